"""The pre-training system end to end: resume, preemption, sharding, multi-process, NaNs."""
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from tests import trainer_harness as h


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  videos = h.small_video_dir(tmp_path)
  cfg = f"{h.TINY}:{videos}"
  overrides = ["--config.total_steps=40", "--config.checkpoint.every_steps=5"]
  ref_dir = tmp_path / "uninterrupted"
  h.run(ref_dir, *overrides, config=cfg)
  reference = h.losses(ref_dir)
  assert sorted(reference) == list(range(1, 41))

  work = tmp_path / "killed"
  h.sigkill_after_first_checkpoint(h.command(work, *overrides, config=cfg), work)
  resumed_from = max(h.checkpoint_steps(work))
  assert 5 <= resumed_from < 40

  out = h.run(work, *overrides, config=cfg)
  assert f"resumed from step {resumed_from}" in out.stderr
  # The killed run's lines after its last checkpoint are dropped: every step appears once.
  with open(work / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, 41))
  got = h.losses(work)
  after = [s for s in range(resumed_from + 1, 41)]
  np.testing.assert_array_equal([got[s] for s in after], [reference[s] for s in after])


def test_sigterm_leaves_a_complete_checkpoint_and_exits_cleanly(tmp_path):
  work = tmp_path / "w"
  overrides = ["--config.total_steps=100000", "--config.checkpoint.every_steps=1000"]
  proc = subprocess.Popen(h.command(work, *overrides), cwd=h.REPO, env=h.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step 3/"):
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "preempted: saved step" in out
  steps = h.checkpoint_steps(work)
  assert steps and steps[-1] >= 3
  # The checkpoint is complete: a new run restores it and carries on.
  res = h.run(work, f"--config.total_steps={steps[-1] + 2}")
  assert f"resumed from step {steps[-1]}" in res.stderr
  assert max(h.losses(work)) == steps[-1] + 2


def _shardings(workdir):
  with open(os.path.join(workdir, "param_shardings.json")) as f:
    return json.load(f)


def test_data_parallel_and_fsdp_on_8_devices_match_one_device(tmp_path):
  overrides = ["--config.total_steps=6", "--config.checkpoint.every_steps=100"]
  one = tmp_path / "one"
  h.run(one, *overrides, devices=1)
  dp = tmp_path / "dp"
  h.run(dp, *overrides, "--config.mesh.data=8", devices=8)
  fsdp = tmp_path / "fsdp"
  h.run(fsdp, *overrides, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
  ref = h.losses(one)
  for other in (dp, fsdp):
    got = h.losses(other)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                               rtol=2e-5)
  # Data parallel replicates parameters; FSDP shards the big ones over 'fsdp'.
  assert all(v["shard_shape"] == v["shape"] and "fsdp" not in v["spec"]
             for v in _shardings(dp).values())
  sh = _shardings(fsdp)
  qkv = sh["encoder/blocks/blocks_0/attn/qkv/kernel"]
  assert "fsdp" in qkv["spec"] and qkv["shard_shape"] != qkv["shape"]
  assert np.prod(qkv["shard_shape"]) * 4 == np.prod(qkv["shape"])
  sharded = [k for k, v in sh.items() if "fsdp" in v["spec"]]
  assert len(sharded) > len(sh) // 2


def test_two_processes_train_checkpoint_and_restore(tmp_path):
  videos = h.small_video_dir(tmp_path)
  work = tmp_path / "mp"

  def launch(total):
    port = h.free_port()
    procs = [subprocess.Popen(
        h.command(work, f"--config.total_steps={total}", "--config.mesh.data=2",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", config=f"{h.TINY}:{videos}"),
        cwd=h.REPO, env=h.env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
      try:
        outs.append(p.communicate(timeout=400))
      finally:
        if p.poll() is None:
          p.kill()
    for p, (o, e) in zip(procs, outs):
      assert p.returncode == 0, e[-4000:]
    return [e for _, e in outs]

  def losses_by_process(errs):
    out = []
    for e in errs:
      d = {}
      for line in e.splitlines():
        if "process " in line and " loss " in line:
          parts = line.split("process ")[1].split()
          d[int(parts[2])] = float(parts[4])
      out.append(d)
    return out

  first = losses_by_process(launch(4))
  assert sorted(first[0]) == [1, 2, 3, 4]
  assert first[0] == first[1], "both processes must see the same global loss"
  assert 4 in h.checkpoint_steps(work)
  errs = launch(6)
  assert all("resumed from step 4" in e for e in errs)
  second = losses_by_process(errs)
  assert sorted(second[0]) == [5, 6] and second[0] == second[1]


def test_nonfinite_run_stops_after_k_in_a_row(tmp_path):
  proc = h.run(tmp_path / "nan", "--config.optim.base_lr=1e30", "--config.optim.warmup_steps=0",
               "--config.max_nonfinite_in_row=3", "--config.total_steps=50", check=False)
  assert proc.returncode != 0
  assert "non-finite steps in a row" in proc.stdout + proc.stderr
  rec = [json.loads(l) for l in open(tmp_path / "nan" / "metrics.jsonl")]
  assert any(r["skipped"] == 1 for r in rec)
  assert max(r["step"] for r in rec) < 50


@pytest.mark.parametrize("overrides,message", [
    (["--config.batch_size=7"], "batch_size=7 is not divisible"),
    (["--config.model.num_frames=5"], "num_frames=5 is not divisible by"),
    (["--config.mesh.fsdp=3"], "fsdp=3 does not divide"),
    (["--config.mask.decoder_type=cell"], "decoder_type='cell'"),
    (["--config.model.no_such_field=1"], "no_such_field"),
])
def test_bad_config_fails_before_compiling(tmp_path, overrides, message):
  proc = h.run(tmp_path / "bad", *overrides, devices=2, check=False, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")
