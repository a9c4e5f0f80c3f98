"""The Pallas TPU (splash) attention wrapper, run in the Pallas interpreter on the CPU: forward
and the q/k/v gradients against float32 attention on the same bf16 inputs, at token counts
that need padding to 128-token blocks (1, 160, 944, 1568) and one that does not (2048)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention_reference import einsum_attention as einsum_bf16, f32_attention, rel_err
from videomae_jax.models import attention
from videomae_jax.models.tpu import splash


def interpreted(qkv, scale):
  return attention.dot_product_attention(qkv, scale, "tpu_splash_interpret")


def test_padding_and_blocks():
  assert [splash.padded_length(n) for n in (1, 160, 944, 1568, 2048)] == [128, 256, 1024, 1664,
                                                                          2048]
  for n_pad in (128, 256, 1024, 1664, 2048, 4096):
    bs = splash.block_sizes(n_pad)
    for blk in (bs.block_q, bs.block_kv, bs.block_kv_compute, bs.block_q_dkv, bs.block_kv_dkv):
      assert blk % 128 == 0 and n_pad % blk == 0, (n_pad, bs)
    assert bs.block_kv % bs.block_kv_compute == 0 and bs.use_fused_bwd_kernel
  # the whole sequence is one key/value block where it fits: keys and values read once
  assert splash.block_sizes(1664).block_kv == 1664


@pytest.mark.parametrize("n", [1, 160, 944, 1568, 2048])
def test_forward_and_gradients_match_float32(n):
  b, h, d = 1, (2 if n <= 256 else 1), 64  # small: the interpreter is slow
  rng = np.random.default_rng(n)
  qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)) * 1.5, jnp.bfloat16)
  cot = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
  scale = d**-0.5

  def grad_of(fn, x):
    return jax.grad(lambda x: jnp.vdot(fn(x, scale).astype(jnp.float32), cot))(x)

  out, g = jax.jit(lambda x: (interpreted(x, scale), grad_of(interpreted, x)))(qkv)
  assert out.shape == (b, n, h, d) and out.dtype == jnp.bfloat16
  assert g.shape == qkv.shape and g.dtype == jnp.bfloat16
  ref = f32_attention(qkv, scale)
  err, err_xla = rel_err(out, ref), rel_err(einsum_bf16(qkv, scale), ref)
  # bf16 rounding is 2^-9 relative: as close to float32 as XLA's own bf16 attention.
  assert err < 1e-2 and err <= 2 * err_xla + 4e-3, (err, err_xla)

  g_ref = grad_of(f32_attention, qkv.astype(jnp.float32))
  g_xla = grad_of(einsum_bf16, qkv)
  for i, name in enumerate("qkv"):
    err, err_xla = rel_err(g[:, :, i], g_ref[:, :, i]), rel_err(g_xla[:, :, i], g_ref[:, :, i])
    assert err < 2e-2, (name, err)
    assert err <= 2 * err_xla + 4e-3, (name, err, err_xla)


@pytest.mark.parametrize("n", [160, 1568])  # padded after the projection / before it
def test_attention_layer_with_projections_in_kernel_layout(n):
  """The Attention layer on the TPU path (projections written in the kernel's layout) has the
  params of the einsum path and its loss and gradients, to bf16 accuracy."""
  from videomae_jax.models import layers
  x = jax.random.normal(jax.random.key(0), (1, n, 128), jnp.float32)
  ref = layers.Attention(2, jnp.bfloat16, implementation="einsum")
  tpu = layers.Attention(2, jnp.bfloat16, implementation="tpu_splash_interpret")
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(tpu.init(jax.random.key(1), x)) == jax.tree.structure(params)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  cot = jax.random.normal(jax.random.key(3), x.shape)

  def loss_and_grads(m):
    return jax.jit(jax.value_and_grad(
        lambda p, x: jnp.vdot(m.apply(p, x).astype(jnp.float32), cot), argnums=(0, 1)))(params, x)

  (l_ref, g_ref), (l_tpu, g_tpu) = loss_and_grads(ref), loss_and_grads(tpu)
  assert abs(float(l_tpu) - float(l_ref)) <= 2e-2 * abs(float(l_ref)) + 1.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_tpu), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 2e-2, (jax.tree_util.keystr(path), rel_err(a, b))
