"""Checkpoints under faults, with real trainer processes: kill -9 during an async save, files of
the latest checkpoint truncated, and a write that fails (file size limit, as a full disk)."""
import glob
import os
import resource
import shutil
import signal
import subprocess
import time

import pytest

from tests import trainer_harness as h


def _tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def test_kill_9_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path):
  overrides = ["--config.total_steps=100000", "--config.checkpoint.every_steps=1",
               "--config.log_every_steps=1000"]
  for attempt in range(5):
    work = tmp_path / f"w{attempt}"
    proc = subprocess.Popen(h.command(work, *overrides), cwd=h.REPO, env=h.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in_save = False
    try:
      deadline = time.time() + 240
      # Poll for a save in flight once an earlier one is complete, and kill it there.
      while time.time() < deadline and proc.poll() is None:
        if h.checkpoint_steps(work) and _tmp_dirs(work):
          proc.send_signal(signal.SIGKILL)
          break
        time.sleep(0.001)
      proc.wait(timeout=60)
      killed_in_save = proc.returncode == -signal.SIGKILL and bool(_tmp_dirs(work))
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    if killed_in_save:
      break
  else:
    pytest.fail("never killed the trainer while a save was in flight")

  complete = h.checkpoint_steps(work)
  assert complete
  last = max(complete)
  res = h.run(work, f"--config.total_steps={last + 2}", "--config.checkpoint.every_steps=1")
  assert f"resumed from step {last}" in res.stderr
  assert not _tmp_dirs(work)
  assert max(h.checkpoint_steps(work)) == last + 2


# Width 128: the largest arrays (the MLP kernels, 128x512 float32 = 256 KiB, and their
# moments) are larger than any file a save writes besides array data, so a file size limit
# between the two fails every save, however the arrays are grouped into files.
WIDE = "--config.model.embed_dim=128"
LARGEST_ARRAY_BYTES = 128 * 512 * 4


def _run(work, *overrides, **kw):
  return h.run(work, WIDE, *overrides, **kw)


@pytest.fixture(scope="module")
def trained_to_8(tmp_path_factory):
  work = tmp_path_factory.mktemp("trained") / "w"
  _run(work, "--config.total_steps=8")
  assert h.checkpoint_steps(work) == [4, 8]
  return work


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _largest_array_file(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("which", ["checkpoint_metadata", "meta_json", "array_data"])
def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, trained_to_8, which):
  work = tmp_path / "w"
  shutil.copytree(trained_to_8, work)
  before = h.losses(work)
  step_dir = os.path.join(work, "checkpoints", "8")
  target = {"checkpoint_metadata": os.path.join(step_dir, "_CHECKPOINT_METADATA"),
            "meta_json": os.path.join(step_dir, "meta", "metadata"),
            "array_data": _largest_array_file(step_dir)}[which]
  _truncate(target)

  res = _run(work, "--config.total_steps=8")  # the same schedule as the run that wrote it
  assert "resumed from step 4" in res.stderr, res.stderr[-3000:]
  assert "checkpoint step 8" in res.stderr and "unreadable" in res.stderr
  # Set aside, not deleted, and out of orbax's way.
  assert os.path.isdir(os.path.join(work, "checkpoints", "8.corrupt"))
  assert os.path.exists(target.replace(os.sep + "8" + os.sep, os.sep + "8.corrupt" + os.sep))
  after = h.losses(work)
  assert sorted(after) == list(range(1, 9))
  # The same steps again: the stream continued from step 4, not from 8.
  assert [after[s] for s in range(5, 9)] == [before[s] for s in range(5, 9)]
  assert h.checkpoint_steps(work) == [4, 8]


def _file_size_limit(limit):
  def apply():
    # A full disk, as the write sees it: EFBIG instead of a SIGXFSZ kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


# 16: a periodic save (12) fails, found at the next save; 10: only the final save fails, found
# when the run waits for it at the end.
@pytest.mark.parametrize("total_steps", [16, 10])
def test_failed_write_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, trained_to_8,
                                                                       total_steps):
  work = tmp_path / "w"
  shutil.copytree(trained_to_8, work)
  # Larger than every file the run writes but array data, smaller than the largest array.
  others = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(work) for f in files
            if os.path.basename(d) != "d"]
  limit = 2 * max(others)
  assert limit < LARGEST_ARRAY_BYTES
  proc = subprocess.run(h.command(work, WIDE, f"--config.total_steps={total_steps}"), cwd=h.REPO,
                        env=h.env(),
                        capture_output=True, text=True, timeout=300,
                        preexec_fn=_file_size_limit(limit))
  assert proc.returncode != 0
  err = proc.stderr
  assert "resumed from step 8" in err
  assert "could not be written" in err and os.path.join(str(work), "checkpoints") in err, \
      err[-4000:]
  assert max(h.checkpoint_steps(work)) == 8 and 4 in h.checkpoint_steps(work)
  res = _run(work, f"--config.total_steps={total_steps}")
  assert "resumed from step 8" in res.stderr
  assert max(h.checkpoint_steps(work)) == total_steps


def test_damaged_array_bytes_stop_the_run_and_the_next_launch_resumes_earlier(tmp_path,
                                                                             trained_to_8):
  """Bytes damaged without a size change are only found by restoring; the input pipeline
  already starts at that step then, so the run stops and asks to be run again."""
  work = tmp_path / "w"
  shutil.copytree(trained_to_8, work)
  target = _largest_array_file(os.path.join(work, "checkpoints", "8"))
  with open(target, "r+b") as f:
    f.write(b"\0" * os.path.getsize(target))
  proc = _run(work, "--config.total_steps=8", check=False)
  assert proc.returncode != 0
  assert "checkpoint step 8" in proc.stderr and "run again to resume from step 4" in proc.stderr
  assert os.path.isdir(os.path.join(work, "checkpoints", "8.corrupt"))
  res = _run(work, "--config.total_steps=8")
  assert "resumed from step 4" in res.stderr
  assert h.checkpoint_steps(work) == [4, 8]
