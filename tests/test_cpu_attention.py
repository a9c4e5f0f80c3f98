"""The fused AVX512-BF16 CPU attention kernel: numerics against float32 attention on the same
bf16 inputs (forward and all three gradients), model-level agreement with the einsum path,
per-backend resolution and the fallback when the kernel cannot be built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention_reference import einsum_attention as xla_bf16_attention, f32_attention, rel_err
from videomae_jax import masking
from videomae_jax.models import cpu_attention, layers, presets, videomae

pytestmark = pytest.mark.skipif(cpu_attention.unavailable_reason() is not None,
                                reason=f"fused CPU attention: {cpu_attention.unavailable_reason()}")


@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 5, 2, 64), (2, 70, 3, 64), (1, 33, 2, 88),
                                   (2, 200, 3, 32), (1, 130, 1, 16)])
def test_forward_and_gradients_match_float32(shape):
  b, n, h, d = shape
  rng = np.random.default_rng(n)
  qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)) * 1.5, jnp.bfloat16)
  cot = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
  scale = d**-0.5

  def grad_of(fn, x):
    return jax.grad(lambda x: jnp.vdot(fn(x, scale).astype(jnp.float32), cot))(x)

  out = jax.jit(cpu_attention.attention, static_argnums=1)(qkv, scale)
  assert out.shape == (b, n, h, d) and out.dtype == jnp.bfloat16
  ref = f32_attention(qkv, scale)
  xla = xla_bf16_attention(qkv, scale)
  # bf16 output rounding is 2^-9 relative; the kernel must be as close to float32 as XLA's own
  # bf16 attention is.
  assert rel_err(out, ref) < 1e-2
  assert rel_err(out, ref) <= 2 * rel_err(xla, ref) + 4e-3

  g = jax.jit(lambda x: grad_of(cpu_attention.attention, x))(qkv).astype(jnp.float32)
  g_ref = grad_of(f32_attention, qkv.astype(jnp.float32))
  g_xla = grad_of(xla_bf16_attention, qkv).astype(jnp.float32)
  for i, name in enumerate("qkv"):
    err, err_xla = rel_err(g[:, :, i], g_ref[:, :, i]), rel_err(g_xla[:, :, i], g_ref[:, :, i])
    assert err < 2e-2, (name, err)
    assert err <= 2 * err_xla + 4e-3, (name, err, err_xla)


def test_rows_are_independent_of_padding_and_batch():
  """Each (batch, head) is computed alone: a clip's output does not depend on its neighbours."""
  rng = np.random.default_rng(0)
  qkv = jnp.asarray(rng.standard_normal((3, 77, 3, 2, 64)), jnp.bfloat16)
  full = cpu_attention.attention(qkv, 0.125)
  one = cpu_attention.attention(qkv[1:2], 0.125)
  np.testing.assert_array_equal(np.asarray(full[1:2], np.float32), np.asarray(one, np.float32))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="head dim 63"):
    cpu_attention.attention(jnp.zeros((1, 4, 3, 1, 63), jnp.bfloat16), 1.0)
  with pytest.raises(ValueError, match="bfloat16"):
    cpu_attention.attention(jnp.zeros((1, 4, 3, 1, 64), jnp.float32), 1.0)
  with pytest.raises(ValueError, match=r"\(B, N, 3, heads, head_dim\)"):
    cpu_attention.attention(jnp.zeros((1, 4, 2, 1, 64), jnp.bfloat16), 1.0)


def test_workspace_is_allocated_by_xla():
  """The kernel's packed operands and scratch are an XLA buffer: they count in the compiled
  step's memory, and a workspace smaller than the layout needs is refused."""
  b, n, h, d = 2, 300, 3, 64
  qkv = jnp.zeros((b, n, 3, h, d), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda x: cpu_attention.attention(x, 0.125).astype(jnp.float32).sum()))
  temp = grad.lower(qkv).compile().memory_analysis().temp_size_in_bytes
  slots = cpu_attention._slots()
  assert temp >= cpu_attention.workspace_bytes(b, n, h, d, backward=True, slots=slots)
  small = jax.ShapeDtypeStruct((64,), jnp.uint8)
  call = jax.ffi.ffi_call(cpu_attention._FWD, (jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16),
                                               jax.ShapeDtypeStruct((b, h, n), jnp.float32),
                                               small))
  with pytest.raises(Exception, match="workspace too small"):
    jax.block_until_ready(call(qkv, scale=np.float32(0.125), slots=np.int64(slots)))


def test_resolution_per_dtype():
  assert layers.resolve_attention_impl(None, jnp.bfloat16) == "cpu_fused"
  assert layers.resolve_attention_impl(None, jnp.float32) == "einsum"
  assert layers.resolve_attention_impl("einsum", jnp.bfloat16) == "einsum"


def test_unavailable_kernel_falls_back_to_einsum(monkeypatch):
  monkeypatch.setattr(cpu_attention, "_cpu_flags", lambda: {"avx512f"})
  cpu_attention.unavailable_reason.cache_clear()
  try:
    assert "avx512_bf16" in cpu_attention.unavailable_reason()
    assert layers.resolve_attention_impl(None, jnp.bfloat16) == "einsum"
    with pytest.raises(RuntimeError, match="unavailable: the CPU lacks"):
      cpu_attention.attention(jnp.zeros((1, 4, 3, 1, 64), jnp.bfloat16), 1.0)
  finally:
    monkeypatch.undo()
    cpu_attention.unavailable_reason.cache_clear()
  assert cpu_attention.unavailable_reason() is None


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("VIDEOMAE_JAX_CACHE", str(tmp_path / "cache"))
  cpu_attention.unavailable_reason.cache_clear()
  try:
    assert "no C++ compiler" in cpu_attention.unavailable_reason()
  finally:
    cpu_attention.unavailable_reason.cache_clear()


def test_compiles_into_a_fresh_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("VIDEOMAE_JAX_CACHE", str(tmp_path))
  cpu_attention.unavailable_reason.cache_clear()
  try:
    assert cpu_attention.unavailable_reason() is None
    assert len(list(tmp_path.glob("cpu_attention_*.so"))) == 1
    assert not list(tmp_path.glob("tmp*"))
  finally:
    cpu_attention.unavailable_reason.cache_clear()


def test_model_loss_and_grads_match_einsum_path():
  """A bf16 VideoMAE pre-training model gives the same loss and gradients (to bf16 accuracy)
  with the fused kernel as with XLA's einsum attention."""
  kw = dict(presets.preset("vit_small"), img_size=64, num_frames=4, depth=2, decoder_depth=1,
            dtype=jnp.bfloat16)
  models = {impl: videomae.VideoMAEPretrain(**kw, attention_impl=impl)
            for impl in ("cpu_fused", "einsum")}
  video = jax.random.normal(jax.random.key(0), (2, 4, 64, 64, 3))
  mask = masking.tube_mask(jax.random.key(1), 2, models["einsum"].grid, 0.75)
  params = models["einsum"].init(jax.random.key(2), video, mask)["params"]

  def loss(params, model):
    pred = model.apply({"params": params}, video, mask)
    return jnp.mean(jnp.square(pred.astype(jnp.float32)))

  out = {k: jax.value_and_grad(loss)(params, m) for k, m in models.items()}
  (l_f, g_f), (l_e, g_e) = out["cpu_fused"], out["einsum"]
  assert abs(float(l_f) - float(l_e)) <= 1e-2 * abs(float(l_e))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_e)):
    assert a.dtype == jnp.float32
    assert rel_err(a, b) < 5e-2, (jax.tree_util.keystr(path), rel_err(a, b))
