"""Transformer building blocks shared by the VideoMAE encoder and decoder.

Parameter names follow the official PyTorch modules (``qkv``, ``q_bias``, ``proj``, ``norm1``,
``mlp.fc1`` ...) so that checkpoint conversion is a rename plus a transpose.

The layers are plain Linen/XLA code (what a TPU or GPU program contains). On XLA:CPU the
matmul layers switch to the custom-VJP forms of :mod:`videomae_jax.models.cpu`; the choice
(``layers_impl=None``) is made by ``jax.lax.platform_dependent`` when the step is lowered, so
the parameters are the same and one model compiles for any target. ``layers_impl="plain"``
forces the plain layers everywhere (e.g. to use ``remat_policy`` on the CPU: checkpoint
policies cannot see inside a ``custom_vjp``), ``"cpu"`` the CPU forms.

Activations carry ``checkpoint_name`` tags (:data:`CHECKPOINT_NAMES`) for ``remat_policy``
and, when a mesh is in context (``jax.sharding.use_abstract_mesh``), sharding constraints by
logical axis names (:data:`LOGICAL_AXIS_RULES`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from videomae_jax.models import attention as attention_lib
from videomae_jax.models import cpu as cpu_layers

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


def normal_init(std: float) -> Callable:
  """timm's ``trunc_normal_(std=std)`` as the reference's fine-tuning model calls it: truncated
  at +-2 (absolute), i.e. N(0, std) for std << 1."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * std

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


def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of ``F.interpolate(mode='bicubic', align_corners=False)`` along one
  axis: cubic convolution with A = -0.75, source index (i + 0.5) * n_in / n_out - 0.5 (not
  clamped), taps outside the input clamped to its border."""
  a = -0.75
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    i0 = math.floor(src)
    t = src - i0
    x1, x2 = t + 1.0, 2.0 - t
    coeffs = (((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * x2 - 5 * a) * x2 + 8 * a) * x2 - 4 * a)
    for k, c in enumerate(coeffs):
      w[i, min(max(i0 - 1 + k, 0), n_in - 1)] += c
  return w


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of ``F.interpolate(mode='linear', align_corners=False)``: source
  index (i + 0.5) * n_in / n_out - 0.5 clamped at 0, the upper neighbour clamped to the end."""
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(math.floor(src), n_in - 1)
    lam = min(max(src - i0, 0.0), 1.0)
    w[i, i0] += 1.0 - lam
    w[i, min(i0 + 1, n_in - 1)] += lam
  return w


def interpolated_sincos_table(src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int],
                              dim: int) -> np.ndarray:
  """VideoMAE V2's table for another geometry, (T*H*W, dim) float32: the sin/cos table of the
  token grid ``src_grid`` (T0, H0, W0), resized bicubically in space and then linearly in time
  to ``dst_grid``, as ``torch.nn.functional.interpolate`` does it (align_corners=False).

  The two resizes are separable linear maps, applied here as one product in float64.
  """
  (t0, h0, w0), (t1, h1, w1) = tuple(map(int, src_grid)), tuple(map(int, dst_grid))
  src = sincos_table(t0 * h0 * w0, dim).reshape(t0, h0, w0, dim).astype(np.float64)
  out = np.einsum("at,bh,cw,thwd->abcd", _linear_weights(t0, t1), _cubic_weights(h0, h1),
                  _cubic_weights(w0, w1), src, optimize=True)
  return out.reshape(t1 * h1 * w1, dim).astype(np.float32)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype: bf16 variance is too coarse.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


LAYERS_IMPLS = ("plain", "cpu")

# Names of the activations tagged with checkpoint_name, for remat_policy: every projection's
# output under its layer name, plus the attention output before `proj`, the MLP's GELU output
# and each block's output.
CHECKPOINT_NAMES = ("qkv", "attn_out", "proj", "fc1", "mlp_hidden", "fc2", "block_out")

# Logical activation axes -> mesh axes; mesh axes missing from the mesh in context are dropped.
LOGICAL_AXIS_RULES = (("batch", ("data", "fsdp")),)


def check_layers_impl(impl: str | None) -> None:
  if impl is not None and impl not in LAYERS_IMPLS:
    raise ValueError(f"layers_impl={impl!r}: use None (per platform), "
                     f"{', '.join(map(repr, LAYERS_IMPLS))}")


def on_platform(impl: str | None, cpu_fn: Callable, plain_fn: Callable, *args):
  """``cpu_fn(*args)`` on XLA:CPU and ``plain_fn(*args)`` elsewhere (``impl=None``), chosen
  when the computation is lowered for its platform; ``impl`` "plain"/"cpu" forces one."""
  check_layers_impl(impl)
  if impl == "plain":
    return plain_fn(*args)
  if impl == "cpu":
    return cpu_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=plain_fn)


def plain_linear(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Dtype) -> jax.Array:
  """``nn.Dense``'s arithmetic: operands and result in ``dtype`` (the backend accumulates in
  float32), bias added in ``dtype``."""
  dtype = jnp.dtype(dtype)
  y = jnp.dot(x.astype(dtype), w.astype(dtype))
  if b is not None:
    y = y + b.astype(dtype)
  return y


# The XLA:CPU form, kept importable from here.
linear = cpu_layers.linear


def apply_linear(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Dtype,
                 impl: str | None = None) -> jax.Array:
  """``x @ w + b`` in ``dtype``: :func:`plain_linear`, or on XLA:CPU :func:`cpu.linear`."""
  dtype = jnp.dtype(dtype)
  return on_platform(impl, functools.partial(cpu_layers.linear, dtype=dtype),
                     functools.partial(plain_linear, dtype=dtype), x.astype(dtype), w, b)


def with_logical_constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """``with_sharding_constraint`` by logical axis names (:data:`LOGICAL_AXIS_RULES`, or flax's
  ``nn.logical_axis_rules`` when set) against the mesh in context; without a mesh (single
  device use) ``x`` is returned unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = tuple(nn.get_logical_axis_rules()) or LOGICAL_AXIS_RULES
  table = dict(rules)
  spec = []
  for name in logical_axes:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    spec.append(axes or None)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _dense_params(mdl: nn.Module, in_features: int) -> tuple[jax.Array, jax.Array | None]:
  kernel = mdl.param("kernel", mdl.kernel_init, (in_features, mdl.features), mdl.param_dtype)
  bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype) if mdl.use_bias \
      else None
  return kernel, bias


class Dense(nn.Module):
  """``nn.Dense`` (same ``kernel``/``bias`` params) through :func:`apply_linear`. With
  ``use_bias=False`` a ``bias`` given at call time is added instead (for biases held elsewhere,
  like qkv's q/v biases)."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = torch_default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str | None = None  # layers_impl: None = per platform, "plain", "cpu"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    kernel, own_bias = _dense_params(self, x.shape[-1])
    y = apply_linear(x, kernel, own_bias if self.use_bias else bias, self.dtype, self.impl)
    # Tagged with the layer's name (qkv, proj, ...) for remat policies.
    return checkpoint_name(y, self.name)


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
  layers_impl: str | None = None

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
    return apply_linear(x, kernel.reshape(fan_in, self.embed_dim), bias, self.dtype,
                        self.layers_impl)


# The implementation is chosen in models/attention.py; these names stay importable from here.
ATTENTION_IMPLS = attention_lib.ATTENTION_IMPLS
resolve_attention_impl = attention_lib.resolve_attention_impl
einsum_attention = attention_lib.einsum_attention


class Attention(nn.Module):
  """Multi-head self-attention with q/v bias and no k bias, as in the reference.

  One fused qkv projection (rows [q; k; v], head-major), then
  :func:`attention.dot_product_attention` with ``implementation`` (None: the best for the
  platform being compiled, chosen at lowering time; see that module for the others).
  ``remat_probs`` recomputes the probabilities in the backward pass of the einsum path.
  With the TPU kernel named ("tpu_splash", e.g. by a step choosing per platform with
  :func:`attention.platform_impls`) the projections are written in the kernel's layout
  (:func:`tpu.splash.self_attention`), which saves the transposing copies around it.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None
  remat_probs: bool = False
  layers_impl: str | None = None
  kernel_init: Callable = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"embed dim {d} is not divisible by num_heads={self.num_heads}")
    hd = d // self.num_heads
    dense = functools.partial(Dense, kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, impl=self.layers_impl)
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,), self.param_dtype)
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,), self.param_dtype)
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
    tpu_kernel = self.implementation in ("tpu_splash", "tpu_splash_interpret")
    if tpu_kernel and self.layers_impl != "cpu":
      # The TPU kernel with the projections in its layout (same params as the Dense layers).
      from videomae_jax.models.tpu import splash
      params = functools.partial(DenseParams, kernel_init=self.kernel_init,
                                 param_dtype=self.param_dtype)
      w_qkv, _ = params(3 * d, use_bias=False, name="qkv")(d)
      w_proj, b_proj = params(d, name="proj")(d)
      return splash.self_attention(
          x, w_qkv, bias, w_proj, b_proj, self.num_heads, hd**-0.5, jnp.dtype(self.dtype),
          interpret=self.implementation == "tpu_splash_interpret", tag=checkpoint_name)
    qkv = dense(3 * d, use_bias=False, name="qkv")(x, bias)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    out = attention_lib.dot_product_attention(qkv, hd**-0.5, self.implementation,
                                             remat=self.remat_probs)
    out = checkpoint_name(out, "attn_out")
    return dense(d, name="proj")(out.reshape(b, n, d))


# Exact (erf) GELU and the XLA:CPU fused MLP, kept importable from here.
gelu_erf = cpu_layers.gelu_erf
mlp = cpu_layers.mlp


def plain_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array,
              dtype: Dtype) -> jax.Array:
  """fc2(gelu(fc1(x))), exact GELU, with its activations named for remat policies."""
  h = checkpoint_name(plain_linear(x, w1, b1, dtype), "fc1")
  a = checkpoint_name(gelu_erf(h), "mlp_hidden")
  return checkpoint_name(plain_linear(a, w2, b2, dtype), "fc2")


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2: :func:`plain_mlp`, or on XLA:CPU the fused
  :func:`cpu.mlp` (which recomputes the GELU in its backward pass)."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layers_impl: str | None = None
  kernel_init: Callable = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    params = functools.partial(DenseParams, kernel_init=self.kernel_init,
                               param_dtype=self.param_dtype)
    w1, b1 = params(self.hidden_dim, name="fc1")(d)
    w2, b2 = params(d, name="fc2")(self.hidden_dim)
    dtype = jnp.dtype(self.dtype)
    return on_platform(self.layers_impl, functools.partial(cpu_layers.mlp, dtype=dtype),
                       functools.partial(plain_mlp, dtype=dtype), x.astype(dtype), w1, b1, w2, b2)


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
  layers_impl: str | None = None
  kernel_init: Callable = xavier_uniform

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
                  self.attention_remat, layers_impl=self.layers_impl,
                  kernel_init=self.kernel_init, name="attn")(y)
    x = residual(x, y, "gamma_1")
    y = layer_norm(self.layer_norm_eps, "norm2")(x)
    y = Mlp(self.mlp_dim, self.dtype, self.param_dtype, self.layers_impl,
            kernel_init=self.kernel_init, name="mlp")(y)
    x = residual(x, y, "gamma_2")
    x = with_logical_constraint(x, ("batch", None, None))
    return checkpoint_name(x, "block_out"), None


PLAIN_REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                        "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                        "checkpoint_dots_with_no_batch_dims")
NAMED_REMAT_POLICIES = ("save_only_these_names", "save_any_names_but_these")


def remat_policy(spec: str) -> Callable:
  """A ``jax.checkpoint_policies`` policy from its name, e.g. ``"nothing_saveable"``,
  ``"dots_saveable"``, or a name-taking one with its names after a colon:
  ``"save_only_these_names:qkv,fc1"`` (names from :data:`CHECKPOINT_NAMES`).

  Policies see the plain layers only: the XLA:CPU custom-VJP layers (``layers_impl=None`` on a
  CPU, or ``"cpu"``) keep their own residuals, so use ``layers_impl="plain"`` to apply a policy
  on the CPU.
  """
  name, sep, args = spec.partition(":")
  if name in PLAIN_REMAT_POLICIES and not sep:
    return getattr(jax.checkpoint_policies, name)
  if name in NAMED_REMAT_POLICIES and sep:
    names = tuple(a.strip() for a in args.split(",") if a.strip())
    unknown = sorted(set(names) - set(CHECKPOINT_NAMES))
    if unknown:
      raise ValueError(f"remat_policy={spec!r}: unknown checkpoint names {unknown}; the model "
                       f"names {', '.join(CHECKPOINT_NAMES)}")
    return getattr(jax.checkpoint_policies, name)(*names)
  raise ValueError(f"remat_policy={spec!r}: use one of {', '.join(PLAIN_REMAT_POLICIES)}, or "
                   f"{' / '.join(n + ':NAME,...' for n in NAMED_REMAT_POLICIES)} with names "
                   f"from {', '.join(CHECKPOINT_NAMES)}")


class BlockStack(nn.Module):
  """``depth`` blocks with drop-path rates linspace(0, rate, depth); remat and scan are knobs.

  With ``scan`` the block parameters are stacked on a leading axis under ``blocks``; without it
  they live under ``blocks_{i}``. ``remat`` checkpoints each block with the policy
  ``remat_policy(self.remat_policy)`` names; under ``scan`` without ``prevent_cse`` (the loop
  already keeps XLA from merging the recomputation into the forward pass).
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
  layers_impl: str | None = None
  # The Linear layers' init: xavier_uniform in pre-training, trunc_normal(0.02) in the
  # reference's fine-tuning model.
  kernel_init: Callable = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    rates = np.linspace(0.0, self.drop_path_rate, self.depth).astype(np.float32)
    check_layers_impl(self.layers_impl)
    policy = remat_policy(self.remat_policy)  # checked with or without remat
    block_cls = Block
    if self.remat:
      block_cls = nn.remat(Block, static_argnums=(3,), policy=policy, prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, layer_norm_eps=self.layer_norm_eps,
              init_values=self.init_values, use_drop_path=self.drop_path_rate > 0,
              dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
              attention_remat=self.attention_remat, layers_impl=self.layers_impl,
              kernel_init=self.kernel_init)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=self.depth)
      x, _ = stack(name="blocks", **kw)(x, jnp.asarray(rates), deterministic)
    else:
      for i in range(self.depth):
        x, _ = block_cls(name=f"blocks_{i}", **kw)(x, float(rates[i]), deterministic)
    return x
