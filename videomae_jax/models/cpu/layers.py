"""Custom-VJP linear and MLP layers for XLA:CPU (same values as the plain layers)."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _contract(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
  """a . b over one axis of each, float32 accumulation; no explicit transposes."""
  dims = (((a_dim % a.ndim,), (b_dim % b.ndim,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Dtype) -> jax.Array:
  """``x @ w + b`` for x in ``dtype``, w (K, F) and b (F,) in their param dtype; result in ``dtype``.

  All three matmuls (forward, input and weight gradient) take ``dtype`` operands and accumulate
  in float32, the form XLA:CPU runs natively (it widens a bf16-output dot to float32, and its
  large row reductions are slow): the weight gradient comes straight from the float32
  accumulator, and the bias gradient is a matmul with a ones vector.
  """
  y = _contract(x, w.astype(dtype), -1, 0)
  if b is not None:
    y = y + b.astype(jnp.float32)
  return y.astype(dtype)


def _linear_fwd(x, w, b, dtype):
  return linear(x, w, b, dtype), (x, w, b)


def linear_bwd(dtype, res, g):
  """The VJP of :func:`linear` for residuals ``(x, w, b)``: ``(dx, dw, db)``."""
  x, w, b = res
  g = g.astype(dtype)
  dx = _contract(g, w.astype(dtype), -1, 1).astype(x.dtype)
  g2 = g.reshape(-1, g.shape[-1])
  # dW = x^T g through an explicit transpose: XLA:CPU runs a dot contracting both operands'
  # leading axis (and any matrix-vector dot) as a float32 Eigen dot on upcast copies, the
  # (K, M) . (M, F) form natively in bf16. db rides along as a row of ones under x^T; the barrier
  # keeps XLA from folding the transpose back into the dot.
  xt = x.reshape(-1, x.shape[-1]).T
  if b is not None:
    xt = jnp.concatenate([xt, jnp.ones((1, xt.shape[1]), xt.dtype)])
  dwb = _contract(jax.lax.optimization_barrier(xt), g2, 1, 0)
  dw = dwb[:w.shape[0]].astype(w.dtype)
  db = None if b is None else dwb[w.shape[0]].astype(b.dtype)
  return dx, dw, db


linear.defvjp(_linear_fwd, linear_bwd)


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU."""
  return nn.gelu(x, approximate=False)


def gelu_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """g * GELU'(x). The derivative Phi(x) + x*phi(x) is written with erfc and exp, not the
  forward's erf, so that XLA does not merge it with the forward's intermediates and keep them
  alive until the backward pass."""
  xf = x.astype(jnp.float32)
  cdf = 0.5 * jax.lax.erfc(xf * -np.float32(1 / np.sqrt(2)))
  pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1 / np.sqrt(2 * np.pi))
  return (g.astype(jnp.float32) * (cdf + xf * pdf)).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array,
        dtype: Dtype) -> jax.Array:
  """fc2(gelu(fc1(x))) with :func:`linear` layers, keeping only x and fc1's output for the
  backward pass: the GELU output (as wide as fc1's) is recomputed there, not stored."""
  return linear(gelu_erf(linear(x, w1, b1, dtype)), w2, b2, dtype)


def _mlp_fwd(x, w1, b1, w2, b2, dtype):
  h = linear(x, w1, b1, dtype)
  return linear(gelu_erf(h), w2, b2, dtype), (x, h, w1, b1, w2, b2)


def _mlp_bwd(dtype, res, g):
  x, h, w1, b1, w2, b2 = res
  da, dw2, db2 = linear_bwd(dtype, (gelu_erf(h), w2, b2), g)
  dh = gelu_grad(h, da)
  dx, dw1, db1 = linear_bwd(dtype, (x, w1, b1), dh)
  return dx, dw1, db1, dw2, db2


mlp.defvjp(_mlp_fwd, _mlp_bwd)
