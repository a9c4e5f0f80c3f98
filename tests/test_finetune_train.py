"""Fine-tuning and testing end to end, as users run them: launch.pretrain -> launch.finetune ->
launch.evaluate on real videos, SIGKILL and resume, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import trainer_harness as h

FT = "tests/configs/tiny_finetune.py"


def labelled_list(tmp_path, videos: str, num_classes: int = 2, name: str = "list.txt",
                  labels=None) -> str:
  """`path label` lines over the sample videos, labels cycling through the classes."""
  paths = sorted(os.listdir(videos))
  labels = labels if labels is not None else [i % num_classes for i in range(len(paths))]
  path = tmp_path / name
  path.write_text("".join(f"{p} {l}\n" for p, l in zip(paths, labels)))
  return str(path)


def finetune_cmd(workdir, *overrides, config: str = FT) -> list[str]:
  return [sys.executable, "-m", "launch.finetune", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def run_finetune(workdir, *overrides, check=True, timeout=600):
  proc = subprocess.run(finetune_cmd(workdir, *overrides), cwd=h.REPO, env=h.env(),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"finetune exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                         f"stderr:\n{proc.stderr[-6000:]}")
  return proc


def run_evaluate(workdir, *overrides, check=True, timeout=600):
  proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}",
                         *overrides], cwd=h.REPO, env=h.env(), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"evaluate exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                         f"stderr:\n{proc.stderr[-6000:]}")
  return proc


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ft")
  videos = h.small_video_dir(tmp)
  lst = labelled_list(tmp, videos)
  pre = tmp / "pretrain"
  h.run(pre, "--config.total_steps=4", "--config.checkpoint.every_steps=4")
  data = [f"--config.data.root={videos}", f"--config.data.train_list={lst}",
          f"--config.data.val_list={lst}", "--config.num_classes=2"]
  return dict(tmp=tmp, videos=videos, list=lst, pretrain=str(pre), data=data)


def test_finetune_resumes_bit_exactly_after_sigkill_and_evaluates(setup):
  tmp = setup["tmp"]
  args = [*setup["data"], f"--config.init={setup['pretrain']}"]
  ref = tmp / "uninterrupted"
  out = run_finetune(ref, *args)
  assert "validation at step 6" in out.stdout, out.stdout[-2000:]
  reference = {r["step"]: r for r in rows(ref)}
  assert sorted(reference) == list(range(1, 13))
  for s in (6, 12):
    assert 0.0 <= reference[s]["val_top1"] <= reference[s]["val_top5"] <= 1.0
    assert reference[s]["val_videos"] == 3
  assert "val_top1" not in reference[5]

  work = tmp / "killed"
  h.sigkill_after_first_checkpoint(finetune_cmd(work, *args), work)
  resumed_from = max(h.checkpoint_steps(work))
  assert 4 <= resumed_from < 12
  out = run_finetune(work, *args)
  assert f"resumed from step {resumed_from}" in out.stderr
  got = {r["step"]: r for r in rows(work)}
  assert sorted(got) == list(range(1, 13))
  for s in range(resumed_from + 1, 13):
    assert got[s]["loss"] == reference[s]["loss"], s
    assert got[s]["grad_norm"] == reference[s]["grad_norm"], s
  assert got[12]["val_top1"] == reference[12]["val_top1"]

  # The test protocol on the finished run: 5 clips x 3 crops of each video, decoded once.
  out = run_evaluate(ref)
  with open(ref / "eval_5x3.json") as f:
    report = json.load(f)
  assert report["num_videos"] == 3 and report["num_views"] == 45
  assert report["num_clips"] == 5 and report["num_crops"] == 3
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
  assert len(report["predictions"]) == 3
  assert sorted(os.path.basename(p["video"]) for p in report["predictions"]) == sorted(
      os.listdir(setup["videos"]))
  assert np.asarray(report["confusion"]).sum() == 3
  assert (ref / "eval_5x3.png").exists()
  # 1x1 with the same flags layout.
  run_evaluate(ref, "--config.test.num_clips=1", "--config.test.num_crops=1")
  with open(ref / "eval_1x1.json") as f:
    assert json.load(f)["num_views"] == 3


def test_unknown_class_ids_fail_naming_the_list(setup, tmp_path):
  bad = labelled_list(tmp_path, setup["videos"], labels=[0, 1, 5], name="bad.txt")
  data = [a for a in setup["data"] if "train_list" not in a] + [f"--config.data.train_list={bad}"]
  out = run_finetune(tmp_path / "w", *data, check=False)
  assert out.returncode != 0
  assert "bad.txt" in out.stderr and "5" in out.stderr, out.stderr[-3000:]
  assert not h.checkpoint_steps(tmp_path / "w")


def test_missing_num_classes_fails_before_compiling(setup, tmp_path):
  data = [a for a in setup["data"] if "num_classes" not in a]
  out = run_finetune(tmp_path / "w", *data, check=False)
  assert out.returncode != 0 and "config.num_classes" in out.stderr, out.stderr[-3000:]


def test_init_of_another_geometry_fails_naming_the_field(setup, tmp_path):
  pre = tmp_path / "wide"
  h.run(pre, "--config.total_steps=1", "--config.checkpoint.every_steps=1",
        "--config.model.embed_dim=48")
  out = run_finetune(tmp_path / "w", *setup["data"], f"--config.init={pre}", check=False)
  assert out.returncode != 0 and "embed_dim" in out.stderr, out.stderr[-3000:]
