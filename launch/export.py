r"""Exports pre-trained weights from a training workdir for fine-tuning elsewhere.

  python -m launch.export --workdir=/ckpt/k400_b --out=/ckpt/k400_b/export [--encoder_only] \
      [--formats=orbax,official,hf]

Writes, from the latest checkpoint (or --step), only the params (the optimizer state is not
read):
  params/                 orbax checkpoint of the params (the encoder's only with --encoder_only)
  videomae_official.pth   official VideoMAE layout, {'model': state_dict}, as the reference's
                          fine-tuning script loads it; needs the `torch` extra
  hf/                     HF transformers VideoMAEForPreTraining (or VideoMAEModel with
                          --encoder_only): config.json + model.safetensors, in the layout of the
                          installed transformers; needs the `torch` extra

Without --formats every format whose extra is installed is written, and the others are named
with the extra they need (exit 0). With --formats naming one whose extra is missing, it stops
before doing any work (exit 1).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags

# Kept importable from here; they live in the library (fine-tuning reads workdirs too).
from videomae_jax.finetune.init import load_config, load_params  # noqa: F401

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with config.json).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_ENCODER_ONLY = flags.DEFINE_bool("encoder_only", False, "Leave out the decoder.")
_FORMATS = flags.DEFINE_list("formats", None, "What to write, of orbax, official, hf; default "
                             "every one whose extra is installed.")

FORMATS = ("orbax", "official", "hf")
# The modules each format needs, and the extra that installs them.
_NEEDS = {"orbax": (("orbax.checkpoint",), "train"),
          "official": (("torch",), "torch"),
          "hf": (("safetensors", "transformers"), "torch")}


def missing_extras(formats) -> dict[str, str]:
  """{format: why it cannot be written here} for the formats whose extra is not installed."""
  out = {}
  for fmt in formats:
    modules, extra = _NEEDS[fmt]
    for mod in modules:
      try:
        importlib.import_module(mod)
      except ImportError as e:
        out[fmt] = f"needs the `{extra}` extra (pip install -e '.[{extra}]'): {e}"
        break
  return out


def hf_config_dict(model, encoder_only: bool, norm_pix: bool = True) -> dict:
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
      norm_pix_loss=bool(norm_pix), model_type="videomae",
      architectures=["VideoMAEModel" if encoder_only else "VideoMAEForPreTraining"])
  return d


class ExportError(ValueError):
  """An export that cannot run as asked (unknown format, missing extra)."""


def export(workdir: str, out: str, *, step: int | None = None, encoder_only: bool = False,
           formats=None) -> dict[str, str]:
  """Writes ``formats`` (default: all whose extra is installed, naming the others on stderr);
  returns {format: path}. Raises ExportError before any work if a format asked for explicitly
  cannot be written."""
  import numpy as np

  from videomae_jax import interop
  explicit = formats is not None
  wanted = tuple(formats) if explicit else FORMATS
  unknown = [f for f in wanted if f not in FORMATS]
  if unknown:
    raise ExportError(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
  missing = missing_extras(wanted)
  if missing and explicit:
    raise ExportError("--formats: cannot write " + "; ".join(
        f"{fmt} ({why})" for fmt, why in missing.items()))
  for fmt, why in missing.items():
    print(f"launch.export: skipping {fmt}: {why}", file=sys.stderr, flush=True)
  wanted = tuple(f for f in wanted if f not in missing)
  if not wanted:
    raise ExportError("nothing to write: " + "; ".join(f"{k} {v}" for k, v in missing.items()))

  config = load_config(workdir)
  model, params, step = load_params(workdir, step)
  if encoder_only:
    params = {"encoder": params["encoder"]}
  os.makedirs(out, exist_ok=True)
  written = {}
  if "orbax" in wanted:
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(out, "params"))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, params, force=True)
    written["orbax"] = path
  if "official" in wanted:
    import torch
    full = interop.to_pytorch(params, model, "official")
    path = os.path.join(out, "videomae_official.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in full.items()},
                "step": step}, path)
    written["official"] = path
  if "hf" in wanted:
    from safetensors.numpy import save_file
    # The bias names of the installed transformers (q_bias/v_bias before v5).
    hf = interop.to_pytorch(params, model, "hf")
    if encoder_only:
      hf = {k[len("videomae."):]: v for k, v in hf.items() if k.startswith("videomae.")}
    path = os.path.join(out, "hf")
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(hf_config_dict(model, encoder_only, config.get("norm_pix", True)), f, indent=2)
    written["hf"] = path
  return written


def main(argv):
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  try:
    written = export(_WORKDIR.value, _OUT.value, step=_STEP.value,
                     encoder_only=_ENCODER_ONLY.value, formats=_FORMATS.value)
  except ExportError as e:
    print(f"launch.export: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  for fmt, path in written.items():
    print(f"{fmt}: {path}")


if __name__ == "__main__":
  app.run(main)
