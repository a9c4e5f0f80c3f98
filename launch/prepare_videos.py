"""Prepares videos for pre-training: resize, re-encode to h264 mp4, verify, write a clean list.

  python -m launch.prepare_videos --src_dir /data/k400/train --out_dir /data/k400_320
  python -m launch.prepare_videos --src_list train.csv --root /data/ssv2 --out_dir /data/ssv2_mp4

Every input (mp4, webm, avi, ...) is decoded sequentially (frame-exact), scaled
so its short side is `--short_side` (never enlarged), and written as h264 mp4
with one keyframe per `--keyframe_s` seconds: sparse keyframes (x264's default is
one per 250 frames) make every seek decode more frames, about 2x the CPU cost
per clip. Each output is then opened with the training reader and a few frames
are decoded. Writes, under `--out_dir`:
  train_list.txt  `relative/path.mp4 label` per line, for data.train_list with
                  data.root=<out_dir>;
  bad_files.txt   `path<TAB>reason` for every input that failed.
Existing outputs that decode are kept, so an interrupted run can be restarted.
"""
from __future__ import annotations

import argparse
import concurrent.futures
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


def transcode(src: str, dst: str, short_side: int, crf: int, preset: str,
              keyframe_s: float) -> int:
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
    rate = ist.average_rate or ist.guessed_rate or Fraction(25)
    w, h = output_size(ist.codec_context.width, ist.codec_context.height, short_side)
    with av.open(tmp, 'w', format='mp4') as out:
      ost = out.add_stream('libx264', rate=rate)
      ost.width, ost.height, ost.pix_fmt = w, h, 'yuv420p'
      ost.options = {'crf': str(crf), 'preset': preset,
                     'g': str(max(1, int(round(float(rate) * keyframe_s))))}
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


def process(rec: VideoRecord, src_base: str, out_dir: str, args) -> tuple[str, str | None]:
  """Returns (output path relative to out_dir, None) or (src path, reason)."""
  rel = os.path.relpath(rec.path, src_base) if src_base else os.path.basename(rec.path)
  if rel.startswith('..'):
    rel = os.path.basename(rec.path)
  rel = os.path.splitext(rel)[0] + '.mp4'
  dst = os.path.join(out_dir, rel)
  try:
    if os.path.exists(dst) and not args.overwrite:
      try:
        verify(dst)
        return rel, None
      except readers.DecodeError:
        pass  # A broken earlier output: redo it.
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    transcode(rec.path, dst, args.short_side, args.crf, args.preset, args.keyframe_s)
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
    return rec.path, f'{type(e).__name__}: {e}'.replace('\n', ' ')


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--src_dir', help='folder of videos (recursive; class subfolders -> labels)')
  src.add_argument('--src_list', help='annotation list, `path label` per line')
  p.add_argument('--root', default='', help='prefix for relative paths of --src_list')
  p.add_argument('--out_dir', required=True)
  p.add_argument('--short_side', type=int, default=320, help='0 keeps the stored size')
  p.add_argument('--crf', type=int, default=23)
  p.add_argument('--preset', default='veryfast')
  p.add_argument('--keyframe_s', type=float, default=1.0, help='seconds between keyframes')
  p.add_argument('--extensions', default=','.join(DEFAULT_EXTENSIONS))
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
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
  except SourceError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(args.out_dir, exist_ok=True)
  t0 = time.time()
  good, bad = [], []
  with concurrent.futures.ProcessPoolExecutor(max(1, args.workers)) as pool:
    futures = [pool.submit(process, r, base, args.out_dir, args) for r in records]
    for i, (rec, fut) in enumerate(zip(records, futures), 1):
      path, reason = fut.result()
      if reason is None:
        good.append((path, rec.label))
      else:
        bad.append((path, reason))
        print(f'bad: {path}: {reason}', file=sys.stderr)
      if i % 100 == 0 or i == len(records):
        print(f'{i}/{len(records)} done, {len(bad)} bad, {time.time() - t0:.0f}s', flush=True)
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
