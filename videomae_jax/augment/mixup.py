"""Mixup / CutMix with label smoothing on a batch of clips, on the device.

timm's ``Mixup(mode='batch', correct_lam=True)`` (what the official fine-tuning uses): one
lambda per batch, each clip mixed with the clip at the mirrored position (``x.flip(0)``), CutMix
boxes over height and width, the same box on every frame, lambda corrected to the box's area.
Videos here are channels-last (B, T, H, W, C). ``num_groups`` > 1 mixes each contiguous group
(the per-device shards) on its own, as the official code mixes each GPU's local batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Box = tuple  # (y_low, y_high, x_low, x_high), half-open, int32 scalars


class MixParams(NamedTuple):
  """One group's draw: the target weight, whether CutMix is used, and its box."""
  lam: jax.Array        # float32; 1.0 = no mixing
  use_cutmix: jax.Array  # bool
  box: Box


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """timm's one-hot with label smoothing: off = smoothing / K, on = 1 - smoothing + off."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.where(hot > 0, jnp.float32(on), jnp.float32(off))


def cutmix_box(lam, cy, cx, height: int, width: int) -> Box:
  """timm 1.0's ``rand_bbox`` for a given centre: a box of int(H * sqrt(1 - lam)) by
  int(W * sqrt(1 - lam)) around (cy, cx), clipped to the image."""
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  return yl, yh, xl, xh


def box_lam(box: Box, height: int, width: int) -> jax.Array:
  """timm's ``correct_lam``: 1 - box area / image area."""
  yl, yh, xl, xh = box
  return 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(height * width)


def mixup_cutmix_with(video: jax.Array, labels: jax.Array, *, lam, box: Box | None,
                      use_cutmix=None, num_classes: int, smoothing: float = 0.0):
  """The deterministic core of timm's ``Mixup._mix_batch`` + ``mixup_target`` on one batch.

  ``video`` (B, T, H, W, C) float, ``labels`` int (B,). Mixup: ``x * lam + x.flip(0) *
  (1 - lam)``. CutMix (``box`` given and ``use_cutmix`` true, the default when a box is given):
  the box of every frame is taken from the mirrored clip; ``lam`` is used as given (pass the
  corrected one). Targets: smoothed one-hots mixed with the mirrored ones by ``lam``.
  Returns (video, soft targets float32 (B, num_classes)).
  """
  lam = jnp.asarray(lam, jnp.float32)
  flipped = jnp.flip(video, axis=0)
  mixed = video * lam.astype(video.dtype) + flipped * (1.0 - lam).astype(video.dtype)
  if box is not None:
    h, w = video.shape[2], video.shape[3]
    yl, yh, xl, xh = box
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    cut = jnp.where(inside[None, None, :, :, None], flipped, video)
    use_cutmix = True if use_cutmix is None else use_cutmix
    mixed = jnp.where(use_cutmix, cut, mixed)
  y1 = smooth_one_hot(labels, num_classes, smoothing)
  targets = y1 * lam + jnp.flip(y1, axis=0) * (1.0 - lam)
  return mixed, targets


def _symmetric_beta(rng: jax.Array, u: jax.Array, alpha: float) -> jax.Array:
  """One Beta(alpha, alpha) sample. For alpha > 1/2 Ulrich's exact transform of two uniforms
  ``u`` (1/2 + 1/2 sqrt(1 - u0^(2 / (2 alpha - 1))) cos(2 pi u1)), which compiles far faster
  than a gamma rejection loop; otherwise sigmoid(log G1 - log G2) of two gammas."""
  if alpha > 0.5:
    radius = jnp.sqrt(1.0 - u[0] ** (2.0 / (2.0 * alpha - 1.0)))
    return jnp.clip(0.5 + 0.5 * radius * jnp.cos(2.0 * jnp.pi * u[1]), 0.0, 1.0)
  lg = jax.random.loggamma(rng, jnp.full((2,), alpha, jnp.float32))
  return jax.nn.sigmoid(lg[0] - lg[1])


def draw_mix_params(rng: jax.Array, height: int, width: int, *, mixup_alpha: float,
                    cutmix_alpha: float, prob: float, switch_prob: float) -> MixParams:
  """timm's ``_params_per_batch`` + ``cutmix_bbox_and_lam`` for one group."""
  k_uniform, k_mix, k_cut = jax.random.split(rng, 3)
  # One uniform draw for the scalar choices (fewer RNG calls compile faster).
  u = jax.random.uniform(k_uniform, (8,))
  u_prob, u_switch, u_cy, u_cx = u[0], u[1], u[2], u[3]
  do_mix = u_prob < prob
  lam_mix = _symmetric_beta(k_mix, u[4:6], mixup_alpha) if mixup_alpha > 0 else None
  lam_cut = _symmetric_beta(k_cut, u[6:8], cutmix_alpha) if cutmix_alpha > 0 else None
  if lam_mix is not None and lam_cut is not None:
    use_cutmix = u_switch < switch_prob
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  elif lam_mix is not None:
    use_cutmix, lam = jnp.zeros((), bool), lam_mix
  elif lam_cut is not None:
    use_cutmix, lam = jnp.ones((), bool), lam_cut
  else:
    raise ValueError("mixup_alpha or cutmix_alpha must be > 0")
  lam = jnp.where(do_mix, lam.astype(jnp.float32), 1.0)
  use_cutmix = use_cutmix & do_mix
  cy = jnp.minimum(jnp.floor(u_cy * height).astype(jnp.int32), height - 1)
  cx = jnp.minimum(jnp.floor(u_cx * width).astype(jnp.int32), width - 1)
  box = cutmix_box(lam, cy, cx, height, width)
  lam = jnp.where(use_cutmix, box_lam(box, height, width), lam)
  return MixParams(lam, use_cutmix, box)


def mixup_cutmix_groups(video: jax.Array, labels: jax.Array, params: MixParams, *,
                        num_classes: int, smoothing: float = 0.0):
  """:func:`mixup_cutmix_with` on each of G contiguous groups of the batch, ``params`` stacked
  with a leading G axis (one draw per group). Returns (video, targets (B, num_classes))."""
  b, t, h, w, c = video.shape
  groups = params.lam.shape[0]
  if b % groups:
    raise ValueError(f"batch {b} is not divisible into {groups} mixup groups")

  def one(p, v, y):
    return mixup_cutmix_with(v, y, lam=p.lam, box=p.box, use_cutmix=p.use_cutmix,
                             num_classes=num_classes, smoothing=smoothing)

  g = b // groups
  v, y = jax.vmap(one)(params, video.reshape(groups, g, t, h, w, c), labels.reshape(groups, g))
  return v.reshape(video.shape), y.reshape(b, num_classes)


def mixup_cutmix(rng: jax.Array, video: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 smoothing: float, num_groups: int = 1):
  """timm ``Mixup(mode='batch')`` on (B, T, H, W, C) ``video``, one draw per group of
  B / num_groups contiguous clips, flips within each group. Returns (video, targets float32
  (B, num_classes))."""
  b, h, w = video.shape[0], video.shape[2], video.shape[3]
  if b % num_groups:
    raise ValueError(f"batch {b} is not divisible into {num_groups} mixup groups")
  params = jax.vmap(lambda k: draw_mix_params(
      k, h, w, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
      switch_prob=switch_prob))(jax.random.split(rng, num_groups))
  return mixup_cutmix_groups(video, labels, params, num_classes=num_classes,
                             smoothing=smoothing)
