"""launch.compile: the pre-training step compiled ahead of time for a TPU slice (libtpu, no TPU).

Each case runs in a subprocess (libtpu is loaded there, not in the test process). Without
libtpu (`pip install -e '.[tpu]'`) or where it cannot load, the cases skip with the reason.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join("tests", "configs", "tiny.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="",
              ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _compile(tmp_path, *overrides, topology="v5e:2x2"):
  out = tmp_path / "aot.json"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compile", f"--config={TINY}", f"--topology={topology}",
       f"--json={out}", *overrides], cwd=ROOT, env=_env(), capture_output=True, text=True,
      timeout=600)
  if proc.returncode == 2 and "no TPU topology" in proc.stderr:
    pytest.skip("libtpu cannot describe a TPU topology here: " + proc.stderr.strip()[-300:])
  payload = json.loads(out.read_text()) if out.exists() else None
  return proc, payload


def test_tiny_config_compiles_for_v5e_with_sane_numbers(tmp_path):
  proc, r = _compile(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert r["fits"] and r["per_chip"]
  assert r["num_chips"] == 4 and r["device_kind"].startswith("TPU v5")
  assert r["mesh"] == {"data": 4, "fsdp": 1} and r["clips_per_chip"] == 2
  h = r["hbm"]
  assert h["arguments"] > 0 and h["temporaries"] > 0
  # The donated state is updated in place: its outputs alias the arguments.
  assert 0 < h["aliased"] <= min(h["arguments"], h["outputs"])
  assert h["total"] == (h["arguments"] + h["outputs"] - h["aliased"] + h["temporaries"]
                        + h["generated_code"])
  assert 0 < h["total"] <= r["hbm_capacity"] == 16 * 2**30
  assert r["xla_flops"] > 0 and r["xla_bytes"] > 0 and r["model_flops_per_clip"] > 0
  assert r["peak_flops"] == 197e12 and r["hbm_bandwidth"] == 819e9
  rf = r["roofline"]
  assert rf["compute_s"] == pytest.approx(r["xla_flops"] / r["peak_flops"])
  assert rf["memory_s"] == pytest.approx(r["xla_bytes"] / r["hbm_bandwidth"])
  assert rf["step_s"] == max(rf["compute_s"], rf["memory_s"])
  assert rf["bound"] == ("compute" if rf["compute_s"] >= rf["memory_s"] else "memory")
  assert rf["mfu_bound"] == pytest.approx(
      r["model_flops_per_clip"] * r["clips_per_chip"] / r["peak_flops"] / rf["step_s"])
  assert 0 < rf["mfu_bound"] <= 1
  # The HBM traffic: XLA's bytes less their on-chip part, and its roofline on the same terms.
  assert 0 < r["hbm_traffic_bytes"] <= r["xla_bytes"]
  ht = r["roofline_hbm_traffic"]
  assert ht["memory_s"] == pytest.approx(r["hbm_traffic_bytes"] / r["hbm_bandwidth"])
  assert ht["compute_s"] == rf["compute_s"] and ht["mfu_bound"] >= rf["mfu_bound"]
  assert rf["clips_per_s_per_chip"] == pytest.approx(r["clips_per_chip"] / rf["step_s"])
  assert "HBM per chip" in proc.stdout and "MFU bound" in proc.stdout
  assert "Roofline with the HBM traffic" in proc.stdout


def test_impossible_batch_is_out_of_hbm_naming_the_config(tmp_path):
  # 2M clips per chip: the uint8 batch alone exceeds a v5e chip's 16 GiB.
  proc, r = _compile(tmp_path, "--config.batch_size=8388608")
  assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])
  assert "out of HBM" in proc.stderr and TINY in proc.stderr
  assert "8388608" in proc.stderr and "v5e:2x2" in proc.stderr
  assert r["fits"] is False and TINY in r["error"]


def test_config_error_names_the_field(tmp_path):
  proc, _ = _compile(tmp_path, "--config.batch_size=6")  # not divisible by 4 chips
  assert proc.returncode == 1
  assert "config.batch_size=6" in proc.stderr


_PER_DEVICE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from videomae_jax import aot
devs = aot.topology_devices("v5e:2x2")
out = []
for n in (1, 4):
  mesh = Mesh(np.array(devs[:n]), ("d",))
  x = jax.ShapeDtypeStruct((n * 256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("d")))
  w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  c = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(x, w).compile()
  ca = c.cost_analysis()
  out.append((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
print(json.dumps(out))
"""


def test_cost_analysis_of_an_spmd_program_is_per_chip():
  # What the roofline assumes: n chips at n times the global batch report the same FLOPs.
  proc = subprocess.run([sys.executable, "-c", _PER_DEVICE], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  if proc.returncode and "no TPU topology" in proc.stderr:
    pytest.skip("libtpu cannot describe a TPU topology here")
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, four = json.loads(proc.stdout.strip().splitlines()[-1])
  assert one >= 2 * 256 * 512 * 512
  assert four == pytest.approx(one, rel=0.01)


def test_planning_table_bisects_to_the_largest_batch_that_fits(tmp_path):
  out = tmp_path / "table.json"
  cell = "vit_small:v5e:2x2:config=tests/configs/tiny.py:attention_impl=einsum"
  proc = subprocess.run(
      [sys.executable, os.path.join("bench", "aot_table.py"), "--cells", cell, "--batches",
       "2,4194304", "--json", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
      timeout=600)
  if proc.returncode and "no TPU topology" in proc.stderr:
    pytest.skip("libtpu cannot describe a TPU topology here")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert sorted(r["per_chip_batch"] for r in rows.values()) == [2, 4194304]
  assert {r["per_chip_batch"]: r["fits"] for r in rows.values()} == {2: True, 4194304: False}
  # The table lists the largest batch that fits.
  assert "| vit_small | v5e:2x2 | 4 x 1 | no | none | 2 |" in proc.stdout


def test_v4_devices_are_tensorcores_with_half_a_chip(tmp_path):
  # libtpu describes v4 slices per TensorCore (2 devices per chip): each device gets half of
  # the chip's 32 GiB, 275 TFLOP/s and 1.2 TB/s.
  proc, r = _compile(tmp_path, topology="v4:2x2x1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert r["num_chips"] == 8 and r["devices_per_chip"] == 2
  assert r["hbm_capacity"] == 16 * 2**30
  assert r["peak_flops"] == 275e12 / 2 and r["hbm_bandwidth"] == 1.2e12 / 2
