r"""VideoMAE pre-training.

  python -m launch.pretrain --config=configs/pretrain_k400_vit_b.py --workdir=/ckpt/k400_b \
      --config.batch_size=512 --config.model.dtype=bfloat16

Phases: distributed init -> config check -> mesh -> data -> model/optimizer -> sharded init or
restore -> jitted step -> loop (metrics, images, checkpoints, preemption). Re-running the same
command resumes from the last checkpoint in --workdir with the same data order and masks.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

# TensorFlow (the input pipeline) prints start-up notices at INFO from C++.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from videomae_jax.train import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and images go here.")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0, for multi-process runs outside TPU/SLURM.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

log = logging.getLogger("videomae_jax.train")


def initialize_distributed(env: Mapping[str, str] = os.environ) -> None:
  """jax.distributed: from flags, from the environment (TPU pods, srun tasks), or one process."""
  import jax
  if _NPROC.value and _NPROC.value > 1:
    # Cross-process collectives for CPU devices; GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                               process_id=_PID.value)
  elif distributed.cluster_from_env(env):
    jax.distributed.initialize()
  elif distributed.env_int(env.get("SLURM_NTASKS")) > 1:
    # Waiting for the other tasks here would hang: none of them runs this command.
    log.warning("SLURM_NTASKS=%s but this process is not an srun task (no SLURM_STEP_ID): "
                "running as one process; start it with `srun python -m launch.pretrain ...` "
                "to use every task", env.get("SLURM_NTASKS"))


def train(config, workdir: str) -> dict:
  """Runs (or resumes) pre-training; returns the last logged metrics."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from videomae_jax import flops as flops_lib
  from videomae_jax.normalization import normalize
  from videomae_jax.train import checkpointing, sharding, step as step_lib
  from videomae_jax.train import program as program_lib
  from videomae_jax.train import config as config_lib
  from videomae_jax.train import metrics as metrics_lib
  from videomae_jax.train.visualize import reconstruction_grid

  # ---- config: every check before anything compiles -----------------------------------------
  # Derived defaults (data.seed from seed) filled in once, before the data and the meta use them.
  config = config_lib.resolve(config)
  config_lib.validate(config, jax.device_count())
  model = config_lib.build_model(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ---- mesh ----------------------------------------------------------------------------------
  mesh = sharding.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
  log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
           jax.process_count())

  # ---- checkpoints (first: the data position comes from them) --------------------------------
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
  start_step = ckpt.latest_step() or 0

  # ---- data ----------------------------------------------------------------------------------
  if config.data.get("synthetic", False):
    from videomae_jax.train.synthetic import SyntheticVideos
    data = SyntheticVideos(global_batch_size=config.batch_size, num_frames=model.num_frames,
                           size=model.image_hw[0], seed=config.data.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), start_step=start_step)
    data_desc = {"synthetic": True, "seed": int(config.data.seed)}
  else:
    from videomae_jax.data import build_pretrain_dataset
    from videomae_jax.data.pipeline import describe
    data = build_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), start_step=start_step)
    data_desc = json.loads(json.dumps(describe(config.data), default=str))
  videos_per_batch = config.batch_size // int(config.data.num_sample)
  steps_per_epoch = int(config.steps_per_epoch) or max(data.stats.num_files // videos_per_batch, 1)
  total_steps = int(config.total_steps) or int(config.num_epochs) * steps_per_epoch

  # ---- model, optimizer, shardings, jitted step (the program launch.compile compiles) ---------
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  program = program_lib.build_train_program(config, model, mesh, total_steps=total_steps,
                                            steps_per_epoch=steps_per_epoch, init_rng=init_rng)
  init_state, abstract = program.init_state, program.abstract_state
  state_sh = program.state_shardings

  # ---- sharded init or restore ---------------------------------------------------------------
  meta = {"seed": int(config.seed), "data": data_desc, "batch_size": int(config.batch_size),
          "model": checkpointing.model_meta(config_lib.model_fields(config))}
  state, start_step = ckpt.restore_or_init(
      lambda: jax.jit(init_state, out_shardings=state_sh)(),
      checkpointing.abstract_with_shardings(abstract, state_sh), meta)
  if is_main:
    # Where every parameter lives, for checking a sharding plan before a long run.
    specs = {sharding.path_name(path): {
        "spec": str(x.sharding.spec), "shape": list(x.shape),
        "shard_shape": list(x.sharding.shard_shape(x.shape))}
        for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    with open(os.path.join(workdir, "param_shardings.json"), "w") as f:
      json.dump(specs, f, indent=1)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  log.info("model %s: %.1fM params; %d steps (%d/epoch) of %d clips", config.model_name,
           n_params / 1e6, total_steps, steps_per_epoch, config.batch_size)

  p_step, replicated = program.step, program.replicated

  # Reconstruction images: one fixed clip, global example 0 of epoch 0 (a pure function of the
  # data seed, so the same whatever step the run starts or resumes from), on the device once,
  # masked as the run masks: its mask type and ratio, and the V2 decoder mask.
  if config.vis_every_steps:
    try:
      vis_u8 = np.asarray(data.example(0, epoch=0))
    except NotImplementedError:
      # No random access (TFDS): the first clip of a stream that starts at step 0.
      from videomae_jax.data import build_pretrain_dataset
      with build_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                  process_index=0, process_count=jax.process_count(),
                                  start_step=0) as first:
        vis_u8 = next(iter(first))["video"][0]
    vis_clip = jax.make_array_from_process_local_data(replicated, vis_u8, vis_u8.shape)
    vis_mask, vis_dmask = step_lib.draw_masks(jax.random.key(config.seed + 1), 1, model,
                                              config.mask)

    def reconstruct(params, clip_u8):
      video = normalize(clip_u8[None], jnp.dtype(model.dtype))
      return model.apply({"params": params}, video, vis_mask, vis_dmask)[0]

    reconstruct = jax.jit(reconstruct, out_shardings=replicated)

  # ---- loop ----------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  timer = metrics_lib.StepTimer()
  flops_per_clip = flops_lib.train_flops(
      model, config.mask.ratio,
      config.mask.decoder_ratio if config.mask.decoder_type == "run_cell" else None,
      config.mask.type)
  peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device, model.dtype)
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
      batch = sharding.global_batch({"video": local["video"]}, mesh)
      state, m = p_step(state, batch, train_rng)
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
        if peak and t:
          last["mfu"] = t["clips_per_sec"] * flops_per_clip / (peak * jax.device_count())
        s = data.stats.summary()
        last["skipped_videos"] = s["num_bad_files"]
        last["decode_failures"] = s["failures"]
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

      if config.vis_every_steps and (step % config.vis_every_steps == 0 or step == total_steps):
        pred = np.asarray(jax.device_get(reconstruct(state.params, vis_clip)))
        if is_main:
          img = reconstruction_grid(vis_u8, pred, vis_mask, config.norm_pix,
                                    decoder_mask=vis_dmask, model=model)
          writer.write_image(step, "reconstruction", img)

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
      raise SystemExit(stop_reason)
  return last


def main(argv):
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  # orbax and jax log every save/compile step through absl at INFO; keep the console readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  for name in ("videomae_jax", "videomae_jax.train", "videomae_jax.checkpoint"):
    logging.getLogger(name).setLevel(logging.INFO)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  initialize_distributed()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
