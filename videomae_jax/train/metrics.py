"""Metrics on disk (JSONL + TensorBoard), the console progress line, and the MFU estimate."""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger("videomae_jax.train")

# Dense bf16 peak FLOP/s per device, for the MFU estimate.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override > 0:
    return override
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard, images to TensorBoard and PNG files.

  Only process 0 writes; the others get a no-op writer.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    try:
      from clu import metric_writers
      self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
    except Exception as e:  # noqa: BLE001 - TensorBoard is optional ([train] extra)
      log.warning("TensorBoard logging off (%s); metrics.jsonl only", e)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), clean)

  def write_image(self, step: int, name: str, image: np.ndarray) -> str | None:
    """``image``: uint8 (H, W, 3). Also saved as ``{workdir}/images/{name}_{step}.png``."""
    if not self.enabled:
      return None
    from PIL import Image
    path = os.path.join(self.workdir, "images", f"{name}_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    if self._tb is not None:
      self._tb.write_images(int(step), {name: image[None]})
    return path

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class StepTimer:
  """Splits wall time into waiting for data and everything else, between log lines."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.t0 = time.perf_counter()
    self.data_wait = 0.0
    self.steps = 0

  def add_data_wait(self, seconds: float):
    self.data_wait += seconds

  def tick(self):
    self.steps += 1

  def summary(self, clips_per_step: int) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    steps = max(self.steps, 1)
    return {
        "clips_per_sec": self.steps * clips_per_step / elapsed,
        "step_time_s": elapsed / steps,
        "data_wait_s": self.data_wait / steps,
        "compute_s": (elapsed - self.data_wait) / steps,
    }


def progress_line(step: int, total: int, loss: float, clips_per_sec: float, lr: float,
                  data_frac: float, eta_s: float, extra: str = "") -> str:
  eta = str(datetime.timedelta(seconds=int(max(eta_s, 0))))
  return (f"step {step}/{total} | loss {loss:.4f} | {clips_per_sec:.2f} clips/s | lr {lr:.3e} | "
          f"data wait {100 * data_frac:.0f}% | ETA {eta}{extra}")
