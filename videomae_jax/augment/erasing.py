"""Random erasing of a normalised clip, on the device.

The official VideoMAE ``random_erasing.py`` with ``cube=True`` (its default, and what
``kinetics.py`` / ``ssv2.py`` use): with ``probability``, one box (per count) is drawn for the
whole clip and erased on every frame; the fill is drawn per frame. The reference retries up to
100 times for a box that fits; here the 100 candidates are drawn at once and the first that
fits is taken (none fits: nothing is erased), which is the same distribution.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("pixel", "rand", "const")
MIN_AREA, MAX_AREA, MIN_ASPECT = 0.02, 1 / 3, 0.3
TRIES = 100


def _uniform_int(u: jax.Array, n) -> jax.Array:
  """An integer uniform in [0, n) from a uniform(0, 1) draw."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _box(u: jax.Array, height: int, width: int, count, *, min_area: float, max_area: float,
         log_aspect: tuple[float, float]):
  """(found, top, left, h, w) of one box from 2 * TRIES + 2 uniforms ``u``: the first of
  TRIES candidates that fits, at a uniform position."""
  area = height * width
  target = (min_area + (max_area - min_area) * u[:TRIES]) * area / count
  aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[TRIES:2 * TRIES])
  # Python's round() is round-half-to-even, as jnp.round.
  h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits)
  found = fits[first]
  h, w = jnp.where(found, h[first], 0), jnp.where(found, w[first], 0)
  # random.randint(0, H - h): inclusive bounds.
  top = _uniform_int(u[2 * TRIES], height - h + 1)
  left = _uniform_int(u[2 * TRIES + 1], width - w + 1)
  return found, top, left, h, w


def random_erasing(rng: jax.Array, clip: jax.Array, *, probability: float, mode: str = "pixel",
                   count: int = 1, min_area: float = MIN_AREA, max_area: float = MAX_AREA,
                   min_aspect: float = MIN_ASPECT, max_aspect: float | None = None) -> jax.Array:
  """Erases boxes of a normalised float clip (T, H, W, C), the same boxes on every frame.

  ``count`` is the reference's ``max_count``: the clip gets randint(1, count) boxes, each of
  area uniform(min_area, max_area) * H * W / that number. ``mode``: 'pixel' fills each erased
  pixel of each frame with N(0, 1), 'rand' one N(0, 1) colour per frame, 'const' zeros.
  """
  if mode not in MODES:
    raise ValueError(f"random erasing mode {mode!r}: use one of {MODES}")
  t, h, w, c = clip.shape
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  # One uniform draw for every scalar choice (fewer RNG calls compile faster).
  k_uniform, k_fill = jax.random.split(rng)
  u = jax.random.uniform(k_uniform, (2 + count * (2 * TRIES + 2),))
  apply = u[0] <= probability
  n = 1 + _uniform_int(u[1], count) if count > 1 else 1  # randint(1, count)
  u_boxes = u[2:].reshape(count, 2 * TRIES + 2)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  if mode == "pixel":
    # One N(0, 1) field serves every box: overlapping boxes would each draw fresh iid values.
    # Drawn flat: a multi-dimensional draw compiles several times slower on XLA:CPU.
    pixel_fill = jax.random.normal(k_fill, (clip.size,), jnp.float32)
    pixel_fill = pixel_fill.reshape(clip.shape).astype(clip.dtype)
  elif mode == "rand":
    colours = jax.random.normal(k_fill, (count, t, 1, 1, c), jnp.float32).astype(clip.dtype)
  out = clip
  for i in range(count):
    found, top, left, bh, bw = _box(u_boxes[i], h, w, n, min_area=min_area, max_area=max_area,
                                    log_aspect=log_aspect)
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    inside = inside & found & (i < n) & apply
    if mode == "pixel":
      fill = pixel_fill
    elif mode == "rand":
      fill = colours[i]
    else:
      fill = jnp.zeros((), clip.dtype)
    out = jnp.where(inside[None, :, :, None], fill, out)
  return out
