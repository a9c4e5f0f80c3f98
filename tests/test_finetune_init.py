"""Fine-tuning init from real files (workdir, exported params, official .pth, HF folders),
architecture checks, other geometries (v1 recomputed table, v2 interpolated table) and
pooled features."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import hf_reference as hf_ref
from videomae_jax import interop
from videomae_jax.finetune import features, init as init_lib
from videomae_jax.interop import CheckpointError
from videomae_jax.models import VideoMAEClassifier, VideoMAEPretrain, layers
from videomae_jax.train import checkpointing, loop, optim, step as step_lib
from videomae_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FIELDS = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2)
CLF = VideoMAEClassifier(**TINY_FIELDS, num_classes=5)
HEAD_AND_NORM = ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
RNG = jax.random.key(7)


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "tests/configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.resolve(mod.get_config())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pre-training workdir of tests/configs/tiny.py as the trainer writes it (config.json and a
  checkpoint of the train state, through the trainer's own writers), at step 3."""
  work = str(tmp_path_factory.mktemp("pretrain") / "w")
  config = _tiny_config()
  model = config_lib.build_model(config)
  tx, _ = optim.make_optimizer(config, total_steps=12, steps_per_epoch=4)
  state = step_lib.init_state(_random_params(model), tx)
  loop.write_run_files(work, config)
  ckpt = checkpointing.Checkpointer(os.path.join(work, "checkpoints"), every_steps=1, keep=2,
                                    async_save=False)
  ckpt.save(3, state, {"seed": 0, "step": 3}, force=True)
  ckpt.close()
  return work, model, jax.device_get(state.params)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  from launch.export import export
  out = str(tmp_path_factory.mktemp("export") / "out")
  export(workdir[0], out, formats=("orbax", "official", "hf"))
  return out


def _random_params(model, seed=0):
  """Random params of the model's shapes (values no init gives, so that what is loaded cannot
  be mistaken for what is initialised), without compiling its init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.1),
                      interop.param_shapes(model))


def _encoder_of(pre_params):
  """The classifier's encoder params from pre-training params (no final norm)."""
  return {k: v for k, v in pre_params["encoder"].items() if k != "norm"}


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def scratch():
  params, info = init_lib.load_init("", CLF, rng=RNG)
  return params, info


def test_pretraining_workdir_gives_the_encoder_and_a_fresh_head(workdir, scratch):
  work, pre_model, pre_params = workdir
  params, info = init_lib.load_init(work, CLF, rng=RNG)
  _assert_tree_equal(params["encoder"], _encoder_of(pre_params))
  # fc_norm and head: the classifier's own init from the same rng as from scratch.
  _assert_tree_equal({k: params[k] for k in ("fc_norm", "head")},
                     {k: scratch[0][k] for k in ("fc_norm", "head")})
  assert info["kind"] == "workdir" and info["path"] == work and info["step"] == 3
  assert info["initialised"] == HEAD_AND_NORM
  pre_names = interop.to_pytorch(pre_params, pre_model, "official")
  assert info["dropped"] == sorted(k for k in pre_names if k.startswith(
      ("decoder.", "encoder_to_decoder.", "mask_token", "encoder.norm.")))
  assert "decoder.head.weight" in info["dropped"] and "mask_token" in info["dropped"]
  assert info["loaded"] == len(pre_names) - len(info["dropped"])
  # A scanned classifier gets the same values stacked.
  sparams, _ = init_lib.load_init(work, CLF.clone(scan=True), rng=RNG)
  qkv = sparams["encoder"]["blocks"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.shape[0] == 2
  for i in range(2):
    np.testing.assert_array_equal(
        qkv[i], pre_params["encoder"]["blocks"][f"blocks_{i}"]["attn"]["qkv"]["kernel"])


def test_exported_params_folder_official_pth_and_hf_folder(workdir, exported, tmp_path):
  work, _, pre_params = workdir
  ref, _ = init_lib.load_init(work, CLF, rng=RNG)
  for path in (os.path.join(exported, "params"), exported):
    params, info = init_lib.load_init(path, CLF, rng=RNG)
    assert info["kind"] == "orbax" and info["path"] == os.path.join(exported, "params")
    assert info["initialised"] == HEAD_AND_NORM
    _assert_tree_equal(params, ref)
  params, info = init_lib.load_init(os.path.join(exported, "videomae_official.pth"), CLF,
                                    rng=RNG)
  assert info["kind"] == "pytorch" and info["step"] == 3
  _assert_tree_equal(params, ref)

  # HF folders saved by transformers itself: the pre-training model and its bare encoder.
  from transformers import VideoMAEForPreTraining
  hf = VideoMAEForPreTraining.from_pretrained(os.path.join(exported, "hf"))
  hf.save_pretrained(str(tmp_path / "hf_pre"))
  hf.videomae.save_pretrained(str(tmp_path / "hf_enc"))
  assert json.load(open(tmp_path / "hf_enc" / "config.json"))["architectures"] == [
      "VideoMAEModel"]
  # The encoder as older transformers wrote it (pytorch_model.bin, as on the Hub).
  from safetensors.torch import load_file
  enc_dir = tmp_path / "hf_enc"
  torch.save(load_file(str(enc_dir / "model.safetensors")), str(enc_dir / "pytorch_model.bin"))
  os.remove(enc_dir / "model.safetensors")
  for name in ("hf_pre", "hf_enc"):
    params, info = init_lib.load_init(str(tmp_path / name), CLF, rng=RNG)
    assert info["kind"] == "hf" and info["initialised"] == HEAD_AND_NORM, name
    _assert_tree_equal(params, ref)
  # HF's default LayerNorm eps (1e-12) loads, and is named.
  _, info = init_lib.load_init(str(tmp_path / "hf_pre"), CLF.clone(layer_norm_eps=1e-12),
                               rng=RNG)
  assert info["notes"] and "layer_norm_eps: checkpoint 1e-06, model 1e-12" in info["notes"][0]


def test_hf_video_classification_folder_gives_its_logits(tmp_path):
  hf = hf_ref.classifier_model(3, **dict(image_size=32, patch_size=8, num_frames=4,
                                         hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128,
                                         num_labels=5, layer_norm_eps=1e-6))
  hf.save_pretrained(str(tmp_path / "hf_clf"))
  params, info = init_lib.load_init(str(tmp_path / "hf_clf"), CLF, rng=RNG)
  assert info["kind"] == "hf" and info["initialised"] == [] and info["dropped"] == []
  assert info["notes"] == []
  video = np.random.default_rng(0).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  expected = hf(hf_ref.to_torch_video(video)).logits.detach().numpy()
  np.testing.assert_allclose(np.asarray(CLF.apply({"params": params}, video)), expected,
                             atol=1e-4, rtol=0)
  # The heads count is in the HF config (shapes do not show it).
  with pytest.raises(CheckpointError, match=r"num_heads: checkpoint 2, model 4"):
    init_lib.load_init(str(tmp_path / "hf_clf"), CLF.clone(num_heads=4), rng=RNG)


def test_fine_tuned_pth_and_its_head(workdir, tmp_path):
  ft, _ = init_lib.load_init(workdir[0], CLF, rng=RNG)
  ft = jax.tree.map(lambda x: x + 0.5, ft)  # a "fine-tuned" head and fc_norm
  sd = interop.to_pytorch(ft, CLF, "official")
  assert "head.weight" in sd and not any(k.startswith("encoder.") for k in sd)
  path = str(tmp_path / "finetuned.pth")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
              "epoch": 7}, path)
  params, info = init_lib.load_init(path, CLF, rng=RNG)
  _assert_tree_equal(params, jax.tree.map(np.asarray, ft))
  assert info == dict(kind="pytorch", path=path, step=7, loaded=len(sd), initialised=[],
                      dropped=[], notes=[])
  other = CLF.clone(num_classes=9)
  with pytest.raises(CheckpointError, match=r"head has 5 classes, the model 9.*drop_head"):
    init_lib.load_init(path, other, rng=RNG)
  params, info = init_lib.load_init(path, other, rng=RNG, drop_head=True)
  assert info["initialised"] == ["head.bias", "head.weight"]
  assert info["dropped"] == ["head.bias", "head.weight"]
  # The head a pre-trained encoder would get (the scratch init's, see the workdir test).
  _assert_tree_equal(params["head"], init_lib._init_modules(other, RNG, {"head"})["head"])
  _assert_tree_equal(params["fc_norm"], jax.tree.map(np.asarray, ft["fc_norm"]))


def test_architecture_mismatches_name_the_field(workdir, exported):
  work = workdir[0]
  with pytest.raises(CheckpointError, match=r"embed_dim: checkpoint 32, model 64"):
    init_lib.load_init(work, CLF.clone(embed_dim=64), rng=RNG)
  with pytest.raises(CheckpointError, match=r"num_heads: checkpoint 2, model 4"):
    init_lib.load_init(work, CLF.clone(num_heads=4), rng=RNG)  # from the workdir's config
  pth = os.path.join(exported, "videomae_official.pth")
  with pytest.raises(CheckpointError, match=r"depth: checkpoint 2, model 3"):
    init_lib.load_init(pth, CLF.clone(depth=3), rng=RNG)
  with pytest.raises(CheckpointError, match=r"patch_size: checkpoint 8, model 16.*tubelet_size: "
                                            r"checkpoint 2, model 4"):
    init_lib.load_init(pth, CLF.clone(patch_size=16, tubelet_size=4), rng=RNG)
  with pytest.raises(CheckpointError, match=r"mlp_ratio: checkpoint 4.0, model 2.0"):
    init_lib.load_init(exported, CLF.clone(mlp_ratio=2.0), rng=RNG)
  # Another clip length and frame size load: the position table is not in the checkpoint.
  params, _ = init_lib.load_init(work, CLF.clone(num_frames=8, img_size=48), rng=RNG)
  _assert_tree_equal(params["encoder"], _encoder_of(workdir[2]))


def test_unknown_or_missing_paths(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*expected"):
    init_lib.load_init(str(tmp_path / "nope"), CLF, rng=RNG)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("x")
  with pytest.raises(CheckpointError, match=r"junk.*unknown kind.*notes.txt.*expected"):
    init_lib.load_init(str(tmp_path / "junk"), CLF, rng=RNG)
  with pytest.raises(CheckpointError, match=r"notes.txt.*unknown type"):
    init_lib.load_init(str(tmp_path / "junk" / "notes.txt"), CLF, rng=RNG)
  empty = tmp_path / "empty_work"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text(open(os.path.join(workdir[0], "config.json")).read())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    init_lib.load_init(str(empty), CLF, rng=RNG)
  with pytest.raises(TypeError, match="VideoMAEClassifier"):
    init_lib.load_init("", VideoMAEPretrain(**TINY_FIELDS), rng=RNG)


def test_scratch_init_follows_the_reference_fine_tune_init(scratch):
  params, info = scratch
  assert info["kind"] == "scratch" and info["loaded"] == 0 and info["dropped"] == []
  assert "head.weight" in info["initialised"] and "blocks.1.mlp.fc2.bias" in info["initialised"]
  flat = {"/".join(str(k.key) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert all(x.dtype == np.float32 for x in flat.values())
  for name, x in flat.items():
    if name.endswith("scale"):  # LayerNorm 1 / 0
      np.testing.assert_array_equal(x, 1.0, err_msg=name)
    elif name.endswith(("bias", "q_bias", "v_bias")) and "patch_embed" not in name:
      np.testing.assert_array_equal(x, 0.0, err_msg=name)
  # The Conv3d keeps PyTorch's default init: U(+-1/sqrt(fan_in)) for weight and bias.
  bound = 1 / np.sqrt(3 * 2 * 8 * 8)
  for k in ("kernel", "bias"):
    x = flat[f"encoder/patch_embed/{k}"]
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.5 * bound
  # Every Linear: timm's trunc_normal_(std=0.02), cut at +-2, i.e. N(0, 0.02) (not the
  # pre-training xavier_uniform, whose std for these widths is far larger); head x init_scale.
  for name, x in flat.items():
    if name.endswith("kernel") and "patch_embed" not in name:
      std = x.std() / (CLF.init_scale if name.startswith("head") else 1.0)
      if x.size >= 512:
        assert 0.9 * 0.02 < std < 1.1 * 0.02, (name, std)


# --------------------------------------------------------------------------------------------
# Other geometries.

NARROW_16x224 = dict(img_size=224, patch_size=16, num_frames=16, embed_dim=32, depth=1,
                     num_heads=2)


def _bound_encoder(model):
  params = jax.eval_shape(lambda: model.init(RNG, *model.example_inputs()))
  return model.bind(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)).encoder


def test_16x224_checkpoint_into_a_32_frame_classifier(tmp_path):
  pre = VideoMAEPretrain(**NARROW_16x224, decoder_embed_dim=16, decoder_depth=1,
                         decoder_num_heads=2)
  pre_params = _random_params(pre)
  path = str(tmp_path / "pretrain_16x224.pth")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in
                        interop.to_pytorch(pre_params, pre, "official").items()}}, path)
  clf32 = VideoMAEClassifier(**dict(NARROW_16x224, num_frames=32), num_classes=3,
                             layers_impl="plain")
  params, info = init_lib.load_init(path, clf32, rng=RNG)
  assert info["kind"] == "pytorch" and info["initialised"] == HEAD_AND_NORM
  np.testing.assert_array_equal(params["encoder"]["patch_embed"]["kernel"],
                                pre_params["encoder"]["patch_embed"]["kernel"])
  # v1: the table is recomputed for 3136 tokens; its first 1568 rows are the 16-frame table.
  table32 = _bound_encoder(clf32).pos_table(clf32.grid)
  table16 = _bound_encoder(clf32.clone(num_frames=16)).pos_table((8, 14, 14))
  assert table32.shape == (3136, 32) and table16.shape == (1568, 32)
  np.testing.assert_array_equal(table32[:1568], table16)


def _torch_v2_table(src_grid, dst_grid, dim):
  """VideoMAE V2 run_class_finetuning.py's resize of a (1, T*H*W, C) table: bicubic over
  (H, W) per temporal slot, then linear over T (F.interpolate, align_corners=False)."""
  import torch.nn.functional as F
  (t, h, w), (nt, nh, nw) = src_grid, dst_grid
  x = torch.from_numpy(layers.sincos_table(t * h * w, dim))[None]
  x = x.reshape(-1, t, h, w, dim).reshape(-1, h, w, dim).permute(0, 3, 1, 2)
  x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
  x = x.permute(0, 2, 3, 1).reshape(-1, t, nh, nw, dim)
  x = x.permute(0, 2, 3, 4, 1).reshape(-1, dim, t)
  x = F.interpolate(x, size=nt, mode="linear")
  x = x.reshape(1, nh, nw, dim, nt).permute(0, 4, 1, 2, 3).flatten(1, 3)
  return x[0].numpy()


@pytest.mark.parametrize("dst", [(16, 14, 14), (8, 20, 20), (16, 20, 20), (4, 7, 9)])
def test_v2_interpolated_table_equals_torch_interpolate(dst):
  dim = 64
  got = layers.interpolated_sincos_table((8, 14, 14), dst, dim)
  np.testing.assert_allclose(got, _torch_v2_table((8, 14, 14), dst, dim), atol=1e-5, rtol=0)
  # And the classifier's encoder uses it for its own grid.
  clf = VideoMAEClassifier(**dict(NARROW_16x224, embed_dim=dim, num_frames=2 * dst[0],
                                  img_size=(16 * dst[1], 16 * dst[2])),
                           pos_embed_from=(8, 14, 14))
  np.testing.assert_array_equal(_bound_encoder(clf).pos_table(clf.grid), got)


def test_pos_embed_from_reaches_the_forward_pass():
  clf = CLF.clone(num_frames=8, img_size=48, layers_impl="plain")  # grid (4, 6, 6)
  params = _random_params(clf)
  video = np.random.default_rng(1).normal(size=(1, 8, 48, 48, 3)).astype(np.float32)
  run = lambda m: np.asarray(jax.jit(lambda p: m.apply({"params": p}, video))(params))  # noqa
  # Interpolating from the model's own grid is the identity: the recomputed table.
  np.testing.assert_array_equal(_bound_encoder(clf.clone(pos_embed_from=(4, 6, 6))).pos_table(
      clf.grid), layers.sincos_table(clf.num_tokens, clf.embed_dim))
  assert not np.allclose(run(clf.clone(pos_embed_from=(2, 4, 4))), run(clf), atol=1e-6)
  with pytest.raises(ValueError, match="pos_embed_from"):
    clf.clone(pos_embed_from=(4, 6)).init(RNG, *clf.example_inputs())


# --------------------------------------------------------------------------------------------
# Features.


def test_encode_is_what_the_head_sees(scratch):
  params = jax.tree.map(lambda x: x + 0.05, scratch[0])  # fc_norm away from 1/0
  model = CLF.clone(drop_path_rate=0.2)
  video = np.random.default_rng(2).normal(size=(3, 4, 32, 32, 3)).astype(np.float32)
  head = params["head"]
  feats = features.encode(model, params, video)
  assert feats.shape == (3, 32) and feats.dtype == jnp.float32
  np.testing.assert_allclose(feats @ head["kernel"] + head["bias"],
                             model.apply({"params": params}, video), atol=1e-5, rtol=0)
  mean = features.encode(model, params, video, pool="mean")
  mu, var = mean.mean(-1, keepdims=True), mean.var(-1, keepdims=True)
  by_hand = (mean - mu) / np.sqrt(var + 1e-6) * params["fc_norm"]["scale"] + \
      params["fc_norm"]["bias"]
  np.testing.assert_allclose(feats, by_hand, atol=1e-5, rtol=0)
  # In training mode (drop path on) with the same rng: the same features the logits use.
  rngs = {"dropout": jax.random.key(3)}
  train_feats = features.encode(model, params, video, train=True, rngs=rngs)
  assert not np.allclose(train_feats, feats, atol=1e-4)
  np.testing.assert_allclose(
      train_feats @ head["kernel"] + head["bias"],
      model.apply({"params": params}, video, train=True, rngs=rngs), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="pool"):
    features.encode(model, params, video, pool="cls")


def test_stop_encoder_grad_leaves_the_encoder_without_gradient(scratch):
  params = scratch[0]
  video = np.random.default_rng(4).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)

  model = CLF.clone(stop_encoder_grad=True)
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, video)[:, 0].sum()))(params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(grads["encoder"]))
  for k in ("fc_norm", "head"):
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads[k]["kernel" if k ==
                                                                             "head" else "scale"]))
