"""Multi-head self-attention: the one place where its implementation is chosen.

:func:`dot_product_attention` takes the packed ``qkv`` projection and an ``implementation``.
``None`` means "best for the platform the program is compiled for", decided at lowering time
with ``jax.lax.platform_dependent`` (all branches are traced, only the target's is lowered), so
one config compiles correctly for CPU, TPU or GPU whatever the host is:

- TPU: jax's Pallas splash attention kernel (:mod:`videomae_jax.models.tpu.splash`; padded to
  multiples of 128 tokens with segment ids, ``shard_map`` over the mesh's batch axes).
- CUDA: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention) where
  cuDNN can run it (bfloat16/float16, a supported head dim, cuDNN present), else its XLA path.
- CPU: the fused AVX512-BF16 kernel (:mod:`cpu_attention`) for bfloat16 on one device when the
  machine has it, else two einsums (what XLA:CPU runs fastest).
- other platforms: ``jax.nn.dot_product_attention(implementation="xla")``.

What can only be known outside lowering (the dtype, the device count, whether the CPU kernel
builds, whether cuDNN accepts the shapes) is decided inside the platform's branch.

Differentiating through the per-call choice keeps (zero) residuals of the branches not taken;
``scan`` stacks them per block. A train step that chooses the platform once around its whole
gradient gives each branch its model with :func:`platform_impls` instead.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from videomae_jax.models import cpu_attention

Dtype = Any

ATTENTION_IMPLS = ("cpu_fused", "einsum", "xla", "cudnn", "cudnn_or_xla", "tpu_splash",
                   "tpu_splash_interpret")


def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # float32 accumulation also for low-precision v: the form XLA:CPU runs natively.
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     remat: bool = False, chunk: int = 512) -> jax.Array:
  """softmax(q k^T * scale) v over (B, N, heads, head_dim) inputs; softmax in float32.

  With ``remat`` the (B, heads, N, N) probabilities are never kept for the backward pass: the
  queries run in chunks of ``chunk`` under ``lax.map`` with a checkpointed body, so the backward
  loop recomputes one chunk's probabilities at a time (one extra q k^T matmul). A loop is what
  bounds the memory on every backend: a plain ``jax.checkpoint`` leaves XLA free to schedule
  (or CSE) the recomputation next to the forward pass, which XLA:CPU does.
  """
  if not remat:
    return _attention_core(q, k, v, scale)
  b, n, h, d = q.shape
  num = -(-n // chunk)
  size = -(-n // num)  # balanced chunks; padded query rows are sliced off again
  pad = num * size - n
  qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
  qc = qc.reshape(b, num, size, h, d).swapaxes(0, 1)
  body = jax.checkpoint(lambda qi: _attention_core(qi, k, v, scale),
                        policy=jax.checkpoint_policies.nothing_saveable)
  out = jax.lax.map(body, qc).swapaxes(0, 1).reshape(b, num * size, h, d)
  return out[:, :n] if pad else out


def cpu_fused_eligible(dtype: Dtype) -> bool:
  """The fused CPU kernel runs bfloat16 on one device (the SPMD partitioner cannot split an
  opaque custom call) on machines where it builds."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and jax.device_count() == 1
          and cpu_attention.available())


def resolve_attention_impl(impl: str | None, dtype: Dtype = jnp.float32,
                           platform: str | None = None) -> str:
  """The implementation :func:`dot_product_attention` runs for ``impl`` on ``platform``
  (default: the host's default backend), for reports and FLOP counts. The model itself does
  not call this: with ``impl=None`` it decides per platform at lowering time."""
  if impl is not None:
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={impl!r}: use None, {', '.join(ATTENTION_IMPLS)}")
    return impl
  platform = platform or jax.default_backend()
  if platform == "cpu":
    return "cpu_fused" if cpu_fused_eligible(dtype) else "einsum"
  if platform == "tpu":
    return "tpu_splash"
  if platform in ("cuda", "gpu"):
    return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return "xla"


def platform_impls(impl: str | None, dtype: Dtype) -> dict[str, str]:
  """What ``impl`` means on each platform, keyed like ``jax.lax.platform_dependent``'s
  branches (``cpu``, ``tpu``, ``cuda``, ``default``), for callers that choose the platform once
  around a whole gradient: ``platform_dependent(cpu=grad_of(model.clone(attention_impl=
  impls["cpu"])), ...)``. Differentiating through the per-call choice of ``impl=None`` keeps
  (zero) residuals of the branches not taken, which ``scan`` stacks per block."""
  if impl is not None:
    resolve_attention_impl(impl)
    return dict.fromkeys(("cpu", "tpu", "cuda", "default"), impl)
  return {"cpu": resolve_attention_impl(None, dtype, "cpu"), "tpu": "tpu_splash",
          "cuda": "cudnn_or_xla", "default": "xla"}


def _split(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _einsum(qkv, scale, remat):
  return einsum_attention(*_split(qkv), scale, remat)


def _cpu_fused(qkv, scale):
  return cpu_attention.attention(qkv.astype(jnp.bfloat16), scale).astype(qkv.dtype)


def _xla(qkv, scale):
  return jax.nn.dot_product_attention(*_split(qkv), scale=scale, implementation="xla")


def _cudnn(qkv, scale):
  return jax.nn.dot_product_attention(*_split(qkv), scale=scale, implementation="cudnn")


def _tpu(qkv, scale, interpret=False):
  from videomae_jax.models.tpu import splash  # imports Pallas; only where it is used
  return splash.attention(qkv, scale, interpret=interpret)


def _cpu_best(qkv, scale, remat):
  if cpu_fused_eligible(qkv.dtype):
    return _cpu_fused(qkv, scale)
  return _einsum(qkv, scale, remat)


def cudnn_accepts(qkv: jax.Array, scale: float) -> bool:
  """Whether ``jax.nn.dot_product_attention(implementation="cudnn")`` traces for these inputs
  here: cuDNN present (a GPU build of jax), bfloat16/float16, a head dim it supports."""
  if jnp.dtype(qkv.dtype) not in (jnp.bfloat16, jnp.float16):
    return False
  spec = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)
  try:
    jax.eval_shape(functools.partial(_cudnn, scale=scale), spec)
  except Exception:  # noqa: BLE001 - any refusal (no cuDNN, shapes, version) means XLA
    return False
  return True


def _cuda_best(qkv, scale):
  return _cudnn(qkv, scale) if cudnn_accepts(qkv, scale) else _xla(qkv, scale)


def dot_product_attention(qkv: jax.Array, scale: float, implementation: str | None = None, *,
                          remat: bool = False) -> jax.Array:
  """softmax(q k^T * scale) v for packed ``qkv`` (B, N, 3, heads, head_dim) (rows [q; k; v])
  -> (B, N, heads, head_dim) in ``qkv``'s dtype; softmax statistics in float32.

  ``implementation``: None (per platform at lowering time, see the module docstring),
  "einsum" (``remat``: recompute the probabilities in the backward pass), "cpu_fused",
  "xla"/"cudnn" (``jax.nn.dot_product_attention``), "cudnn_or_xla" (cuDNN where it accepts the
  inputs, else XLA: what ``None`` runs on CUDA), "tpu_splash" (the Pallas TPU kernel;
  "tpu_splash_interpret" runs it in the Pallas interpreter, on any backend, for tests).
  """
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"qkv must be (B, N, 3, heads, head_dim), got {qkv.shape}")
  impl = implementation
  if impl is None:
    return jax.lax.platform_dependent(
        qkv, cpu=functools.partial(_cpu_best, scale=scale, remat=remat),
        tpu=functools.partial(_tpu, scale=scale),
        cuda=functools.partial(_cuda_best, scale=scale),
        default=functools.partial(_xla, scale=scale))
  resolve_attention_impl(impl)  # validates the name
  if impl == "einsum":
    return _einsum(qkv, scale, remat)
  if impl == "cpu_fused":
    return _cpu_fused(qkv, scale)
  if impl == "xla":
    return _xla(qkv, scale)
  if impl == "cudnn":
    return _cudnn(qkv, scale)
  if impl == "cudnn_or_xla":
    return _cuda_best(qkv, scale)
  return _tpu(qkv, scale, interpret=impl == "tpu_splash_interpret")
