"""Which cluster a process was started in, from its environment, and starting
``jax.distributed`` for it (jax is imported only when a process starts)."""
from __future__ import annotations

import logging
import os
from typing import Mapping

log = logging.getLogger("videomae_jax.train")

# SLURM_STEP_ID values of steps that are not srun task launches: the batch script, the
# extern step (older Slurm gives them as 2**32 - 2 and 2**32 - 1), the interactive step.
_SLURM_NON_TASK_STEPS = frozenset({"batch", "extern", "interactive", "4294967293",
                                   "4294967294", "4294967295"})


def env_int(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def slurm_step_tasks(env: Mapping[str, str]) -> int:
  """How many tasks run this command in its srun step; 0 outside an srun task.

  An sbatch script or a shell inside salloc also sees SLURM_NTASKS (the allocation's) and
  SLURM_PROCID=0, but no other task runs the command there: only srun sets a step id.
  """
  step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
  if step is None or step in _SLURM_NON_TASK_STEPS or "SLURM_PROCID" not in env:
    return 0
  return env_int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))


def cluster_from_env(env: Mapping[str, str]) -> str | None:
  """'tpu' or 'slurm' when jax.distributed initialises itself from ``env``; None = one process."""
  if env.get("TPU_WORKER_HOSTNAMES"):
    return "tpu"
  if slurm_step_tasks(env) > 1:
    return "slurm"
  return None


def initialize(num_processes: int | None = None, coordinator_address: str | None = None,
               process_id: int | None = None, env: Mapping[str, str] = os.environ) -> None:
  """jax.distributed: from the launcher's flags, from the environment (TPU pods, srun tasks),
  or nothing (one process)."""
  import jax
  if num_processes and num_processes > 1:
    # Cross-process collectives for CPU devices; GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif cluster_from_env(env):
    jax.distributed.initialize()
  elif env_int(env.get("SLURM_NTASKS")) > 1:
    # Waiting for the other tasks here would hang: none of them runs this command.
    log.warning("SLURM_NTASKS=%s but this process is not an srun task (no SLURM_STEP_ID): "
                "running as one process; start it with `srun python -m launch.<trainer> ...` "
                "to use every task", env.get("SLURM_NTASKS"))


def configure_logging() -> None:
  """The trainers' console: our loggers at INFO; orbax and jax (through absl), which log every
  save and compile at INFO, at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  for name in ("videomae_jax", "videomae_jax.train", "videomae_jax.checkpoint"):
    logging.getLogger(name).setLevel(logging.INFO)
