"""Weight conversion between videomae-jax params and PyTorch VideoMAE checkpoints.

Two PyTorch layouts are understood and written:

* ``official``: MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 (``encoder.blocks.{i}.attn.qkv``...;
  fine-tuned models without the ``encoder.`` prefix, with ``fc_norm`` and ``head``).
* ``hf``: HF transformers ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification``
  (separate query/key/value; q/v biases as ``query.bias``/``value.bias`` in transformers 5,
  ``q_bias``/``v_bias`` before).

Conversion goes through one canonical flat naming (the official pre-training names, with the
classifier's encoder under ``encoder.`` too), so each layout needs only a rename table.
Every key is accounted for: an unexpected or missing key, or a shape mismatch, is an error that
names it, unless the caller asked to drop it.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping, Sequence

import flax.traverse_util
import jax
import numpy as np

from videomae_jax.models import layers
from videomae_jax.models.videomae import VideoMAEClassifier, VideoMAEPretrain

Params = Any
Model = VideoMAEPretrain | VideoMAEClassifier


class CheckpointError(ValueError):
  """A checkpoint does not fit the model it is converted for."""


# --------------------------------------------------------------------------------------------
# Reading state dicts.


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors``, ``.bin`` or ``.pth``/``.pt`` file into numpy arrays.

  PyTorch files are read with ``weights_only=True`` (the ``argparse.Namespace`` the official
  scripts store under ``args`` is allowed); ``allow_pickle=True`` lifts that for trusted files.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001 - torch raises several types here
    if allow_pickle:
      raise CheckpointError(f"could not read {path}: {e}") from e
    raise CheckpointError(
        f"could not read {path} with weights_only=True ({type(e).__name__}: {e}); if the file "
        "is trusted, pass allow_pickle=True") from e
  return unwrap_state_dict(obj, source=path)


def unwrap_state_dict(obj: Mapping[str, Any], source: str = "state dict") -> dict[str, np.ndarray]:
  """Finds the weights in a checkpoint dict (``model``/``module``/``state_dict`` or bare) and
  strips ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes."""
  for key in ("model", "module", "state_dict"):
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      raise CheckpointError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__}); "
                            "is this a training checkpoint without a 'model' key?")
    k = k.replace("_orig_mod.", "")
    if k.startswith("module."):
      k = k[len("module."):]
    out[k] = _to_numpy(v)
  return out


def detect_layout(keys) -> str:
  """'hf' or 'official', from the key names."""
  keys = list(keys)
  if any(k.startswith("videomae.") for k in keys):
    return "hf"
  if any(k.startswith(("encoder.patch_embed.", "patch_embed.", "encoder.blocks.", "blocks."))
         for k in keys):
    return "official"
  raise CheckpointError(f"cannot tell the checkpoint layout from its keys (first: "
                        f"{keys[:5]}); expected official VideoMAE or HF transformers names")


# --------------------------------------------------------------------------------------------
# HF <-> canonical (official pre-training names).

_HF_BLOCK_RENAMES = [
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
_HF_PREFIXES = [
    ("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
    ("videomae.encoder.layer.", "encoder.blocks."),
    ("videomae.layernorm.", "encoder.norm."),
    ("decoder.decoder_layers.", "decoder.blocks."),
    ("classifier.", "head."),
]
_ATTN = "attention.attention."


def _hf_to_canonical(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for k, v in sd.items():
    for src, dst in _HF_PREFIXES:
      if k.startswith(src):
        k = dst + k[len(src):]
        break
    m = re.match(r"^((?:encoder|decoder)\.blocks\.\d+)\.(.*)$", k)
    if m:
      block, rest = m.groups()
      if rest.startswith(_ATTN):
        name = rest[len(_ATTN):]
        if name in ("query.weight", "key.weight", "value.weight"):
          qkv.setdefault(block, {})[name.split(".")[0]] = v
          continue
        rest = {"query.bias": "attn.q_bias", "value.bias": "attn.v_bias",
                "q_bias": "attn.q_bias", "v_bias": "attn.v_bias"}.get(name, "hf." + rest)
      else:
        for src, dst in _HF_BLOCK_RENAMES:
          if rest.startswith(src):
            rest = dst + rest[len(src):]
            break
      k = f"{block}.{rest}"
    out[k] = v
  for block, parts in qkv.items():
    missing = [p for p in ("query", "key", "value") if p not in parts]
    if missing:
      raise CheckpointError(f"{block}: attention has no {', '.join(missing)} weight")
    out[f"{block}.attn.qkv.weight"] = np.concatenate(
        [parts["query"], parts["key"], parts["value"]], axis=0)
  return out


def _canonical_to_hf(sd: dict[str, np.ndarray], bias_style: str) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for k, v in sd.items():
    m = re.match(r"^(encoder|decoder)\.blocks\.(\d+)\.(.*)$", k)
    if m:
      part, i, rest = m.groups()
      block = (f"videomae.encoder.layer.{i}" if part == "encoder"
               else f"decoder.decoder_layers.{i}")
      if rest == "attn.qkv.weight":
        q, kk, vv = np.split(v, 3, axis=0)
        out[f"{block}.{_ATTN}query.weight"] = q
        out[f"{block}.{_ATTN}key.weight"] = kk
        out[f"{block}.{_ATTN}value.weight"] = vv
        continue
      if rest in ("attn.q_bias", "attn.v_bias"):
        which = rest[len("attn."):]
        name = which if bias_style == "v4" else {"q_bias": "query.bias",
                                                 "v_bias": "value.bias"}[which]
        out[f"{block}.{_ATTN}{name}"] = v
        continue
      for dst, src in _HF_BLOCK_RENAMES:
        if rest.startswith(src):
          rest = dst + rest[len(src):]
          break
      else:
        raise CheckpointError(f"{k} has no HF transformers equivalent")
      out[f"{block}.{rest}"] = v
      continue
    for dst, src in _HF_PREFIXES:
      if k.startswith(src):
        k = dst + k[len(src):]
        break
    out[k] = v
  return out


def _default_hf_bias_style() -> str:
  try:
    import transformers
    return "v4" if int(transformers.__version__.split(".")[0]) < 5 else "v5"
  except ImportError:
    return "v5"


# --------------------------------------------------------------------------------------------
# Official names <-> canonical.


def _official_to_canonical(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Fine-tuned checkpoints carry the encoder without a prefix.
  out = {}
  for k, v in sd.items():
    if k.startswith(("patch_embed.", "blocks.", "norm.")):
      k = "encoder." + k
    out[k] = v
  return out


def _canonical_to_official(sd: dict[str, np.ndarray], classifier: bool) -> dict[str, np.ndarray]:
  if not classifier:
    return dict(sd)
  return {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Canonical <-> Flax params.


def _canonical_to_flax(key: str, v: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  parts = key.split(".")
  path: list[str] = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if p == "blocks" and i + 1 < len(parts) and parts[i + 1].isdigit():
      path += ["blocks", f"blocks_{parts[i + 1]}"]
      i += 2
      continue
    if p == "proj" and path and path[-1] == "patch_embed":
      i += 1
      continue
    path.append(p)
    i += 1
  leaf = path[-1]
  if leaf == "weight":
    if v.ndim == 5:  # Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
      path[-1], v = "kernel", v.transpose(2, 3, 4, 1, 0)
    elif v.ndim == 2:  # Linear [out, in] -> [in, out]
      path[-1], v = "kernel", v.T
    elif v.ndim == 1:  # LayerNorm
      path[-1] = "scale"
  return tuple(path), v


def _flax_to_canonical(path: tuple[str, ...], v: np.ndarray) -> tuple[str, np.ndarray]:
  parts: list[str] = []
  for p in path:
    m = re.fullmatch(r"blocks_(\d+)", p)
    if m:
      parts[-1:] = ["blocks", m.group(1)]  # BlockStack's "blocks" + "blocks_i" -> blocks.i
    else:
      parts.append(p)
  if len(parts) >= 2 and parts[-2] == "patch_embed":
    parts.insert(-1, "proj")
  leaf = parts[-1]
  if leaf == "kernel":
    if v.ndim == 5:
      v = v.transpose(4, 3, 0, 1, 2)
      parts[-1] = "weight"
    else:
      v = v.T
      parts[-1] = "weight"
  elif leaf == "scale":
    parts[-1] = "weight"
  return ".".join(parts), v


def _unstack_scanned(flat: dict) -> dict:
  """Scanned params (.../blocks/blocks/leaf with a depth axis) -> .../blocks/blocks_i/leaf."""
  out = {}
  for path, v in flat.items():
    if "blocks" in path and path[path.index("blocks") + 1:path.index("blocks") + 2] == ("blocks",):
      j = path.index("blocks")
      for i in range(v.shape[0]):
        out[path[:j + 1] + (f"blocks_{i}",) + path[j + 2:]] = v[i]
    else:
      out[path] = v
  return out


def _stack_for_scan(flat: dict) -> dict:
  out, groups = {}, {}
  for path, v in flat.items():
    idx = next((j for j, p in enumerate(path) if re.fullmatch(r"blocks_\d+", p)), None)
    if idx is None:
      out[path] = v
      continue
    key = path[:idx] + ("blocks",) + path[idx + 1:]
    groups.setdefault(key, {})[int(path[idx][len("blocks_"):])] = v
  for key, by_layer in groups.items():
    out[key] = np.stack([by_layer[i] for i in range(len(by_layer))])
  return out


# --------------------------------------------------------------------------------------------
# Public API.


def _as_model(cfg) -> Model:
  if isinstance(cfg, (VideoMAEPretrain, VideoMAEClassifier)):
    return cfg
  if isinstance(cfg, Mapping):
    cfg = dict(cfg)
    return VideoMAEClassifier(**cfg) if "num_classes" in cfg else VideoMAEPretrain(**cfg)
  raise TypeError(f"cfg must be a VideoMAEPretrain/VideoMAEClassifier or a dict of its fields, "
                  f"got {type(cfg).__name__}")


def param_shapes(cfg) -> dict:
  """Shapes of the model's params (as ``jax.ShapeDtypeStruct``), without allocating them."""
  model = _as_model(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))["params"]


def _pt_name(path: tuple[str, ...], classifier: bool) -> str:
  name, _ = _flax_to_canonical(path, np.zeros((1, 1)))
  return next(iter(_canonical_to_official({name: None}, classifier)))


def from_pytorch(state_dict_or_path, cfg, *, drop: Sequence[str] = (), init_params: Params = None,
                 allow_pickle: bool = False) -> Params:
  """Converts a PyTorch VideoMAE state dict (official or HF layout) into Flax params.

  Args:
    state_dict_or_path: a state dict (torch tensors or numpy arrays, possibly wrapped under
      ``model``/``module``), or a path to a ``.pth``/``.bin``/``.safetensors`` file.
    cfg: the target model (module instance, or dict of its fields; a dict with ``num_classes``
      means the classifier).
    drop: regular expressions over the checkpoint's (canonical, official pre-training) key names
      to leave out, e.g. ``[r"^head\\."]`` for a classifier head of another size, or
      :data:`PRETRAIN_ONLY` when initialising a classifier from a pre-trained encoder.
    init_params: params to take the leaves the checkpoint does not provide from (required for
      whatever ``drop`` removes).
    allow_pickle: read a trusted ``.pth`` with full unpickling.

  Returns:
    float32 numpy params in the model's layout (stacked when ``cfg.scan``).
  """
  model = _as_model(cfg)
  classifier = isinstance(model, VideoMAEClassifier)
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    sd = load_state_dict(state_dict_or_path, allow_pickle=allow_pickle)
  else:
    sd = unwrap_state_dict(state_dict_or_path)
  layout = detect_layout(sd)
  canon = _hf_to_canonical(sd) if layout == "hf" else _official_to_canonical(sd)

  # The fixed sin/cos table is recomputed, never loaded; accept it only if it is the fixed one.
  for k in [k for k in canon if k in ("pos_embed", "encoder.pos_embed", "decoder.pos_embed")]:
    table = canon.pop(k)
    dim = table.shape[-1]
    expected = layers.sincos_table(table.reshape(-1, dim).shape[0], dim)
    if not np.allclose(table.reshape(-1, dim), expected, atol=1e-5):
      raise CheckpointError(f"{k}: a learned position embedding is not supported (videomae-jax "
                            "uses the fixed sin/cos table)")

  patterns = [re.compile(p) for p in drop]
  canon = {k: v for k, v in canon.items() if not any(p.search(k) for p in patterns)}

  expected = flax.traverse_util.flatten_dict(param_shapes(model.clone(scan=False)))
  converted = {}
  unexpected, mismatched = [], []
  for k, v in canon.items():
    path, arr = _canonical_to_flax(k, np.asarray(v, np.float32))
    if path not in expected:
      unexpected.append(k)
      continue
    if tuple(arr.shape) != tuple(expected[path].shape):
      mismatched.append(f"{k}: shape {tuple(v.shape)} (the model expects "
                        f"{tuple(expected[path].shape)} as {'/'.join(path)})")
      continue
    converted[path] = arr
  if mismatched:
    raise CheckpointError("checkpoint tensors do not fit the model: " + "; ".join(mismatched)
                          + ". Check the model size fields, or drop= them")
  if unexpected:
    raise CheckpointError(f"checkpoint keys the model does not have: {sorted(unexpected)}; pass "
                          "them in drop= to leave them out")
  missing = [p for p in expected if p not in converted]
  if missing and init_params is not None:
    init_flat = flax.traverse_util.flatten_dict(init_params)
    if model.scan:
      init_flat = _unstack_scanned(init_flat)
    for p in missing:
      converted[p] = np.asarray(init_flat[p])
    missing = []
  if missing:
    raise CheckpointError(f"checkpoint is missing keys: {sorted(_pt_name(p, classifier) for p in missing)}"
                          " (pass init_params= to take them from freshly initialised params)")
  if model.scan:
    converted = _stack_for_scan(converted)
  return flax.traverse_util.unflatten_dict(converted)


# Keys of a pre-training checkpoint that a classifier has no place for.
PRETRAIN_ONLY = (r"^decoder\.", r"^encoder_to_decoder\.", r"^mask_token$", r"^encoder\.norm\.")


def to_pytorch(params: Params, cfg, layout: str = "official", *,
               hf_bias_style: str | None = None) -> dict[str, np.ndarray]:
  """Converts Flax params (or a same-structured tree such as gradients) to a PyTorch state dict.

  Args:
    params: the model's params (plain or scanned layout).
    cfg: the model (module instance or dict of fields), to name classifier vs pre-training keys.
    layout: ``'official'`` or ``'hf'``.
    hf_bias_style: ``'v5'`` (``query.bias``/``value.bias``) or ``'v4'`` (``q_bias``/``v_bias``);
      default: the style of the installed transformers.

  Returns:
    ``{name: float32 numpy array}`` in PyTorch shapes.
  """
  if layout not in ("official", "hf"):
    raise ValueError(f"layout must be 'official' or 'hf', got {layout!r}")
  model = _as_model(cfg)
  classifier = isinstance(model, VideoMAEClassifier)
  flat = _unstack_scanned({p: np.asarray(v)
                           for p, v in flax.traverse_util.flatten_dict(params).items()})
  canon = dict(_flax_to_canonical(p, v) for p, v in flat.items())
  if layout == "official":
    return _canonical_to_official(canon, classifier)
  style = hf_bias_style or _default_hf_bias_style()
  if style not in ("v4", "v5"):
    raise ValueError(f"hf_bias_style must be 'v4' or 'v5', got {style!r}")
  return _canonical_to_hf(canon, style)


def fields_from_hf_config(config, *, classifier: bool | None = None) -> dict[str, Any]:
  """Model fields matching an HF ``VideoMAEConfig`` (or its dict), incl. its LayerNorm eps.

  ``classifier`` picks VideoMAEClassifier fields (with ``num_classes``) over pre-training
  fields; by default it follows the config's ``architectures``.
  """
  c = config if isinstance(config, Mapping) else config.to_dict()
  if classifier is None:
    classifier = "VideoMAEForVideoClassification" in (c.get("architectures") or [])
  if c.get("hidden_act", "gelu") != "gelu":
    raise CheckpointError(f"hidden_act {c['hidden_act']!r} is not supported (exact GELU only)")
  fields = dict(
      img_size=c["image_size"], patch_size=c["patch_size"], num_frames=c["num_frames"],
      tubelet_size=c["tubelet_size"], in_chans=c["num_channels"], embed_dim=c["hidden_size"],
      depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      mlp_ratio=c["intermediate_size"] / c["hidden_size"], layer_norm_eps=c["layer_norm_eps"])
  if classifier:
    fields["num_classes"] = len(c.get("id2label") or {}) or c.get("num_labels", 2)
  else:
    fields.update(decoder_embed_dim=c["decoder_hidden_size"],
                  decoder_depth=c["decoder_num_hidden_layers"],
                  decoder_num_heads=c["decoder_num_attention_heads"],
                  decoder_norm_eps=1e-5)  # HF's decoder.norm is a default nn.LayerNorm
  return fields
