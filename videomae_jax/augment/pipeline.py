"""The fine-tuning augmentation of a batch, on the device, in the official order.

Per clip (own key): RandAugment on uint8 -> horizontal flip (p = 0.5) -> ImageNet normalisation
-> random erasing; then per batch: mixup / CutMix with smoothed targets, or smoothed one-hots
alone. The host has already cropped the clips (the official code crops between RandAugment and
erasing, so its RandAugment sees the uncropped frames).
"""
from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp

from videomae_jax.augment.erasing import random_erasing
from videomae_jax.augment.mixup import mixup_cutmix, smooth_one_hot
from videomae_jax.augment.randaugment import rand_augment
from videomae_jax.normalization import normalize


def mixing_active(cfg) -> bool:
  """Whether the config mixes clips (timm: an alpha > 0), given a non-zero probability."""
  return (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0


def augment_clip(rng: jax.Array, clip_u8: jax.Array, cfg) -> jax.Array:
  """One (T, H, W, 3) uint8 clip -> normalised float32, every per-clip step of ``cfg``."""
  k_ra, k_flip, k_erase = jax.random.split(rng, 3)
  if cfg.randaugment:
    clip_u8 = rand_augment(k_ra, clip_u8, cfg.randaugment)
  if cfg.flip:
    clip_u8 = jnp.where(jax.random.uniform(k_flip) < 0.5, dm_pix.flip_left_right(clip_u8),
                        clip_u8)
  x = normalize(clip_u8, jnp.float32)
  if cfg.reprob > 0:
    x = random_erasing(k_erase, x, probability=float(cfg.reprob), mode=cfg.remode,
                       count=int(cfg.recount))
  return x


def augment_batch(rng: jax.Array, video_u8: jax.Array, labels: jax.Array, cfg, *,
                  num_classes: int, dtype=jnp.float32, num_groups: int = 1):
  """(B, T, H, W, 3) uint8 clips and int labels (B,) -> (video (B, T, H, W, 3) in ``dtype``,
  ImageNet-normalised and augmented; soft targets float32 (B, num_classes)).

  ``cfg`` is a :func:`default_aug_config`-shaped config (read at trace time). ``num_groups``:
  mixup pairs clips within each of that many contiguous groups (the per-device shards).
  """
  k_clips, k_mix = jax.random.split(rng)
  keys = jax.random.split(k_clips, video_u8.shape[0])
  x = jax.vmap(lambda k, c: augment_clip(k, c, cfg))(keys, video_u8)
  if mixing_active(cfg):
    x, targets = mixup_cutmix(k_mix, x, labels, num_classes=num_classes,
                              mixup_alpha=float(cfg.mixup), cutmix_alpha=float(cfg.cutmix),
                              prob=float(cfg.mixup_prob), switch_prob=float(cfg.switch_prob),
                              smoothing=float(cfg.smoothing), num_groups=num_groups)
  else:
    targets = smooth_one_hot(labels, num_classes, float(cfg.smoothing))
  return x.astype(dtype), targets
