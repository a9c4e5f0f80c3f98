"""Resuming a workdir: what must match the checkpoint (model layout, data stream), what may
change (paths, compute dtype, remat), and that a mismatch is a clear error before compiling."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import trainer_harness as h
from videomae_jax.data import default_data_config
from videomae_jax.data.pipeline import describe
from videomae_jax.train import checkpointing


def _steps_logged(workdir):
  return sorted(h.losses(workdir))


def test_toggling_scan_on_resume_names_the_field_before_compiling(tmp_path):
  work = tmp_path / "w"
  h.run(work, "--config.total_steps=4")
  proc = h.run(work, "--config.total_steps=8", "--config.model.scan=True", check=False)
  assert proc.returncode != 0
  assert "model.scan" in proc.stderr, proc.stderr[-3000:]
  assert str(work) in proc.stderr
  assert "resumed from step" not in proc.stderr
  assert _steps_logged(work) == [1, 2, 3, 4]
  assert h.checkpoint_steps(work) == [4]


def test_dtype_and_remat_may_change_on_resume(tmp_path):
  work = tmp_path / "w"
  h.run(work, "--config.total_steps=4")
  proc = h.run(work, "--config.total_steps=6", "--config.model.dtype=bfloat16",
               "--config.model.remat=True")
  assert "resumed from step 4" in proc.stderr
  assert _steps_logged(work) == list(range(1, 7))


def test_param_layout_backstop_names_the_first_mismatching_path(tmp_path):
  """A checkpoint whose meta says nothing about the model (an older one) still fails with the
  param path, not inside orbax, when the tree differs."""
  saved = {"params": {"a": jnp.zeros((2, 3)), "b": {"kernel": jnp.ones((4, 5))}}}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2)
  ckpt.save(1, saved, {"seed": 0})
  ckpt.close()

  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2)
  want = {"params": {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                     "b": {"kernel": jax.ShapeDtypeStruct((1, 4, 5), jnp.float32)}}}
  with pytest.raises(checkpointing.ResumeMismatchError, match=r"params/b/kernel.*\(4, 5\)"):
    ckpt.restore_or_init(lambda: None, want, {"seed": 0})
  missing = {"params": {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
  with pytest.raises(checkpointing.ResumeMismatchError, match=r"params/b/kernel"):
    ckpt.restore_or_init(lambda: None, missing, {"seed": 0})
  ckpt.close()


# ---- the data stream guard ---------------------------------------------------------------------

def _list_source(tmp_path, folder, lines):
  d = tmp_path / folder
  (d / "videos").mkdir(parents=True)
  for rel, _ in lines:
    (d / "videos" / rel).write_bytes(b"x")
  (d / "train.txt").write_text("".join(f"{rel} {label}\n" for rel, label in lines))
  c = default_data_config()
  c.train_list = str(d / "train.txt")
  c.root = str(d / "videos")
  return c


def test_describe_guards_stream_fields_not_locations(tmp_path):
  lines = [("a.mp4", 0), ("b.mp4", 1)]
  here = _list_source(tmp_path, "here", lines)
  moved = _list_source(tmp_path, "moved", lines)
  assert describe(here) == describe(moved)
  # A field that changes the clips: every field outside the documented list is guarded.
  for key, value in [("max_distort", 2), ("decode_short_side", 256), ("min_frames", 8),
                     ("video_extensions", (".mp4",)), ("shuffle_buffer", 16)]:
    changed = ml_collections.ConfigDict(here.to_dict())
    changed[key] = value
    assert describe(changed) != describe(here), key
  # Not the same videos (a label differs): not the same stream.
  relabelled = _list_source(tmp_path, "relabelled", [("a.mp4", 0), ("b.mp4", 2)])
  assert describe(relabelled) != describe(here)
  # Throughput knobs do not change the stream.
  faster = ml_collections.ConfigDict(here.to_dict())
  faster.num_parallel_calls, faster.prefetch, faster.num_threads = 3, 8, 4
  faster.decode_timeout_s, faster.max_abandoned_decodes = 5.0, 9
  assert describe(faster) == describe(here)


def test_new_data_fields_are_guarded_by_default():
  c = default_data_config()
  c.some_new_augmentation = 0.5
  assert describe(c)["some_new_augmentation"] == 0.5


def test_changed_augmentation_blocks_resume_and_moved_videos_resume(tmp_path):
  videos = h.small_video_dir(tmp_path)
  work = tmp_path / "w"
  h.run(work, "--config.total_steps=4", config=f"{h.TINY}:{videos}")

  proc = h.run(work, "--config.total_steps=6", "--config.data.max_distort=0",
               config=f"{h.TINY}:{videos}", check=False)
  assert proc.returncode != 0
  assert "data.max_distort" in proc.stderr, proc.stderr[-3000:]
  assert str(work) in proc.stderr

  moved = tmp_path / "moved" / "videos"
  os.makedirs(moved.parent)
  os.rename(videos, moved)
  proc = h.run(work, "--config.total_steps=6", config=f"{h.TINY}:{moved}")
  assert "resumed from step 4" in proc.stderr
  assert _steps_logged(work) == list(range(1, 7))
