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
