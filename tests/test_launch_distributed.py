"""When launch.pretrain initialises jax.distributed from the environment."""
import json
import subprocess

import pytest

from videomae_jax.train import distributed
from tests import trainer_harness as h

# What an sbatch script (or a shell inside salloc) sees: the allocation's task count and
# task-0 ids, but no step: nothing else runs this command, so waiting for peers would hang.
SBATCH_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
              "SLURM_STEP_NODELIST": "localhost"}


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    (SBATCH_ENV, None),
    (dict(SBATCH_ENV, SLURM_STEP_ID="4294967294"), None),     # the batch step itself
    (dict(SBATCH_ENV, SLURM_STEP_ID="batch"), None),
    (dict(SBATCH_ENV, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2"), "slurm"),
    (dict(SBATCH_ENV, SLURM_STEPID="3"), "slurm"),             # older Slurm spelling
    (dict(SBATCH_ENV, SLURM_STEP_ID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1"), None),
    (dict(SBATCH_ENV, SLURM_STEP_ID="0", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="1"), None),
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, None),       # no task id: not a task
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
])
def test_cluster_from_env(env, expected):
  assert distributed.cluster_from_env(env) == expected


def test_slurm_variables_without_srun_run_single_process(tmp_path):
  env = h.env()
  for k in list(env):
    if k.startswith("SLURM_") or k == "TPU_WORKER_HOSTNAMES":
      del env[k]
  env.update(SBATCH_ENV)
  work = tmp_path / "sbatch"
  proc = subprocess.run(h.command(work, "--config.total_steps=2"), cwd=h.REPO, env=env,
                        capture_output=True, text=True, timeout=150)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "not an srun task" in proc.stderr
  steps = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
  assert steps == [1, 2]
