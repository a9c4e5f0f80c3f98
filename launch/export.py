r"""Exports pre-trained weights from a training workdir for fine-tuning elsewhere.

  python -m launch.export --workdir=/ckpt/k400_b --out=/ckpt/k400_b/export [--encoder_only]

Writes, from the latest checkpoint (or --step):
  params/                 orbax checkpoint of the params (the encoder's only with --encoder_only)
  videomae_official.pth   official VideoMAE layout, {'model': state_dict}, as the reference's
                          fine-tuning script loads it
  hf/                     HF transformers VideoMAEForPreTraining (or VideoMAEModel with
                          --encoder_only): config.json + model.safetensors
"""
from __future__ import annotations

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with config.json).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False, "Leave out the decoder.")
_FORMATS = flags.DEFINE_list("formats", ["orbax", "official", "hf"], "What to write.")


def load_params(workdir: str, step: int | None = None):
  """(model, params, step) from a workdir's config.json and checkpoint, on the local CPU/device."""
  import jax
  import ml_collections

  from videomae_jax.train import checkpointing, optim, step as step_lib
  from videomae_jax.train import config as config_lib
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = config_lib.build_model(config)
  tx, _ = optim.make_optimizer(config, total_steps=1, steps_per_epoch=1)

  init = step_lib.make_init_fn(model, tx, jax.random.key(0))
  abstract = jax.eval_shape(init)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: device,
                                                                          abstract))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1,
                                    async_save=False)
  try:
    step = step if step is not None else ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state, _ = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return model, jax.device_get(state.params), step


def hf_config_dict(model, encoder_only: bool) -> dict:
  d = dict(
      image_size=model.image_hw[0], patch_size=model.patch_size, num_channels=model.in_chans,
      num_frames=model.num_frames, tubelet_size=model.tubelet_size, hidden_size=model.embed_dim,
      num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
      intermediate_size=int(model.embed_dim * model.mlp_ratio), hidden_act="gelu",
      qkv_bias=True, use_mean_pooling=False, layer_norm_eps=model.layer_norm_eps,
      decoder_hidden_size=model.decoder_embed_dim,
      decoder_num_hidden_layers=model.decoder_depth,
      decoder_num_attention_heads=model.decoder_num_heads,
      decoder_intermediate_size=int(model.decoder_embed_dim * model.mlp_ratio),
      norm_pix_loss=True, model_type="videomae",
      architectures=["VideoMAEModel" if encoder_only else "VideoMAEForPreTraining"])
  return d


def export(workdir: str, out: str, *, step: int | None = None, encoder_only: bool = False,
           formats=("orbax", "official", "hf")) -> dict[str, str]:
  """Writes the requested formats; returns {format: path}."""
  import numpy as np

  from videomae_jax import interop
  model, params, step = load_params(workdir, step)
  if encoder_only:
    params = {"encoder": params["encoder"]}
  os.makedirs(out, exist_ok=True)
  written = {}
  if "orbax" in formats:
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(out, "params"))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, params, force=True)
    written["orbax"] = path
  if "official" in formats:
    import torch
    full = interop.to_pytorch(params, model, "official")
    path = os.path.join(out, "videomae_official.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in full.items()},
                "step": step}, path)
    written["official"] = path
  if "hf" in formats:
    from safetensors.numpy import save_file
    hf = interop.to_pytorch(params, model, "hf", hf_bias_style="v5")
    if encoder_only:
      hf = {k[len("videomae."):]: v for k, v in hf.items() if k.startswith("videomae.")}
    path = os.path.join(out, "hf")
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(hf_config_dict(model, encoder_only), f, indent=2)
    written["hf"] = path
  return written


def main(argv):
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  for fmt, path in export(_WORKDIR.value, _OUT.value, step=_STEP.value,
                          encoder_only=_ENCODER_ONLY.value, formats=_FORMATS.value).items():
    print(f"{fmt}: {path}")


if __name__ == "__main__":
  app.run(main)
