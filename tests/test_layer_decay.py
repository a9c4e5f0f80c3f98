"""Fine-tuning optimizer: layer-wise lr decay and weight-decay groups against the official
optim_factory, one AdamW step against torch.optim.AdamW, linear probe, state shardings."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec as P

from tests import reference_optim as ref
from videomae_jax import interop
from videomae_jax.models import VideoMAEClassifier, preset
from videomae_jax.train import optim, sharding, step as step_lib

VIT_B = VideoMAEClassifier(**preset("vit_base", decoder=False), num_classes=400)
SKIP = {"pos_embed", "cls_token"}  # the fine-tuning model's no_weight_decay()


def _flat(tree):
  return {"/".join(optim._names(p)): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _official_shapes(abstract, model):
  """{official fine-tuned name: shape} of a classifier's params, without allocating them."""
  views = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.float32), x.shape), abstract)
  return {k: tuple(v.shape) for k, v in interop.to_pytorch(views, model, "official").items()}


def _reference_groups(shapes, depth, layer_decay, weight_decay):
  params = {k: types.SimpleNamespace(shape=s, requires_grad=True) for k, s in shapes.items()}
  assigner = ref.make_assigner(layer_decay, depth)
  names, _ = ref.get_parameter_groups(
      ref.NamedParams(params), weight_decay, SKIP,
      assigner.get_layer_id if assigner else None, assigner.get_scale if assigner else None)
  return names


def _sorted(groups):
  return {k: dict(v, params=sorted(v["params"])) for k, v in groups.items()}


@pytest.fixture(scope="module")
def vit_b_abstract():
  return interop.param_shapes(VIT_B)


def test_vit_b_groups_equal_the_official_groups(vit_b_abstract):
  got = optim.param_groups(vit_b_abstract, 12, 0.75, 0.05)
  blocks_decay = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
  blocks_no_decay = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.bias",
                     "mlp.fc2.bias")
  expected = {
      "layer_0_decay": {"weight_decay": 0.05, "lr_scale": 0.75 ** 13,
                        "params": ["patch_embed.proj.weight"]},
      "layer_0_no_decay": {"weight_decay": 0.0, "lr_scale": 0.75 ** 13,
                           "params": ["patch_embed.proj.bias"]},
      "layer_13_decay": {"weight_decay": 0.05, "lr_scale": 1.0, "params": ["head.weight"]},
      "layer_13_no_decay": {"weight_decay": 0.0, "lr_scale": 1.0,
                            "params": ["fc_norm.bias", "fc_norm.weight", "head.bias"]},
  }
  for i in range(12):  # blocks.i -> layer i + 1, scale 0.75 ** (12 - i)
    expected[f"layer_{i + 1}_decay"] = {
        "weight_decay": 0.05, "lr_scale": 0.75 ** (12 - i),
        "params": sorted(f"blocks.{i}.{n}" for n in blocks_decay)}
    expected[f"layer_{i + 1}_no_decay"] = {
        "weight_decay": 0.0, "lr_scale": 0.75 ** (12 - i),
        "params": sorted(f"blocks.{i}.{n}" for n in blocks_no_decay)}
  assert len(expected) == 28
  assert _sorted(got) == expected
  # The official functions on the official names give the same groups.
  official = _reference_groups(_official_shapes(vit_b_abstract, VIT_B), 12, 0.75, 0.05)
  assert _sorted(official) == expected


def test_per_leaf_scale_and_decay_flag_equal_the_official_rule(vit_b_abstract):
  assigner = ref.make_assigner(0.75, 12)
  scales = _flat(optim.layer_decay_scales(vit_b_abstract, 12, 0.75))
  decays = _flat(optim.finetune_decay_mask(vit_b_abstract))
  flat = _flat(vit_b_abstract)
  assert set(scales) == set(decays) == set(flat)
  for path, x in flat.items():
    tree = {}
    node = tree
    for n in path.split("/")[:-1]:
      node = node.setdefault(n, {})
    node[path.split("/")[-1]] = np.broadcast_to(np.zeros((), np.float32), x.shape)
    ((name, arr),) = interop.to_pytorch(tree, VIT_B, "official").items()
    lid = assigner.get_layer_id(name)
    assert optim.layer_id(tuple(path.split("/")), 12) == lid, path
    assert float(scales[path]) == assigner.get_scale(lid), path
    official_decay = not (arr.ndim == 1 or name.endswith(".bias") or name in SKIP)
    assert bool(decays[path]) == official_decay, path


def test_scanned_params_get_the_same_scales_per_block(vit_b_abstract):
  scanned = interop.param_shapes(VIT_B.clone(scan=True))
  scales = _flat(optim.layer_decay_scales(scanned, 12, 0.75))
  decays = _flat(optim.finetune_decay_mask(scanned))
  plain_scales = _flat(optim.layer_decay_scales(vit_b_abstract, 12, 0.75))
  plain_decays = _flat(optim.finetune_decay_mask(vit_b_abstract))
  qkv = "encoder/blocks/blocks/attn/qkv/kernel"
  assert scales[qkv].shape == (12, 1, 1)
  np.testing.assert_array_equal(scales[qkv].ravel(), [0.75 ** (12 - i) for i in range(12)])
  for path, s in scales.items():
    if "/blocks/blocks/" not in path:
      assert float(s) == float(plain_scales[path]) and decays[path] == plain_decays[path]
      continue
    for i in range(12):
      plain = path.replace("/blocks/blocks/", f"/blocks/blocks_{i}/")
      assert float(s[i].ravel()[0]) == float(plain_scales[plain]), plain
      assert decays[path] == plain_decays[plain], plain
  assert _sorted(optim.param_groups(scanned, 12, 0.75, 0.05)) == _sorted(
      optim.param_groups(vit_b_abstract, 12, 0.75, 0.05))
  assert optim.num_blocks(scanned) == optim.num_blocks(vit_b_abstract) == 12


def test_no_layer_decay_gives_the_official_two_groups(vit_b_abstract):
  got = optim.param_groups(vit_b_abstract, 12, 1.0, 0.05)
  official = _reference_groups(_official_shapes(vit_b_abstract, VIT_B), 12, 1.0, 0.05)
  assert set(got) == {"decay", "no_decay"} and _sorted(got) == _sorted(official)


SMALL = VideoMAEClassifier(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2,
                           num_heads=2, num_classes=5, layers_impl="plain")


def _config(mode="finetune", grad_clip=0.0, layer_decay=0.75):
  c = ml_collections.ConfigDict()
  c.mode = mode
  c.batch_size = 8
  c.data = ml_collections.ConfigDict(dict(num_sample=2))  # 4 videos per step
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.5, min_lr=1e-3, warmup_epochs=5.0, warmup_steps=2, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.05, layer_decay=layer_decay, grad_clip=grad_clip))
  return c


def _params(model, seed=0):
  """Random params of the model's shapes (no init compile needed; nothing here runs it)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.2),
                      interop.param_shapes(model))


def _stepper(tx):
  @jax.jit
  def step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _grads(params, step):
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.3),
                      params)


@pytest.mark.parametrize("grad_clip,scan", [(0.0, False), (1.0, True)])
def test_steps_equal_torch_adamw_with_the_official_groups(grad_clip, scan):
  model = SMALL.clone(scan=scan)
  config = _config(grad_clip=grad_clip)
  total, spe = 10, 5
  params = _params(model)
  tx, schedule = optim.make_finetune_optimizer(config, total, spe, params)
  peak, final = 0.5 * 4 / 256, 1e-3 * 4 / 256  # lr scaled by videos per step (8 clips / 2)
  lrs = optim.reference_schedule(peak, final, total, 2)
  np.testing.assert_allclose([float(schedule(i)) for i in range(total)], lrs, rtol=1e-5)

  torch_params = {k: torch.nn.Parameter(torch.from_numpy(np.array(v)))
                  for k, v in interop.to_pytorch(params, model, "official").items()}
  assigner = ref.make_assigner(0.75, 2)
  _, groups = ref.get_parameter_groups(ref.NamedParams(torch_params), 0.05, SKIP,
                                       assigner.get_layer_id, assigner.get_scale)
  # run_class_finetuning.py / optim_factory.create_optimizer: the groups carry their decay.
  opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  opt_state, step = tx.init(params), _stepper(tx)
  for it in range(3):  # step 0 has lr 0 (warmup from 0); steps 1, 2 are in warmup, then cosine
    grads = _grads(params, it)
    params, opt_state = step(grads, opt_state, params)
    for g in opt.param_groups:  # engine_for_finetuning.py
      g["lr"] = lrs[it] * g["lr_scale"]
    for k, v in interop.to_pytorch(grads, model, "official").items():
      torch_params[k].grad = torch.from_numpy(np.array(v))
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(list(torch_params.values()), grad_clip)
    opt.step()
    got = interop.to_pytorch(params, model, "official")
    for k, v in torch_params.items():
      np.testing.assert_allclose(got[k], v.detach().numpy(), atol=1e-6, rtol=0,
                                 err_msg=f"{k} after step {it}")
  assert float(lrs[1]) > 0 and float(lrs[2]) > 0  # steps 1 and 2 moved the params


def test_linear_probe_trains_fc_norm_and_head_only():
  params = _params(SMALL)
  tx, _ = optim.make_finetune_optimizer(_config("linear_probe"), 10, 5, params)
  opt_state = tx.init(params)
  # No moments for the frozen encoder: Adam's two moments of fc_norm and head only.
  trained = sum(x.size for k in ("fc_norm", "head") for x in jax.tree.leaves(params[k]))
  moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert moments == 2 * trained
  step, new = _stepper(tx), params
  for it in range(3):
    new, opt_state = step(_grads(new, it), opt_state, new)
  jax.tree.map(np.testing.assert_array_equal, new["encoder"], params["encoder"])
  for k in ("fc_norm", "head"):
    for a, b in zip(jax.tree.leaves(new[k]), jax.tree.leaves(params[k])):
      assert not np.allclose(a, b), k
  # Without layer decay: the head and fc_norm updates are those of plain fine-tuning at scale 1
  # (their layer's scale is 1 anyway), with the encoder's gradients ignored.
  ft, _ = optim.make_finetune_optimizer(_config("finetune", layer_decay=1.0), 10, 5, params)
  ft_state, ft_new, ft_step = ft.init(params), params, _stepper(ft)
  for it in range(3):
    ft_new, ft_state = ft_step(_grads(ft_new, it), ft_state, ft_new)
  for k in ("fc_norm", "head"):
    jax.tree.map(np.testing.assert_array_equal, new[k], ft_new[k])


@pytest.mark.parametrize("mode", [
    "finetune",
    "linear_probe",
])
def test_state_shardings_give_the_moments_their_params_sharding(mode):
  abstract = interop.param_shapes(SMALL.clone(scan=True))
  tx, _ = optim.make_finetune_optimizer(_config(mode), 10, 5, abstract)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), abstract)
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.DATA_AXES)
  rules = ((r"params/head/kernel", (None, "fsdp")),
           (r"params/encoder/blocks/blocks/attn/qkv/kernel", ("fsdp", None, None)),
           (r".*", "replicate"))
  sh = sharding.state_shardings(state, mesh, rules, tx)
  specs = {k: s.spec for k, s in _flat(sh.opt_state).items()}
  head = [k for k in specs if k.endswith("head/kernel")]
  qkv = [k for k in specs if k.endswith("qkv/kernel")]
  # Adam's mu and nu of the head follow the head's rule; a probe keeps no qkv moments.
  assert len(head) == 2 and all(specs[k] == P(None, "fsdp") for k in head)
  if mode == "finetune":
    assert len(qkv) == 2 and all(specs[k] == P("fsdp", None, None) for k in qkv)
  else:
    assert not qkv
  assert all(s == P() for k, s in specs.items() if k not in head + qkv)


def test_layer_id_rule():
  assert optim.layer_id(("encoder", "patch_embed", "kernel"), 12) == 0
  assert optim.layer_id(("encoder", "blocks", "blocks_0", "attn", "qkv", "kernel"), 12) == 1
  assert optim.layer_id(("encoder", "blocks", "blocks_11", "norm1", "scale"), 12) == 12
  np.testing.assert_array_equal(
      optim.layer_id(("encoder", "blocks", "blocks", "mlp", "fc1", "kernel"), 12),
      np.arange(1, 13))
  assert optim.layer_id(("fc_norm", "scale"), 12) == 13
  assert optim.layer_id(("head", "bias"), 12) == 13
  with pytest.raises(ValueError, match="mode"):
    optim.make_finetune_optimizer(_config("probe"), 10, 5, interop.param_shapes(SMALL))
