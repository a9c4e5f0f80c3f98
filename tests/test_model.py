"""Model behaviour beyond the reference parity: dtypes, knobs, init, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import losses, masking
from videomae_jax.models import VideoMAEClassifier, VideoMAEPretrain, preset
from videomae_jax.models.layers import sincos_table

SMALL = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)


def _inputs(model, batch=2, seed=0, ratio=0.75):
  video = jax.random.normal(jax.random.key(seed), (batch, model.num_frames, *model.image_hw, 3))
  return video, masking.tube_mask(jax.random.key(seed + 1), batch, model.grid, ratio)


def test_presets_match_reference_table():
  expected_encoder_params = {"vit_small": 21.9e6, "vit_base": 86.2e6, "vit_large": 303.9e6,
                             "vit_huge": 631.6e6, "vit_giant": 1011.6e6}
  for name, count in expected_encoder_params.items():
    model = VideoMAEClassifier(**preset(name, decoder=False), num_classes=0 + 1)
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v),
                            jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32))["params"]
    n = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["encoder"]))
    assert abs(n - count) / count < 0.002, (name, n)
  assert preset("vit_giant")["patch_size"] == 14
  with pytest.raises(KeyError, match="vit_tiny"):
    preset("vit_tiny")


def test_sincos_table_formula():
  t = sincos_table(5, 6)
  pos, j = 3, 4
  angle = pos / 10000 ** (2 * (j // 2) / 6)
  assert np.isclose(t[pos, j], np.sin(angle)) and np.isclose(t[pos, j + 1], np.cos(angle))


def test_init_follows_reference():
  model = VideoMAEPretrain(**SMALL)
  video, mask = _inputs(model)
  p = model.init(jax.random.key(0), video, mask)["params"]
  blk = p["encoder"]["blocks"]["blocks_0"]
  # xavier_uniform on Linear weights, zero biases, LayerNorm 1/0, q/v bias 0.
  lim = np.sqrt(6 / (64 + 192))
  assert np.abs(blk["attn"]["qkv"]["kernel"]).max() <= lim
  assert np.abs(blk["attn"]["qkv"]["kernel"]).max() > 0.9 * lim
  assert not np.any(blk["mlp"]["fc1"]["bias"]) and not np.any(blk["attn"]["q_bias"])
  assert np.all(blk["norm1"]["scale"] == 1)
  # PyTorch-default conv init: U(+-1/sqrt(fan_in)), fan_in = 3*2*8*8.
  k = p["encoder"]["patch_embed"]["kernel"]
  assert np.abs(k).max() <= 1 / np.sqrt(384) and np.abs(p["encoder"]["patch_embed"]["bias"]).max() > 0
  # mask token: N(0, .02) truncated at +-1 std.
  assert np.abs(p["mask_token"]).max() <= 0.02 and p["mask_token"].std() > 0.005
  # params float32 even with bf16 compute.
  pb = VideoMAEPretrain(**SMALL, dtype="bfloat16").init(jax.random.key(0), video, mask)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pb))


def test_bfloat16_loss_close_to_float32():
  model = VideoMAEPretrain(**SMALL)
  video, mask = _inputs(model)
  params = model.init(jax.random.key(0), video, mask)["params"]
  kw = dict(tubelet_size=2, patch_size=8)

  def loss(m, params):
    return losses.reconstruction_loss(video, m.apply({"params": params}, video, mask), mask, **kw)

  l32 = float(jax.jit(lambda p: loss(model, p))(params))
  bf = model.clone(dtype=jnp.bfloat16)
  lbf, g = jax.jit(jax.value_and_grad(lambda p: loss(bf, p)))(params)
  assert abs(float(lbf) - l32) / l32 < 2e-2
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
  pred = bf.apply({"params": params}, video, mask)
  assert pred.dtype == jnp.float32


def test_layer_scale_and_drop_path():
  model = VideoMAEPretrain(**SMALL, init_values=0.1, drop_path_rate=0.5)
  video, mask = _inputs(model)
  p = model.init(jax.random.key(0), video, mask)["params"]
  assert np.allclose(p["encoder"]["blocks"]["blocks_1"]["gamma_1"], 0.1)
  eval_a = model.apply({"params": p}, video, mask)
  eval_b = model.apply({"params": p}, video, mask)
  np.testing.assert_array_equal(eval_a, eval_b)
  tr = [model.apply({"params": p}, video, mask, train=True, rngs={"dropout": jax.random.key(i)})
        for i in range(2)]
  assert not np.allclose(tr[0], tr[1]), "drop path must be active in training"
  # scan gives the same eval output with stacked params
  sc = model.clone(scan=True)
  ps = sc.init(jax.random.key(0), video, mask)["params"]
  assert ps["encoder"]["blocks"]["blocks"]["gamma_2"].shape == (2, 64)
  sc.apply({"params": ps}, video, mask, train=True, rngs={"dropout": jax.random.key(0)})


def test_bad_inputs_raise_clear_errors():
  model = VideoMAEPretrain(**SMALL)
  video, mask = _inputs(model)
  p = model.init(jax.random.key(0), video, mask)["params"]
  with pytest.raises(ValueError, match=r"video must have shape \(B, 4, 32, 32, 3\)"):
    model.apply({"params": p}, video[:, :2], mask)
  with pytest.raises(ValueError, match="channels-last"):
    model.apply({"params": p}, jnp.moveaxis(video, -1, 2), mask)
  with pytest.raises(ValueError, match="num_frames 5 is not divisible by tubelet_size 2"):
    VideoMAEPretrain(**dict(SMALL, num_frames=5)).init(
        jax.random.key(0), jnp.zeros((1, 5, 32, 32, 3)), mask)
  with pytest.raises(ValueError, match="img_size 36 is not divisible by patch_size 8"):
    VideoMAEPretrain(**dict(SMALL, img_size=36)).init(
        jax.random.key(0), jnp.zeros((1, 4, 36, 36, 3)), mask)
  uneven = np.zeros((2, model.num_tokens), bool)
  uneven[0, :5] = True
  uneven[1, :6] = True
  with pytest.raises(ValueError, match="same count"):
    model.apply({"params": p}, video, uneven)
  wrong_n = masking.tube_mask(jax.random.key(0), 2, (2, 4, 2), 0.5)
  with pytest.raises(ValueError, match="mask has 16 tokens"):
    model.apply({"params": p}, video, wrong_n)


def test_concrete_bool_mask_equals_mask_object():
  model = VideoMAEPretrain(**SMALL)
  video, mask = _inputs(model)
  p = model.init(jax.random.key(0), video, mask)["params"]
  np.testing.assert_array_equal(model.apply({"params": p}, video, mask),
                                model.apply({"params": p}, video, np.asarray(mask.masked)))


def test_layers_are_chosen_for_the_platform_being_compiled():
  """One model lowers to the XLA:CPU custom-VJP layers for a CPU and to plain layers for a TPU
  (the CPU form's backward hides its transpose behind an optimization barrier)."""
  import os
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  # libtpu only as a compiler: no TPU host to query, and no lock against other users of it.
  for var, value in (("TPU_ACCELERATOR_TYPE", ""), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(var, value)
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # noqa: BLE001 - libtpu missing or too old
    pytest.skip(f"no TPU topology description (libtpu): {e}")
  model = VideoMAEPretrain(**SMALL, attention_impl="xla")  # attention: test_attention_dispatch
  video, mask = _inputs(model)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), video, mask)["params"])

  def grad(m):
    def loss(p, v):
      return losses.reconstruction_loss(v, m.apply({"params": p}, v, mask), mask, tubelet_size=2,
                                        patch_size=8)
    return jax.jit(jax.grad(loss))

  tpu = NamedSharding(Mesh(np.asarray(topo.devices[:1]), ("d",)), PartitionSpec())
  on_tpu = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=tpu),
                        (params, video))
  barrier = "optimization_barrier"
  assert barrier in grad(model).lower(params, video).as_text()
  assert barrier not in grad(model).lower(*on_tpu).as_text()
  # The knob is honest both ways.
  assert barrier not in grad(model.clone(layers_impl="plain")).lower(params, video).as_text()
  assert barrier in grad(model.clone(layers_impl="cpu")).lower(*on_tpu).as_text()
