"""Checkpoint conversion: round trips, files on disk, layouts and errors."""
import argparse

import jax
import numpy as np
import pytest
import torch

from tests import hf_reference as ref
from videomae_jax import interop, masking
from videomae_jax.models import VideoMAEClassifier, VideoMAEPretrain

HF = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64,
          num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
          decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
          decoder_intermediate_size=128)


@pytest.fixture(scope="module")
def hf_model():
  return ref.pretrain_model(1, **HF)


@pytest.fixture(scope="module")
def model(hf_model):
  return VideoMAEPretrain(**interop.fields_from_hf_config(hf_model.config))


def _np_sd(m):
  return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def _assert_same(a, b):
  assert set(a) == set(b), (sorted(set(a) ^ set(b)))
  for k in a:
    assert a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_hf_layout(hf_model, model):
  sd = _np_sd(hf_model)
  _assert_same(interop.to_pytorch(interop.from_pytorch(sd, model), model, "hf"), sd)


def test_round_trip_official_layout(hf_model, model):
  official = ref.hf_to_official(hf_model.state_dict())
  assert interop.detect_layout(official) == "official"
  params = interop.from_pytorch(official, model)
  _assert_same(interop.to_pytorch(params, model, "official"), official)
  # Both layouts of the same weights give the same params.
  hf_params = interop.from_pytorch(hf_model.state_dict(), model)
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)


def test_round_trip_transformers4_bias_names(hf_model, model):
  sd = {k.replace("attention.attention.query.bias", "attention.attention.q_bias")
        .replace("attention.attention.value.bias", "attention.attention.v_bias"): v
        for k, v in _np_sd(hf_model).items()}
  params = interop.from_pytorch(sd, model)
  _assert_same(interop.to_pytorch(params, model, "hf", hf_bias_style="v4"), sd)


def test_official_pth_file_with_wrappers(tmp_path, hf_model, model):
  """An official training checkpoint: weights under 'model', torch.compile prefixes, args."""
  official = ref.hf_to_official(hf_model.state_dict())
  ckpt = {"model": {"_orig_mod." + k: torch.from_numpy(v) for k, v in official.items()},
          "epoch": 799, "args": argparse.Namespace(model="pretrain_videomae_base", lr=1.5e-4)}
  path = tmp_path / "checkpoint-799.pth"
  torch.save(ckpt, path)
  params = interop.from_pytorch(str(path), model)
  _assert_same(interop.to_pytorch(params, model, "official"), official)


def test_hf_safetensors_and_bin_files(tmp_path, hf_model, model):
  hf_model.save_pretrained(tmp_path / "st")
  torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
  a = interop.from_pytorch(tmp_path / "st" / "model.safetensors", model)
  b = interop.from_pytorch(tmp_path / "pytorch_model.bin", model)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The written HF file loads back into transformers with identical outputs.
  sd = {k: torch.from_numpy(v) for k, v in interop.to_pytorch(a, model, "hf").items()}
  reloaded = ref.pretrain_model(99, **HF)
  reloaded.load_state_dict(sd, strict=True)
  video = torch.randn(1, 4, 3, 32, 32)
  mask = torch.from_numpy(np.array(masking.tube_mask(jax.random.key(0), 1, model.grid,
                                                     0.5).masked))
  with torch.no_grad():
    torch.testing.assert_close(reloaded(video, bool_masked_pos=mask).logits,
                               hf_model(video, bool_masked_pos=mask).logits)


def test_missing_unexpected_and_mismatched_keys_are_named(hf_model, model):
  official = ref.hf_to_official(hf_model.state_dict())
  broken = dict(official)
  del broken["encoder.blocks.1.attn.v_bias"]
  with pytest.raises(interop.CheckpointError, match=r"missing keys: \['encoder.blocks.1.attn.v_bias'\]"):
    interop.from_pytorch(broken, model)
  extra = dict(official, **{"encoder.blocks.0.attn.k_bias": np.zeros(64, np.float32)})
  with pytest.raises(interop.CheckpointError, match="encoder.blocks.0.attn.k_bias"):
    interop.from_pytorch(extra, model)
  wrong = dict(official, **{"decoder.head.weight": np.zeros((10, 32), np.float32)})
  with pytest.raises(interop.CheckpointError, match=r"decoder.head.weight: shape \(10, 32\)"):
    interop.from_pytorch(wrong, model)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    interop.from_pytorch("/nonexistent/nope.pth", model)


def test_classifier_from_pretrained_encoder_with_fresh_head(hf_model):
  """Fine-tuning init: the encoder from a pre-training checkpoint, head and fc_norm fresh."""
  official = ref.hf_to_official(hf_model.state_dict())
  clf = VideoMAEClassifier(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2,
                           num_heads=4, layer_norm_eps=1e-12, num_classes=11)
  fresh = clf.init(jax.random.key(0), np.zeros((1, 4, 32, 32, 3), np.float32))["params"]
  with pytest.raises(interop.CheckpointError, match="model does not have"):
    interop.from_pytorch(official, clf)
  params = interop.from_pytorch(official, clf, drop=interop.PRETRAIN_ONLY, init_params=fresh)
  np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
  np.testing.assert_array_equal(
      params["encoder"]["blocks"]["blocks_1"]["mlp"]["fc1"]["kernel"],
      official["encoder.blocks.1.mlp.fc1.weight"].T)
  out = interop.to_pytorch(params, clf, "official")
  assert "blocks.0.attn.qkv.weight" in out and "head.weight" in out and "fc_norm.weight" in out
  assert not any(k.startswith("encoder.") for k in out)
  # Dropping a head of another size is explicit.
  other = dict(out, **{"head.weight": np.zeros((3, 64), np.float32),
                       "head.bias": np.zeros(3, np.float32)})
  with pytest.raises(interop.CheckpointError, match="head.weight"):
    interop.from_pytorch(other, clf)
  p2 = interop.from_pytorch(other, clf, drop=[r"^head\."], init_params=fresh)
  assert p2["head"]["kernel"].shape == (64, 11)


def test_fixed_pos_embed_is_accepted_and_learned_one_rejected(hf_model, model):
  from videomae_jax.models.layers import sincos_table
  official = ref.hf_to_official(hf_model.state_dict())
  ok = dict(official, pos_embed=sincos_table(model.num_tokens, 64)[None])
  interop.from_pytorch(ok, model)
  bad = dict(official, pos_embed=np.ones((1, model.num_tokens, 64), np.float32))
  with pytest.raises(interop.CheckpointError, match="learned position embedding"):
    interop.from_pytorch(bad, model)
