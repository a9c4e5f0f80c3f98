"""Frame store: every frame of every video as a JPEG, in sharded ArrayRecord files.

A clip then costs its 16 sampled JPEG decodes instead of a video decode from the
nearest keyframe (see bench/README.md, "Frame store", for the measurements behind
the choices below).

Layout of a store folder (written by `python -m launch.prepare_videos --format=frames`):
  store.json                        format, version, short side, JPEG quality, shard
                                    names, number of videos; written last;
  frames-SSSSS-of-NNNNN.array_record  one record per frame (JPEG bytes), the frames of
                                    each video consecutive, in presentation order;
  frames-SSSSS-of-NNNNN.json        the shard's index: per video `source` (path relative
                                    to the source folder), `label`, `num_frames`, `fps`,
                                    `source_size` (w, h of the original), `frame_size` (w, h
                                    of the JPEGs), `first_record`; plus the shard's byte
                                    size and the videos it could not store (`bad`);
  bad_files.txt                     `path<TAB>reason` of every video that failed.

Choices:
- ArrayRecord (riegeli, `group_size:1`, uncompressed) rather than DMVR's one
  SequenceExample per video: a clip reads only its 16 frames by record number (about
  0.4 MB, not the whole video) and the reader needs no shuffle buffer, so the stream
  stays a pure function of (seed, epoch, index). Riegeli checksums every chunk, so
  damaged bytes fail the read instead of decoding to garbage.
- Every frame is kept, at its original index: `num_frames` is the original frame count
  and the reference sampler (`sampling.sample_frame_indices`) runs unchanged in original
  frame units, for any sampling rate (K400 stride 4, SSv2 stride 2, fine-tuning's dense
  sampling).
- Crops are sampled in the original video's pixels (`source_size`) and mapped onto the
  stored frames (`augment.frame_box`), exactly as the mp4 path maps them onto frames
  decoded at reduced resolution: a store made from some videos gives the clips the mp4
  path gives on those videos, up to resolution and JPEG error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from videomae_jax.data import augment
from videomae_jax.data import readers
from videomae_jax.data.sources import VideoRecord

FORMAT = 'videomae_jax.frame_store'
VERSION = 1
STORE_FILE = 'store.json'
WRITER_OPTIONS = 'group_size:1,uncompressed'
# Random access: no readahead, no reader threads (the pipeline's threads read in parallel).
READER_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'


class StoreError(readers.DecodeError):
  """A store, shard or frame that cannot be read (missing, truncated, corrupt)."""


def shard_name(index: int, count: int) -> str:
  return f'frames-{index:05d}-of-{count:05d}'


def stored_frame_size(w: int, h: int, short_side: int) -> tuple[int, int]:
  """(w, h) of the stored frames: short side `short_side`, aspect kept, never enlarged.

  Scaled sizes are even and rounded as `augment.decode_size` rounds them, so the mp4 path
  decoding at the same short side sees frames of the same size.
  """
  if short_side <= 0 or min(w, h) <= short_side:
    return w, h
  s = short_side / min(w, h)
  return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def _array_record():
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise readers.BackendUnavailable(
        f'config.data.frame_store needs the Python module array_record, which does not import '
        f'({e}); `pip install array_record` or the extra `pip install \'videomae-jax[data]\'`'
    ) from None
  return array_record_module


def _cv2():
  import cv2  # pylint: disable=g-import-not-at-top
  return cv2


# --------------------------------------------------------------------------------------------
# JPEG frames


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
  """Baseline JPEG (4:2:0, optimised Huffman tables) of an RGB uint8 frame."""
  cv2 = _cv2()
  ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[..., ::-1]),
                         [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 1])
  if not ok:
    raise StoreError(f'JPEG encoding failed for a frame of shape {rgb.shape}')
  return buf.tobytes()


# DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8 size for little more than the entropy
# decoding, so a crop that covers at least `ratio` x the output side is decoded reduced.
_IMREAD_FLAGS = {1: 'IMREAD_COLOR_RGB', 2: 'IMREAD_REDUCED_GRAYSCALE_2',
                 4: 'IMREAD_REDUCED_GRAYSCALE_4', 8: 'IMREAD_REDUCED_GRAYSCALE_8'}


def dct_ratio(min_crop_side: float, input_size: int) -> int:
  """The largest of 1, 2, 4, 8 that leaves every crop at least `input_size` pixels wide."""
  for r in (8, 4, 2):
    if min_crop_side >= r * input_size:
      return r
  return 1


def _check_complete(data: bytes, name: str) -> None:
  """A JPEG cut short still decodes above the cut: require its start and end markers."""
  if len(data) < 4 or data[:2] != b'\xff\xd8' or data[-2:] != b'\xff\xd9':
    raise StoreError(f'{name}: not a complete JPEG ({len(data)} bytes)')


def decode_jpeg(data: bytes, frame_size: tuple[int, int], ratio: int = 1,
                name: str = 'frame') -> np.ndarray:
  """RGB uint8 (h, w, 3) of one whole stored frame (OpenCV), at 1/`ratio` size.

  Raises StoreError when the bytes do not decode to the size the index records (a
  truncated or damaged JPEG decodes partly, with libjpeg warnings only).
  """
  cv2 = _cv2()
  _check_complete(data, name)
  flags = getattr(cv2, _IMREAD_FLAGS[ratio])
  if ratio > 1:
    flags |= cv2.IMREAD_COLOR_RGB  # Reduced size, three channels, RGB order.
  img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  w, h = frame_size
  want = (math.ceil(h / ratio), math.ceil(w / ratio))
  if img is None or img.shape[:2] != want:
    got = None if img is None else img.shape[:2]
    raise StoreError(f'{name}: JPEG does not decode (got {got}, expected {want})')
  return img


# --------------------------------------------------------------------------------------------
# Index


@dataclasses.dataclass(frozen=True)
class StoredVideo:
  """One video's entry in a shard index."""
  source: str
  label: int
  num_frames: int
  fps: float
  source_size: tuple[int, int]
  frame_size: tuple[int, int]
  first_record: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> 'StoredVideo':
    return cls(str(d['source']), int(d['label']), int(d['num_frames']), float(d['fps']),
               tuple(d['source_size']), tuple(d['frame_size']), int(d['first_record']))


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_shard_index(store_dir: str, name: str) -> dict | None:
  """The index of a finished shard, or None when the shard is missing or incomplete."""
  index_path = os.path.join(store_dir, name + '.json')
  data_path = os.path.join(store_dir, name + '.array_record')
  try:
    with open(index_path) as f:
      index = json.load(f)
    if index.get('format') != FORMAT or os.path.getsize(data_path) != index['file_size']:
      return None
    return index
  except (OSError, ValueError, KeyError):
    return None


# --------------------------------------------------------------------------------------------
# Writer


def _decode_source(path: str) -> tuple[Iterator[np.ndarray], float, tuple[int, int], object]:
  """(RGB frames in presentation order, fps, (w, h), container): frame-exact sequential
  PyAV decoding, one thread."""
  av = readers.import_backend('pyav', path)
  readers._check_file(path)  # pylint: disable=protected-access
  try:
    container = av.open(path, metadata_errors='ignore')
  except av.error.FFmpegError as e:
    raise readers.DecodeError(f'{path}: {e}') from e
  if not container.streams.video:
    container.close()
    raise readers.DecodeError(f'{path}: no video stream')
  stream = container.streams.video[0]
  stream.codec_context.thread_count = 1
  rate = stream.average_rate or stream.guessed_rate
  fps = float(rate) if rate else 0.0
  size = (int(stream.codec_context.width), int(stream.codec_context.height))

  def frames():
    try:
      for frame in container.decode(stream):
        yield frame.to_ndarray(format='rgb24')
    except av.error.FFmpegError as e:
      raise readers.DecodeError(f'{path}: {e}') from e

  return frames(), fps, size, container


def write_shard(store_dir: str, name: str, videos: Sequence[tuple[str, str, int]],
                short_side: int, quality: int) -> dict:
  """Writes the shard `name` of `videos` ((path, source name, label) each) and its index.

  Every frame is resized (area interpolation) to `short_side` and JPEG-encoded at
  `quality`. A video that fails to decode is listed under `bad` with its reason (frames it
  wrote stay in the shard, unreferenced). The shard is written under a temporary name and
  verified (every frame of every video decodes at its recorded size) before the index is
  written: an index whose byte size matches its shard marks a finished shard.
  """
  ar = _array_record()
  cv2 = _cv2()
  cv2.setNumThreads(1)
  data_path = os.path.join(store_dir, name + '.array_record')
  tmp = data_path + '.tmp'
  entries, bad = [], []
  writer = ar.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  record = 0
  try:
    for path, source, label in videos:
      first, container = record, None
      try:
        frames, fps, size, container = _decode_source(path)
        fsize = stored_frame_size(*size, short_side)
        for rgb in frames:
          if (rgb.shape[1], rgb.shape[0]) != fsize:
            rgb = cv2.resize(rgb, fsize, interpolation=cv2.INTER_AREA)
          writer.write(encode_jpeg(rgb, quality))
          record += 1
        if record == first:
          raise readers.DecodeError(f'{path}: no decodable frames')
        entries.append(StoredVideo(source, int(label), record - first, fps, size, fsize, first))
      except Exception as e:  # pylint: disable=broad-except
        # One bad input must not stop the others.
        bad.append((path, f'{type(e).__name__}: {e}'.replace('\n', ' ')))
      finally:
        if container is not None:
          container.close()
  finally:
    writer.close()
  # Verify what was written, through the reader the pipeline uses.
  reader = ar.ArrayRecordReader(tmp, READER_OPTIONS)
  try:
    if reader.num_records() != record:
      raise StoreError(f'{tmp}: {reader.num_records()} records written, expected {record}')
    verified = []
    for v in entries:
      try:
        for i, data in enumerate(reader.read(list(range(v.first_record,
                                                        v.first_record + v.num_frames)))):
          # 1/8 DCT scaling: the whole entropy-coded stream is checked, little IDCT work.
          decode_jpeg(data, v.frame_size, 8, f'{v.source} frame {i}')
        verified.append(v)
      except Exception as e:  # pylint: disable=broad-except
        path = next(p for p, s, _ in videos if s == v.source)
        bad.append((path, f'verification: {type(e).__name__}: {e}'))
  finally:
    reader.close()
  os.replace(tmp, data_path)
  index = {'format': FORMAT, 'version': VERSION, 'shard': name,
           'file_size': os.path.getsize(data_path), 'num_records': record,
           'short_side': int(short_side), 'jpeg_quality': int(quality),
           'planned': [s for _, s, _ in videos],
           'videos': [v.to_json() for v in verified],
           'bad': [list(b) for b in bad]}
  _write_json(os.path.join(store_dir, name + '.json'), index)
  return index


def write_store_file(store_dir: str, shard_names: Sequence[str], short_side: int,
                     quality: int, num_videos: int) -> None:
  _write_json(os.path.join(store_dir, STORE_FILE), {
      'format': FORMAT, 'version': VERSION, 'short_side': int(short_side),
      'jpeg_quality': int(quality), 'shards': list(shard_names), 'num_videos': int(num_videos)})


# --------------------------------------------------------------------------------------------
# Reader


class StoreVideo:
  """A `readers.VideoFile` over one stored video, which renders clips from the crop window.

  `stored_size` is the original video's (w, h): crop boxes are sampled in its pixels, as on
  the mp4 path, and mapped onto the stored frames.
  """

  def __init__(self, store: 'FrameStore', vid: int):
    self._store = store
    self._vid = vid
    self.entry = store.videos[vid]
    self.path = store.records[vid].path
    self.num_frames = self.entry.num_frames
    self.stored_size = self.entry.source_size

  def _read(self, indices: Sequence[int]) -> list[bytes]:
    e = self.entry
    bad = [i for i in indices if not 0 <= i < e.num_frames]
    if bad:
      raise StoreError(f'{self.path}: frames {bad} outside [0, {e.num_frames})')
    reader = self._store.reader(self._store.shard_of[self._vid])
    readers.checkpoint(self.path)
    try:
      return reader.read([e.first_record + int(i) for i in indices])
    except Exception as e_:  # riegeli raises on damaged chunks (checksums).
      raise StoreError(f'{self.path}: {type(e_).__name__}: {e_}') from None

  def _decode(self, indices: Sequence[int], ratio: int) -> dict[int, np.ndarray]:
    uniq = sorted({int(i) for i in indices})
    out = {}
    for i, data in zip(uniq, self._read(uniq)):
      readers.checkpoint(self.path)  # An abandoned decode stops at the next frame.
      out[i] = decode_jpeg(data, self.entry.frame_size, ratio, f'{self.path} frame {i}')
    return out

  def get_frames(self, indices: np.ndarray) -> np.ndarray:
    """The stored frames (T, h, w, 3) at `indices` (original frame numbers)."""
    got = self._decode(indices, 1)
    return np.stack([got[int(i)] for i in indices])

  def render_clips(self, indices: np.ndarray, crops: Sequence[tuple[augment.CropBox, bool]],
                   input_size: int) -> np.ndarray:
    """(len(crops), T, input_size, input_size, 3): each (box, flip) of `crops` applied to the
    frames at `indices`.

    Each distinct frame is decoded once (OpenCV, DCT-scaled by 2, 4 or 8 when every crop
    still covers the output at that scale) and resized into every clip position that shows
    it right after its decode, while it is in cache (bench/README.md, "Decoder").
    """
    fw, fh = self.entry.frame_size
    full = [augment.frame_box(b, self.stored_size, (fw, fh)) for b, _ in crops]
    ratio = dct_ratio(min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in full), input_size)
    size = (math.ceil(fw / ratio), math.ceil(fh / ratio))
    boxes = [augment.frame_box(b, self.stored_size, size) for b, _ in crops]
    positions: dict[int, list[int]] = {}
    for t, i in enumerate(indices):
      positions.setdefault(int(i), []).append(t)
    uniq = sorted(positions)
    data = self._read(uniq)
    out = augment.aligned_empty((len(crops), len(indices), input_size, input_size, 3))
    for i, d in zip(uniq, data):
      readers.checkpoint(self.path)  # An abandoned decode stops at the next frame.
      img = decode_jpeg(d, (fw, fh), ratio, f'{self.path} frame {i}')
      first, *repeats = positions[i]
      for k, ((x0, y0, x1, y1), (_, flip)) in enumerate(zip(boxes, crops)):
        augment.resize_into(img[y0:y1, x0:x1], out[k, first], flip)
        for t in repeats:
          out[k, t] = out[k, first]
    return out

  def close(self) -> None:
    pass  # Shard readers are shared by all videos of the store.


class FrameStore:
  """A store folder opened for reading: the videos in order and shared shard readers.

  `records[i]` is video i as a `VideoRecord` whose `path` names the video in the store
  (the key under which failures are counted); `open(i)` returns its `StoreVideo`. A shard
  whose file is missing or not the size its index records (truncated) fails every read of
  its videos with a StoreError, which the pipeline counts and replaces like a bad file.
  """

  def __init__(self, path: str):
    self.path = path
    store_file = os.path.join(path, STORE_FILE)
    try:
      with open(store_file) as f:
        meta = json.load(f)
    except OSError:
      raise StoreError(f'config.data.frame_store: {store_file} does not exist (make a store '
                       f'with `python -m launch.prepare_videos --format=frames`)') from None
    except ValueError as e:
      raise StoreError(f'config.data.frame_store: {store_file} is not valid JSON: {e}') from None
    if meta.get('format') != FORMAT or int(meta.get('version', 0)) > VERSION:
      raise StoreError(f'config.data.frame_store: {store_file} is not a frame store of version '
                       f'<= {VERSION} (format {meta.get("format")!r}, version '
                       f'{meta.get("version")!r})')
    self.meta = meta
    self.shards: list[str] = list(meta['shards'])
    self.videos: list[StoredVideo] = []
    self.shard_of: list[int] = []
    self.records: list[VideoRecord] = []
    self._shard_size: list[int] = []
    for k, name in enumerate(self.shards):
      index_path = os.path.join(path, name + '.json')
      try:
        with open(index_path) as f:
          index = json.load(f)
      except (OSError, ValueError) as e:
        raise StoreError(f'config.data.frame_store: shard index {index_path} does not read '
                         f'({e})') from None
      self._shard_size.append(int(index['file_size']))
      for j, d in enumerate(index['videos']):
        v = StoredVideo.from_json(d)
        self.videos.append(v)
        self.shard_of.append(k)
        self.records.append(VideoRecord(f'{name}[{j}]:{v.source}', v.label))
    if not self.videos:
      raise StoreError(f'config.data.frame_store: {path} holds no videos')
    self._readers: dict[int, object] = {}
    self._errors: dict[int, str] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.videos)

  def reader(self, shard: int):
    """The shared reader of shard `shard`, opened on first use (thread-safe)."""
    r = self._readers.get(shard)
    if r is not None:
      return r
    with self._lock:
      if shard in self._readers:
        return self._readers[shard]
      if shard not in self._errors:
        data_path = os.path.join(self.path, self.shards[shard] + '.array_record')
        try:
          size = os.path.getsize(data_path)
          if size != self._shard_size[shard]:
            raise StoreError(f'{data_path}: {size} bytes, the index records '
                             f'{self._shard_size[shard]} (truncated or replaced shard)')
          self._readers[shard] = _array_record().ArrayRecordReader(data_path, READER_OPTIONS)
          return self._readers[shard]
        except readers.BackendUnavailable:
          raise
        except Exception as e:  # pylint: disable=broad-except
          self._errors[shard] = f'{type(e).__name__}: {e}'
      raise StoreError(f'shard {self.shards[shard]}: {self._errors[shard]}')

  def open(self, vid: int) -> StoreVideo:
    return StoreVideo(self, vid)

  def fingerprint(self) -> str:
    """sha256 of the videos in order (source name, label, frame count): the same store
    anywhere on disk gives the same fingerprint."""
    h = hashlib.sha256()
    for v in self.videos:
      h.update(f'{v.source}\t{v.label}\t{v.num_frames}\n'.encode())
    return h.hexdigest()

  def close(self) -> None:
    with self._lock:
      for r in self._readers.values():
        r.close()
      self._readers.clear()


def iter_bad(store_dir: str, shard_names: Iterable[str]) -> Iterator[tuple[str, str]]:
  """(path, reason) of every video the finished shards could not store."""
  for name in shard_names:
    index = read_shard_index(store_dir, name)
    for path, reason in (index or {}).get('bad', []):
      yield path, reason
