"""Reference attention for the kernel tests: float32 softmax attention on the same inputs, the
einsum path in the inputs' dtype, and the relative error the tolerances are stated in."""
import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax.models import attention


def f32_attention(qkv, scale):
  q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
  p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def einsum_attention(qkv, scale):
  return attention.einsum_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale)


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-3))
