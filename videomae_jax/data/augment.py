"""Host crops on uint8 clips: the reference multi-scale crop (GroupMultiScaleCrop) of
pre-training, the official fine-tuning RandomResizedCrop, the test-time short-side resize and
crops along the long side; resize and flip."""
from __future__ import annotations

import math
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


CROPS = ('multiscale', 'random_resized')


def random_resized_crop_box(image_w: int, image_h: int, scale: Sequence[float],
                            ratio: Sequence[float], rng: np.random.Generator,
                            num_repeat: int = 10) -> CropBox:
  """One RandomResizedCrop box, the arithmetic of the official fine-tuning crop
  (`video_transforms._get_param_spatial_crop`, log-uniform aspect ratio).

  Up to `num_repeat` tries of an area fraction uniform in `scale` and a log-uniform aspect
  ratio in `ratio`, sides rounded; the first that fits is placed uniformly (both ends
  included). Then the fallback: the whole frame, narrowed to the nearest allowed aspect
  ratio when the frame's own is outside `ratio`, centred.
  """
  width, height = int(image_w), int(image_h)
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(num_repeat):
    target_area = float(rng.uniform(scale[0], scale[1])) * area
    aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))  # random.randint(0, height - h): inclusive.
      j = int(rng.integers(0, width - w + 1))
      return CropBox(j, i, w, h)
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return CropBox((width - w) // 2, (height - h) // 2, w, h)


def short_side_resize_size(image_w: int, image_h: int, short_side: int) -> tuple[int, int]:
  """(w, h) after the official test `video_transforms.Resize(short_side)`: the short side
  becomes `short_side` and the long side `int(short_side * long / short)` (truncated)."""
  if image_w < image_h:
    return int(short_side), int(short_side * image_h / image_w)
  return int(short_side * image_w / image_h), int(short_side)


def long_side_crop_offsets(image_w: int, image_h: int, size: int,
                           num_crops: int) -> list[tuple[int, int]]:
  """(x, y) of the official test crops of `size` x `size` on a frame whose short side is
  `size`: `num_crops` evenly spaced along the long side, int(k * (long - size) /
  (num_crops - 1)); along the height when h >= w. One crop (where the official divides by
  zero) is the centre crop of its validation `CenterCrop`: int(round((long - size) / 2)).
  """
  if num_crops < 1:
    raise ValueError(f'num_crops={num_crops} < 1')
  long_side = max(image_w, image_h)
  if num_crops == 1:
    starts = [int(round((long_side - size) / 2.))]
  else:
    step = 1.0 * (long_side - size) / (num_crops - 1)
    starts = [int(k * step) for k in range(num_crops)]
  if image_h >= image_w:
    return [(0, s) for s in starts]
  return [(s, 0) for s in starts]


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(T, h, w, 3) frames to (T, size[1], size[0], 3) with OpenCV bilinear (the official
  test resize, `functional.resize_clip`); unchanged when already that size."""
  _single_threaded_cv2()
  w, h = size
  if frames.shape[1:3] == (h, w):
    return frames
  out = np.empty((len(frames), h, w, 3), np.uint8)
  for t in range(len(frames)):
    cv2.resize(frames[t], (w, h), dst=out[t], interpolation=cv2.INTER_LINEAR)
  return out


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


# TensorFlow takes a numpy_function's output without a copy only when its buffer is aligned
# to 64 bytes; numpy's large allocations are 16 bytes off (0.13 ms per 16x224 clip).
_ALIGN = 64


def aligned_empty(shape: Sequence[int]) -> np.ndarray:
  """An uninitialised uint8 array of `shape` whose buffer starts on a 64-byte boundary."""
  n = int(np.prod(shape))
  buf = np.empty(n + _ALIGN, np.uint8)
  off = (-buf.ctypes.data) % _ALIGN
  return buf[off:off + n].reshape(shape)


def _interpolation(h: int, w: int, input_size: int) -> int:
  """Area interpolation when shrinking by `AREA_SHRINK_FACTOR` or more (close to PIL's
  antialiased bilinear of the reference), bilinear otherwise."""
  return cv2.INTER_AREA if min(w, h) >= AREA_SHRINK_FACTOR * input_size else cv2.INTER_LINEAR


def resize_into(crop: np.ndarray, dst: np.ndarray, flip: bool = False) -> None:
  """One (h, w, 3) crop resized into `dst` (S, S, 3), optionally flipped (in place)."""
  _single_threaded_cv2()
  size = dst.shape[0]
  cv2.resize(crop, (size, size), dst=dst, interpolation=_interpolation(*crop.shape[:2], size))
  if flip:
    cv2.flip(dst, 1, dst=dst)


def resize_crops(crops: Sequence[np.ndarray] | np.ndarray, input_size: int,
                 flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
  """The T (h, w, 3) crops of one clip (an array or a list of views) to (T, input_size,
  input_size, 3), optionally flipped, written into `out` when given (`resize_into` each)."""
  if out is None:
    out = aligned_empty((len(crops), input_size, input_size, 3))
  for t in range(len(crops)):
    resize_into(crops[t], out[t], flip)
  return out


def crop_resize(frames: np.ndarray, box: CropBox, stored_size: tuple[int, int],
                input_size: int, flip: bool = False, out: np.ndarray | None = None
                ) -> np.ndarray:
  """Applies one crop (given in stored-video pixels) to every frame of a clip.

  `frames` (T, h, w, 3) uint8 may be decoded at a reduced resolution; the box is
  scaled to it (`frame_box`), so the crop covers the same part of the scene as on the
  stored video; then `resize_crops` (into `out` when given).
  """
  x0, y0, x1, y1 = frame_box(box, stored_size, (frames.shape[2], frames.shape[1]))
  return resize_crops(frames[:, y0:y1, x0:x1], input_size, flip, out)


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
