"""AdamW with the reference's learning-rate schedule and weight-decay groups."""
from __future__ import annotations

import flax.traverse_util
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
