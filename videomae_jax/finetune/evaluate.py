"""The official test protocol over a list of videos, and what it reports.

Each video is decoded once and all of its views (temporal clips x spatial crops) are cut from
that decode (:mod:`videomae_jax.data.evaluation`); the model gives a softmax per view and the
video's prediction is their mean. Used for the fast single-view validation during fine-tuning
and by ``launch.evaluate`` for the full protocol.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from videomae_jax.train import sharding


def predictions(predict: Callable, params: Any, loader, mesh: Mesh) -> dict[str, np.ndarray]:
  """Runs ``predict(params, video)`` (jitted, batch sharded over the mesh) over every batch of
  ``loader``; returns this run's per-video arrays (all hosts gathered): probs (N, C), label,
  index (position in the list) and valid (False: padding or a video that failed to decode).
  Padding rows are dropped; failed videos are kept with valid=False."""
  out = {"probs": [], "label": [], "index": [], "valid": []}
  for batch in loader:
    video = sharding.global_batch({"video": batch["video"]}, mesh)["video"]
    probs = predict(params, video)
    rows = {"probs": probs, "label": batch["label"], "index": batch["index"],
            "valid": batch["valid"]}
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      host = {k: np.asarray(v) for k, v in rows.items() if k != "probs"}
      gathered = multihost_utils.process_allgather(host, tiled=True)
      gathered["probs"] = np.asarray(multihost_utils.process_allgather(probs, tiled=True))
      rows = gathered
    else:
      rows["probs"] = np.asarray(jax.device_get(probs))
    for k in out:
      out[k].append(np.asarray(rows[k]))
  cat = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}
  # Padding copies repeat a real video's index with valid=False; keep each index once,
  # preferring the valid row.
  order = np.lexsort((~cat["valid"].astype(bool), cat["index"]))
  _, first = np.unique(cat["index"][order], return_index=True)
  keep = order[first]
  return {k: v[keep] for k, v in cat.items()}


def topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Whether each label is among the k most probable classes (ties broken by class index)."""
  k = min(k, probs.shape[1])
  top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  return (top == labels[:, None]).any(axis=1)


def summarize(preds: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
  """top-1/top-5 over the videos that decoded, per-class accuracy, the confusion matrix."""
  valid = preds["valid"].astype(bool)
  probs, labels = preds["probs"][valid], preds["label"][valid].astype(np.int64)
  n = int(valid.sum())
  top1 = topk_hits(probs, labels, 1) if n else np.zeros((0,), bool)
  top5 = topk_hits(probs, labels, 5) if n else np.zeros((0,), bool)
  pred = probs.argmax(axis=1) if n else np.zeros((0,), np.int64)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  per_class = {}
  for c in range(num_classes):
    m = labels == c
    if m.any():
      per_class[str(c)] = float(top1[m].mean())
  return {
      "top1": float(top1.mean()) if n else 0.0,
      "top5": float(top5.mean()) if n else 0.0,
      "mean_class_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
      "per_class_top1": per_class,
      "num_videos": n,
      "num_failed": int((~valid).sum()),
      "confusion": confusion,
  }


def confusion_png(confusion: np.ndarray, path: str, min_side: int = 256) -> None:
  """Row-normalised confusion matrix as an image: white = 0, dark blue = the whole row."""
  from PIL import Image
  rows = confusion.sum(axis=1, keepdims=True)
  frac = np.where(rows > 0, confusion / np.maximum(rows, 1), 0.0)
  rgb = np.stack([255 * (1 - frac), 255 * (1 - 0.8 * frac), 255 * (1 - 0.3 * frac)], -1)
  img = rgb.astype(np.uint8)
  scale = max(1, -(-min_side // max(confusion.shape[0], 1)))
  img = np.repeat(np.repeat(img, scale, 0), scale, 1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(img).save(path)


def write_report(workdir: str, preds: dict[str, np.ndarray], summary: dict[str, Any], *,
                 num_clips: int, num_crops: int, names: Sequence[str], extra: dict) -> dict:
  """Writes ``eval_<clips>x<crops>.json`` (+ ``.png`` confusion matrix) in ``workdir``
  (process 0); returns the report, with its ``path``."""
  stem = os.path.join(workdir, f"eval_{num_clips}x{num_crops}")
  per_video = []
  for i in range(len(preds["index"])):
    idx = int(preds["index"][i])
    row = {"video": names[idx], "label": int(preds["label"][i]), "valid": bool(preds["valid"][i])}
    if row["valid"]:
      p = preds["probs"][i]
      top = np.argsort(-p, kind="stable")[:5]
      row.update(pred=int(top[0]), top5=[int(t) for t in top],
                 top5_prob=[round(float(p[t]), 6) for t in top])
    per_video.append(row)
  report = {k: v for k, v in summary.items() if k != "confusion"}
  report.update(num_clips=num_clips, num_crops=num_crops,
                num_views=summary["num_videos"] * num_clips * num_crops,
                confusion=summary["confusion"].tolist(), predictions=per_video, **extra)
  if jax.process_index() == 0:
    with open(stem + ".json", "w") as f:
      json.dump(report, f, indent=1)
    confusion_png(summary["confusion"], stem + ".png")
  return dict(report, path=stem + ".json")

