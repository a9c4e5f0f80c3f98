"""Which videos a fine-tuning run trains and tests on, and the jitted multi-view evaluation."""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videomae_jax.data import sources
from videomae_jax.finetune import config as config_lib
from videomae_jax.finetune import evaluate as evaluate_lib
from videomae_jax.finetune import step as ft_step
from videomae_jax.models import VideoMAEClassifier
from videomae_jax.train import sharding


def source_name(data_config) -> str:
  """The flag that names the training videos, for error messages."""
  for key in ("frame_store", "train_list", "video_dir"):
    if data_config.get(key):
      return f"config.data.{key}={data_config[key]}"
  return "config.data"


def train_records(data_config) -> list[sources.VideoRecord]:
  """The training videos with their labels, as the input pipeline will read them."""
  if data_config.get("frame_store"):
    from videomae_jax.data import frame_store
    return list(frame_store.FrameStore(data_config.frame_store).records)
  return sources.file_source_from_config(data_config)


def eval_records(list_path: str, root: str, num_classes: int,
                 flag: str) -> list[sources.VideoRecord]:
  """A `path label` list, every label checked against ``num_classes``."""
  records = sources.load_annotation_list(list_path, root)
  sources.check_labels(records, num_classes, f"{flag}={list_path}")
  return records


def val_records(data_config, num_classes: int) -> list[sources.VideoRecord]:
  if not data_config.get("val_list"):
    return []
  return eval_records(data_config.val_list, data_config.get("root", ""), num_classes,
                      "config.data.val_list")


class MultiViewEvaluator:
  """The official test views of every video of a list, through the jitted model: decode each
  video once (host), softmax per view and the mean (device)."""

  def __init__(self, data_config, model: VideoMAEClassifier, mesh: Mesh,
               records: Sequence[sources.VideoRecord], *, num_clips: int, num_crops: int,
               short_side: int, videos_per_batch: int, params_shardings: Any = None):
    self.data_config = data_config
    self.model = model
    self.mesh = mesh
    self.records = list(records)
    self.num_clips, self.num_crops = int(num_clips), int(num_crops)
    self.short_side = int(short_side)
    self.videos_per_batch = int(videos_per_batch)
    predict = ft_step.make_predict_fn(model)
    in_sh = (params_shardings if params_shardings is not None else NamedSharding(mesh, P()),
             sharding.batch_sharding(mesh))
    self.predict = jax.jit(predict, in_shardings=in_sh,
                           out_shardings=sharding.batch_sharding(mesh))

  def loader(self):
    from videomae_jax.data import evaluation
    return evaluation.build_eval_dataset(
        self.data_config, self.records, num_clips=self.num_clips, num_crops=self.num_crops,
        short_side=self.short_side, frame_sampling=self.data_config.frame_sampling,
        process_index=jax.process_index(), process_count=jax.process_count(),
        videos_per_batch=self.videos_per_batch)

  def __call__(self, params) -> tuple[dict, dict, float]:
    """(per-video predictions, summary, seconds) for ``params``."""
    t0 = time.perf_counter()
    loader = self.loader()
    try:
      preds = evaluate_lib.predictions(self.predict, params, loader, self.mesh)
    finally:
      close = getattr(loader, "close", None)
      if close is not None:
        close()
    summary = evaluate_lib.summarize(preds, int(self.model.num_classes))
    return preds, summary, time.perf_counter() - t0


class Validator:
  """The fast validation of a fine-tuning run: ``config.eval`` views (one centre clip by
  default) of the first ``config.eval.max_videos`` (0 = all) videos of the validation list."""

  def __init__(self, config, model: VideoMAEClassifier, mesh: Mesh,
               records: Sequence[sources.VideoRecord], params_shardings: Any = None):
    cap = int(config.eval.max_videos)
    self.evaluator = MultiViewEvaluator(
        config.data, model, mesh, records[:cap] if cap > 0 else records,
        num_clips=config.eval.num_clips, num_crops=config.eval.num_crops,
        short_side=config.data.input_size,
        videos_per_batch=config_lib.eval_videos_per_batch(config.eval, jax.device_count()),
        params_shardings=params_shardings)

  def __call__(self, params) -> dict[str, float]:
    _, summary, seconds = self.evaluator(params)
    return {"val_top1": summary["top1"], "val_top5": summary["top5"],
            "val_videos": float(summary["num_videos"]), "val_failed": float(summary["num_failed"]),
            "val_s": seconds}
