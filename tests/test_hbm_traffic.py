"""HBM traffic from a compiled TPU program: XLA's bytes accessed less its on-chip part."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from videomae_jax import hbm_traffic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shape of what XLA:TPU prints for a prefetched matmul (x copied into VMEM, S(1)), with a
# while loop whose body holds one more VMEM-resident elementwise op, and a fusion body whose
# own instructions must not be counted.
_HLO = textwrap.dedent("""\
    HloModule m, is_scheduled=true

    %fused (p0: bf16[64,128], p1: bf16[128,128]) -> bf16[64,128] {
      %p0 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} parameter(0)
      %p1 = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(1)
      ROOT %conv = bf16[64,128]{1,0:T(8,128)(2,1)} convolution(%p0, %p1), dim_labels=bf_io->bf
    }

    %body (t: (s32[], f32[256])) -> (s32[], f32[256]) {
      %t = (s32[], f32[256]{0:T(256)}) parameter(0)
      %i = s32[] get-tuple-element(%t), index=0
      %v = f32[256]{0:T(256)} get-tuple-element(%t), index=1
      %sq = f32[256]{0:T(256)S(1)} multiply(%v, %v)
      ROOT %r = (s32[], f32[256]{0:T(256)S(1)}) tuple(%i, %sq)
    }

    %cond (tc: (s32[], f32[256])) -> pred[] {
      %tc = (s32[], f32[256]{0:T(256)}) parameter(0)
      ROOT %c = pred[] constant(false)
    }

    ENTRY %main (x: bf16[64,128], w: bf16[128,128], v: f32[256]) -> bf16[64,128] {
      %x = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
      %w = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(1)
      %v = f32[256]{0:T(256)} parameter(2)
      %cs = (bf16[64,128]{1,0:T(8,128)(2,1)S(1)}, bf16[64,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%x)
      %cd = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
      %z = s32[] constant(0)
      %init = (s32[], f32[256]{0:T(256)}) tuple(%z, %v)
      %loop = (s32[], f32[256]{0:T(256)S(1)}) while(%init), condition=%cond, body=%body
      ROOT %f = bf16[64,128]{1,0:T(8,128)(2,1)} fusion(%cd, %w), kind=kOutput, calls=%fused, metadata={op_name="dot"}
    }
    """)


def test_onchip_part_of_a_prefetched_matmul_and_a_loop_body():
  x = 64 * 128 * 2
  v = 256 * 4
  # copy-start: its VMEM destination; copy-done: read and written again; the fusion's VMEM
  # operand; the loop body's multiply: its VMEM result (its operand lives in HBM).
  assert hbm_traffic.onchip_bytes(_HLO) == x + 2 * x + x + v


def test_no_onchip_arrays_leaves_bytes_accessed_unchanged():
  text = _HLO.replace("S(1)", "")
  # Without VMEM arrays only the copy-done halves are on-chip accounting.
  assert hbm_traffic.onchip_bytes(text) == 2 * 64 * 128 * 2
  plain = "\n".join(l for l in text.splitlines() if "copy-" not in l).replace("%cd", "%x")
  assert hbm_traffic.onchip_bytes(plain) == 0
  assert hbm_traffic.hbm_traffic(plain, 12345.0) == 12345.0


def test_unknown_text_is_all_hbm_traffic():
  assert hbm_traffic.onchip_bytes("not an HLO module") == 0
  assert hbm_traffic.hbm_traffic("", 10.0) == 10.0


_TPU_SCRIPT = """
import json, os
from videomae_jax import aot, hbm_traffic
aot.quiet_libtpu_env()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")[:1]), ("x",))
spec = lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P()))
out = {}
for name, f, shapes in (("matmul", lambda x, w: x @ w, ((4096, 768), (768, 768))),
                        ("scale", lambda x: x * 2, ((4096, 768),))):
  c = jax.jit(f).lower(*map(spec, shapes)).compile()
  ca = c.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  text = c.as_text()
  out[name] = dict(xla=ca["bytes accessed"], hbm=hbm_traffic.hbm_traffic(text, ca["bytes accessed"]),
                   prefetched="copy-start" in text)
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_matmul_hbm_traffic_is_its_operands_and_result():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  proc = subprocess.run([sys.executable, "-c", _TPU_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if proc.returncode and "no TPU topology" in proc.stderr:
    pytest.skip("libtpu cannot describe a TPU topology here: " + proc.stderr.strip()[-300:])
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  x, w = 4096 * 768 * 2, 768 * 768 * 2
  mm = r["matmul"]
  # XLA prefetches x into VMEM and counts the copy's halves and the VMEM read on top of the
  # one HBM read: the HBM traffic is x and w read and the result written (to a few KiB: XLA
  # also counts the copy's sync flag).
  assert mm["prefetched"] and mm["xla"] > 2 * (2 * x + w)
  assert mm["hbm"] == pytest.approx(2 * x + w, rel=1e-3)
  sc = r["scale"]
  assert sc["hbm"] <= sc["xla"]
  assert sc["hbm"] == pytest.approx(2 * x, rel=1e-3)
