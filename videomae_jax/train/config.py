"""The pre-training config schema, its validation, and what it builds (the model).

Seeds: `config.seed` drives everything by default: parameter init, masks, and (through
`config.data.seed`, None = "use config.seed") the data order, crops and synthetic clips. Set
`config.data.seed` to keep the data stream fixed while changing the rest. `resolve()` fills it
in; the trainer records the resolved value in config.json and the checkpoint meta.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from videomae_jax.data.config import default_data_config
from videomae_jax.models import PRESET_NAMES, VideoMAEPretrain, preset

# Sharding rules: (regex over the '/'-joined param path, spec). The first match wins. A spec is
# 'replicate', 'fsdp' (shard the largest axis divisible by the fsdp mesh size, the big_vision
# strategy) or a tuple with a mesh axis name or None per array axis.
DEFAULT_SHARDING_RULES = (
    (r".*", "fsdp"),
)


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the reference K400 ViT-B recipe as defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model_name = "vit_base"  # a models.preset name; fields in `model` override it
  c.model = ml_collections.ConfigDict(dict(
      img_size=224, patch_size=ml_collections.config_dict.placeholder(int),
      num_frames=16, tubelet_size=2, drop_path_rate=0.0, init_values=0.0,
      layer_norm_eps=1e-6, dtype="float32", remat=False, remat_policy="nothing_saveable",
      scan=False, attention_impl=ml_collections.config_dict.placeholder(str),
      attention_remat="decoder",  # "none" | "decoder" | "all": recompute attention probs
      # None = per platform (XLA:CPU custom-VJP layers on a CPU, plain elsewhere) | "plain" |
      # "cpu"; remat_policy applies to the plain layers.
      layers_impl=ml_collections.config_dict.placeholder(str),
      ))
  # Size overrides on top of the preset (None = the preset's value).
  for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
            "decoder_depth", "decoder_num_heads"):
    c.model[k] = ml_collections.config_dict.placeholder(float if k == "mlp_ratio" else int)

  c.mask = ml_collections.ConfigDict(dict(
      type="tube", ratio=0.9,
      decoder_type="none",  # "none" | "run_cell" (VideoMAE V2 dual masking)
      decoder_ratio=0.5))
  c.norm_pix = True

  c.data = default_data_config()
  c.data.num_frames = c.model.get_ref("num_frames")
  c.data.input_size = c.model.get_ref("img_size")
  c.data.synthetic = False  # deterministic generated clips (benchmarks, sharding tests)
  # Order, crops and synthetic clips; None = config.seed (see resolve()).
  c.data.seed = ml_collections.config_dict.placeholder(int)

  c.batch_size = 2048            # global, in clips (repeated samples counted)
  c.num_epochs = 800
  c.total_steps = 0              # > 0 overrides num_epochs
  c.steps_per_epoch = 0          # 0 = dataset videos // (batch_size / num_sample)

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4, min_lr=1e-5, warmup_epochs=40.0, warmup_steps=-1,  # >=0 overrides epochs
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      grad_clip=0.0,  # global-norm clip; 0 = off (reference v1)
      accum_steps=1))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = DEFAULT_SHARDING_RULES

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  c.log_every_steps = 50        # >= 1; the last step is always logged
  c.vis_every_steps = 1000      # 0 = no reconstruction images
  c.max_nonfinite_in_row = 10
  c.peak_flops_per_device = 0.0  # for MFU where the device is not known; 0 = auto/none
  return c


class ConfigError(ValueError):
  """A config that cannot run; raised before anything compiles."""


def resolve(config) -> ml_collections.ConfigDict:
  """The config a run uses: a copy with references resolved and `data.seed` (None) set to
  `config.seed`, so that one seed changes init, masks and data together."""
  c = config.copy_and_resolve_references()
  if c.data.get("seed") is None:
    c.data.seed = int(c.seed)
  return c


def model_fields(config) -> dict[str, Any]:
  """The VideoMAEPretrain fields a config describes (preset + overrides)."""
  if config.model_name not in PRESET_NAMES:
    raise ConfigError(f"config.model_name={config.model_name!r} is not a preset; known: "
                      f"{', '.join(PRESET_NAMES)}")
  fields = preset(config.model_name)
  for k, v in config.model.items():
    if v is not None:
      fields[k] = v
  return fields


def build_model(config) -> VideoMAEPretrain:
  return VideoMAEPretrain(**model_fields(config))


def check_geometry(config, fields: dict[str, Any]) -> None:
  """Frames, image size and width agree with the tubelet, the patch and the heads."""
  m = config.model
  if m.num_frames % m.tubelet_size:
    raise ConfigError(f"config.model.num_frames={m.num_frames} is not divisible by "
                      f"config.model.tubelet_size={m.tubelet_size}")
  p = fields.get("patch_size", 16)
  if m.img_size % p:
    raise ConfigError(f"config.model.img_size={m.img_size} is not divisible by patch_size={p}")
  if fields["embed_dim"] % fields["num_heads"]:
    raise ConfigError(f"embed_dim={fields['embed_dim']} is not divisible by "
                      f"num_heads={fields['num_heads']}")


def check_mesh(config, num_devices: int) -> None:
  """The mesh fits the devices; the batch splits over them and the accumulation steps."""
  mesh = config.mesh
  data, fsdp = int(mesh.data), int(mesh.fsdp)
  if fsdp < 1 or (data != -1 and data < 1):
    raise ConfigError(f"config.mesh data={data} fsdp={fsdp}: sizes must be >= 1 (data may be "
                      "-1 = the remaining devices)")
  if data == -1:
    if num_devices % fsdp:
      raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices")
  elif data * fsdp != num_devices:
    raise ConfigError(f"config.mesh data={data} x fsdp={fsdp} != {num_devices} devices")
  accum = int(config.optim.accum_steps)
  if accum < 1:
    raise ConfigError(f"config.optim.accum_steps={accum} must be >= 1")
  if config.batch_size % (num_devices * accum):
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"{num_devices} devices x config.optim.accum_steps={accum}")


def validate(config, num_devices: int) -> None:
  """Checks everything that can be checked before compiling; raises ConfigError naming the flag."""
  m = config.model
  fields = model_fields(config)
  unknown = set(fields) - set(VideoMAEPretrain.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ConfigError(f"unknown config.model fields: {sorted(unknown)}")
  check_geometry(config, fields)
  if fields["decoder_embed_dim"] % fields["decoder_num_heads"]:
    raise ConfigError(f"decoder_embed_dim={fields['decoder_embed_dim']} is not divisible by "
                      f"decoder_num_heads={fields['decoder_num_heads']}")
  if m.dtype == "float16":
    raise ConfigError("config.model.dtype='float16' is not supported: the train step has no "
                      "loss scaling, so float16 gradients underflow; use bfloat16 (the same "
                      "speed on TPUs and recent GPUs, with float32's range) or float32")
  if m.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={m.dtype!r}: use bfloat16 or float32")
  if config.data.num_frames != m.num_frames or config.data.input_size != m.img_size:
    raise ConfigError(f"config.data (num_frames={config.data.num_frames}, input_size="
                      f"{config.data.input_size}) must match config.model (num_frames="
                      f"{m.num_frames}, img_size={m.img_size})")
  if config.mask.type not in ("tube", "random"):
    raise ConfigError(f"config.mask.type={config.mask.type!r}: use 'tube' or 'random'")
  if not 0.0 <= config.mask.ratio < 1.0:
    raise ConfigError(f"config.mask.ratio={config.mask.ratio} must be in [0, 1)")
  if config.mask.decoder_type not in ("none", "run_cell"):
    raise ConfigError(f"config.mask.decoder_type={config.mask.decoder_type!r}: use 'none' or "
                      "'run_cell'")
  if config.mask.decoder_type == "run_cell":
    grid_h = m.img_size // fields.get("patch_size", 16)
    if grid_h % 2:
      raise ConfigError(f"config.mask.decoder_type='run_cell' needs an even token grid, got "
                        f"{grid_h}x{grid_h}")
  check_mesh(config, num_devices)
  if config.batch_size % int(config.data.num_sample):
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                      f"config.data.num_sample={config.data.num_sample}")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set config.total_steps or config.num_epochs > 0")
  if int(config.log_every_steps) < 1:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be >= 1 (steps "
                      "between metric lines; the last step is always logged)")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
    raise ConfigError("config.checkpoint.every_steps and .keep must be > 0")
  for rule in config.sharding_rules:
    if len(rule) != 2:
      raise ConfigError(f"config.sharding_rules entry {rule!r} is not (regex, spec)")
