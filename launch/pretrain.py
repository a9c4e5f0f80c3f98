r"""VideoMAE pre-training.

  python -m launch.pretrain --config=configs/pretrain_k400_vit_b.py --workdir=/ckpt/k400_b \
      --config.batch_size=512 --config.model.dtype=bfloat16

Phases: distributed init -> config check -> mesh -> data -> model/optimizer -> sharded init or
restore -> jitted step -> loop (metrics, images, checkpoints, preemption). Re-running the same
command resumes from the last checkpoint in --workdir with the same data order and masks.
"""
from __future__ import annotations

import logging
import os

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


def train(config, workdir: str) -> dict:
  """Runs (or resumes) pre-training; returns the last logged metrics."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from videomae_jax import flops as flops_lib
  from videomae_jax.normalization import normalize
  from videomae_jax.train import checkpointing, loop, sharding, step as step_lib
  from videomae_jax.train import program as program_lib
  from videomae_jax.train import config as config_lib
  from videomae_jax.train.visualize import reconstruction_grid

  # ---- config: every check before anything compiles -----------------------------------------
  # Derived defaults (data.seed from seed) filled in once, before the data and the meta use them.
  config = config_lib.resolve(config)
  config_lib.validate(config, jax.device_count())
  model = config_lib.build_model(config)
  is_main = jax.process_index() == 0
  loop.write_run_files(workdir, config)

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
  else:
    from videomae_jax.data import build_pretrain_dataset
    data = build_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), start_step=start_step)
  data_desc = loop.data_description(config.data)
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
  loop.write_param_shardings(workdir, state.params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  log.info("model %s: %.1fM params; %d steps (%d/epoch) of %d clips", config.model_name,
           n_params / 1e6, total_steps, steps_per_epoch, config.batch_size)

  replicated = program.replicated

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
  hooks = []
  if config.vis_every_steps:
    def write_reconstruction(step, state, writer):
      pred = np.asarray(jax.device_get(reconstruct(state.params, vis_clip)))
      if is_main:
        img = reconstruction_grid(vis_u8, pred, vis_mask, config.norm_pix,
                                  decoder_mask=vis_dmask, model=model)
        writer.write_image(step, "reconstruction", img)
    hooks.append(loop.Hook(int(config.vis_every_steps), write_reconstruction))
  flops_per_clip = flops_lib.train_flops(
      model, config.mask.ratio,
      config.mask.decoder_ratio if config.mask.decoder_type == "run_cell" else None,
      config.mask.type)
  _, last = loop.run(config=config, workdir=workdir, state=state, step_fn=program.step,
                     rng=train_rng, data=data, ckpt=ckpt, meta=meta, mesh=mesh,
                     start_step=start_step, total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, batch_keys=("video",),
                     flops_per_clip=flops_per_clip, dtype=model.dtype, hooks=hooks)
  return last


def main(argv):
  del argv
  distributed.configure_logging()
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  distributed.initialize(_NPROC.value, _COORD.value, _PID.value)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
