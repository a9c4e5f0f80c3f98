"""Metrics on disk (JSONL + TensorBoard), the console progress line, and the MFU estimate."""
from __future__ import annotations

import datetime
import io
import itertools
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

log = logging.getLogger("videomae_jax.train")
_TB_FILES = itertools.count()  # two writers in one second and process get different files


class Peak(NamedTuple):
  """Dense peak FLOP/s of one device: bfloat16 matmuls, and float32 matmuls at JAX's default
  precision (TF32 tensor cores on NVIDIA; one bfloat16 pass on TPU) and at 'highest'
  (full float32: CUDA cores on NVIDIA; six bfloat16 passes on TPU). None: not known."""
  bf16: float
  f32_default: float
  f32_highest: float | None


def _tpu(bf16: float) -> Peak:
  return Peak(bf16, bf16, bf16 / 6)


# Per JAX device (`device_kind`); the longest name that matches wins, so "NVIDIA H100 PCIe"
# is not read as the SXM part and "TPU v5 lite" (v5e) not as "TPU v5" (v5p).
_PEAKS: dict[str, Peak] = {
    "TPU v3": _tpu(61.5e12),               # per core: a v3 chip is two JAX devices
    "TPU v4": _tpu(275e12),
    "TPU v5 lite": _tpu(197e12), "TPU v5e": _tpu(197e12),
    "TPU v5": _tpu(459e12), "TPU v5p": _tpu(459e12),
    "TPU v6 lite": _tpu(918e12), "TPU v6e": _tpu(918e12),
    "NVIDIA A100": Peak(312e12, 156e12, 19.5e12),
    "NVIDIA H100": Peak(989e12, 494e12, 67e12),          # SXM ("NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": Peak(756e12, 378e12, 51e12),
    "NVIDIA H100 NVL": Peak(835e12, 417e12, 60e12),
    "NVIDIA H200": Peak(989e12, 494e12, 67e12),
    "NVIDIA H200 NVL": Peak(835e12, 417e12, 60e12),
    "NVIDIA GH200": Peak(989e12, 494e12, 67e12),
    "NVIDIA B200": Peak(2250e12, 1100e12, None),
    "NVIDIA L4": Peak(121e12, 60e12, 30e12),
    "NVIDIA L40S": Peak(362e12, 183e12, 91.6e12),
}

# jax_default_matmul_precision values that make float32 matmuls exact float32 ('highest'),
# or three bfloat16 passes on TPU ('high'; TF32 on NVIDIA, like the default).
_HIGHEST = {"highest", "float32", "F32_F32_F32", "BF16_BF16_F32_X6", "BF16_BF16_F32_X9"}
_HIGH = {"high", "tensorfloat32", "BF16_BF16_F32_X3", "TF32_TF32_F32_X3"}


def _lookup(kind: str) -> Peak | None:
  matches = [name for name in _PEAKS
             if kind == name or kind.startswith(name + " ") or kind.startswith(name + "-")]
  return _PEAKS[max(matches, key=len)] if matches else None


def peak_flops_per_device(override: float = 0.0, dtype: str = "float32", *,
                          device_kind: str | None = None,
                          matmul_precision: str | None = None) -> float | None:
  """Peak FLOP/s of one device for the model's compute ``dtype``, for the MFU estimate.

  ``override`` > 0 is used as given (``config.peak_flops_per_device``). ``device_kind``
  defaults to the first JAX device's, ``matmul_precision`` (float32 runs only) to
  ``jax_default_matmul_precision``. None where the device is not in the table.
  """
  if override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  peak = _lookup(kind)
  if peak is None:
    return None
  if jax.numpy.dtype(dtype).itemsize < 4:   # bfloat16 (float16 runs are refused by the config)
    return peak.bf16
  if matmul_precision is None:
    matmul_precision = jax.config.jax_default_matmul_precision
  precision = str(matmul_precision or "default")
  if precision in _HIGHEST:
    return peak.f32_highest
  if precision in _HIGH and kind.startswith("TPU"):
    return peak.bf16 / 3
  return peak.f32_default


class _TensorBoard:
  """TensorBoard event files written with the `tensorboard` package alone: no TensorFlow import
  (its EventFileWriter opens files through TensorFlow whenever that is installed)."""

  def __init__(self, logdir: str, resume_step: int | None):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event, self._summary = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_TB_FILES)}")
    self._writer = RecordWriter(open(os.path.join(logdir, name), "wb"))
    self._add(0, file_version="brain.Event:2")
    if resume_step is not None:
      # TensorBoard drops the events at steps >= a session START's step from earlier files: the
      # steps a killed run logged after its last checkpoint.
      self._add(int(resume_step) + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def _add(self, step: int, **fields) -> None:
    event = self._event.Event(wall_time=time.time(), step=int(step), **fields)
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [self._summary.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._add(step, summary=self._summary.Summary(value=values))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    from PIL import Image
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    img = self._summary.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                      encoded_image_string=png.getvalue())
    self._add(step, summary=self._summary.Summary(
        value=[self._summary.Summary.Value(tag=name, image=img)]))

  def close(self) -> None:
    self._writer.close()


def _truncate_jsonl(path: str, resume_step: int) -> None:
  """Keeps the rows of ``path`` up to ``resume_step``: a run killed after its last checkpoint
  logged steps that the resumed run logs again (and maybe a partial last line)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if int(json.loads(line)["step"]) <= resume_step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard, images to TensorBoard and PNG files.

  ``resume_step``: the step the run starts from (0 for a fresh run); rows of an earlier run for
  later steps are dropped, so every step appears once. None appends to what is there. Only
  process 0 writes; the others get a no-op writer.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _truncate_jsonl(path, int(resume_step))
    self._jsonl = open(path, "a", buffering=1)
    try:
      self._tb = _TensorBoard(os.path.join(workdir, "tensorboard"), resume_step)
    except ImportError as e:  # TensorBoard is optional ([train] extra)
      log.warning("TensorBoard logging off (%s); metrics.jsonl only", e)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    if self._tb is not None:
      self._tb.scalars(int(step), clean)

  def write_image(self, step: int, name: str, image: np.ndarray) -> str | None:
    """``image``: uint8 (H, W, 3). Also saved as ``{workdir}/images/{name}_{step}.png``."""
    if not self.enabled:
      return None
    from PIL import Image
    path = os.path.join(self.workdir, "images", f"{name}_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    if self._tb is not None:
      self._tb.image(int(step), name, image)
    return path

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class StepTimer:
  """Splits wall time into waiting for data and everything else, between log lines.

  The run's first step (compilation included) is kept out of the rates: `first_step_done()`
  records its wall time as `compile_s` and starts the window after it.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.compile_s: float | None = None
    self.reset()

  def reset(self, now: float | None = None):
    self.t0 = self._clock() if now is None else now
    self.data_wait = 0.0
    self.steps = 0

  def first_step_done(self):
    """Call once the first step has finished (blocked on), instead of `tick()`."""
    now = self._clock()
    self.compile_s = now - self.t0
    self.reset(now)

  def exclude(self, seconds: float):
    """Leaves ``seconds`` (spent outside the steps, e.g. in validation) out of the window."""
    self.t0 += seconds

  def add_data_wait(self, seconds: float):
    self.data_wait += seconds

  def tick(self):
    self.steps += 1

  def summary(self, clips_per_step: int) -> dict[str, float]:
    """Rates over the timed steps since the last reset; {} when there were none."""
    if not self.steps:
      return {}
    elapsed = max(self._clock() - self.t0, 1e-9)
    return {
        "clips_per_sec": self.steps * clips_per_step / elapsed,
        "step_time_s": elapsed / self.steps,
        "data_wait_s": self.data_wait / self.steps,
        "compute_s": (elapsed - self.data_wait) / self.steps,
    }


def progress_line(step: int, total: int, loss: float, clips_per_sec: float | None, lr: float,
                  data_frac: float | None, eta_s: float | None, extra: str = "", *,
                  compile_s: float | None = None) -> str:
  """One console line; rates and ETA are left out when no step was timed yet (the first)."""
  parts = [f"step {step}/{total}", f"loss {loss:.4f}"]
  if clips_per_sec is not None:
    parts.append(f"{clips_per_sec:.2f} clips/s")
  parts.append(f"lr {lr:.3e}")
  if data_frac is not None:
    parts.append(f"data wait {100 * data_frac:.0f}%")
  if eta_s is not None:
    parts.append(f"ETA {datetime.timedelta(seconds=int(max(eta_s, 0)))}")
  if compile_s is not None:
    parts.append(f"first step {compile_s:.1f} s (compile)")
  return " | ".join(parts) + extra
