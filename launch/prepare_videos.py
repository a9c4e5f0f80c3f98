"""Prepares videos for pre-training: resize, re-encode to h264 mp4 or to a frame store, verify.

  python -m launch.prepare_videos --src_dir /data/k400/train --out_dir /data/k400_320
  python -m launch.prepare_videos --src_list train.csv --root /data/ssv2 --out_dir /data/ssv2_mp4
  python -m launch.prepare_videos --format=frames --src_dir /data/k400/train \\
      --out_dir /data/k400_frames [--short_side 256 --jpeg_quality 90 --num_shards N]

`--format=mp4` (default): every input (mp4, webm, avi, ...) is decoded sequentially
(frame-exact), scaled so its short side is `--short_side` (default 320, never
enlarged), and written as h264 mp4 with one keyframe per `--keyframe_s` seconds:
sparse keyframes (x264's default is one per 250 frames) make every seek decode more
frames, about 2x the CPU cost per clip. Each output is then opened with the training
reader and a few frames are decoded. Writes, under `--out_dir`:
  <relative path>.mp4  one per input, at the input's path relative to --src_dir
                  (--root, or the inputs' common folder); inputs that are not mp4
                  keep their extension (`sub/a.avi` -> `sub/a.avi.mp4`), so
                  `a.avi` and `a.mp4` do not overwrite each other;
  train_list.txt  `relative/path.mp4 label` per line, for data.train_list with
                  data.root=<out_dir>;
  bad_files.txt   `path<TAB>reason` for every input that failed.
Existing outputs that decode are kept, so an interrupted run can be restarted.
`--workers` processes each decode and encode with `--threads` threads; by default
their product is the number of cores available to this process.

`--format=frames`: a frame store for `config.data.frame_store=<out_dir>`
(`videomae_jax/data/frame_store.py`): every frame of every video, in order, as a JPEG
at `--short_side` (default 256) and `--jpeg_quality` (default 80), in `--num_shards`
ArrayRecord shards (0: one per 256 videos, at least one per worker) with per-video
metadata (frame count, fps, label, source path, sizes). Every stored frame is decoded
back before its shard counts as finished; failures go to bad_files.txt. Shards are
written in parallel (one single-threaded worker per core by default); finished shards
(index present, byte size matching, same videos and settings) are skipped when the command
runs again, unless `--overwrite`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
from fractions import Fraction

from videomae_jax.data import readers
from videomae_jax.data.sources import (DEFAULT_EXTENSIONS, SourceError, VideoRecord,
                                       load_annotation_list, scan_video_folder)


def output_size(w: int, h: int, short_side: int) -> tuple[int, int]:
  """Even (w, h) with the given short side, keeping the aspect; never enlarges."""
  if short_side <= 0 or min(w, h) <= short_side:
    return w - w % 2, h - h % 2
  s = short_side / min(w, h)
  return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def available_cores() -> int:
  """Cores this process may run on (the affinity mask, e.g. a container's share)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def plan_parallelism(cores: int, workers: int = 0, threads: int = 0) -> tuple[int, int]:
  """(worker processes, codec threads per worker) with workers x threads <= cores.

  0 means derive it: by default one thread per worker and one worker per core
  (many small videos parallelise better over processes than inside x264).
  """
  if workers > 0 and threads > 0:
    if workers * threads > cores:
      raise ValueError(f'--workers={workers} x --threads={threads} = {workers * threads} '
                       f'encoder threads on {cores} cores; lower one of them (0 derives it '
                       f'from the other)')
    return workers, threads
  if threads > 0:
    return max(1, cores // threads), threads
  if workers > 0:
    return workers, max(1, cores // workers)
  return max(1, cores), 1


def encoder_options(crf: int, preset: str, gop: int, threads: int) -> dict[str, str]:
  """libx264 options: quality, speed, keyframe interval and thread count."""
  return {'crf': str(crf), 'preset': preset, 'g': str(max(1, gop)), 'threads': str(threads)}


def output_name(rel: str) -> str:
  """`sub/a.mp4` stays; other inputs keep their extension: `sub/a.avi` -> `sub/a.avi.mp4`."""
  return rel if rel.lower().endswith('.mp4') else rel + '.mp4'


def source_base(records: list[VideoRecord], base: str) -> str:
  """The folder outputs mirror: `base` if it holds every input, else their common folder."""
  paths = [os.path.abspath(r.path) for r in records]
  if base:
    b = os.path.abspath(base)
    if all(p.startswith(b.rstrip(os.sep) + os.sep) for p in paths):
      return b
  return os.path.commonpath([os.path.dirname(p) for p in paths])


def output_paths(records: list[VideoRecord], base: str) -> list[str]:
  """Each record's output path relative to --out_dir; ValueError if two inputs share one."""
  b = source_base(records, base)
  owner: dict[str, str] = {}
  out = []
  for r in records:
    src = os.path.abspath(r.path)
    rel = output_name(os.path.relpath(src, b))
    prev = owner.setdefault(rel, src)
    if prev != src:
      raise ValueError(f'{prev} and {src} would both be written to {rel} under --out_dir; '
                       f'rename one of them')
    out.append(rel)
  for rel, src in owner.items():
    if rel + '.part.mp4' in owner:  # The temporary file of another output.
      raise ValueError(f'{owner[rel + ".part.mp4"]} would be written to {rel}.part.mp4, the '
                       f'temporary file of {src}; rename one of them')
  return out


def transcode(src: str, dst: str, short_side: int, crf: int, preset: str,
              keyframe_s: float, threads: int = 1) -> int:
  """Re-encodes `src` to h264 mp4 `dst`; returns the number of frames written."""
  import av  # pylint: disable=g-import-not-at-top
  readers._check_file(src)  # pylint: disable=protected-access
  tmp = dst + '.part.mp4'
  n = 0
  with av.open(src, metadata_errors='ignore') as inp:
    if not inp.streams.video:
      raise readers.DecodeError(f'{src}: no video stream')
    ist = inp.streams.video[0]
    ist.thread_type = 'AUTO'
    ist.codec_context.thread_count = threads  # FFmpeg's default is one per core.
    rate = ist.average_rate or ist.guessed_rate or Fraction(25)
    w, h = output_size(ist.codec_context.width, ist.codec_context.height, short_side)
    with av.open(tmp, 'w', format='mp4') as out:
      ost = out.add_stream('libx264', rate=rate)
      ost.width, ost.height, ost.pix_fmt = w, h, 'yuv420p'
      ost.options = encoder_options(crf, preset, int(round(float(rate) * keyframe_s)), threads)
      for frame in inp.decode(ist):
        f = frame.reformat(width=w, height=h, format='yuv420p')
        f.pts = n  # Constant frame rate, one output frame per decoded frame.
        f.time_base = Fraction(1) / rate
        for pkt in ost.encode(f):
          out.mux(pkt)
        n += 1
      for pkt in ost.encode():
        out.mux(pkt)
  if n == 0:
    os.remove(tmp)
    raise readers.DecodeError(f'{src}: no decodable frames')
  os.replace(tmp, dst)
  return n


def verify(path: str, reader: str = 'decord') -> int:
  """Opens `path` with the training reader and decodes its first, middle and last frames."""
  v = readers.open_video(path, reader)
  try:
    n = v.num_frames
    if n <= 0:
      raise readers.DecodeError(f'{path}: no frames')
    v.get_frames(sorted({0, n // 2, max(0, n - 2)}))
    return n
  finally:
    v.close()


def process(src: str, rel: str, out_dir: str, args) -> tuple[str, str | None]:
  """Writes `src` to out_dir/rel; returns (rel, None) or (src, reason)."""
  dst = os.path.join(out_dir, rel)
  try:
    if os.path.exists(dst) and not args.overwrite:
      try:
        verify(dst)
        return rel, None
      except readers.DecodeError:
        pass  # A broken earlier output: redo it.
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    transcode(src, dst, args.short_side, args.crf, args.preset, args.keyframe_s,
              args.threads)
    verify(dst)
    if args.check_frames:
      ok, detail = readers.check_frame_accuracy(dst, 'decord', num_probes=4)
      if not ok:
        raise readers.DecodeError(f'{dst}: {detail}')
    return rel, None
  except Exception as e:  # pylint: disable=broad-except
    # One bad input must not stop the preparation of the others.
    for p in (dst, dst + '.part.mp4'):
      if os.path.exists(p) and (p.endswith('.part.mp4') or args.overwrite):
        os.remove(p)
    return src, f'{type(e).__name__}: {e}'.replace('\n', ' ')


def plan_shards(records: list[VideoRecord], base: str, num_shards: int, workers: int
                ) -> list[list[tuple[str, str, int]]]:
  """Contiguous slices of the distinct inputs, (path, source name, label) each, in input
  order; a source listed twice is stored once (first label). Source names are paths
  relative to the inputs' folder (as `output_paths` mirrors them)."""
  b = source_base(records, base)
  seen, videos = set(), []
  for r in records:
    src = os.path.abspath(r.path)
    if src not in seen:
      seen.add(src)
      videos.append((src, os.path.relpath(src, b), int(r.label)))
  n = num_shards if num_shards > 0 else max(workers, -(-len(videos) // 256))
  n = max(1, min(n, len(videos)))
  return [videos[k * len(videos) // n:(k + 1) * len(videos) // n] for k in range(n)]


def make_frame_store(records: list[VideoRecord], base: str, out_dir: str, short_side: int,
                     quality: int, num_shards: int, workers: int, overwrite: bool = False) -> int:
  """`--format=frames`: writes (or completes) the frame store; returns the exit code."""
  from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  frame_store._array_record()  # pylint: disable=protected-access  # Fails before any work.
  plan = plan_shards(records, base, num_shards, workers)
  names = [frame_store.shard_name(k, len(plan)) for k in range(len(plan))]
  os.makedirs(out_dir, exist_ok=True)
  todo = []
  for name, videos in zip(names, plan):
    index = frame_store.read_shard_index(out_dir, name)
    if (overwrite or index is None or index.get('planned') != [s for _, s, _ in videos]
        or index.get('short_side') != short_side or index.get('jpeg_quality') != quality):
      todo.append((name, videos))
  total = sum(map(len, plan))
  print(f'{total} videos in {len(plan)} shards ({len(plan) - len(todo)} finished), '
        f'{min(workers, max(1, len(todo)))} workers', flush=True)
  t0 = time.time()
  # Forked from the command line; spawned when this process already runs TensorFlow or JAX
  # threads (a library caller, tests), which fork() cannot copy safely.
  threaded = any(m in sys.modules for m in ('tensorflow', 'jax'))
  ctx = multiprocessing.get_context('spawn' if threaded else None)
  with concurrent.futures.ProcessPoolExecutor(max(1, min(workers, len(todo) or 1)),
                                              mp_context=ctx) as pool:
    futures = [pool.submit(frame_store.write_shard, out_dir, name, videos, short_side, quality)
               for name, videos in todo]
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      index = fut.result()
      for path, reason in index['bad']:
        print(f'bad: {path}: {reason}', file=sys.stderr)
      print(f'{i}/{len(todo)} shards written ({index["shard"]}: {len(index["videos"])} videos), '
            f'{time.time() - t0:.0f}s', flush=True)
  stored = frames = 0
  hours = 0.0
  sources = set()
  for name in names:
    index = frame_store.read_shard_index(out_dir, name)
    stored += index['file_size']
    for v in index['videos']:
      frames += v['num_frames']
      hours += v['num_frames'] / (v['fps'] or 25.0) / 3600
      sources.add(v['source'])
  num_videos = len(sources)
  src_bytes = sum(os.path.getsize(p) for videos in plan for p, s, _ in videos if s in sources)
  bad = list(frame_store.iter_bad(out_dir, names))
  with open(os.path.join(out_dir, 'bad_files.txt'), 'w') as f:
    f.writelines(f'{path}\t{reason}\n' for path, reason in bad)
  if not num_videos:
    print(f'no video could be stored; {len(bad)} bad -> bad_files.txt', file=sys.stderr)
    return 1
  frame_store.write_store_file(out_dir, names, short_side, quality, num_videos)
  per_hour = stored / max(hours, 1e-9) / 1e9
  print(f'{num_videos} videos, {frames} frames ({hours * 60:.1f} min) -> {out_dir} '
        f'(use data.frame_store={out_dir}); {stored / 1e6:.1f} MB, {per_hour:.2f} GB per hour '
        f'of video ({stored / max(src_bytes, 1):.1f}x the {src_bytes / 1e6:.1f} MB of the '
        f'inputs); {len(bad)} bad -> bad_files.txt')
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--src_dir', help='folder of videos (recursive; class subfolders -> labels)')
  src.add_argument('--src_list', help='annotation list, `path label` per line')
  p.add_argument('--root', default='', help='prefix for relative paths of --src_list')
  p.add_argument('--out_dir', required=True)
  p.add_argument('--format', choices=('mp4', 'frames'), default='mp4',
                 help='mp4: h264 files and a train list; frames: a frame store')
  p.add_argument('--short_side', type=int, default=None,
                 help='0 keeps the stored size (default 320 for mp4, 256 for frames)')
  p.add_argument('--jpeg_quality', type=int, default=80, help='frames: JPEG quality')
  p.add_argument('--num_shards', type=int, default=0,
                 help='frames: shards (0: one per 256 videos, at least one per worker)')
  p.add_argument('--crf', type=int, default=23)
  p.add_argument('--preset', default='veryfast')
  p.add_argument('--keyframe_s', type=float, default=1.0, help='seconds between keyframes')
  p.add_argument('--extensions', default=','.join(DEFAULT_EXTENSIONS))
  p.add_argument('--workers', type=int, default=0,
                 help='worker processes (0: cores / --threads)')
  p.add_argument('--threads', type=int, default=0,
                 help='decoder and x264 threads per worker (0: cores / --workers, else 1)')
  p.add_argument('--check_frames', action='store_true',
                 help='also compare decord against an exact decode on every output')
  p.add_argument('--overwrite', action='store_true')
  args = p.parse_args(argv)

  try:
    if args.src_dir:
      records = scan_video_folder(args.src_dir, args.extensions.split(','))
      base = args.src_dir
    else:
      records = load_annotation_list(args.src_list, args.root)
      base = args.root
    if args.short_side is None:
      args.short_side = 256 if args.format == 'frames' else 320
    if args.format == 'frames':
      if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f'--jpeg_quality={args.jpeg_quality}: expected 1..100')
      workers = args.workers if args.workers > 0 else available_cores()
      return make_frame_store(records, base, args.out_dir, args.short_side, args.jpeg_quality,
                              args.num_shards, workers, args.overwrite)
    rels = output_paths(records, base)  # Before any work: two inputs, one output.
    workers, args.threads = plan_parallelism(available_cores(), args.workers, args.threads)
  except (SourceError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(args.out_dir, exist_ok=True)
  t0 = time.time()
  good, bad = [], []
  jobs = dict(zip(rels, (os.path.abspath(r.path) for r in records)))  # A repeated input once.
  print(f'{len(jobs)} videos, {workers} workers x {args.threads} threads', flush=True)
  with concurrent.futures.ProcessPoolExecutor(workers) as pool:
    futures = {rel: pool.submit(process, src, rel, args.out_dir, args)
               for rel, src in jobs.items()}
    results = {}
    for i, (rel, fut) in enumerate(futures.items(), 1):
      results[rel] = fut.result()
      if results[rel][1] is not None:
        print(f'bad: {results[rel][0]}: {results[rel][1]}', file=sys.stderr)
      if i % 100 == 0 or i == len(futures):
        print(f'{i}/{len(futures)} done, {time.time() - t0:.0f}s', flush=True)
  for rec, rel in zip(records, rels):
    path, reason = results[rel]
    if reason is None:
      good.append((path, rec.label))
    elif (path, reason) not in bad:
      bad.append((path, reason))
  list_path = os.path.join(args.out_dir, 'train_list.txt')
  with open(list_path, 'w') as f:
    f.writelines(f'{path} {label}\n' for path, label in good)
  with open(os.path.join(args.out_dir, 'bad_files.txt'), 'w') as f:
    f.writelines(f'{path}\t{reason}\n' for path, reason in bad)
  print(f'{len(good)} videos -> {list_path} (use data.train_list={list_path} '
        f'data.root={args.out_dir}); {len(bad)} bad -> bad_files.txt')
  return 0 if good else 1


if __name__ == '__main__':
  sys.exit(main())
