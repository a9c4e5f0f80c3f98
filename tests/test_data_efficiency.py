"""The data-efficiency experiment end to end at its tiny scale: real clips, the real launchers
(pre-training, four fine-tunings, evaluation), the report, and a re-run that runs nothing."""
import json
import os

import pytest

from experiments import data_efficiency, temporal_dataset


def test_label_subset_is_stratified_and_seeded(tmp_path):
  src = tmp_path / "train.txt"
  src.write_text("".join(f"c{k}/{i}.mp4 {k}\n" for k in range(3) for i in range(20)))
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  assert data_efficiency.label_subset(str(src), 0.1, str(a), seed=1) == 6
  data_efficiency.label_subset(str(src), 0.1, str(b), seed=1)
  assert a.read_text() == b.read_text()
  labels = [int(l.split()[1]) for l in a.read_text().split("\n") if l]
  assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_tiny_experiment_runs_every_phase_and_reports(tmp_path):
  try:
    temporal_dataset.locate_sources()
  except temporal_dataset.SourceMissing as e:
    pytest.skip(str(e))
  out = str(tmp_path / "exp")
  res = data_efficiency.run(out, "tiny")
  scale = data_efficiency.SCALES["tiny"]
  val = res["dataset"]["val"]
  assert res["dataset"]["train"] + val == scale.clips
  assert set(res["runs"]) == {f"{a}_{f:g}" for a in ("pretrained", "scratch")
                              for f in data_efficiency.FRACTIONS}
  assert res["runs"]["scratch_1"]["train_clips"] == res["dataset"]["train"]
  assert res["runs"]["scratch_0.1"]["train_clips"] < res["runs"]["scratch_1"]["train_clips"]
  for name, r in res["runs"].items():
    assert r["num_videos"] == val, name
    assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    cfg = json.load(open(os.path.join(out, name, "config.json")))
    assert cfg["init"] == ("" if name.startswith("scratch") else os.path.join(out, "pretrain"))
    assert cfg["aug"]["flip"] is False  # a flip swaps pan_left and pan_right
    assert (cfg["model"]["num_frames"], cfg["data"]["sampling_rate"]) == (
        scale.num_frames, scale.sampling_rate)
  assert res["gaps"]["1"] == pytest.approx(res["runs"]["pretrained_1"]["top1"]
                                           - res["runs"]["scratch_1"]["top1"])
  assert res["pretrain_final_loss"] is not None
  assert 0 < res["frame_baseline"]["chance"] < 1
  table = open(os.path.join(out, "results.md")).read()
  assert "| 10% |" in table and "| 100% |" in table and "Frame-level baseline" in table
  assert os.path.getsize(os.path.join(out, "results.png")) > 1000
  # Every phase's output exists: a second invocation runs no launcher.
  again = data_efficiency.run(out, "tiny")
  assert again["runs"] == res["runs"]
  assert again["wall_s_this_invocation"] < 30
