"""Reference multi-scale crop (GroupMultiScaleCrop), resize and flip on uint8 clips."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np

_cv2_single_threaded = False


def _single_threaded_cv2() -> None:
  """Turns OpenCV's own thread pool off (process-wide), once, when clips are first rendered:
  the pipeline already runs one clip per worker thread. Not at import, which must not change
  the threading of a process that only imports this module."""
  global _cv2_single_threaded
  if not _cv2_single_threaded:
    cv2.setNumThreads(1)
    _cv2_single_threaded = True


class CropBox(NamedTuple):
  """A crop in pixel coordinates of the stored video: offsets and size."""
  x: int
  y: int
  w: int
  h: int


def fixed_offsets(image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
  """The 13 fixed (x, y) offsets of the reference (`more_fix_crop=True`)."""
  ws = (image_w - crop_w) // 4
  hs = (image_h - crop_h) // 4
  return [
      (0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
      (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
      (1 * ws, 1 * hs), (3 * ws, 1 * hs), (1 * ws, 3 * hs), (3 * ws, 3 * hs),
  ]


def sample_crop_box(image_w: int, image_h: int, input_size: int, scales: Sequence[float],
                    max_distort: int, rng: np.random.Generator) -> CropBox:
  """One multi-scale crop, exactly the reference's choice set and snapping rule.

  Crop sides are `int(short_side * scale)`, snapped to `input_size` when within
  3 pixels of it; (w, h) pairs whose scale indices differ by at most
  `max_distort`; then one of the 13 fixed offsets.
  """
  base = min(image_w, image_h)
  sizes = [int(base * s) for s in scales]
  sizes = [input_size if abs(s - input_size) < 3 else s for s in sizes]
  pairs = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes)
           if abs(i - j) <= max_distort]
  crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
  offsets = fixed_offsets(image_w, image_h, crop_w, crop_h)
  x, y = offsets[int(rng.integers(len(offsets)))]
  return CropBox(x, y, crop_w, crop_h)


def frame_box(box: CropBox, stored_size: tuple[int, int],
              frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
  """`box` (stored-video pixels) in pixels of a frame of `frame_size` (w, h): (x0, y0, x1, y1).

  The rounding every renderer uses, so a crop covers the same part of the scene whatever
  resolution its frames were decoded at.
  """
  stored_w, stored_h = stored_size
  w, h = frame_size
  sx, sy = w / stored_w, h / stored_h
  x0, y0 = int(round(box.x * sx)), int(round(box.y * sy))
  x1 = min(w, max(x0 + 1, int(round((box.x + box.w) * sx))))
  y1 = min(h, max(y0 + 1, int(round((box.y + box.h) * sy))))
  return x0, y0, x1, y1


# Shrinking by less than this factor uses bilinear interpolation: its aliasing is negligible
# there and it costs half of area interpolation (256 -> 224 px: 0.09 against 0.17 ms a frame).
AREA_SHRINK_FACTOR = 1.5


def resize_crops(crops: Sequence[np.ndarray] | np.ndarray, input_size: int,
                 flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
  """The T (h, w, 3) crops of one clip (an array or a list of views) to (T, input_size,
  input_size, 3), optionally flipped, written into `out` when given.

  Shrinking by `AREA_SHRINK_FACTOR` or more uses area interpolation (close to PIL's
  antialiased bilinear of the reference), anything else bilinear.
  """
  _single_threaded_cv2()
  h, w = crops[0].shape[:2]
  area = min(w, h) >= AREA_SHRINK_FACTOR * input_size
  interp = cv2.INTER_AREA if area else cv2.INTER_LINEAR
  if out is None:
    out = np.empty((len(crops), input_size, input_size, 3), np.uint8)
  for t in range(len(crops)):
    cv2.resize(crops[t], (input_size, input_size), dst=out[t], interpolation=interp)
  if flip:
    out[...] = out[:, :, ::-1]  # numpy buffers overlapping copies.
  return out


def crop_resize(frames: np.ndarray, box: CropBox, stored_size: tuple[int, int],
                input_size: int, flip: bool = False) -> np.ndarray:
  """Applies one crop (given in stored-video pixels) to every frame of a clip.

  `frames` (T, h, w, 3) uint8 may be decoded at a reduced resolution; the box is
  scaled to it (`frame_box`), so the crop covers the same part of the scene as on the
  stored video; then `resize_crops`.
  """
  x0, y0, x1, y1 = frame_box(box, stored_size, (frames.shape[2], frames.shape[1]))
  return resize_crops(frames[:, y0:y1, x0:x1], input_size, flip)


def decode_size(stored_w: int, stored_h: int, short_side: int) -> tuple[int, int] | None:
  """(w, h) to decode at so the short side is `short_side`; None keeps the stored size.

  Returns None unless that saves at least ~25% of the pixels: resizing in the
  decoder is not free, and small savings do not pay for it.
  """
  if short_side <= 0 or min(stored_w, stored_h) * 0.87 <= short_side:
    return None
  scale = short_side / min(stored_w, stored_h)
  # Even sizes: some scalers and chroma layouts require them.
  w = max(2, int(round(stored_w * scale / 2)) * 2)
  h = max(2, int(round(stored_h * scale / 2)) * 2)
  return w, h
