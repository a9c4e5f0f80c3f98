"""Device-side fine-tuning augmentation: RandAugment, flip, random erasing, mixup / CutMix.

Everything runs inside the jitted train step on uint8 clips the host has decoded and cropped:
per clip with its own key, static shapes, no host callbacks.
"""
from __future__ import annotations

import math

import ml_collections

from videomae_jax.augment.erasing import random_erasing
from videomae_jax.augment.mixup import (MixParams, box_lam, cutmix_box, draw_mix_params,
                                        mixup_cutmix, mixup_cutmix_groups, mixup_cutmix_with,
                                        smooth_one_hot)
from videomae_jax.augment.pipeline import augment_batch, augment_clip, mixing_active
from videomae_jax.augment.randaugment import (Policy, apply_op, level_to_arg, parse_policy,
                                              rand_augment)

MIXUP_MODES = ("batch",)
REMODES = ("pixel", "rand", "const")

__all__ = [
    "MixParams", "Policy", "apply_op", "augment_batch", "augment_clip", "box_lam", "cutmix_box",
    "default_aug_config", "draw_mix_params", "level_to_arg", "mixing_active", "mixup_cutmix",
    "mixup_cutmix_groups", "mixup_cutmix_with", "parse_policy", "rand_augment",
    "random_erasing", "smooth_one_hot", "validate_aug_config",
]


def default_aug_config() -> ml_collections.ConfigDict:
  """The official fine-tuning defaults (``run_class_finetuning.py``); SSv2 sets flip=False."""
  return ml_collections.ConfigDict(dict(
      randaugment="rand-m7-n4-mstd0.5-inc1",  # timm policy; '' = off
      flip=True,            # horizontal flip, p = 0.5 per clip
      reprob=0.25,          # random erasing probability (0 = off)
      remode="pixel",       # 'pixel' | 'rand' | 'const'
      recount=1,            # at most this many erased boxes per clip
      mixup=0.8,            # mixup alpha (0 = off)
      cutmix=1.0,           # cutmix alpha (0 = off)
      mixup_prob=1.0,       # probability of mixing a batch
      switch_prob=0.5,      # probability of cutmix when both are on
      mixup_mode="batch",
      smoothing=0.1,        # label smoothing
  ))


def _unit(cfg, name: str) -> None:
  v = cfg[name]
  if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
    raise ValueError(f"config.aug.{name}={v!r}: must be a probability in [0, 1]")


def validate_aug_config(cfg) -> None:
  """Raises ValueError naming the field (``config.aug.<field>``) for a bad value."""
  missing = set(default_aug_config()) - set(cfg)
  if missing:
    raise ValueError(f"config.aug is missing {sorted(missing)}")
  if not isinstance(cfg.randaugment, str):
    raise ValueError(f"config.aug.randaugment={cfg.randaugment!r}: a timm policy string "
                     "such as 'rand-m7-n4-mstd0.5-inc1', or '' for none")
  if cfg.randaugment:
    try:
      parse_policy(cfg.randaugment)
    except ValueError as e:
      raise ValueError(f"config.aug.randaugment: {e}") from None
  if not isinstance(cfg.flip, bool):
    raise ValueError(f"config.aug.flip={cfg.flip!r}: must be True or False")
  for name in ("reprob", "mixup_prob", "switch_prob"):
    _unit(cfg, name)
  if cfg.remode not in REMODES:
    raise ValueError(f"config.aug.remode={cfg.remode!r}: use one of {REMODES}")
  if not isinstance(cfg.recount, int) or isinstance(cfg.recount, bool) or cfg.recount < 1:
    raise ValueError(f"config.aug.recount={cfg.recount!r}: must be an integer >= 1")
  for name in ("mixup", "cutmix"):
    v = cfg[name]
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
        or v < 0):
      raise ValueError(f"config.aug.{name}={v!r}: a Beta alpha must be >= 0 (0 = off)")
  if cfg.mixup_mode not in MIXUP_MODES:
    if cfg.mixup_mode in ("pair", "elem"):
      raise ValueError(f"config.aug.mixup_mode={cfg.mixup_mode!r} is not supported on the "
                       "device; use 'batch' (the official default)")
    raise ValueError(f"config.aug.mixup_mode={cfg.mixup_mode!r}: use 'batch'")
  s = cfg.smoothing
  if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s < 1.0:
    raise ValueError(f"config.aug.smoothing={s!r}: must be in [0, 1)")
