"""The training loop shared by pre-training and fine-tuning.

A trainer builds its program (state, jitted step, data) and hands the loop the pieces that
differ: which batch keys go to the device, the FLOPs of one clip, and periodic hooks
(reconstruction images, validation). The loop owns everything else: data-wait timing, the
first-step compile time, the non-finite stop, metric lines and the progress line, checkpoint
saves, preemption and the final save.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from videomae_jax.train import checkpointing, metrics as metrics_lib, sharding

log = logging.getLogger("videomae_jax.train")


@dataclasses.dataclass(frozen=True)
class Hook:
  """``fn(step, state, writer) -> scalars or None`` every ``every_steps`` steps and at the last
  step; returned scalars are written to the metrics at that step (``writer`` takes images)."""
  every_steps: int
  fn: Callable[[int, Any, metrics_lib.MetricWriter], Mapping[str, float] | None]
  at_end: bool = True

  def due(self, step: int, total_steps: int) -> bool:
    if self.every_steps <= 0:
      return False
    return step % self.every_steps == 0 or (self.at_end and step == total_steps)


class NonFiniteStop(SystemExit):
  """Too many non-finite steps in a row; the last good checkpoint is kept."""


def write_run_files(workdir: str, config) -> None:
  """``config.json`` of the resolved config (process 0), which evaluation and export read."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def write_param_shardings(workdir: str, params) -> None:
  """Where every parameter lives, for checking a sharding plan before a long run."""
  if jax.process_index() != 0:
    return
  specs = {sharding.path_name(path): {
      "spec": str(x.sharding.spec), "shape": list(x.shape),
      "shard_shape": list(x.sharding.shard_shape(x.shape))}
      for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  with open(os.path.join(workdir, "param_shardings.json"), "w") as f:
    json.dump(specs, f, indent=1)


def data_description(data_config) -> dict:
  """What the checkpoint meta records of the data stream (compared on resume)."""
  if data_config.get("synthetic", False):
    return {"synthetic": True, "seed": int(data_config.seed)}
  from videomae_jax.data.pipeline import describe
  return json.loads(json.dumps(describe(data_config), default=str))


def run(*, config, workdir: str, state: Any, step_fn: Callable, rng: jax.Array,
        data: Any, ckpt: checkpointing.Checkpointer, meta: dict, mesh,
        start_step: int, total_steps: int, steps_per_epoch: int,
        batch_keys: Sequence[str] = ("video",), flops_per_clip: float | None = None,
        dtype: str = "float32", hooks: Iterable[Hook] = ()) -> tuple[Any, dict]:
  """Runs ``state`` from ``start_step`` to ``total_steps`` (or a stop); returns (state, the last
  logged metrics). Raises :class:`NonFiniteStop` after ``config.max_nonfinite_in_row`` skipped
  steps in a row."""
  is_main = jax.process_index() == 0
  hooks = tuple(hooks)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  timer = metrics_lib.StepTimer()
  peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device, dtype)
  ckpt.install_preemption_handler()
  last: dict = {}
  pending = []
  prev_m = None
  stop_reason = None
  step = start_step
  compile_logged = False
  it = iter(data)
  timer.reset()
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      local = next(it)
      timer.add_data_wait(time.perf_counter() - t0)
      batch = sharding.global_batch({k: local[k] for k in batch_keys}, mesh)
      state, m = step_fn(state, batch, rng)
      step += 1
      if timer.compile_s is None:
        # The first call compiles: time it on its own (compile_s), out of the rates and ETA.
        jax.block_until_ready(m)
        timer.first_step_done()
      else:
        timer.tick()
      pending.append(m)
      # Read the previous step's counter, so the host never waits for the step just dispatched.
      if prev_m is not None:
        in_row = int(jax.device_get(prev_m["nonfinite_in_row"]))
        if in_row >= config.max_nonfinite_in_row:
          stop_reason = (f"stopping: {in_row} non-finite steps in a row "
                         f"(config.max_nonfinite_in_row={config.max_nonfinite_in_row}); skipped "
                         "steps change nothing, and the last good checkpoint is kept")
          break
      prev_m = m

      # Hooks first: what they return goes into this step's metrics row.
      extra_scalars = {}
      for hook in hooks:
        if hook.due(step, total_steps):
          t_hook = time.perf_counter()
          extra_scalars.update(hook.fn(step, state, writer) or {})
          timer.exclude(time.perf_counter() - t_hook)  # validation is not training time

      if step % config.log_every_steps == 0 or step == total_steps:
        host = jax.device_get(pending)
        pending = []
        last = {k: float(v) for k, v in host[-1].items()}
        last["loss_avg"] = float(np.mean([h["loss"] for h in host]))
        t = timer.summary(config.batch_size)  # {} when the window held only the first step
        timer.reset()
        last.update(t)
        if not compile_logged:
          last["compile_s"] = timer.compile_s
          compile_logged = True
        last["epoch"] = step / steps_per_epoch
        if peak and t and flops_per_clip:
          last["mfu"] = t["clips_per_sec"] * flops_per_clip / (peak * jax.device_count())
        s = data.stats.summary()
        last["skipped_videos"] = s["num_bad_files"]
        last["decode_failures"] = s["failures"]
        last.update(extra_scalars)
        writer.write_scalars(step, last)
        if jax.process_count() > 1:
          log.info("process %d: step %d loss %.8f", jax.process_index(), step, last["loss"])
        if is_main:
          extra = f" | skipped steps {int(last['nonfinite_total'])}" if last["nonfinite_total"] else ""
          if s["num_bad_files"]:
            extra += f" | bad videos {s['num_bad_files']}"
          print(metrics_lib.progress_line(
              step, total_steps, last["loss"], t.get("clips_per_sec"), last["lr"],
              t["data_wait_s"] / max(t["step_time_s"], 1e-9) if t else None,
              (total_steps - step) * t["step_time_s"] if t else None, extra,
              compile_s=last.get("compile_s")), flush=True)
      elif extra_scalars:
        writer.write_scalars(step, extra_scalars)
        last.update(extra_scalars)

      if ckpt.should_save(step):
        ckpt.save(step, state, dict(meta, step=step))
      if ckpt.reached_preemption(step):
        stop_reason = f"preempted: saved step {step} and exiting"
        ckpt.save(step, state, dict(meta, step=step), force=True)
        break
    else:
      ckpt.save(step, state, dict(meta, step=step), force=True)
  finally:
    ckpt.close()
    writer.close()
    data.close()
    del it
  if stop_reason:
    log.warning(stop_reason)
    if is_main:
      print(stop_reason, flush=True)
    if stop_reason.startswith("stopping"):
      raise NonFiniteStop(stop_reason)
  return state, last
