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
