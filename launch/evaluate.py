r"""The official test protocol for a fine-tuning workdir.

  python -m launch.evaluate --workdir=/ckpt/k400_b_ft \
      [--config.test.num_clips=5 --config.test.num_crops=3] [--config.test.list=test.csv]

Reads the workdir's config.json and its latest checkpoint (or --step): the short side resized
to `test.short_side`, `num_clips` temporal clips evenly spaced x `num_crops` crops along the
long side, softmax per view and the mean. Each video is decoded once and all of its views are
cut from that decode. Writes W/eval_<clips>x<crops>.json (top-1/top-5, per-class accuracy,
num_videos, num_views, per-video predictions, the confusion matrix) and the matrix as a PNG.
The list defaults to the run's `data.val_list`.
"""
from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A launch.finetune workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")

log = logging.getLogger("videomae_jax.train")


def overrides() -> ml_collections.ConfigDict:
  """What the command line may change of the run's config; None = the run's value."""
  ph = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.test = ml_collections.ConfigDict(dict(
      num_clips=ph(int), num_crops=ph(int), short_side=ph(int), videos_per_batch=ph(int),
      list=ph(str)))
  c.data = ml_collections.ConfigDict(dict(root=ph(str), reader=ph(str), num_threads=ph(int)))
  c.model = ml_collections.ConfigDict(dict(dtype=ph(str), attention_impl=ph(str)))
  return c


_CONFIG = config_flags.DEFINE_config_dict("config", overrides())


def run_config(workdir: str, changes: ml_collections.ConfigDict | None = None):
  """The fine-tuning run's config.json with the non-None ``changes`` applied."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir}: no config.json (not a launch.finetune "
                            "workdir)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "num_classes" not in config or "aug" not in config:
    raise ValueError(f"--workdir={workdir}: config.json is not a fine-tuning run's (no "
                     "num_classes); evaluate a launch.finetune workdir")
  for section, values in (changes or {}).items():
    for k, v in values.items():
      if v is not None:
        config[section][k] = v
  return config


def evaluate(workdir: str, changes: ml_collections.ConfigDict | None = None,
             step: int | None = None) -> dict:
  """Runs the test protocol; returns the report (also written to the workdir)."""
  import jax

  from videomae_jax.finetune import config as config_lib
  from videomae_jax.finetune import evaluate as evaluate_lib
  from videomae_jax.finetune import validation
  from videomae_jax.finetune import init as init_lib
  from videomae_jax.train import sharding

  config = run_config(workdir, changes)
  model = config_lib.build_model(config)
  num_classes = int(config.num_classes)
  t = config.test
  list_path = t.list or config.data.val_list
  if not list_path:
    raise ValueError("no test videos: pass --config.test.list=<`path label` list> (the run "
                     "has no data.val_list)")
  flag = "config.test.list" if t.list else "config.data.val_list"
  records = validation.eval_records(list_path, config.data.get("root", ""), num_classes, flag)
  if int(t.videos_per_batch) % jax.device_count():
    raise ValueError(f"config.test.videos_per_batch={t.videos_per_batch} must be a multiple "
                     f"of the {jax.device_count()} devices (or 0: auto)")
  videos_per_batch = config_lib.eval_videos_per_batch(t, jax.device_count())

  mesh = sharding.make_mesh(-1, 1)
  # Only the params are read; their shapes do not depend on the overridable fields.
  _, params, step = init_lib.load_params(workdir, step)

  evaluator = validation.MultiViewEvaluator(
      config.data, model, mesh, records, num_clips=t.num_clips, num_crops=t.num_crops,
      short_side=t.short_side, videos_per_batch=videos_per_batch)
  preds, summary, seconds = evaluator(params)
  names = [r.path for r in records]
  report = evaluate_lib.write_report(
      workdir, preds, summary, num_clips=int(t.num_clips), num_crops=int(t.num_crops),
      names=names, extra={"step": int(step), "list": list_path, "seconds": round(seconds, 3)})
  if jax.process_index() == 0:
    print(f"{t.num_clips}x{t.num_crops} views of {summary['num_videos']} videos "
          f"({summary['num_failed']} failed to decode) at step {step}: top-1 "
          f"{100 * summary['top1']:.2f}% top-5 {100 * summary['top5']:.2f}% "
          f"({seconds:.1f} s) -> {report['path']}", flush=True)
  return report


def main(argv):
  del argv
  from videomae_jax.train import distributed
  distributed.configure_logging()
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  distributed.initialize()
  evaluate(_WORKDIR.value, _CONFIG.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
