"""The fine-tuning config schema, the official recipes, validation, and the model it builds.

Batch sizes count clips, as in pre-training: with ``data.num_sample`` repeated clips per decoded
video a step holds ``batch_size / num_sample`` videos. The official script scales the learning
rate and counts epochs by videos (``lr = base x videos / 256``, ``steps/epoch = videos in the
list // videos per step``); so does this trainer.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from videomae_jax.augment import default_aug_config, validate_aug_config
from videomae_jax.data.config import default_data_config
from videomae_jax.models import PRESET_NAMES, VideoMAEClassifier, preset
from videomae_jax.train import config as train_config
from videomae_jax.train.config import (DEFAULT_SHARDING_RULES, ConfigError, check_geometry,
                                       check_mesh)

placeholder = ml_collections.config_dict.placeholder

MODES = ("finetune", "linear_probe")


def base_config() -> ml_collections.ConfigDict:
  """Every field the fine-tuning trainer reads; defaults: the official K400 ViT-B recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "finetune"      # "finetune" | "linear_probe" (frozen encoder, trained fc_norm + head)
  # Weights to start from: a pre-training workdir, an exported params dir, an official .pth,
  # an HF folder, or "" (from scratch).
  c.init = ""
  c.init_drop_head = False  # re-initialise a fine-tuned checkpoint's head of another size
  c.num_classes = placeholder(int)

  c.model_name = "vit_base"
  c.model = ml_collections.ConfigDict(dict(
      img_size=224, patch_size=placeholder(int), num_frames=16, tubelet_size=2,
      drop_path_rate=0.1, fc_drop_rate=0.0, init_scale=0.001, init_values=0.0,
      layer_norm_eps=1e-6, dtype="float32", remat=False, remat_policy="nothing_saveable",
      scan=False, attention_impl=placeholder(str), attention_remat="none",
      layers_impl=placeholder(str),
      # (T', H', W') of the pre-training table to interpolate from (VideoMAE V2); None =
      # recompute the sin/cos table for this geometry (v1).
      pos_embed_from=placeholder(tuple)))
  for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
    c.model[k] = placeholder(float if k == "mlp_ratio" else int)

  c.data = default_data_config()
  c.data.num_frames = c.model.get_ref("num_frames")
  c.data.input_size = c.model.get_ref("img_size")
  c.data.frame_sampling = "dense"       # K400-style; "segment" for SSv2
  c.data.crop = "random_resized"
  c.data.sampling_rate = 4
  c.data.num_sample = 2
  c.data.flip = False                   # flips run on the device (config.aug.flip)
  c.data.val_list = ""                  # `path label` list for validation and testing
  c.data.seed = placeholder(int)        # None = config.seed
  c.data.synthetic = False

  c.aug = default_aug_config()

  c.batch_size = 1024                   # global, in clips: 512 videos x num_sample 2
  c.num_epochs = 100
  c.total_steps = 0                     # > 0 overrides num_epochs
  c.steps_per_epoch = 0                 # 0 = train videos // videos per batch

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-3, min_lr=1e-6, warmup_epochs=5.0, warmup_steps=-1, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.05, layer_decay=0.75, grad_clip=0.0, accum_steps=1))

  # Fast validation during training: one centre view per video, every `every_epochs`.
  # videos_per_batch: 0 = auto (see `eval_videos_per_batch`).
  c.eval = ml_collections.ConfigDict(dict(every_epochs=5.0, every_steps=0, num_clips=1,
                                          num_crops=1, videos_per_batch=0, max_videos=0))
  # The test protocol (launch.evaluate): K400 5 clips x 3 crops, SSv2 2 x 3.
  c.test = ml_collections.ConfigDict(dict(num_clips=5, num_crops=3, short_side=224,
                                          videos_per_batch=0, list=""))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = DEFAULT_SHARDING_RULES
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
  c.log_every_steps = 50
  c.max_nonfinite_in_row = 10
  c.peak_flops_per_device = 0.0
  return c


# dataset -> what the official fine-tuning scripts set. `videos` = per-GPU batch x GPUs.
_DATASETS = {
    "k400": dict(num_classes=400, frame_sampling="dense", sampling_rate=4, flip=True,
                 test=(5, 3)),
    "ssv2": dict(num_classes=174, frame_sampling="segment", sampling_rate=4, flip=False,
                 test=(2, 3)),
    "ucf101": dict(num_classes=101, frame_sampling="dense", sampling_rate=4, flip=True,
                   test=(5, 3)),
    "hmdb51": dict(num_classes=51, frame_sampling="dense", sampling_rate=4, flip=True,
                   test=(5, 3)),
}
_SCRIPTS = {
    ("k400", "vit_small"): dict(videos=384, num_sample=2, lr=5e-4, epochs=150),
    ("k400", "vit_base"): dict(videos=512, num_sample=1, lr=1e-3, epochs=100),
    ("k400", "vit_large"): dict(videos=128, num_sample=2, lr=2e-3, epochs=35),
    ("k400", "vit_huge"): dict(videos=512, num_sample=2, lr=1e-3, epochs=50, drop_path=0.2,
                               fc_drop=0.5, min_lr=1e-5),
    ("ssv2", "vit_small"): dict(videos=384, num_sample=2, lr=1e-3, epochs=40, layer_decay=0.7),
    ("ssv2", "vit_base"): dict(videos=512, num_sample=1, lr=5e-4, epochs=50),
    # No official v1 script: the ViT-B 2400-epoch values (batch 384 videos x 2 clips).
    ("ssv2", "vit_large"): dict(videos=384, num_sample=2, lr=5e-4, epochs=30),
    ("ucf101", "vit_base"): dict(videos=128, num_sample=2, lr=5e-4, epochs=100,
                                 layer_decay=0.7, drop_path=0.2, fc_drop=0.5, min_lr=1e-5),
    # No official v1 script: the UCF101 recipe (the paper fine-tunes both alike).
    ("hmdb51", "vit_base"): dict(videos=128, num_sample=2, lr=5e-4, epochs=100,
                                 layer_decay=0.7, drop_path=0.2, fc_drop=0.5, min_lr=1e-5),
}


def finetune_recipe(dataset: str, model_name: str) -> ml_collections.ConfigDict:
  """The official fine-tuning script for (dataset, model) as a config. Lists and the init
  come from the command line."""
  d, s = _DATASETS[dataset], _SCRIPTS[(dataset, model_name)]
  c = base_config()
  c.model_name = model_name
  c.num_classes = d["num_classes"]
  c.data.frame_sampling = d["frame_sampling"]
  c.data.sampling_rate = d["sampling_rate"]
  c.data.num_sample = s["num_sample"]
  c.aug.flip = d["flip"]
  c.batch_size = s["videos"] * s["num_sample"]
  c.num_epochs = s["epochs"]
  c.optim.base_lr = s["lr"]
  c.optim.min_lr = s.get("min_lr", 1e-6)
  c.optim.layer_decay = s.get("layer_decay", 0.75)
  c.model.drop_path_rate = s.get("drop_path", 0.1)
  c.model.fc_drop_rate = s.get("fc_drop", 0.0)
  c.test.num_clips, c.test.num_crops = d["test"]
  if model_name in ("vit_large", "vit_huge"):
    c.model.dtype = "bfloat16"
    c.model.remat = True
  return c


# The same derived defaults as pre-training (data.seed from seed).
resolve = train_config.resolve


def model_fields(config) -> dict[str, Any]:
  """The VideoMAEClassifier fields a config describes (preset + overrides)."""
  if config.model_name not in PRESET_NAMES:
    raise ConfigError(f"config.model_name={config.model_name!r} is not a preset; known: "
                      f"{', '.join(PRESET_NAMES)}")
  fields = preset(config.model_name, decoder=False)
  for k, v in config.model.items():
    if v is not None:
      fields[k] = tuple(v) if isinstance(v, list) else v
  fields["num_classes"] = int(config.num_classes)
  return fields


def build_model(config) -> VideoMAEClassifier:
  return VideoMAEClassifier(**model_fields(config))


def videos_per_batch(config) -> int:
  return int(config.batch_size) // int(config.data.num_sample)


def eval_videos_per_batch(section, num_devices: int) -> int:
  """Videos per evaluation batch: ``section.videos_per_batch``, or for 0 about 16 views per
  device (at least one video each), rounded to a multiple of the devices."""
  n = int(section.videos_per_batch)
  if n > 0:
    return n
  views = int(section.num_clips) * int(section.num_crops)
  per_device = max(1, 16 // max(views, 1))
  return per_device * num_devices


def validate(config, num_devices: int) -> None:
  """Everything that can be checked before compiling; raises ConfigError naming the flag."""
  if config.num_classes is None or int(config.num_classes) < 1:
    raise ConfigError(f"config.num_classes={config.num_classes}: set it to the number of "
                      "classes of the annotation lists (e.g. --config.num_classes=400)")
  if config.mode not in MODES:
    raise ConfigError(f"config.mode={config.mode!r}: use one of {MODES}")
  fields = model_fields(config)
  unknown = set(fields) - set(VideoMAEClassifier.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ConfigError(f"unknown config.model fields: {sorted(unknown)}")
  m = config.model
  check_geometry(config, fields)
  if m.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={m.dtype!r}: use bfloat16 or float32")
  if config.data.num_frames != m.num_frames or config.data.input_size != m.img_size:
    raise ConfigError(f"config.data (num_frames={config.data.num_frames}, input_size="
                      f"{config.data.input_size}) must match config.model (num_frames="
                      f"{m.num_frames}, img_size={m.img_size})")
  if config.data.frame_sampling not in ("dense", "segment", "pretrain"):
    raise ConfigError(f"config.data.frame_sampling={config.data.frame_sampling!r}: use "
                      "'dense' (K400) or 'segment' (SSv2)")
  if not (config.data.synthetic or config.data.train_list or config.data.video_dir
          or config.data.frame_store):
    raise ConfigError("no training videos: set --config.data.train_list (a `path label` list), "
                      "--config.data.video_dir or --config.data.frame_store")
  try:
    validate_aug_config(config.aug)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_mesh(config, num_devices)
  if config.batch_size % int(config.data.num_sample):
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.data.num_sample={config.data.num_sample}")
  mixing = config.aug.mixup > 0 or config.aug.cutmix > 0
  if mixing and (config.batch_size // num_devices) % 2:
    raise ConfigError(f"mixup/cutmix pair each clip with another on its device: "
                      f"config.batch_size={config.batch_size} over {num_devices} devices "
                      "leaves an odd number per device")
  for name in ("eval", "test"):
    vpb = int(config[name].videos_per_batch)
    if vpb < 0 or vpb % num_devices:
      raise ConfigError(f"config.{name}.videos_per_batch={vpb} must be a multiple of the "
                        f"{num_devices} devices (or 0: auto)")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set config.total_steps or config.num_epochs > 0")
  if int(config.log_every_steps) < 1:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be >= 1")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
    raise ConfigError("config.checkpoint.every_steps and .keep must be > 0")
