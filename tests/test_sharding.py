"""Sharding that does what it says, on 8 simulated CPU devices (one subprocess per probe)."""
import json
import subprocess
import sys

import numpy as np

from tests import trainer_harness as h


def _probe(case: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_probe", case], cwd=h.REPO,
                        env=h.env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_accumulation_splits_every_device_shard_into_micro_batches():
  out = _probe("accumulation")
  one, four = out["1"], out["4"]
  # Every micro-batch spans all 8 devices: a quarter of the activations per device.
  assert four["temp"] < 0.4 * one["temp"], (four["temp"], one["temp"])
  # Same examples and masks, only summed in another order.
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
  assert len(set(one["losses"])) == 3  # the params move: a real trajectory


def test_optimizer_moments_shard_like_their_params_under_fsdp():
  out = _probe("moments")
  params, opt = out["params"], out["opt"]
  assert any("fsdp" in s for s in params.values())
  mu = {k: v for k, v in opt.items() if "/mu/" in k}
  nu = {k: v for k, v in opt.items() if "/nu/" in k}
  assert mu and nu
  for moments in (mu, nu):
    for path, spec in moments.items():
      param = path.split("/mu/" if "/mu/" in path else "/nu/")[1]
      assert spec == params[param], (path, spec, params[param])
  # The created state really is laid out that way.
  assert {k: v for k, v in out["actual_opt"].items() if "/mu/" in k} == mu


def test_activations_are_constrained_on_the_batch_axes_only_under_a_mesh():
  import jax

  from videomae_jax import masking
  from videomae_jax.models import VideoMAEPretrain
  from videomae_jax.train import sharding

  model = VideoMAEPretrain(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2,
                           num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                           decoder_num_heads=2)
  video = jax.numpy.zeros((2, 4, 32, 32, 3))
  mask = masking.tube_mask(jax.random.key(0), 2, model.grid, 0.75)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), video, mask)["params"])
  apply = jax.jit(lambda p, v: model.apply({"params": p}, v, mask))
  alone = apply.lower(params, video).as_text()
  mesh = sharding.make_mesh(1, 1)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    meshed = apply.lower(params, video).as_text()
  assert "sharding_constraint" not in alone
  # Encoder and decoder inputs and every block's output, on ('data', 'fsdp').
  constraints = [l for l in meshed.splitlines() if "sharding_constraint" in l]
  assert len(constraints) >= 2 + 2 + 1
  assert all('[{"data", "fsdp"}, {}, {}]' in l for l in constraints), constraints
