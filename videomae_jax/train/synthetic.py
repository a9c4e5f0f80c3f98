"""A synthetic input stream with the pipeline's interface, for benchmarks and sharding tests.

Batch contents are a pure function of (seed, step, process), like the real pipeline's, so
resume semantics are identical. Smooth moving gradients rather than white noise, so that the
norm-pix targets have structure to learn.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from videomae_jax.data.stats import BadDataStats


class SyntheticVideos:
  def __init__(self, *, global_batch_size: int, num_frames: int, size: int, seed: int,
               process_index: int = 0, process_count: int = 1, start_step: int = 0):
    if global_batch_size % process_count:
      raise ValueError(f"batch {global_batch_size} is not divisible by {process_count} processes")
    self.local = global_batch_size // process_count
    self.shape = (num_frames, size, size, 3)
    self.seed, self.process_index, self.start_step = seed, process_index, start_step
    self.process_count = process_count
    self.stats = BadDataStats(num_files=global_batch_size * 100)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    self._grid = (yy.astype(np.float32), xx.astype(np.float32))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, self.process_index])
    t = np.arange(self.shape[0], dtype=np.float32)[:, None, None]
    yy, xx = self._grid
    out = np.empty((self.local, *self.shape), np.uint8)
    for i in range(self.local):
      f = rng.uniform(1, 4, size=3).astype(np.float32)
      v = rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
      ph = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
      for c in range(3):
        wave = np.sin(2 * np.pi * f[c] * (xx + yy * (c - 1) + v[c] * t) + ph[c])
        out[i, ..., c] = (127.5 + 120 * wave).astype(np.uint8)
    return {"video": out}

  def example(self, global_index: int, epoch: int = 0) -> np.ndarray:
    """Clip `global_index` of `epoch` (uint8 (T, H, W, 3)) as the stream serves it, whichever
    process asks and wherever the stream started. An epoch is `stats.num_files` clips, as for
    the real pipeline."""
    g = epoch * self.stats.num_files + global_index
    global_batch = self.local * self.process_count
    step, j = divmod(g, global_batch)
    owner, i = divmod(j, self.local)
    src = SyntheticVideos(global_batch_size=global_batch, num_frames=self.shape[0],
                          size=self.shape[1], seed=self.seed, process_index=owner,
                          process_count=self.process_count)
    return src.batch(step)["video"][i]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    step = self.start_step
    while True:
      yield self.batch(step)
      step += 1

  def close(self) -> None:
    pass
