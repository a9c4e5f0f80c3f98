"""Attention implementation chosen for the platform being compiled, not the host: lowering the
same function for TPU, CUDA or CPU puts only that platform's kernel in the program; cuDNN falls
back to XLA where it cannot run; a tiny model compiles ahead of time for a TPU topology with the
Pallas kernel under shard_map."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videomae_jax import masking
from videomae_jax.models import VideoMAEPretrain, attention, cpu_attention, layers

CPU_CALLS = ("videomae_attention_fwd", "videomae_attention_bwd")
CUDNN_CALL = "__cudnn$fmha"  # jax's cuDNN attention custom call targets
SCALE = 0.125


def _f32_attention(qkv):
  q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
  p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * SCALE, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _exported(platform, impl=None, dtype=jnp.bfloat16):
  """StableHLO of forward + backward attention lowered for one platform, on this CPU host."""
  def f(qkv):
    out, vjp = jax.vjp(lambda x: attention.dot_product_attention(x, SCALE, impl), qkv)
    return out, vjp(out)[0]
  spec = jax.ShapeDtypeStruct((2, 200, 3, 2, 64), dtype)
  checks = [export.DisabledSafetyCheck.custom_call(n) for n in CPU_CALLS]
  return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(spec).mlir_module()


def test_tpu_lowering_has_the_pallas_kernel_only():
  text = _exported("tpu")
  assert "tpu_custom_call" in text  # Mosaic: the splash forward and fused backward kernels
  assert not any(c in text for c in CPU_CALLS)
  assert CUDNN_CALL not in text


def test_cpu_lowering_has_no_tpu_kernel():
  text = _exported("cpu")
  assert "tpu_custom_call" not in text
  assert ("videomae_attention_fwd" in text) == cpu_attention.available()
  assert not any(c in _exported("cpu", dtype=jnp.float32) for c in CPU_CALLS)  # einsum


def test_cuda_lowering_falls_back_to_xla_without_cudnn():
  """Tracing the CUDA branch does not raise where cuDNN is absent (this host): it takes XLA's
  attention, and nothing of the CPU or TPU kernels enters the program."""
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU host has cuDNN")
  text = _exported("cuda")
  assert CUDNN_CALL not in text and "tpu_custom_call" not in text
  assert not any(c in text for c in CPU_CALLS)
  qkv = jnp.asarray(np.random.default_rng(0).standard_normal((1, 40, 3, 2, 64)), jnp.bfloat16)
  assert not attention.cudnn_accepts(qkv, SCALE)
  out = attention._cuda_best(qkv, SCALE)
  ref = _f32_attention(qkv)
  assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 2e-2
  assert not attention.cudnn_accepts(qkv.astype(jnp.float32), SCALE)  # float32: never cuDNN
  with pytest.raises(Exception, match="cuDNN"):  # asked for explicitly, it still says why
    _exported("cuda", "cudnn")


def test_names():
  assert layers.resolve_attention_impl is attention.resolve_attention_impl
  assert attention.resolve_attention_impl(None, jnp.bfloat16, "tpu") == "tpu_splash"
  assert attention.resolve_attention_impl(None, jnp.bfloat16, "cuda") == "cudnn"
  assert attention.resolve_attention_impl(None, jnp.float32, "cuda") == "xla"
  assert attention.resolve_attention_impl(None, jnp.float32, "cpu") == "einsum"
  for impl in ("einsum", "cpu_fused", "xla", "cudnn", "tpu_splash"):
    assert attention.resolve_attention_impl(impl) == impl
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.dot_product_attention(jnp.zeros((1, 4, 3, 1, 64)), SCALE, "flash")


def _tpu_devices():
  # libtpu only as a compiler: no TPU host to query, and no lock against other users of it.
  for var, value in (("TPU_ACCELERATOR_TYPE", ""), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(var, value)
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  except Exception as e:  # noqa: BLE001 - no libtpu: nothing to compile for
    pytest.skip(f"TPU topology v5e:2x2 unavailable (install jax[tpu] for libtpu): {e}")


def test_model_compiles_for_a_tpu_topology_with_the_kernel_per_device():
  """The default config (attention_impl=None) AOT-compiles for v5e:2x2 from this CPU host: the
  Pallas kernel is in the program, the CPU custom call is not, and under the mesh each device's
  kernel sees its own share of the batch (shard_map), not the whole batch."""
  devices = _tpu_devices()
  mesh = Mesh(np.asarray(devices).reshape(4, 1), ("data", "fsdp"))
  model = VideoMAEPretrain(img_size=32, patch_size=8, num_frames=4, embed_dim=128, depth=1,
                           num_heads=2, decoder_embed_dim=128, decoder_depth=1,
                           decoder_num_heads=2, dtype="bfloat16")
  batch = 8
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))
  video = jax.ShapeDtypeStruct((batch, 4, 32, 32, 3), jnp.float32)

  def loss(p, v):
    m = masking.tube_mask(jax.random.key(1), batch, model.grid, 0.5)
    return model.apply(p, v, m).astype(jnp.float32).mean()

  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
  step = jax.jit(jax.grad(loss), in_shardings=(jax.tree.map(lambda _: rep, params), data))
  with jax.set_mesh(mesh):
    hlo = step.lower(params, video).compile().as_text()
  calls = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
  assert len(calls) == 4, calls  # forward + fused backward, encoder and decoder
  assert not any(c in hlo for c in CPU_CALLS)
  # kernel outputs (B_device, heads, 128 padded tokens, head_dim): 8 clips over 4 chips
  assert all(re.search(r"bf16\[2,2,128,64\]", l) for l in calls), calls


def test_platform_impls():
  impls = attention.platform_impls(None, jnp.bfloat16)
  assert impls["tpu"] == "tpu_splash" and impls["cuda"] == "cudnn_or_xla"
  assert impls["default"] == "xla"
  assert impls["cpu"] == ("cpu_fused" if cpu_attention.available() else "einsum")
  assert attention.platform_impls(None, jnp.float32)["cpu"] == "einsum"
  assert set(attention.platform_impls("xla", jnp.bfloat16).values()) == {"xla"}
  qkv = jnp.asarray(np.random.default_rng(0).standard_normal((1, 40, 3, 2, 64)), jnp.bfloat16)
  out = attention.dot_product_attention(qkv, SCALE, "cudnn_or_xla")  # XLA on this host
  assert float(jnp.abs(out.astype(jnp.float32) - _f32_attention(qkv)).max()) < 2e-2


def test_choosing_once_around_the_gradient_keeps_no_residuals_of_other_platforms():
  """Under scan, the per-call choice (attention_impl=None) stacks zero residuals of the CPU and
  GPU branches per block; choosing the platform once around the gradient with platform_impls
  compiles to the same temporaries as naming the TPU kernel."""
  devices = _tpu_devices()
  mesh = Mesh(np.asarray(devices).reshape(4, 1), ("data", "fsdp"))
  base = VideoMAEPretrain(img_size=64, patch_size=8, num_frames=4, embed_dim=128, depth=2,
                          num_heads=2, decoder_embed_dim=128, decoder_depth=2,
                          decoder_num_heads=2, dtype="bfloat16", scan=True)
  batch = 8
  params = jax.eval_shape(lambda: base.init(jax.random.key(0), *base.example_inputs()))
  video = jax.ShapeDtypeStruct((batch, 4, 64, 64, 3), jnp.float32)

  def grad_of(model):
    def loss(p, v):
      m = masking.tube_mask(jax.random.key(1), batch, model.grid, 0.5)
      return model.apply(p, v, m).astype(jnp.float32).mean()
    return jax.grad(loss)

  impls = attention.platform_impls(None, base.dtype)
  once = lambda p, v: jax.lax.platform_dependent(  # noqa: E731
      p, v, **{k: grad_of(base.clone(attention_impl=i)) for k, i in impls.items()})
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))

  def temp(fn):
    step = jax.jit(fn, in_shardings=(jax.tree.map(lambda _: rep, params), data))
    with jax.set_mesh(mesh):
      return step.lower(params, video).compile().memory_analysis().temp_size_in_bytes

  named = temp(grad_of(base.clone(attention_impl="tpu_splash")))
  assert temp(once) == named
  assert temp(grad_of(base)) > named
