"""Which cluster a process was started in, from its environment (no jax import)."""
from __future__ import annotations

from typing import Mapping

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
