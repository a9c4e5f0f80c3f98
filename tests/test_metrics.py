"""Metric files, the step timer and the MFU peak table."""
import json
import os

import pytest

from videomae_jax.train import metrics as metrics_lib


@pytest.mark.parametrize("kind,dtype,peak", [
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5e", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),          # v5p reports itself as "TPU v5"
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312e12),
    # float32 matmuls: TF32 tensor cores on NVIDIA, one bf16 pass on TPU (JAX's default
    # precision), fewer FLOP/s on NVIDIA than the bf16 peak.
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494e12),
    ("NVIDIA H100 PCIe", "float32", 378e12),
    ("TPU v5", "float32", 459e12),
    ("TPU v5 lite", "float32", 197e12),
    ("NVIDIA GeForce GTX 1080", "bfloat16", None),
    ("TPU v7 something new", "bfloat16", None),
    ("cpu", "float32", None),
])
def test_peak_flops_by_device_kind_and_dtype(kind, dtype, peak):
  got = metrics_lib.peak_flops_per_device(0.0, dtype, device_kind=kind)
  assert got == (pytest.approx(peak, rel=0.01) if peak else None)


def test_peak_flops_follows_the_float32_matmul_precision():
  kind = "TPU v5"
  assert metrics_lib.peak_flops_per_device(0.0, "float32", device_kind=kind,
                                           matmul_precision="highest") == pytest.approx(459e12 / 6)
  assert metrics_lib.peak_flops_per_device(0.0, "float32", device_kind=kind,
                                           matmul_precision="high") == pytest.approx(459e12 / 3)
  # bfloat16 compute is not affected by the float32 precision setting.
  assert metrics_lib.peak_flops_per_device(0.0, "bfloat16", device_kind=kind,
                                           matmul_precision="highest") == pytest.approx(459e12)
  assert metrics_lib.peak_flops_per_device(0.0, "float32", device_kind="NVIDIA A100-SXM4-40GB",
                                           matmul_precision="highest") == pytest.approx(19.5e12)
  assert metrics_lib.peak_flops_per_device(123.0, "float32", device_kind=kind) == 123.0


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_metric_writer_drops_rows_after_the_resumed_step(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  for s in range(1, 9):
    w.write_scalars(s, {"loss": 1.0 / s})
  w.close()
  # A run killed mid-line leaves a partial last line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo')
  # Resumed from the checkpoint of step 5: steps 6-8 will be logged again.
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=5)
  for s in range(6, 11):
    w.write_scalars(s, {"loss": 1.0 / s})
  w.close()
  assert _steps(tmp_path) == list(range(1, 11))
  # A fresh start (no checkpoint) over an old file starts the file again.
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  w.write_scalars(1, {"loss": 2.0})
  w.close()
  assert _steps(tmp_path) == [1]
  # Without a resume step the writer appends.
  w = metrics_lib.MetricWriter(str(tmp_path))
  w.write_scalars(2, {"loss": 2.0})
  w.close()
  assert _steps(tmp_path) == [1, 2]


def test_tensorboard_events_without_tensorflow(tmp_path):
  import numpy as np
  from tensorboard.backend.event_processing import event_accumulator
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  for s in (1, 2, 3):
    w.write_scalars(s, {"loss": float(s)})
  w.write_image(3, "reconstruction", np.zeros((4, 6, 3), np.uint8))
  w.close()
  # Resuming from step 1: TensorBoard must drop the killed run's steps 2 and 3.
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=1)
  w.write_scalars(2, {"loss": 20.0})
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0)]


def test_step_timer_leaves_the_first_step_out():
  now = [100.0]
  timer = metrics_lib.StepTimer(clock=lambda: now[0])
  now[0] = 110.0
  timer.first_step_done()                 # 10 s: compilation and the first step
  assert timer.compile_s == 10.0
  assert timer.summary(8) == {}           # nothing timed yet: no rate to report
  now[0] = 111.0
  timer.tick()
  timer.add_data_wait(0.5)
  now[0] = 112.0
  timer.tick()
  s = timer.summary(8)
  assert s["clips_per_sec"] == pytest.approx(16 / 2.0)
  assert s["step_time_s"] == pytest.approx(1.0) and s["data_wait_s"] == pytest.approx(0.25)


def test_progress_line_without_a_timed_step():
  line = metrics_lib.progress_line(1, 10, 0.5, None, 1e-3, None, None, compile_s=6.4)
  assert "clips/s" not in line and "ETA" not in line and "first step 6.4 s" in line
  line = metrics_lib.progress_line(2, 10, 0.5, 100.0, 1e-3, 0.1, 80.0)
  assert "100.00 clips/s" in line and "ETA 0:01:20" in line


def test_trainer_times_the_first_step_apart(tmp_path):
  from tests import trainer_harness as h
  out = h.run(tmp_path / "w", "--config.total_steps=3")
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[0]["compile_s"] > 0 and "clips_per_sec" not in rows[0]
  assert all("compile_s" not in r and r["clips_per_sec"] > 0 for r in rows[1:])
  lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
  assert "first step" in lines[0] and "ETA" not in lines[0] and "clips/s" in lines[1]
