"""Self-attention on TPU through jax's Pallas splash attention kernel.

The kernel needs sequence blocks of multiples of 128 lanes, so the token axis is padded
(1568 -> 1664, 160 -> 256, 944 -> 1024) and segment ids keep real and padded tokens apart:
padded queries attend only to padding (their rows stay finite and are sliced off), real queries
never see a padded key. Blocks divide the padded length; the key/value block spans the whole
sequence where it fits, so each head's keys and values are read from HBM once per query pass
and the fused backward kernel writes one dq partial.

Mosaic kernels are opaque to the SPMD partitioner: under a mesh the call runs in ``shard_map``
over the mesh's batch axes (each device attends over its own clips), without one it is called
directly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

LANES = 128
BATCH_AXES = ("data", "fsdp")  # the trainer's mesh axes that split the batch
_MAX_BLOCK_Q = 512
_MAX_BLOCK_KV = 2048
_MAX_BLOCK_COMPUTE = 512


def padded_length(n: int) -> int:
  """Tokens rounded up to a multiple of 128."""
  return -(-n // LANES) * LANES


def _largest_block(n_pad: int, limit: int) -> int:
  """The largest multiple of 128 that divides ``n_pad`` and is at most ``limit``."""
  return max(b for b in range(LANES, min(limit, n_pad) + 1, LANES) if n_pad % b == 0)


def block_sizes(n_pad: int) -> splash.BlockSizes:
  bq = _largest_block(n_pad, _MAX_BLOCK_Q)
  bkv = _largest_block(n_pad, _MAX_BLOCK_KV)
  bkv_compute = _largest_block(bkv, _MAX_BLOCK_COMPUTE)
  return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv_compute,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv_compute,
                           use_fused_bwd_kernel=True)


def _kernel(heads: int, n_pad: int, interpret: bool):
  # Built inside the trace (splash caches the mask processing): its mask-info arrays become
  # constants of the program rather than arrays put on whatever devices are in context.
  mask = splash.MultiHeadMask([splash.FullMask((n_pad, n_pad))] * heads)
  return splash.make_splash_mha(mask, block_sizes=block_sizes(n_pad), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, n: int, interpret: bool) -> jax.Array:
  """(B, H, N_pad, D), k already scaled, all padded -> (B, H, N_pad, D)."""
  _, h, n_pad, _ = q.shape
  kernel = _kernel(h, n_pad, interpret)
  if n_pad == n:
    return jax.vmap(kernel)(q, k, v)
  ids = (jnp.arange(n_pad) >= n).astype(jnp.int32)
  return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, splash.SegmentIds(q=ids, kv=ids))


def _batch_axes(batch: int) -> tuple[tuple[str, ...], jax.sharding.AbstractMesh | None]:
  """The mesh in context (``jax.set_mesh`` / ``with mesh``) and the axes of it that split a
  batch of ``batch`` clips; ``((), None)`` without a multi-device mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    from jax._src import mesh as mesh_lib  # `with Mesh(...)`: the legacy context
    concrete = mesh_lib.thread_resources.env.physical_mesh
    if concrete.empty:
      return (), None
    mesh = concrete.abstract_mesh
  if mesh.size == 1:
    return (), None
  axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES and mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  # A batch the axes do not divide (e.g. one clip for init) runs whole on every device.
  return (axes if axes and batch % size == 0 else ()), mesh


def attention(qkv: jax.Array, scale: float, *, interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale) v for packed ``qkv`` (B, N, 3, heads, head_dim) -> (B, N, heads,
  head_dim), in ``qkv``'s dtype (the kernel accumulates in float32)."""
  b, n, three, h, d = qkv.shape
  if three != 3:
    raise ValueError(f"qkv must be (B, N, 3, heads, head_dim), got {qkv.shape}")
  n_pad = padded_length(n)
  # Padded on the token axis first, then split and transposed to the kernel's (B, H, N, D):
  # XLA fuses the pad into the one transposing copy per direction. The scale goes on k, not q:
  # the same logits, and its gradient multiplies dk as the kernel returns it rather than adding
  # a float32 pass over splash's summed dq.
  if n_pad != n:
    qkv = jnp.pad(qkv, ((0, 0), (0, n_pad - n), (0, 0), (0, 0), (0, 0)))
  q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))
  k = k * jnp.asarray(scale, k.dtype)

  out = _sharded_attend(b, n, interpret)(q, k, v)
  return jnp.transpose(out[:, :, :n], (0, 2, 1, 3))


def _sharded_attend(b: int, n: int, interpret: bool):
  attend = functools.partial(_attend, n=n, interpret=interpret)
  axes, mesh = _batch_axes(b)
  if mesh is None:
    return attend
  spec = P(axes if axes else None)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)


def self_attention(x: jax.Array, w_qkv: jax.Array, qkv_bias: jax.Array, w_proj: jax.Array,
                   b_proj: jax.Array, num_heads: int, scale: float, dtype, *,
                   interpret: bool = False, tag=lambda y, name: y) -> jax.Array:
  """``proj(attention(qkv(x)))`` for x (B, N, d) with the projections written in the kernel's
  layout: q/k/v come out of the qkv matmul as (3, B, heads, N, head_dim) and the output
  projection contracts (B, heads, N, head_dim) directly, so no transposing copies surround
  the kernel (on v5e, 40% fewer bytes for a ViT-B decoder layer's attention, forward and
  backward). Arithmetic as ``nn.Dense`` in ``dtype``; ``tag(y, name)`` names the activations
  ("qkv", "attn_out", "proj") for remat policies."""
  b, n, d = x.shape
  hd = d // num_heads
  n_pad = padded_length(n)
  x = x.astype(dtype)
  # Padding the input costs (n_pad - n)/n more projection FLOPs and saves a pass over q/k/v:
  # worth it for small padding (the decoder's 1568 -> 1664), not for 160 -> 256.
  pad_input = (n_pad - n) * 8 <= n
  if pad_input and n_pad != n:
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0)))
  w = w_qkv.astype(dtype).reshape(d, 3, num_heads, hd)
  qkv = jnp.einsum("bnd,dthk->tbhnk", x, w)
  qkv = qkv + qkv_bias.astype(dtype).reshape(3, 1, num_heads, 1, hd)
  qkv = tag(qkv * jnp.asarray([1, scale, 1], dtype).reshape(3, 1, 1, 1, 1), "qkv")
  if not pad_input and n_pad != n:
    qkv = jnp.pad(qkv, ((0, 0), (0, 0), (0, 0), (0, n_pad - n), (0, 0)))
  out = tag(_sharded_attend(b, n, interpret)(qkv[0], qkv[1], qkv[2]), "attn_out")
  if not pad_input:
    out = out[:, :, :n]
  y = jnp.einsum("bhnk,hkd->bnd", out, w_proj.astype(dtype).reshape(num_heads, hd, d))
  y = tag(y + b_proj.astype(dtype), "proj")
  return y[:, :n] if pad_input and n_pad != n else y
