"""bench/gpu_check.sh: its shell is valid, it runs ViT-B at batch 32 and 64 JAX-only, and its
whole pipeline (train_step.py -> JSON -> clips/s, MFU, memory table) works at a tiny size on
the CPU. The GPU run itself needs a GPU machine."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def _run(*args, **env):
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, **env))


def test_gpu_check_dry_run_runs_vit_b_at_32_and_64_without_hf():
  assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
  proc = _run("--dry-run")
  assert proc.returncode == 0, proc.stderr
  steps = [l for l in proc.stdout.splitlines() if "bench/train_step.py" in l]
  assert len(steps) == 2
  for line, batch in zip(steps, ("32", "64")):
    assert "--sizes vit_base" in line and f"--batches {batch}" in line
    assert "--no-hf" in line and "--dtype bfloat16" in line and line.startswith("+ timeout")
  assert 'platform == "gpu"' in proc.stdout  # refuses to time a CPU fallback


def test_gpu_check_pipeline_on_cpu(tmp_path):
  import sys
  proc = _run("--cpu-smoke", OUT_DIR=str(tmp_path), PYTHON=sys.executable)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "train_step_b2.json").exists()
  summary = proc.stdout.split("bf16 dense peak", 1)[1]
  row = [l for l in summary.splitlines() if l.startswith("| vit_small | 2 |")]
  assert len(row) == 1
  cells = [c.strip() for c in row[0].split("|")[1:-1]]
  assert float(cells[4]) > 0 and float(cells[5]) > 0  # clips/s, model GFLOP/clip
  assert cells[6] == "nan%"  # no bf16 peak known for a CPU: no MFU
  assert float(cells[7]) > 0  # XLA's peak MiB
