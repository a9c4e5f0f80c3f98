"""Token masks drawn with ``jax.random`` inside jit, with static shapes.

Every mask is a :class:`Mask`: the boolean ``(B, N)`` array (True = masked) plus the sorted
index arrays the model gathers with. Because every sample masks the same number of tokens, the
index arrays have static shapes and the encoder never sees a masked token.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Grid = Sequence[int]  # (T', H', W'): tokens along time, height, width


@flax.struct.dataclass
class Mask:
  """A batch of token masks with the same masked count in every row.

  Attributes:
    masked: bool (B, N), True where the token is masked (hidden from the encoder).
    visible_idx: int32 (B, N_visible), ascending token indices with ``masked`` False.
    masked_idx: int32 (B, N_masked), ascending token indices with ``masked`` True.
    grid: the token grid (T', H', W') the mask was drawn for, or None when unknown (a bare
      bool array). Static (pytree aux data): with the video's shape it fixes the tubelet and
      patch size, so the loss needs no geometry arguments.
  """

  masked: jax.Array
  visible_idx: jax.Array
  masked_idx: jax.Array
  grid: tuple[int, int, int] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_tokens(self) -> int:
    return self.masked.shape[1]

  @property
  def num_masked(self) -> int:
    return self.masked_idx.shape[1]

  @property
  def num_visible(self) -> int:
    return self.visible_idx.shape[1]


def _num_tokens(grid: Grid) -> int:
  if len(grid) != 3 or any(int(g) <= 0 for g in grid):
    raise ValueError(f"grid must be (T', H', W') token counts, got {tuple(grid)}")
  return int(np.prod(grid))


def _check_grid(grid: Grid | None, num_tokens: int, name: str = "mask"
                ) -> tuple[int, int, int] | None:
  if grid is None:
    return None
  g = tuple(int(x) for x in grid)
  if _num_tokens(g) != num_tokens:
    raise ValueError(f"{name} has {num_tokens} tokens per sample but grid {g} has "
                     f"{_num_tokens(g)}")
  return g


def mask_from_indices(masked_idx: jax.Array, num_tokens: int, grid: Grid | None = None) -> Mask:
  """Builds a :class:`Mask` from per-row masked token indices (any order, no duplicates)."""
  grid = _check_grid(grid, num_tokens)
  masked_idx = jnp.sort(masked_idx.astype(jnp.int32), axis=-1)
  b, k = masked_idx.shape
  masked = jnp.zeros((b, num_tokens), bool).at[jnp.arange(b)[:, None], masked_idx].set(True)
  # Stable argsort of the bool puts visible tokens first, each group in ascending order.
  visible_idx = jnp.argsort(masked, axis=-1, stable=True)[:, : num_tokens - k].astype(jnp.int32)
  return Mask(masked=masked, visible_idx=visible_idx, masked_idx=masked_idx, grid=grid)


def mask_from_bool(masked, grid: Grid | None = None, *, name: str = "mask") -> Mask:
  """A :class:`Mask` from a concrete bool ``(B, N)`` array (True = masked), or a Mask as is.

  The one normaliser of encoder and decoder masks (the model and the loss use it for both).
  The masked count must be static, so a bool array must be concrete (numpy or a committed jax
  array), and every row must mask the same number of tokens. ``grid`` (T', H', W') is attached
  when given; a Mask whose own grid differs is an error. ``name`` is used in error messages.
  """
  if isinstance(masked, Mask):
    if grid is None:
      return masked
    g = _check_grid(grid, masked.num_tokens, name)
    if masked.grid is not None and masked.grid != g:
      raise ValueError(f"{name} was drawn for grid {masked.grid}, expected {g}")
    return masked if masked.grid == g else masked.replace(grid=g)
  if isinstance(masked, jax.core.Tracer):
    raise TypeError(
        f"a traced bool {name} has no static masked count; inside jit pass a masking.Mask "
        "(e.g. from masking.tube_mask) instead of its .masked array")
  m = np.asarray(masked)
  if m.ndim != 2 or m.dtype != np.bool_:
    raise ValueError(f"{name} must be a bool array of shape (B, N) or a masking.Mask, got "
                     f"{m.dtype} {m.shape}")
  g = _check_grid(grid, m.shape[1], name)
  counts = m.sum(axis=1)
  if not (counts == counts[0]).all():
    raise ValueError(
        f"{name} rows mask different numbers of tokens ({sorted(set(counts.tolist()))}); every "
        "sample must mask the same count")
  order = np.argsort(m, axis=1, kind="stable").astype(np.int32)
  k = int(counts[0])
  return Mask(masked=jnp.asarray(m), visible_idx=jnp.asarray(order[:, : m.shape[1] - k]),
              masked_idx=jnp.asarray(order[:, m.shape[1] - k:]), grid=g)


def _random_subset(rng: jax.Array, batch: int, n: int, k: int) -> jax.Array:
  """(batch, k) distinct indices in [0, n), uniformly at random per row."""
  noise = jax.random.uniform(rng, (batch, n))
  return jnp.argsort(noise, axis=-1)[:, :k]


def tube_mask(rng: jax.Array, batch: int, grid: Grid, ratio: float) -> Mask:
  """Tube masking: one random spatial mask per sample, shared by every temporal slot.

  Exactly ``int(ratio * H'*W')`` tokens are masked per temporal slot, as in the reference.
  """
  n = _num_tokens(grid)
  t, h, w = (int(g) for g in grid)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  per_frame = int(ratio * h * w)
  spatial = jnp.sort(_random_subset(rng, batch, h * w, per_frame), axis=-1)
  # Tokens are t-major, so offsetting the sorted spatial indices per slot keeps them sorted.
  masked_idx = (jnp.arange(t)[:, None] * (h * w) + spatial[:, None, :]).reshape(batch, -1)
  return mask_from_indices(masked_idx, n, grid)


def random_mask(rng: jax.Array, batch: int, grid: Grid, ratio: float) -> Mask:
  """Uniform random masking over all space-time tokens: ``int(ratio * N)`` masked per sample."""
  n = _num_tokens(grid)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  return mask_from_indices(_random_subset(rng, batch, n, int(ratio * n)), n, grid)


def running_cell_maps(grid: Grid, ratio: float = 0.5) -> np.ndarray:
  """All maps of the VideoMAE V2 "run_cell" decoder mask, (cell_size, N) bool, True = dropped.

  A 2x2 cell holds ``int(4 * ratio)`` dropped positions in a queue that shifts by one position
  per temporal slot; the cell is tiled over (H'/2, W'/2). Map ``i`` starts the queue at ``i``.
  """
  _num_tokens(grid)
  t, h, w = (int(g) for g in grid)
  if h % 2 or w % 2:
    raise ValueError(f"running-cell masks need an even spatial token grid, got {h}x{w}")
  num_drop = int(4 * ratio)
  if not 0 < num_drop < 4:
    raise ValueError(f"running-cell ratio must give 1-3 dropped cells of 4, got {ratio}")
  queue = np.concatenate([np.ones(num_drop), np.zeros(4 - num_drop)])
  maps = []
  for start in range(4):
    frames = []
    for slot in range(t):
      ptr = start + slot + 1  # the reference advances the pointer before reading each slot
      cell = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
      frames.append(np.tile(cell, (h // 2, w // 2)))
    maps.append(np.stack(frames).reshape(-1))
  return np.stack(maps).astype(bool)


def running_cell_mask(rng: jax.Array, batch: int, grid: Grid, ratio: float = 0.5) -> Mask:
  """VideoMAE V2 decoder mask: each sample takes one of the running-cell maps at random.

  ``masked`` marks the tokens the decoder drops; ``visible_idx`` are the tokens it reconstructs.
  """
  maps = running_cell_maps(grid, ratio)
  n = maps.shape[1]
  k = int(maps[0].sum())
  dropped_idx = jnp.asarray(np.nonzero(maps)[1].reshape(len(maps), k).astype(np.int32))
  kept_idx = jnp.asarray(np.nonzero(~maps)[1].reshape(len(maps), n - k).astype(np.int32))
  choice = jax.random.randint(rng, (batch,), 0, len(maps))
  return Mask(masked=jnp.asarray(maps)[choice], visible_idx=kept_idx[choice],
              masked_idx=dropped_idx[choice], grid=tuple(int(g) for g in grid))


MASKERS = {"tube": tube_mask, "random": random_mask}
