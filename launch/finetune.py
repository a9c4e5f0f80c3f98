r"""VideoMAE fine-tuning (and linear probing) of a classifier.

  python -m launch.finetune --config=configs/finetune_k400_vit_b.py --workdir=/ckpt/k400_b_ft \
      --config.init=/ckpt/k400_b --config.data.train_list=train.csv \
      --config.data.val_list=val.csv --config.num_classes=400

`--config.init` is a pre-training workdir (its latest checkpoint), a params folder written by
`launch.export`, an official `.pth` (pre-trained or fine-tuned), an HF folder, or "" (from
scratch). Phases as in `launch.pretrain`: config check -> mesh -> data -> init or restore ->
jitted step -> loop (metrics, validation, checkpoints, preemption). Re-running the command
resumes from the last checkpoint in --workdir with the same data order, augmentation and
dropout. `python -m launch.evaluate --workdir=...` then runs the test protocol.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/finetune_*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and evaluations go here.")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0, for multi-process runs outside TPU/SLURM.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

log = logging.getLogger("videomae_jax.train")


def train(config, workdir: str) -> dict:
  """Runs (or resumes) fine-tuning; returns the last logged metrics."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from videomae_jax import flops as flops_lib
  from videomae_jax.data import sources
  from videomae_jax.finetune import config as config_lib
  from videomae_jax.finetune import init as init_lib
  from videomae_jax.finetune import step as ft_step
  from videomae_jax.finetune import validation
  from videomae_jax.train import checkpointing, loop, optim, sharding, step as step_lib

  # ---- config: every check before anything compiles -----------------------------------------
  config = config_lib.resolve(config)
  config_lib.validate(config, jax.device_count())
  model = config_lib.build_model(config)
  num_classes = int(config.num_classes)
  loop.write_run_files(workdir, config)

  # ---- mesh and checkpoints ------------------------------------------------------------------
  mesh = sharding.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
  start_step = ckpt.latest_step() or 0

  # ---- data: labels checked against num_classes before anything decodes --------------------
  from videomae_jax.data import build_pretrain_dataset
  train_records = validation.train_records(config.data)
  sources.check_labels(train_records, num_classes, validation.source_name(config.data))
  val_records = validation.val_records(config.data, num_classes)
  data = build_pretrain_dataset(config.data, global_batch_size=config.batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), start_step=start_step)
  videos_per_batch = config_lib.videos_per_batch(config)
  steps_per_epoch = int(config.steps_per_epoch) or max(len(train_records) // videos_per_batch, 1)
  total_steps = int(config.total_steps) or int(round(config.num_epochs * steps_per_epoch))

  # ---- optimizer, shardings, jitted step ------------------------------------------------------
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  abstract_params = jax.eval_shape(
      lambda: model.init(init_rng, *model.example_inputs())["params"])
  tx, schedule = optim.make_finetune_optimizer(config, total_steps, steps_per_epoch,
                                               abstract_params)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), abstract_params)
  state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules, tx)
  replicated = NamedSharding(mesh, P())
  batch_sh = {"video": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
  train_step = ft_step.make_finetune_step(
      model, tx, schedule, aug_cfg=config.aug, accum_steps=int(config.optim.accum_steps),
      mesh=mesh, frozen_encoder=config.mode == "linear_probe")
  p_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))

  # ---- init (from --config.init) or restore ---------------------------------------------------
  meta = {"seed": int(config.seed), "data": loop.data_description(config.data),
          "batch_size": int(config.batch_size), "mode": config.mode,
          "model": checkpointing.model_meta(config_lib.model_fields(config))}

  def init_state():
    params, info = init_lib.load_init(config.init, model, rng=init_rng,
                                      drop_head=bool(config.init_drop_head))
    log.info("init: %s", {k: v for k, v in info.items() if k not in ("initialised", "dropped")})
    if info.get("initialised"):
      log.info("initialised (not in the checkpoint): %s", info["initialised"])
    if info.get("dropped"):
      log.info("dropped from the checkpoint: %s", info["dropped"])
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s,
                                                  lambda idx, x=x: np.asarray(x)[idx]),
        params, state_sh.params)
    return jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)

  state, start_step = ckpt.restore_or_init(
      init_state, checkpointing.abstract_with_shardings(abstract, state_sh), meta)
  loop.write_param_shardings(workdir, state.params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  log.info("model %s: %.1fM params, %d classes; %d steps (%d/epoch) of %d clips (%d videos)",
           config.model_name, n_params / 1e6, num_classes, total_steps, steps_per_epoch,
           config.batch_size, videos_per_batch)

  # ---- validation: one centre view per video, every eval.every_epochs ------------------------
  hooks = []
  every = int(config.eval.every_steps) or int(round(config.eval.every_epochs * steps_per_epoch))
  if val_records and every > 0:
    validator = validation.Validator(config, model, mesh, val_records,
                                     params_shardings=state_sh.params)

    def validate(step, state, writer):
      scalars = validator(state.params)
      if jax.process_index() == 0:
        print(f"validation at step {step}: top-1 {100 * scalars['val_top1']:.2f}% "
              f"top-5 {100 * scalars['val_top5']:.2f}% over {int(scalars['val_videos'])} "
              f"videos ({scalars['val_s']:.1f} s)", flush=True)
      return scalars
    hooks.append(loop.Hook(every, validate))

  flops_per_clip = 3 * flops_lib.classifier_flops(model)["total"]
  _, last = loop.run(config=config, workdir=workdir, state=state, step_fn=p_step,
                     rng=train_rng, data=data, ckpt=ckpt, meta=meta, mesh=mesh,
                     start_step=start_step, total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, batch_keys=("video", "label"),
                     flops_per_clip=flops_per_clip, dtype=model.dtype, hooks=hooks)
  return last


def main(argv):
  del argv
  from videomae_jax.train import distributed
  distributed.configure_logging()
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  distributed.initialize(_NPROC.value, _COORD.value, _PID.value)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
