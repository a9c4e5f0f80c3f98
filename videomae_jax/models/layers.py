"""Transformer building blocks shared by the VideoMAE encoder and decoder.

Parameter names follow the official PyTorch modules (``qkv``, ``q_bias``, ``proj``, ``norm1``,
``mlp.fc1`` ...) so that checkpoint conversion is a rename plus a transpose.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax.models import cpu_attention

Dtype = Any

# PyTorch's default nn.Linear / nn.Conv3d weight init: kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def trunc_normal_init(std: float) -> Callable:
  """VideoMAE's ``trunc_normal_``: N(0, std) truncated at +-1 std, no variance correction."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype) * std

  return init


def sincos_table(n_position: int, dim: int) -> np.ndarray:
  """Fixed 1-D sinusoid table of the reference, (n_position, dim) float32.

  angle[pos, j] = pos / 10000^(2*(j//2)/dim); even columns sin, odd columns cos (interleaved).
  Computed in float64 like the reference, then rounded once.
  """
  pos = np.arange(n_position, dtype=np.float64)[:, None]
  j = np.arange(dim)
  angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
  table = np.empty_like(angle)
  table[:, 0::2] = np.sin(angle[:, 0::2])
  table[:, 1::2] = np.cos(angle[:, 1::2])
  return table.astype(np.float32)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype: bf16 variance is too coarse.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _contract(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
  """a . b over one axis of each, float32 accumulation; no explicit transposes."""
  dims = (((a_dim % a.ndim,), (b_dim % b.ndim,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Dtype) -> jax.Array:
  """``x @ w + b`` for x in ``dtype``, w (K, F) and b (F,) in their param dtype; result in ``dtype``.

  All three matmuls (forward, input and weight gradient) take ``dtype`` operands and accumulate
  in float32, the form backends run natively (XLA:CPU widens a bf16-output dot to float32, and
  its large row reductions are slow): the weight gradient comes straight from the float32
  accumulator, and the bias gradient is a matmul with a ones vector.
  """
  y = _contract(x, w.astype(dtype), -1, 0)
  if b is not None:
    y = y + b.astype(jnp.float32)
  return y.astype(dtype)


def _linear_fwd(x, w, b, dtype):
  return linear(x, w, b, dtype), (x, w, b)


def _linear_bwd(dtype, res, g):
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


linear.defvjp(_linear_fwd, _linear_bwd)


def _dense_params(mdl: nn.Module, in_features: int) -> tuple[jax.Array, jax.Array | None]:
  kernel = mdl.param("kernel", mdl.kernel_init, (in_features, mdl.features), mdl.param_dtype)
  bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype) if mdl.use_bias \
      else None
  return kernel, bias


class Dense(nn.Module):
  """``nn.Dense`` (same ``kernel``/``bias`` params) through :func:`linear`. With
  ``use_bias=False`` a ``bias`` given at call time is added instead (for biases held elsewhere,
  like qkv's q/v biases)."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = torch_default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    kernel, own_bias = _dense_params(self, x.shape[-1])
    return linear(x.astype(self.dtype), kernel, own_bias if self.use_bias else bias,
                  jnp.dtype(self.dtype))


class DenseParams(nn.Module):
  """A :class:`Dense` layer's ``(kernel, bias)`` without applying them, for functions that fuse
  several layers (same param names)."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = torch_default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    return _dense_params(self, in_features)


class CubeEmbed(nn.Module):
  """Tubelet embedding: a Conv3d with kernel = stride = (tubelet, p, p) over (B, T, H, W, C).

  Computed as patchify + one matmul, which is the same arithmetic as the strided conv and maps
  to a plain GEMM on every backend. The kernel keeps the conv layout (kt, p, p, C, D).
  """

  embed_dim: int
  patch_size: int
  tubelet_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array, token_idx: jax.Array | None = None) -> jax.Array:
    """Embeds every tubelet, or with ``token_idx`` (B, K) only those tokens: the result is the
    same for them, and the encoder never needs the masked ones (90% of the GEMM saved)."""
    b, t, h, w, c = video.shape
    kt, p = self.tubelet_size, self.patch_size
    fan_in = c * kt * p * p
    kernel = self.param("kernel", torch_default_kernel_init, (kt, p, p, c, self.embed_dim),
                        self.param_dtype)
    bias = self.param("bias", torch_default_bias_init(fan_in), (self.embed_dim,), self.param_dtype)
    x = video.reshape(b, t // kt, kt, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, fan_in)
    if token_idx is not None:
      x = jnp.take_along_axis(x, token_idx[..., None], axis=1)
    return linear(x.astype(self.dtype), kernel.reshape(fan_in, self.embed_dim), bias,
                  jnp.dtype(self.dtype))


ATTENTION_IMPLS = ("cpu_fused", "einsum", "xla", "cudnn")


def resolve_attention_impl(impl: str | None, dtype: Dtype = jnp.float32) -> str | None:
  """``None`` picks per backend and compute dtype.

  CPU: with bfloat16 compute on one device, the fused AVX512-BF16 kernel
  (:mod:`cpu_attention`) when the machine has it, else the einsum path (XLA:CPU runs its two
  batched matmuls faster than the generic ``dot_product_attention`` lowering, and it can
  recompute the probabilities in the backward pass). GPU/TPU: ``jax.nn.dot_product_attention``'s
  own choice (fused cuDNN/TPU kernels). The fused CPU kernel is an opaque custom call that the
  SPMD partitioner would replicate, hence one device only.
  """
  if impl is None:
    if jax.default_backend() != "cpu":
      return None
    if (jnp.dtype(dtype) == jnp.bfloat16 and jax.device_count() == 1
        and cpu_attention.available()):
      return "cpu_fused"
    return "einsum"
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: use None, {', '.join(ATTENTION_IMPLS)}")
  return impl


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


class Attention(nn.Module):
  """Multi-head self-attention with q/v bias and no k bias, as in the reference.

  One fused qkv projection (rows [q; k; v], head-major). ``implementation`` (None: per backend,
  see :func:`resolve_attention_impl`): "cpu_fused" (the AVX512-BF16 kernel on the packed qkv,
  bfloat16), "einsum" (two einsums, float32 softmax, optional recomputation of the
  probabilities), or "xla"/"cudnn" for ``jax.nn.dot_product_attention``.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None
  remat_probs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"embed dim {d} is not divisible by num_heads={self.num_heads}")
    hd = d // self.num_heads
    dense = functools.partial(Dense, kernel_init=xavier_uniform, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), self.param_dtype)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), self.param_dtype)
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    qkv = dense(3 * d, use_bias=False, name="qkv")(x, bias)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    impl = resolve_attention_impl(self.implementation, self.dtype)
    if impl == "cpu_fused":
      out = cpu_attention.attention(qkv.astype(jnp.bfloat16), hd**-0.5).astype(self.dtype)
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if impl == "einsum":
        out = einsum_attention(q, k, v, hd**-0.5, self.remat_probs)
      else:
        out = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5, implementation=impl)
    return dense(d, name="proj")(out.reshape(b, n, d))


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU."""
  return nn.gelu(x, approximate=False)


def _gelu_grad(x: jax.Array, g: jax.Array) -> jax.Array:
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
  da, dw2, db2 = _linear_bwd(dtype, (gelu_erf(h), w2, b2), g)
  dh = _gelu_grad(h, da)
  dx, dw1, db1 = _linear_bwd(dtype, (x, w1, b1), dh)
  return dx, dw1, db1, dw2, db2


mlp.defvjp(_mlp_fwd, _mlp_bwd)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2, as one :func:`mlp`."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    params = functools.partial(DenseParams, kernel_init=xavier_uniform,
                               param_dtype=self.param_dtype)
    w1, b1 = params(self.hidden_dim, name="fc1")(d)
    w2, b2 = params(d, name="fc2")(self.hidden_dim)
    return mlp(x.astype(self.dtype), w1, b1, w2, b2, jnp.dtype(self.dtype))


def drop_path(x: jax.Array, rate: jax.Array | float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample (rate may be traced)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class Block(nn.Module):
  """Pre-norm transformer block with optional layer scale and drop path.

  Returns ``(x, None)`` so that the same module runs under ``nn.scan``.
  """

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  init_values: float = 0.0
  use_drop_path: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  attention_remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array | float, deterministic: bool):
    d = x.shape[-1]

    def residual(x, y, gamma_name):
      if self.init_values > 0:
        gamma = self.param(gamma_name, nn.initializers.constant(self.init_values), (d,),
                           self.param_dtype)
        y = y * gamma.astype(y.dtype)
      if self.use_drop_path and not deterministic:
        y = drop_path(y, drop_rate, self.make_rng("dropout"))
      # The residual stream stays float32 while the branches compute in `dtype`.
      return x + y.astype(x.dtype)

    y = layer_norm(self.layer_norm_eps, "norm1")(x)
    y = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                  self.attention_remat, name="attn")(y)
    x = residual(x, y, "gamma_1")
    y = layer_norm(self.layer_norm_eps, "norm2")(x)
    y = Mlp(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(y)
    x = residual(x, y, "gamma_2")
    return x, None


class BlockStack(nn.Module):
  """``depth`` blocks with drop-path rates linspace(0, rate, depth); remat and scan are knobs.

  With ``scan`` the block parameters are stacked on a leading axis under ``blocks``; without it
  they live under ``blocks_{i}``.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  init_values: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  attention_remat: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    rates = np.linspace(0.0, self.drop_path_rate, self.depth).astype(np.float32)
    block_cls = Block
    if self.remat:
      block_cls = nn.remat(Block, static_argnums=(3,),
                           policy=getattr(jax.checkpoint_policies, self.remat_policy))
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, layer_norm_eps=self.layer_norm_eps,
              init_values=self.init_values, use_drop_path=self.drop_path_rate > 0,
              dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
              attention_remat=self.attention_remat)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=self.depth)
      x, _ = stack(name="blocks", **kw)(x, jnp.asarray(rates), deterministic)
    else:
      for i in range(self.depth):
        x, _ = block_cls(name=f"blocks_{i}", **kw)(x, float(rates[i]), deterministic)
    return x
