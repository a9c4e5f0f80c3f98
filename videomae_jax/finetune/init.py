"""The weights fine-tuning starts from: ``load_init(init, model, rng=...)``.

``init`` is one of

* ``""``: from scratch, the classifier's own init;
* a videomae-jax training workdir (``config.json`` + ``checkpoints/``): the params of its latest
  checkpoint (the optimizer state is not read); a pre-training workdir gives the encoder, a
  fine-tuning workdir the whole classifier;
* a params folder written by ``launch.export`` (``<out>/params``, or ``<out>`` holding it);
* a PyTorch file (``.pth``/``.pt``/``.bin``/``.safetensors``) in the official layout
  (pre-trained: ``encoder.*``, the decoder is dropped; fine-tuned: no prefix, ``fc_norm``,
  ``head``) or the HF transformers one;
* an HF transformers folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
  of ``VideoMAEForPreTraining``, ``VideoMAEModel`` or ``VideoMAEForVideoClassification``.

Everything goes through :mod:`videomae_jax.interop` in the official layout, so every tensor is
accounted for: what the classifier has no place for (decoder, ``encoder_to_decoder``,
``mask_token``, the encoder's final ``norm``) is dropped and reported, what the checkpoint does
not have (``fc_norm`` and ``head`` of a pre-trained encoder) is initialised from ``rng`` and
reported. The position table is never loaded (the model computes it), so a checkpoint of another
``num_frames`` or ``img_size`` loads; any other architecture field that differs is an error.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax import interop
from videomae_jax.interop import CheckpointError
from videomae_jax.models import VideoMAEClassifier, VideoMAEPretrain

Params = Any

# Model fields that shape the parameters (num_frames and img_size do not: the table is fixed).
ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "tubelet_size", "mlp_ratio",
               "in_chans")
# What a classifier may take from its own init when the checkpoint lacks it.
_INITIALISABLE = (r"^fc_norm\.", r"^head\.")
_HEAD = (r"^head\.",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_EXPECTED = ("a videomae-jax training workdir (config.json + checkpoints/), a params folder "
             "written by launch.export (orbax; or a folder holding params/), an official or HF "
             "PyTorch file (.pth/.pt/.bin/.safetensors), an HF transformers folder (config.json "
             "+ model.safetensors or pytorch_model.bin), or '' for from scratch")


# --------------------------------------------------------------------------------------------
# Training workdirs.


def load_config(workdir: str):
  """The ``config.json`` a trainer wrote into ``workdir``, as a ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _is_finetune_config(config) -> bool:
  return "num_classes" in config and "mode" in config


def workdir_model(workdir: str) -> VideoMAEPretrain | VideoMAEClassifier:
  """The model a workdir's config builds: the pre-training model, or the classifier of a
  fine-tuning run."""
  config = load_config(workdir)
  if _is_finetune_config(config):
    from videomae_jax.finetune import config as ft_config
    return ft_config.build_model(config)
  from videomae_jax.train import config as config_lib
  return config_lib.build_model(config)


def load_params(workdir: str, step: int | None = None):
  """(model, params, step) from a workdir's config.json and checkpoint, on the local CPU/device.

  Only the params are read: the optimizer state (2x the params with Adam) is not restored."""
  from videomae_jax.train import checkpointing
  model = workdir_model(workdir)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))
  abstract = abstract["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpointing.abstract_with_shardings(abstract, jax.tree.map(lambda _: device,
                                                                          abstract))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1,
                                    async_save=False, read_only=True)
  try:
    step = step if step is not None else ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  return model, jax.device_get(params), step


# --------------------------------------------------------------------------------------------
# Sources -> (canonical state dict, architecture fields, step).


def _is_orbax_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) or os.path.isfile(
      os.path.join(path, "_METADATA"))


def detect_kind(path: str) -> tuple[str, str]:
  """(kind, the path to read) for an ``init`` path: kind is 'workdir', 'orbax', 'pytorch' or
  'hf'. Raises FileNotFoundError for a missing path, CheckpointError for one of no known kind."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"init {path!r} does not exist; expected {_EXPECTED}")
  if os.path.isfile(path):
    if path.endswith(_TORCH_SUFFIXES):
      return "pytorch", path
    raise CheckpointError(f"init {path!r}: a file of unknown type; expected {_EXPECTED}")
  has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
  if has("config.json") and os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir", path
  if has("config.json") and any(has(w) for w in _HF_WEIGHTS):
    return "hf", path
  if _is_orbax_dir(path):
    return "orbax", path
  if _is_orbax_dir(os.path.join(path, "params")):
    return "orbax", os.path.join(path, "params")
  raise CheckpointError(f"init {path!r}: a folder of unknown kind (found "
                        f"{sorted(os.listdir(path))[:10]}); expected {_EXPECTED}")


def _model_arch(model) -> dict[str, Any]:
  return {f: getattr(model, f) for f in ARCH_FIELDS}


def _from_workdir(path: str) -> tuple[dict[str, Any], VideoMAEPretrain | VideoMAEClassifier]:
  src_model = workdir_model(path)
  return _model_arch(src_model), src_model


def _from_orbax(path: str) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = jax.device_get(ckptr.restore(os.path.abspath(path)))
  classifier = "head" in tree or "fc_norm" in tree
  return interop.to_pytorch(tree, VideoMAEClassifier() if classifier else VideoMAEPretrain(),
                            "official")


def _read_torch_file(path: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], int | None]:
  if path.endswith(".safetensors"):
    return interop.load_state_dict(path), None
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001 - torch raises several types here
    hint = "" if allow_pickle else "; if the file is trusted, pass allow_pickle=True"
    raise CheckpointError(f"could not read {path} ({type(e).__name__}: {e}){hint}") from e
  step = None
  for key in ("step", "epoch"):
    if isinstance(obj.get(key), (int, np.integer)):
      step = int(obj[key])
      break
  return interop.unwrap_state_dict(obj, source=path), step


def _from_hf(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], dict]:
  with open(os.path.join(path, "config.json")) as f:
    hf_config = json.load(f)
  weights = next(os.path.join(path, w) for w in _HF_WEIGHTS
                 if os.path.exists(os.path.join(path, w)))
  sd = interop.load_state_dict(weights)
  # VideoMAEModel is saved without the `videomae.` prefix of the task models.
  if not any(k.startswith("videomae.") for k in sd):
    sd = {("videomae." + k if k.startswith(("embeddings.", "encoder.layer.", "layernorm."))
           else k): v for k, v in sd.items()}
  fields = interop.fields_from_hf_config(hf_config, classifier=True)
  return sd, {f: fields[f] for f in ARCH_FIELDS}, hf_config


def _canonical(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Official pre-training names (the classifier's encoder under ``encoder.``)."""
  layout = interop.detect_layout(sd)
  return interop._hf_to_canonical(dict(sd)) if layout == "hf" else \
      interop._official_to_canonical(dict(sd))


def arch_from_state_dict(canon: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The architecture fields a canonical state dict's shapes show (``num_heads`` they do not:
  None)."""
  w = canon.get("encoder.patch_embed.proj.weight")
  if w is None or np.ndim(w) != 5:
    raise CheckpointError("the checkpoint has no Conv3d patch embedding "
                          "(encoder.patch_embed.proj.weight [D, C, kt, p, p]); not a VideoMAE "
                          "checkpoint?")
  d, c, kt, p, _ = w.shape
  ids = {int(m.group(1)) for k in canon for m in [re.match(r"^encoder\.blocks\.(\d+)\.", k)] if m}
  fc1 = canon.get("encoder.blocks.0.mlp.fc1.weight")
  return dict(embed_dim=int(d), in_chans=int(c), tubelet_size=int(kt), patch_size=int(p),
              depth=(max(ids) + 1) if ids else 0, num_heads=None,
              mlp_ratio=(fc1.shape[0] / d) if fc1 is not None else None)


def check_architecture(arch: Mapping[str, Any], model: VideoMAEClassifier, source: str) -> None:
  """CheckpointError naming each architecture field whose checkpoint value differs from the
  model's (None = unknown, not checked)."""
  bad = []
  for f in ARCH_FIELDS:
    have, want = arch.get(f), getattr(model, f)
    if have is None:
      continue
    same = math.isclose(float(have), float(want), rel_tol=1e-6) if f == "mlp_ratio" else \
        int(have) == int(want)
    if not same:
      bad.append(f"{f}: checkpoint {have}, model {want}")
  if bad:
    raise CheckpointError(f"{source}: the checkpoint's architecture differs from the model's: "
                          + "; ".join(bad) + " (num_frames and img_size may differ; these may "
                          "not)")


# --------------------------------------------------------------------------------------------
# The classifier's params.


def _expected_names(model: VideoMAEClassifier) -> dict[str, str]:
  """{canonical name: its top-level module (encoder, fc_norm, head)} of the classifier."""
  try:
    return dict(_expected_names_cached(model))
  except TypeError:  # a field that is not hashable (a list): not cached
    return _expected_names_cached.__wrapped__(model)


@functools.lru_cache(maxsize=16)
def _expected_names_cached(model: VideoMAEClassifier) -> dict[str, str]:
  shapes = interop.param_shapes(model.clone(scan=False))
  views = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.float32), x.shape), shapes)
  names = interop._official_to_canonical(interop.to_pytorch(views, model, "official"))
  return {k: k.split(".")[0] for k in names}


def _head_and_norm(module: VideoMAEClassifier, features: jax.Array) -> jax.Array:
  return module.head(module.fc_norm(features))


@functools.lru_cache(maxsize=16)
def _head_init_fn(embed_dim: int, num_classes: int, init_scale: float, param_dtype) -> Callable:
  # A submodule's init depends on the rng and its name only, so a one-block classifier of the
  # same head gives the values the full model's init gives fc_norm and head. Jitted like the
  # from-scratch init, so they agree to the bit.
  model = VideoMAEClassifier(embed_dim=embed_dim, depth=1, num_heads=1, num_classes=num_classes,
                             init_scale=init_scale, param_dtype=param_dtype)
  return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, embed_dim), jnp.float32),
                                        method=_head_and_norm)["params"])


def _init_modules(model: VideoMAEClassifier, rng: jax.Array, modules: set[str]) -> dict:
  """The model's own init of its fc_norm and/or head, without touching the encoder."""
  unknown = modules - {"fc_norm", "head"}
  if unknown:
    raise CheckpointError(f"cannot initialise {sorted(unknown)} apart from the whole model")
  init = _head_init_fn(int(model.embed_dim), int(model.num_classes), float(model.init_scale),
                       model.param_dtype)
  return {k: v for k, v in jax.device_get(init(rng)).items() if k in modules}


def _to_official(names) -> list[str]:
  return sorted(k[len("encoder."):] if k.startswith("encoder.") else k for k in names)


def load_init(init: str, model: VideoMAEClassifier, *, rng: jax.Array, drop_head: bool = False,
              allow_pickle: bool = False) -> tuple[Params, dict[str, Any]]:
  """The classifier's starting params and what was done to get them.

  Args:
    init: a workdir, exported params folder, PyTorch file or HF folder (see the module
      docstring), or "" for the model's own init.
    model: the classifier to fine-tune (its num_frames / img_size may differ from the
      checkpoint's).
    rng: for what the checkpoint does not provide (and for everything from scratch).
    drop_head: re-initialise a fine-tuned checkpoint's head when its class count differs from
      ``model.num_classes`` (otherwise that is an error).
    allow_pickle: read a trusted ``.pth`` with full unpickling.

  Returns:
    ``(params, info)``: float32 numpy params in the classifier's layout (scan-stacked when
    ``model.scan``), and ``info`` = {kind: 'scratch' | 'workdir' | 'orbax' | 'pytorch' | 'hf',
    path, step (None if the source has none), loaded: tensors taken from the checkpoint,
    initialised: [official names of the params from ``rng``], dropped: [checkpoint tensors left
    out, official names], notes: [differences that load but change the arithmetic, e.g. a
    LayerNorm eps]}.
  """
  if not isinstance(model, VideoMAEClassifier):
    raise TypeError(f"model must be a VideoMAEClassifier, got {type(model).__name__}")
  expected = _expected_names(model)
  if not init:
    params = jax.device_get(jax.jit(model.init)(rng, *model.example_inputs())["params"])
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return params, dict(kind="scratch", path="", step=None, loaded=0,
                        initialised=_to_official(expected), dropped=[], notes=[])

  path = os.path.abspath(os.path.expanduser(os.fspath(init)))
  kind, src = detect_kind(path)
  step, eps = None, None
  if kind == "workdir":
    arch, src_model = _from_workdir(src)
    check_architecture(arch, model, src)  # before any array is read
    _, tree, step = load_params(src)
    canon = _canonical(interop.to_pytorch(tree, src_model, "official"))
    eps = src_model.layer_norm_eps
  elif kind == "hf":
    sd, arch, hf_config = _from_hf(src)
    check_architecture(arch, model, src)
    canon = _canonical(sd)
    eps = hf_config.get("layer_norm_eps")
  else:
    if kind == "orbax":
      sd = _from_orbax(src)
    else:
      sd, step = _read_torch_file(src, allow_pickle)
    canon = _canonical(sd)
  # Shapes as well (for .pth and orbax the only evidence; elsewhere a check of the config).
  check_architecture(arch_from_state_dict(canon), model, src)

  drop = [re.compile(p) for p in interop.PRETRAIN_ONLY]
  head = canon.get("head.weight")
  if head is not None and head.shape[0] != model.num_classes:
    if not drop_head:
      raise CheckpointError(
          f"{src}: the checkpoint's head has {head.shape[0]} classes, the model "
          f"{model.num_classes}; pass drop_head=True (config.init_drop_head) to re-initialise "
          "the head")
    drop += [re.compile(p) for p in _HEAD]
  dropped = sorted(k for k in canon if any(p.search(k) for p in drop))
  kept = {k: v for k, v in canon.items() if k not in set(dropped)}

  missing = sorted(set(expected) - set(kept))
  not_initialisable = [k for k in missing if not any(re.search(p, k) for p in _INITIALISABLE)]
  if not_initialisable:
    raise CheckpointError(f"{src}: the checkpoint lacks {_to_official(not_initialisable)}")
  fresh = None
  if missing:
    fresh = _init_modules(model, rng, {expected[k] for k in missing})
  params = interop.from_pytorch(kept, model, init_params=fresh)
  notes = []
  if eps is not None and not math.isclose(float(eps), float(model.layer_norm_eps)):
    notes.append(f"layer_norm_eps: checkpoint {eps}, model {model.layer_norm_eps} (the weights "
                 "load; the LayerNorms compute slightly differently)")
  return params, dict(kind=kind, path=src, step=step, loaded=len(set(kept) & set(expected)),
                      initialised=_to_official(missing), dropped=sorted(dropped), notes=notes)
