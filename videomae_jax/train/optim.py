"""AdamW with the reference's learning-rate schedule and weight-decay groups; for fine-tuning,
with the official layer-wise lr decay."""
from __future__ import annotations

import re
from typing import NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax


def scaled_lr(base: float, global_batch: int) -> float:
  """The linear scaling rule: base x global_batch / 256 (global_batch counts clips)."""
  return base * global_batch / 256.0


def warmup_cosine(peak: float, final: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """The reference's per-step schedule: linspace(0, peak, warmup) then half-cosine to final."""
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps - 1, 1)
    t = jnp.clip(step - warmup_steps, 0, decay_steps)
    cos = final + 0.5 * (peak - final) * (1 + jnp.cos(jnp.pi * t / decay_steps))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def decay_mask(params):
  """Weight decay on matmul/conv kernels only: not on biases, norms, layer scale or tokens."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(config, total_steps: int, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optim
  peak = scaled_lr(o.base_lr, config.batch_size)
  final = scaled_lr(o.min_lr, config.batch_size)
  warmup = int(o.warmup_steps) if o.warmup_steps >= 0 else int(round(o.warmup_epochs *
                                                                      steps_per_epoch))
  schedule = warmup_cosine(peak, final, total_steps, warmup)
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def reference_schedule(peak, final, total_steps, warmup_steps) -> np.ndarray:
  """The reference's ``cosine_scheduler`` array, for tests."""
  warm = np.linspace(0, peak, warmup_steps)
  iters = np.arange(total_steps - warmup_steps)
  cos = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


# --------------------------------------------------------------------------------------------
# Fine-tuning: layer-wise lr decay and the official per-group AdamW.

# The params a linear probe trains; everything else (the encoder) is frozen.
PROBE_TRAINED = ("fc_norm", "head")
# Official names that never get weight decay (``no_weight_decay()`` of the fine-tuning model).
_NO_DECAY_NAMES = ("pos_embed", "cls_token")
_LAYER0_NAMES = ("cls_token", "mask_token", "pos_embed")


def _names(path) -> tuple[str, ...]:
  """Plain strings for a params path: tuple of str, or jax key entries."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _is_stacked(names: tuple[str, ...]) -> bool:
  """A scanned BlockStack leaf: ``.../blocks/blocks/...``, all depths on axis 0."""
  return any(a == "blocks" and b == "blocks" for a, b in zip(names, names[1:]))


def layer_id(path, depth: int) -> int | np.ndarray:
  """The official ``get_num_layer_for_vit`` for a Flax param path of the classifier.

  ``encoder/patch_embed/*`` (and position/cls/mask tokens) -> 0, ``encoder/blocks/blocks_i/*``
  -> i + 1, anything else (``fc_norm``, ``head``) -> depth + 1. A scanned leaf
  (``encoder/blocks/blocks/*``, blocks stacked on axis 0) gets the ids of all its blocks,
  ``np.arange(1, depth + 1)``.
  """
  names = _names(path)
  rest = names[1:] if names and names[0] == "encoder" else names
  if not rest:
    return depth + 1
  if rest[0] in _LAYER0_NAMES or rest[0] == "patch_embed":
    return 0
  if rest[0] == "blocks" and len(rest) > 1:
    if rest[1] == "blocks":
      return np.arange(1, depth + 1)
    m = re.fullmatch(r"blocks_(\d+)", rest[1])
    if m:
      return int(m.group(1)) + 1
  return depth + 1


def _scale_for(names: tuple[str, ...], ndim: int, depth: int, decay: float):
  ids = layer_id(names, depth)
  scale = np.power(float(decay), depth + 1 - np.asarray(ids, np.float64))
  if np.ndim(ids):  # one scale per stacked block, broadcast over the rest of the leaf
    return scale.reshape((-1,) + (1,) * (ndim - 1))
  return scale


def layer_decay_scales(params, depth: int, decay: float):
  """Per-leaf lr scale decay ** (depth + 1 - layer_id) (float64 numpy; a scanned leaf gets
  shape (depth, 1, ...) so it broadcasts over the leaf). Works on abstract params."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _scale_for(_names(p), len(x.shape), depth, decay), params)


def _decays(names: tuple[str, ...], ndim: int) -> bool:
  # Official rule: no decay for 1-D params, names ending in ".bias", pos_embed and cls_token.
  # A scanned leaf has the block axis in front of its own shape.
  per_layer_ndim = ndim - 1 if _is_stacked(names) else ndim
  return per_layer_ndim >= 2 and names[-1] != "bias" and names[-1] not in _NO_DECAY_NAMES


def finetune_decay_mask(params):
  """Tree of bools, True where the official fine-tuning applies weight decay (the kernels of
  Linear and Conv3d layers; not biases, LayerNorms, q/v biases, layer scale or tokens)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: _decays(_names(p), len(x.shape)), params)


def num_blocks(params) -> int:
  """The encoder depth of a classifier's (or pre-training model's) params, plain or scanned."""
  depth = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    if names[:1] != ("encoder",):
      continue
    if _is_stacked(names):
      return int(x.shape[0])
    for n in names:
      m = re.fullmatch(r"blocks_(\d+)", n)
      if m:
        depth = max(depth, int(m.group(1)) + 1)
  return depth


def _official_name(path: tuple[str, ...], leaf_ndim: int) -> str:
  """The official fine-tuned state-dict name of one (unstacked) param leaf."""
  from videomae_jax import interop
  from videomae_jax.models import VideoMAEClassifier
  tree: dict = {}
  node = tree
  for n in path[:-1]:
    node = node.setdefault(n, {})
  node[path[-1]] = np.broadcast_to(np.zeros((), np.float32), (1,) * leaf_ndim)
  (name,) = interop.to_pytorch(tree, VideoMAEClassifier(), "official")
  return name


def param_groups(params, depth: int, decay: float, weight_decay: float) -> dict[str, dict]:
  """The official ``get_parameter_groups`` for these params, by official fine-tuned names:
  ``{'layer_%d_decay' | 'layer_%d_no_decay': {'weight_decay', 'params': [names], 'lr_scale'}}``
  (``'decay'``/``'no_decay'`` with scale 1 when ``decay >= 1``, as the official script builds
  no assigner then). For tests and logs; the optimizer uses the same rules per leaf."""
  groups: dict[str, dict] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    ndim = len(x.shape)
    if _is_stacked(names):
      j = next(i for i, (a, b) in enumerate(zip(names, names[1:])) if a == b == "blocks")
      leaves = [(names[:j + 1] + (f"blocks_{i}",) + names[j + 2:], ndim - 1)
                for i in range(x.shape[0])]
    else:
      leaves = [(names, ndim)]
    for names_i, ndim_i in leaves:
      decays = _decays(names_i, ndim_i)
      kind = "decay" if decays else "no_decay"
      if decay < 1.0:
        lid = int(layer_id(names_i, depth))
        group, scale = f"layer_{lid}_{kind}", float(decay) ** (depth + 1 - lid)
      else:
        group, scale = kind, 1.0
      g = groups.setdefault(group, {"weight_decay": weight_decay if decays else 0.0,
                                    "params": [], "lr_scale": scale})
      g["params"].append(_official_name(names_i, ndim_i))
  return groups


class ScaleByLayerDecayState(NamedTuple):
  """No state: the scales are a function of each leaf's path."""


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's lr scale (:func:`layer_decay_scales`), found from
  the leaf's path at update time, so any container type and the scanned layout work."""

  def init_fn(params):
    del params
    return ScaleByLayerDecayState()

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      s = _scale_for(_names(path), u.ndim, depth, decay)
      return u * jnp.asarray(s, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def probe_labels(params):
  """'train' for the params a linear probe trains (fc_norm, head), 'frozen' elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if _names(p)[0] in PROBE_TRAINED else "frozen", params)


def _warmup(o, steps_per_epoch: int) -> int:
  return int(o.warmup_steps) if o.warmup_steps >= 0 else int(round(o.warmup_epochs *
                                                                   steps_per_epoch))


def _videos_per_batch(config) -> int:
  # The official fine-tuning script scales the lr by videos per step (each video gives
  # data.num_sample clips of the batch).
  data = config.get("data", None)
  num_sample = int(data.get("num_sample", 1)) if data is not None else 1
  return int(config.batch_size) // max(num_sample, 1)


FINETUNE_MODES = ("finetune", "linear_probe")


def make_finetune_optimizer(config, total_steps: int, steps_per_epoch: int, params
                            ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The official fine-tuning optimizer: per parameter group, torch.optim.AdamW's
  ``p -= lr * lr_scale * (adam_update + wd * p)``, wd only where :func:`finetune_decay_mask`
  says, lr_scale from the layer-wise decay ``config.optim.layer_decay``; lr per step from
  :func:`warmup_cosine` (peak base_lr and final min_lr scaled by videos per batch / 256).

  ``config.mode == 'linear_probe'`` trains fc_norm and head only, without layer decay: the
  other params get zero updates and no optimizer moments. ``params`` (concrete or abstract)
  gives the encoder depth. Moments stay param-shaped, so ``optax.tree_map_params`` (and so
  ``sharding.state_shardings``) sees them.
  """
  o = config.optim
  mode = config.get("mode", "finetune")
  if mode not in FINETUNE_MODES:
    raise ValueError(f"config.mode={mode!r}: use one of {FINETUNE_MODES}")
  videos = _videos_per_batch(config)
  schedule = warmup_cosine(scaled_lr(o.base_lr, videos), scaled_lr(o.min_lr, videos),
                           total_steps, _warmup(o, steps_per_epoch))
  depth = num_blocks(params)
  probe = mode == "linear_probe"
  parts = []
  if o.grad_clip > 0:  # over the trained params only (a frozen param has no gradient)
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
  if o.weight_decay > 0:
    parts.append(optax.add_decayed_weights(o.weight_decay, mask=finetune_decay_mask))
  if not probe and o.layer_decay < 1.0:  # as the official script: no assigner at >= 1
    parts.append(scale_by_layer_decay(depth, o.layer_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if probe:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, probe_labels)
  return tx, schedule
