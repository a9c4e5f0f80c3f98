"""launch.export: a trained workdir to orbax, official .pth and HF transformers files."""
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
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
