"""launch.export: a trained workdir to orbax, official .pth and HF transformers files."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from tests import trainer_harness as h
from videomae_jax import interop, masking


def test_export_round_trips_into_transformers(tmp_path):
  work = tmp_path / "w"
  h.run(work, "--config.total_steps=2")
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={work}",
                         f"--out={out}"], cwd=h.REPO, env=h.env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  from launch.export import load_params
  model, params, step = load_params(str(work))
  assert step == 2

  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(str(out / "params"))
  jax.tree.map(np.testing.assert_array_equal, restored, params)

  official = interop.from_pytorch(str(out / "videomae_official.pth"), model)
  jax.tree.map(np.testing.assert_array_equal, official, params)

  from transformers import VideoMAEForPreTraining
  hf = VideoMAEForPreTraining.from_pretrained(str(out / "hf")).eval()
  video = np.random.default_rng(0).normal(size=(1, model.num_frames,
                                               *model.image_hw, 3)).astype(np.float32)
  mask = masking.tube_mask(jax.random.key(0), 1, model.grid, 0.75)
  with torch.no_grad():
    expected = hf(torch.from_numpy(video.transpose(0, 1, 4, 2, 3).copy()),
                  bool_masked_pos=torch.from_numpy(np.array(mask.masked))).logits.numpy()
  # HF's decoder norm is a default nn.LayerNorm (eps 1e-5).
  got = model.clone(decoder_norm_eps=1e-5).apply({"params": params}, video, mask)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_export_encoder_only(tmp_path):
  work = tmp_path / "w"
  h.run(work, "--config.total_steps=1")
  from launch.export import export, load_params
  written = export(str(work), str(tmp_path / "enc"), encoder_only=True,
                   formats=("official", "hf"))
  sd = torch.load(written["official"], weights_only=True)["model"]
  assert sd and all(k.startswith("encoder.") for k in sd)
  from transformers import VideoMAEModel
  enc = VideoMAEModel.from_pretrained(written["hf"])
  model, params, _ = load_params(str(work))
  np.testing.assert_array_equal(
      enc.embeddings.patch_embeddings.projection.weight.detach().numpy(),
      np.asarray(params["encoder"]["patch_embed"]["kernel"]).transpose(4, 3, 0, 1, 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  work = tmp_path_factory.mktemp("trained") / "w"
  h.run(work, "--config.total_steps=2", "--config.norm_pix=False")
  return work


def test_export_restores_the_params_only(trained):
  from launch.export import load_params
  from videomae_jax.train import checkpointing
  model, params, step = load_params(str(trained))
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, model.num_frames, *model.image_hw, 3), np.float32),
      masking.tube_mask(jax.random.key(0), 1, model.grid, 0.75)))["params"]
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  ckpt = checkpointing.Checkpointer(str(trained / "checkpoints"), every_steps=1, keep=1,
                                    read_only=True)
  try:
    restored = ckpt.restore_params(step, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])), abstract))
  finally:
    ckpt.close()
  # What was read is the params, byte for byte: no Adam moments on the device.
  assert sum(x.nbytes for x in jax.tree.leaves(restored)) == param_bytes
  assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) == param_bytes
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), params)


def test_hf_export_follows_the_run_config_and_installed_transformers(trained, tmp_path,
                                                                     monkeypatch):
  import json

  import transformers
  from launch.export import export
  from safetensors.numpy import load_file
  monkeypatch.setattr(transformers, "__version__", "4.46.0")
  written = export(str(trained), str(tmp_path / "v4"), formats=("hf",))
  with open(os.path.join(written["hf"], "config.json")) as f:
    assert json.load(f)["norm_pix_loss"] is False   # the run trained with norm_pix=False
  keys = load_file(os.path.join(written["hf"], "model.safetensors"))
  assert any(k.endswith("attention.attention.q_bias") for k in keys)


_BLOCK_TORCH = """
import runpy, sys
class _Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'transformers', 'safetensors'):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None
sys.meta_path.insert(0, _Blocker())
sys.argv = ['launch.export'] + sys.argv[1:]
runpy.run_module('launch.export', run_name='__main__', alter_sys=True)
"""


def _export_without_torch(*args):
  return subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *args], cwd=h.REPO, env=h.env(),
                        capture_output=True, text=True, timeout=300)


def test_export_without_torch_writes_orbax_and_names_the_extra(trained, tmp_path):
  out = tmp_path / "export"
  proc = _export_without_torch(f"--workdir={trained}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipping official" in proc.stderr and "skipping hf" in proc.stderr
  assert "`torch` extra" in proc.stderr
  with ocp.StandardCheckpointer() as ckptr:
    assert jax.tree.leaves(ckptr.restore(str(out / "params")))
  assert not (out / "videomae_official.pth").exists() and not (out / "hf").exists()


def test_export_asked_for_pth_without_torch_fails_before_any_work(trained, tmp_path):
  out = tmp_path / "export"
  proc = _export_without_torch(f"--workdir={trained}", f"--out={out}", "--formats=orbax,official")
  assert proc.returncode == 1
  assert "official" in proc.stderr and "`torch` extra" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not out.exists()
