"""Turns one example coordinate (seed, epoch, global example index) into uint8 clips."""
from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

import numpy as np

from videomae_jax.data import augment
from videomae_jax.data import readers
from videomae_jax.data import sampling
from videomae_jax.data.sources import VideoRecord
from videomae_jax.data.stats import BadDataError, BadDataStats


def auto_decode_short_side(data_config) -> int:
  """`decode_short_side`, with 0 meaning: large enough that no crop is upsampled."""
  if data_config.get('decode_short_side', 0):
    return int(data_config.decode_short_side)
  return int(math.ceil(data_config.input_size / min(data_config.scales)))


def make_clips(video: readers.VideoFile, rng: np.random.Generator, data_config,
               num_frames_override: int | None = None) -> np.ndarray:
  """Samples one window of `video`, decodes it once and crops it `num_sample` times.

  Returns (num_sample, T, input_size, input_size, 3) uint8. The window is shared
  by the `num_sample` clips (repeated sampling); each gets its own crop and flip.
  """
  c = data_config
  n = num_frames_override or video.num_frames
  if n < max(1, c.get('min_frames', 1)):
    raise readers.DecodeError(f'{video.path}: too short ({n} frames, min_frames={c.min_frames})')
  idx = sampling.sample_frame_indices(n, c.num_frames, c.sampling_rate, rng)
  frames = video.get_frames(idx)
  if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
    raise readers.DecodeError(f'{video.path}: decoder returned frames of shape {frames.shape}')
  stored_w, stored_h = video.stored_size or (frames.shape[2], frames.shape[1])
  out = []
  for _ in range(c.num_sample):
    box = augment.sample_crop_box(stored_w, stored_h, c.input_size, tuple(c.scales),
                                  c.get('max_distort', 1), rng)
    flip = bool(c.flip) and bool(rng.integers(2))
    out.append(augment.crop_resize(frames, box, (stored_w, stored_h), c.input_size, flip))
  return np.stack(out)


def _call_with_timeout(fn: Callable[[], np.ndarray], timeout_s: float) -> np.ndarray:
  """Runs `fn` in a daemon thread and gives up after `timeout_s`.

  A hung decoder cannot be killed from Python; its thread is abandoned (daemon,
  so it never blocks process exit) and the example is replaced.
  """
  if not timeout_s or timeout_s <= 0:
    return fn()
  result: list = []

  def target():
    try:
      result.append((True, fn()))
    except BaseException as e:  # pylint: disable=broad-except
      result.append((False, e))

  t = threading.Thread(target=target, daemon=True, name='video-decode')
  t.start()
  t.join(timeout_s)
  if not result:
    raise TimeoutError(f'decode did not finish within {timeout_s} s')
  ok, value = result[0]
  if not ok:
    raise value
  return value


class ClipDecoder:
  """Decodes examples of a file source with deterministic replacement of bad videos.

  Example `g` of the infinite stream belongs to epoch `g // N` and shows video
  `perm(seed, epoch)[g % N]`; its window, crops and flips come from
  `example_rng(seed, epoch, g)`. A video that fails is recorded in `stats` and
  the example is served by video `example_rng(seed, epoch, g, attempt)` instead,
  so the result depends only on (seed, epoch, g) and on which files are bad.
  """

  def __init__(self, records: Sequence[VideoRecord], data_config,
               stats: BadDataStats | None = None):
    if not records:
      raise ValueError('empty video source')
    self.records = list(records)
    self.config = data_config
    self.stats = stats or BadDataStats()
    self.stats.num_files = len(self.records)
    self._short_side = auto_decode_short_side(data_config)

  def _decode(self, path: str, rng_factory: Callable[[], np.random.Generator]) -> np.ndarray:
    c = self.config
    video = readers.open_video(path, c.reader, self._short_side)
    try:
      return make_clips(video, rng_factory(), c)
    except readers.ShortRead as e:
      # The header overstated the frame count: sample again (same randomness)
      # over the frames that really exist.
      video.close()
      video = readers.open_video(path, c.reader, self._short_side)
      return make_clips(video, rng_factory(), c, num_frames_override=e.num_frames)
    finally:
      video.close()

  def load_example(self, example: int) -> dict[str, np.ndarray]:
    """Clips of global example `example`: video (S, T, H, W, 3) uint8, label, index, example."""
    c = self.config
    n = len(self.records)
    epoch, pos = divmod(int(example), n)
    for attempt in range(int(c.get('max_replacements', 16)) + 1):
      if attempt == 0:
        vid = int(sampling.epoch_permutation(int(c.seed), epoch, n)[pos])
      else:
        vid = int(sampling.example_rng(c.seed, epoch, example, attempt).integers(n))
      rec = self.records[vid]
      if self.stats.is_bad(rec.path):
        continue
      # Attempt-specific stream, separate from the replacement draw above.
      rng_factory = lambda a=attempt: sampling.example_rng(c.seed, epoch, example, 1000 + a)
      try:
        clips = _call_with_timeout(lambda: self._decode(rec.path, rng_factory),
                                   float(c.get('decode_timeout_s', 0)))
      except TimeoutError as e:
        self.stats.record_failure(rec.path, str(e), timeout=True)
        self.stats.check(float(c.max_bad_fraction))
        continue
      except (readers.DecodeError, RuntimeError, ValueError, OSError, MemoryError) as e:
        self.stats.record_failure(rec.path, f'{type(e).__name__}: {e}')
        self.stats.check(float(c.max_bad_fraction))
        continue
      self.stats.record_success(replaced=attempt > 0)
      s = clips.shape[0]
      return {
          'video': clips,
          'label': np.full((s,), rec.label, np.int32),
          'index': np.full((s,), vid, np.int64),
          'example': np.full((s,), example, np.int64),
      }
    raise BadDataError(
        f'example {example}: no decodable video after {c.get("max_replacements", 16)} '
        f'replacements; {len(self.stats.bad_files)} of {n} files are bad so far')
