"""Reference clip sampling and the (seed, epoch, example) -> randomness mapping."""
from __future__ import annotations

import functools

import numpy as np


def example_rng(seed: int, epoch: int, example: int, attempt: int = 0) -> np.random.Generator:
  """The generator for one example: a pure function of its coordinates.

  `attempt` > 0 is used for deterministic replacements of undecodable videos.
  """
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(example), int(attempt)])


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_videos: int) -> np.ndarray:
  """The video order of one epoch (cached: consecutive examples share an epoch)."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
  perm = rng.permutation(num_videos)
  perm.flags.writeable = False
  return perm


def sample_frame_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Frame indices of one training clip, as the reference `_sample_train_indices`.

  One window of `num_frames * sampling_rate` frames starts uniformly at random
  (at 0 for videos shorter than the window); frames advance by `sampling_rate`
  and stop advancing near the end of short videos, repeating the last frame.
  As in the reference, a step is taken only while `index + sampling_rate` is at
  most `num_video_frames - 2`, so stepping never lands on the very last frame.
  """
  if num_video_frames < 1:
    raise ValueError(f'video has {num_video_frames} frames')
  skip_length = num_frames * sampling_rate
  average_duration = num_video_frames - skip_length + 1
  start = int(rng.integers(average_duration)) if average_duration > 0 else 0
  # Reference: `if offset + new_step < duration: offset += new_step` with a
  # 1-based offset, i.e. the 0-based index advances while idx + step <= n - 2.
  max_steps = max(0, (num_video_frames - 2 - start) // sampling_rate)
  steps = np.minimum(np.arange(num_frames), max_steps)
  return (start + steps * sampling_rate).astype(np.int64)


# Training samplers selected by `config.data.frame_sampling`.
FRAME_SAMPLINGS = ('pretrain', 'dense', 'segment')


def dense_train_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                        rng: np.random.Generator) -> np.ndarray:
  """Frame indices of one fine-tuning clip, as the official K400 `loadvideo_decord` (train,
  `num_segment=1`).

  A window of `num_frames * sampling_rate` frames ends at `end`, uniform in [window, n);
  its `num_frames` frames are `linspace(end - window, end)` truncated (a step of about
  rate * T / (T - 1), not exactly `rate`). Videos no longer than the window take
  `linspace(0, n, n // rate)` padded with the last frame (every frame is the last one when
  n < rate); no random number is drawn then.
  """
  if num_video_frames < 1:
    raise ValueError(f'video has {num_video_frames} frames')
  n, t = int(num_video_frames), int(num_frames)
  window = t * int(sampling_rate)
  if n <= window:
    k = n // sampling_rate
    index = np.concatenate((np.linspace(0, n, num=k), np.ones(t - k) * n))
    return np.clip(index, 0, n - 1).astype(np.int64)
  end = int(rng.integers(window, n))  # np.random.randint(window, n): end < n.
  start = end - window
  return np.clip(np.linspace(start, end, num=t), start, end - 1).astype(np.int64)


def segment_train_indices(num_video_frames: int, num_frames: int,
                          rng: np.random.Generator) -> np.ndarray:
  """Frame indices of one fine-tuning clip, as the official SSv2 `loadvideo_decord` (train):
  `num_frames` equal segments of n // T frames, one uniformly random frame from each.

  Videos shorter than `num_frames` take frame 0 everywhere, as the official: its other
  fallback (sorted random frames when n > T) is unreachable, n > T implying n // T >= 1.
  """
  if num_video_frames < 1:
    raise ValueError(f'video has {num_video_frames} frames')
  t = int(num_frames)
  avg = int(num_video_frames) // t
  if avg <= 0:
    return np.zeros(t, np.int64)
  return (np.arange(t) * avg + rng.integers(avg, size=t)).astype(np.int64)


def train_frame_indices(num_video_frames: int, data_config,
                        rng: np.random.Generator) -> np.ndarray:
  """The training clip's frame indices under `config.data.frame_sampling`."""
  c = data_config
  mode = c.get('frame_sampling', 'pretrain')
  if mode == 'pretrain':
    return sample_frame_indices(num_video_frames, c.num_frames, c.sampling_rate, rng)
  if mode == 'dense':
    return dense_train_indices(num_video_frames, c.num_frames, c.sampling_rate, rng)
  if mode == 'segment':
    return segment_train_indices(num_video_frames, c.num_frames, rng)
  raise ValueError(f'config.data.frame_sampling={mode!r}; expected one of {FRAME_SAMPLINGS}')


def dense_test_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                       num_clips: int) -> np.ndarray:
  """(num_clips, T) frame indices of the official K400 test views.

  Every `sampling_rate`-th frame (padded to T with the last), and clip c is T consecutive
  of those from int(c * step), step = (len - T) / (num_clips - 1). One clip (where the
  official divides by zero) is the middle one, from (len - T) // 2.
  """
  if num_video_frames < 1:
    raise ValueError(f'video has {num_video_frames} frames')
  if num_clips < 1:
    raise ValueError(f'num_clips={num_clips} < 1')
  t = int(num_frames)
  all_index = list(range(0, int(num_video_frames), int(sampling_rate)))
  all_index += [all_index[-1]] * max(0, t - len(all_index))
  all_index = np.asarray(all_index, np.int64)
  if num_clips == 1:
    starts = [(len(all_index) - t) // 2]
  else:
    step = max(1.0 * (len(all_index) - t) / (num_clips - 1), 0)
    starts = [int(c * step) for c in range(num_clips)]
  return np.stack([all_index[s:s + t] for s in starts])


def segment_test_indices(num_video_frames: int, num_frames: int, num_clips: int) -> np.ndarray:
  """(num_clips, T) frame indices of the official SSv2 test views.

  T equal segments of tick = n / T frames; clip c takes int(tick * c / num_clips + tick * x)
  from segment x. For two clips (the official 2 x 3) that is the official's segment starts
  then segment middles; one clip is the middles (the official's validation samples at
  random, and its test with one clip takes the starts); more than two are spread likewise
  (the official's `buffer[c::2]` gives clips of the wrong length there).
  """
  if num_video_frames < 1:
    raise ValueError(f'video has {num_video_frames} frames')
  if num_clips < 1:
    raise ValueError(f'num_clips={num_clips} < 1')
  t = int(num_frames)
  tick = num_video_frames / float(t)
  if num_clips == 1:
    return np.asarray([[int(tick / 2.0 + tick * x) for x in range(t)]], np.int64)
  return np.asarray([[int(tick * c / num_clips + tick * x) for x in range(t)]
                     for c in range(num_clips)], np.int64)
