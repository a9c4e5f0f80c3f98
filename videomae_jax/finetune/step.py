"""The classifier's update step and its evaluation step.

``(state, batch, rng) -> (state, metrics)`` as in pre-training: the uint8 clips are augmented on
the device (RandAugment, flip, erasing, mixup/cutmix: :mod:`videomae_jax.augment`), the loss is
the soft-target cross-entropy of the official recipe, and a non-finite step is skipped.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from videomae_jax.augment import augment_batch
from videomae_jax.models import VideoMAEClassifier
from videomae_jax.normalization import normalize
from videomae_jax.train import sharding
from videomae_jax.train import step as step_lib


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm's SoftTargetCrossEntropy: mean over the batch of sum(-targets * log_softmax)."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def batch_groups(mesh: Mesh | None) -> int:
  """How many contiguous shards the batch is split into over the mesh (mixup pairs clips within
  a shard, as the official code mixes each GPU's own batch, so no clip crosses devices)."""
  if mesh is None:
    return 1
  n = 1
  for a in sharding.DATA_AXES:
    if a in mesh.axis_names:
      n *= mesh.shape[a]
  return n


def make_finetune_step(model: VideoMAEClassifier, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, *, aug_cfg, accum_steps: int = 1,
                       mesh: Mesh | None = None, frozen_encoder: bool = False) -> Callable:
  """Builds the update step; ``batch`` holds ``video`` uint8 (B, T, H, W, 3) and ``label``
  int32 (B,). ``frozen_encoder`` (linear probe) stops gradients at the pooled features, so
  the encoder's backward pass is not computed at all."""
  dtype = jnp.dtype(model.dtype)
  num_classes = int(model.num_classes)
  groups = batch_groups(mesh)

  def value_and_grad(m: VideoMAEClassifier) -> Callable:
    def loss_fn(params, video, targets, drop_rng):
      logits = m.apply({"params": params}, video, train=True, rngs={"dropout": drop_rng})
      loss = soft_cross_entropy(logits, targets)
      hit = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
      return loss, {"train_top1": jnp.mean(hit.astype(jnp.float32))}
    return jax.value_and_grad(loss_fn, has_aux=True)

  if frozen_encoder:
    model = model.clone(stop_encoder_grad=True)
  grad_fn = step_lib.per_platform(model, value_and_grad)

  def train_step(state: step_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    with step_lib.on_mesh(mesh):
      aug_rng, drop_rng = jax.random.split(jax.random.fold_in(rng, state.step))
      video, targets = augment_batch(aug_rng, batch["video"], batch["label"], aug_cfg,
                                     num_classes=num_classes, dtype=dtype, num_groups=groups)
      (loss, aux), grads = step_lib.accumulated_grads(grad_fn, state.params, (video, targets),
                                                      drop_rng, accum_steps, mesh)
      new_state, metrics = step_lib.apply_if_finite(state, loss, grads, tx, schedule)
      metrics.update(aux)
      return new_state, metrics

  return train_step


def make_predict_fn(model: VideoMAEClassifier) -> Callable:
  """``(params, video_u8 (V, views, T, H, W, 3)) -> (V, num_classes)`` float32: softmax per
  view, then the mean over views (the official test protocol)."""
  dtype = jnp.dtype(model.dtype)

  def predict(params, video_u8):
    v, n = video_u8.shape[:2]
    flat = video_u8.reshape(v * n, *video_u8.shape[2:])
    logits = model.apply({"params": params}, normalize(flat, dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs.reshape(v, n, -1).mean(axis=1)

  return predict
