"""Video readers: PyAV (frame-exact, seeks, skips unneeded frames), decord and OpenCV.

All readers return RGB uint8 frames (T, h, w, 3) for a list of frame indices in
presentation order, optionally resized to `size` = (w, h) while decoding.

Frame accuracy: the PyAV reader numbers frames by presentation timestamp and is
frame-exact; on `SAFE_CONTAINERS` it seeks to a keyframe and lets the decoder skip
the frames no requested frame depends on, which costs less CPU than decord for the
same pixels. decord seeks by keyframe index and is frame-exact on h264 mp4 and vp9
webm, but returns wrong frames (up to ~160 off) on AVI files with B-frames (e.g.
mpeg4 part 2 AVIs), and may miscount frames in some AVI codecs. `reader='auto'`
uses PyAV on `SAFE_CONTAINERS` and the frame-exact OpenCV reader for everything else.

Every reader decodes with one thread (parallelism comes from decoding many
clips at once) and calls `checkpoint()` before each frame, so a decode that its
caller abandoned (see `cancel_current_thread_on`) stops at its next frame and
closes its file.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Callable, Protocol

import numpy as np

try:
  # PyAV must load its FFmpeg libraries before decord loads its own copy: in the
  # other order PyAV resolves symbols against decord's older FFmpeg and some
  # codecs fail to open (e.g. the vp9 encoder used by `prepare_videos`).
  import av  # pylint: disable=unused-import
except ImportError:  # PyAV is optional when only decord/OpenCV are used.
  av = None

SAFE_CONTAINERS = ('.mp4', '.m4v', '.mov', '.webm', '.mkv')
READERS = ('auto', 'decord', 'pyav', 'opencv')


class DecodeError(RuntimeError):
  """A video that cannot be decoded (corrupt, truncated, empty, unsupported)."""


class BackendUnavailable(DecodeError):
  """The Python module a reader needs (decord, av, cv2) is not installed."""


class DecodeCancelled(DecodeError):
  """The caller gave up on this decode (timeout); raised at the next frame."""


# Python module and pip package of each reader.
_BACKENDS = {'decord': ('decord', 'decord'), 'pyav': ('av', 'av'),
             'opencv': ('cv2', 'opencv-python-headless')}


def import_backend(reader: str, path: str):
  """The module of `reader`; a missing module is a BackendUnavailable naming `path`."""
  module, package = _BACKENDS[reader]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise BackendUnavailable(
        f"{path}: config.data.reader={reader!r} needs the Python module {module!r}, which "
        f"does not import ({e}); `pip install {package}` or the extra "
        f"`pip install 'videomae-jax[data]'`") from None


_cancel_state = threading.local()


def cancel_current_thread_on(event: threading.Event | None) -> None:
  """Makes `checkpoint()` in the calling thread raise once `event` is set."""
  _cancel_state.event = event


def checkpoint(path: str) -> None:
  """Raises DecodeCancelled when this thread's decode was abandoned by its caller."""
  event = getattr(_cancel_state, 'event', None)
  if event is not None and event.is_set():
    raise DecodeCancelled(f'{path}: decode abandoned (decode_timeout_s passed)')


class ShortRead(DecodeError):
  """The stream ended before a requested frame; `num_frames` is the true count."""

  def __init__(self, path: str, num_frames: int):
    super().__init__(f'{path}: stream ends after {num_frames} frames')
    self.num_frames = num_frames


class VideoFile(Protocol):
  """An open video: frame count, stored size and random access to frames."""
  path: str
  num_frames: int
  stored_size: tuple[int, int]  # (w, h) of the stored video.

  def get_frames(self, indices: np.ndarray) -> np.ndarray: ...

  def close(self) -> None: ...


_probe_cache: dict[str, tuple[int, int]] = {}
_probe_lock = threading.Lock()


def _probe_pyav(path: str) -> tuple[int, int]:
  av_ = import_backend('pyav', path)
  try:
    with av_.open(path, metadata_errors='ignore') as c:
      if not c.streams.video:
        raise DecodeError(f'{path}: no video stream')
      s = c.streams.video[0]
      return int(s.codec_context.width), int(s.codec_context.height)
  except av_.error.FFmpegError as e:
    raise DecodeError(f'{path}: {e}') from e


def _probe_decord(path: str) -> tuple[int, int]:
  decord = import_backend('decord', path)
  try:
    vr = decord.VideoReader(path, num_threads=1)
    h, w = vr.next().shape[:2]  # decord exposes the size only through a frame.
    del vr
  except (RuntimeError, decord.DECORDError, StopIteration) as e:
    raise DecodeError(f'{path}: {e or "no frames"}') from e
  return int(w), int(h)


def _open_capture(path: str):
  cv2 = import_backend('opencv', path)
  # One FFmpeg thread: OpenCV's default is one per core, for every open video.
  return cv2, cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])


def _probe_opencv(path: str) -> tuple[int, int]:
  cv2, cap = _open_capture(path)
  try:
    if not cap.isOpened():
      raise DecodeError(f'{path}: OpenCV cannot open the file')
    return int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
  finally:
    cap.release()


_PROBES = {'decord': _probe_decord, 'pyav': _probe_pyav, 'opencv': _probe_opencv}


def probe_size(path: str, reader: str = 'pyav') -> tuple[int, int]:
  """(w, h) of the first video stream, read with `reader` (cached per path).

  Probing with the reader in use means decord or OpenCV alone suffice.
  """
  size = _probe_cache.get(path)
  if size is None:
    size = _PROBES[resolve_reader(reader, path)](path)
    if min(size) <= 0:
      raise DecodeError(f'{path}: invalid frame size {size}')
    with _probe_lock:
      _probe_cache[path] = size
  return size


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise DecodeError(f'{path}: file does not exist')
  if os.path.getsize(path) == 0:
    raise DecodeError(f'{path}: file is empty (0 bytes)')


class DecordVideo:
  """decord reader: decodes only the sampled frames (from the nearest keyframe)."""

  def __init__(self, path: str, size: tuple[int, int] | None = None,
               stored_size: tuple[int, int] | None = None):
    decord = import_backend('decord', path)
    _check_file(path)
    self.path = path
    kw = {'width': size[0], 'height': size[1]} if size else {}
    try:
      # One thread per reader: parallelism comes from decoding many clips at once,
      # and extra decoder threads cost 10-20% more CPU per clip.
      self._vr = decord.VideoReader(path, num_threads=1, **kw)
    except (RuntimeError, decord.DECORDError) as e:
      raise DecodeError(f'{path}: {e}') from e
    self._decord = decord
    self._size = size
    self.num_frames = len(self._vr)
    self.stored_size = stored_size or size

  def _read(self, indices: np.ndarray) -> dict[int, np.ndarray]:
    got = {}
    for i in sorted({int(i) for i in indices}):
      checkpoint(self.path)
      got[i] = self._vr.get_batch([i]).asnumpy()[0]
    return got

  def get_frames(self, indices: np.ndarray) -> np.ndarray:
    # One frame per call (same seeks and cost as one batch call) so that an
    # abandoned decode stops at the next frame; repeats are decoded once.
    try:
      got = self._read(indices)
    except DecodeCancelled:
      raise
    except Exception as e:  # decord raises DECORDError, IndexError or RuntimeError.
      if self._size is None:
        raise DecodeError(f'{self.path}: {e}') from e
      # decord's scaled decoding fails for some output sizes (e.g. widths 16, 24, 48, 72):
      # decode at the stored size instead; the crops are mapped onto whatever size arrives.
      try:
        self._vr = self._decord.VideoReader(self.path, num_threads=1)
        self._size = None
        got = self._read(indices)
      except DecodeCancelled:
        raise
      except Exception as e2:  # noqa: BLE001
        raise DecodeError(f'{self.path}: {e2}') from e2
    frames = np.stack([got[int(i)] for i in indices])
    if self.stored_size is None:
      self.stored_size = (frames.shape[2], frames.shape[1])
    return frames

  def close(self) -> None:
    del self._vr


class PyAVVideo:
  """PyAV reader, frame-exact: frames are numbered by presentation timestamp.

  On `SAFE_CONTAINERS` (a sample index, a timestamp on every packet) it reads the packet
  timestamps once when opened, which gives the exact frame count. A read seeks to the last
  keyframe at or before the first requested frame and decodes forward from there; frames
  that are neither requested nor referenced by any other frame are skipped by the decoder
  (`skip_frame='NONREF'`), and only requested frames are converted to RGB (with one
  reused swscale context: the same pixels as decord and `to_ndarray`). Elsewhere (AVI, ...),
  or when timestamps are missing or repeated, it decodes sequentially from the start and
  counts frames.
  """

  def __init__(self, path: str, size: tuple[int, int] | None = None):
    av = import_backend('pyav', path)  # pylint: disable=redefined-outer-name
    _check_file(path)
    self.path = path
    self._size = size
    self._c = None
    self._rank: dict[int, int] | None = None  # pts -> frame index.
    self._keys: list[tuple[int, int]] = []  # (frame index, pts) of keyframes, in order.
    self.decoded_frames = 0  # Frames the decoder produced in the last read.
    self._open(av)
    self.stored_size = (int(self._s.codec_context.width), int(self._s.codec_context.height))
    if os.path.splitext(path)[1].lower() in SAFE_CONTAINERS:
      try:
        self._index(av)
      except BaseException:  # Abandoned (DecodeCancelled) while indexing: close the file now.
        self._c.close()
        raise
    if self._rank is not None:
      self.num_frames = len(self._rank)
      return
    n = int(self._s.frames or 0)
    if n <= 0 and self._s.average_rate:
      # Containers without a frame count (webm): estimate by timestamp; an
      # overestimate is corrected through ShortRead on the first read.
      if self._s.duration:
        seconds = float(self._s.duration * self._s.time_base)
      else:
        seconds = (self._c.duration or 0) / 1e6  # In AV_TIME_BASE units.
      n = int(round(seconds * float(self._s.average_rate)))
    if n <= 0:
      raise DecodeError(f'{path}: no frame count in the container header')
    self.num_frames = n

  def _open(self, av) -> None:  # pylint: disable=redefined-outer-name
    if self._c is not None:
      self._c.close()
    try:
      self._c = av.open(self.path, metadata_errors='ignore')
      if not self._c.streams.video:
        self._c.close()
        raise DecodeError(f'{self.path}: no video stream')
      self._s = self._c.streams.video[0]
      self._s.thread_type = 'SLICE'
      self._s.codec_context.thread_count = 1
    except av.error.FFmpegError as e:
      raise DecodeError(f'{self.path}: {e}') from e
    self._reformatter = av.video.reformatter.VideoReformatter()

  def _index(self, av) -> None:  # pylint: disable=redefined-outer-name
    """Numbers the frames by the packets' timestamps (no decoding); leaves `_rank` None
    where they cannot number them."""
    pts, keys = [], []
    try:
      for p in self._c.demux(self._s):
        checkpoint(self.path)
        if p.size == 0:
          continue  # The demuxer's final flush packet.
        if p.pts is None:
          break
        pts.append(int(p.pts))
        if p.is_keyframe:
          keys.append(int(p.pts))
      else:
        order = sorted(pts)
        rank = {t: i for i, t in enumerate(order)}
        if order and keys and len(rank) == len(order):
          self._rank = rank
          self._keys = sorted((rank[t], t) for t in keys)
    except av.error.FFmpegError:
      pass  # A damaged stream: the sequential decode reports what is wrong.
    if self._rank is None:
      # The sequential decode starts where the container is: back to the start. (Indexed
      # reads seek before decoding, so they need no second open.)
      self._open(av)

  def _rgb(self, frame) -> np.ndarray:
    kw = {'width': self._size[0], 'height': self._size[1]} if self._size else {}
    return self._reformatter.reformat(frame, format='rgb24', **kw).to_ndarray()

  def get_frames(self, indices: np.ndarray) -> np.ndarray:
    av = import_backend('pyav', self.path)  # pylint: disable=redefined-outer-name
    wanted = {int(i) for i in indices}
    got = None
    if self._rank is not None:
      outside = sorted(i for i in wanted if not 0 <= i < self.num_frames)
      if outside:
        raise DecodeError(f'{self.path}: frames {outside} outside [0, {self.num_frames})')
      got = self._seek_and_decode(av, wanted)
    if got is None:
      got = self._decode_from_start(av, wanted)
    return np.stack([got[int(i)] for i in indices])

  def _seek_and_decode(self, av, wanted: set[int]) -> dict[int, np.ndarray] | None:  # pylint: disable=redefined-outer-name
    """The wanted frames, decoded from the keyframe before the first; None when the stream
    does not deliver them all that way (then the caller decodes from the start)."""
    first = min(wanted)
    start = 0
    for k, (index, _) in enumerate(self._keys):
      if index <= first:
        start = k
    cc = self._s.codec_context
    got = {}
    self.decoded_frames = 0
    try:
      self._c.seek(self._keys[start][1], stream=self._s, backward=True, any_frame=False)
      cc.flush_buffers()
      for p in self._c.demux(self._s):
        checkpoint(self.path)
        if p.size == 0:
          frames = cc.decode(None)
        else:
          # Set before each packet: the decoder reads it when it parses that frame.
          cc.skip_frame = 'DEFAULT' if self._rank.get(p.pts) in wanted else 'NONREF'
          frames = cc.decode(p)
        for f in frames:
          self.decoded_frames += 1
          i = self._rank.get(f.pts)
          if i in wanted and i not in got:
            got[i] = self._rgb(f)
        if len(got) == len(wanted):
          break
    except av.error.FFmpegError as e:
      raise DecodeError(f'{self.path}: {e}') from e
    finally:
      cc.skip_frame = 'DEFAULT'
    if len(got) < len(wanted):
      self._open(av)
      return None
    return got

  def _decode_from_start(self, av, wanted: set[int]) -> dict[int, np.ndarray]:  # pylint: disable=redefined-outer-name
    last = max(wanted)
    got = {}
    count = 0
    try:
      for i, frame in enumerate(self._c.decode(self._s)):
        checkpoint(self.path)
        count = self.decoded_frames = i + 1
        if i in wanted:
          got[i] = self._rgb(frame)
        if i >= last:
          break
    except av.error.FFmpegError as e:
      raise DecodeError(f'{self.path}: {e}') from e
    if last not in got:
      raise ShortRead(self.path, count)
    self._open(av)  # The next read starts from the start again.
    return got

  def close(self) -> None:
    self._c.close()


class OpenCVVideo:
  """OpenCV reader: seeks to the first sampled frame, then reads sequentially.

  OpenCV's FFmpeg backend seeks frame-accurately (it decodes forward from the
  keyframe and counts frames by timestamp), unlike decord on B-frame AVIs.
  """

  def __init__(self, path: str, size: tuple[int, int] | None = None):
    _check_file(path)
    self.path = path
    self._size = size
    cv2, self._cap = _open_capture(path)
    if not self._cap.isOpened():
      raise DecodeError(f'{path}: OpenCV cannot open the file')
    self.num_frames = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
    self.stored_size = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                        int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    if self.num_frames <= 0 or min(self.stored_size) <= 0:
      raise DecodeError(f'{path}: OpenCV reports {self.num_frames} frames of {self.stored_size}')

  def get_frames(self, indices: np.ndarray) -> np.ndarray:
    import cv2  # pylint: disable=g-import-not-at-top
    order = sorted({int(i) for i in indices})
    got = {}
    pos = order[0]
    if pos > 0 and not self._cap.set(cv2.CAP_PROP_POS_FRAMES, pos):
      raise DecodeError(f'{self.path}: OpenCV cannot seek to frame {pos}')
    for want in order:
      while pos < want:  # grab() decodes without the colour conversion.
        checkpoint(self.path)
        if not self._cap.grab():
          raise ShortRead(self.path, self._count_frames())
        pos += 1
      checkpoint(self.path)
      ok, bgr = self._cap.read()
      if not ok:
        raise ShortRead(self.path, self._count_frames())
      pos += 1
      rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
      if self._size and (rgb.shape[1], rgb.shape[0]) != self._size:
        rgb = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
      got[want] = rgb
    return np.stack([got[int(i)] for i in indices])

  def _count_frames(self) -> int:
    """Decodable frames, counted from the start (the header count can be wrong)."""
    self._cap.release()
    _, self._cap = _open_capture(self.path)
    n = 0
    while self._cap.grab():
      checkpoint(self.path)
      n += 1
    return n

  def close(self) -> None:
    self._cap.release()


def resolve_reader(reader: str, path: str) -> str:
  """The concrete reader for `path`: 'auto' is PyAV on SAFE_CONTAINERS, OpenCV elsewhere."""
  if reader not in READERS:
    raise ValueError(f'config.data.reader={reader!r}; expected one of {READERS}')
  if reader == 'auto':
    return 'pyav' if os.path.splitext(path)[1].lower() in SAFE_CONTAINERS else 'opencv'
  return reader


def open_video(path: str, reader: str = 'auto', decode_short_side: int = 0) -> VideoFile:
  """Opens `path` with `reader`, decoding at short side `decode_short_side` if smaller.

  Raises DecodeError for missing, empty or undecodable files.
  """
  # Imported here: augment imports cv2, which readers must not require for decord.
  from videomae_jax.data.augment import decode_size  # pylint: disable=g-import-not-at-top
  name = resolve_reader(reader, path)
  _check_file(path)
  size = stored = None
  if decode_short_side > 0:
    stored = probe_size(path, name)
    size = decode_size(*stored, decode_short_side)
  if name == 'decord':
    return DecordVideo(path, size, stored)
  if name == 'pyav':
    return PyAVVideo(path, size)
  return OpenCVVideo(path, size)


def read_all_frames_exact(path: str) -> np.ndarray:
  """Every frame in presentation order by plain sequential PyAV decoding (ground truth)."""
  av = import_backend('pyav', path)  # pylint: disable=redefined-outer-name
  with av.open(path, metadata_errors='ignore') as c:
    c.streams.video[0].codec_context.thread_count = 1
    return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


def check_frame_accuracy(path: str, reader: str = 'decord', num_probes: int = 6,
                         seed: int = 0, tolerance: float = 4.0,
                         reference: Callable[[str], np.ndarray] | None = None
                         ) -> tuple[bool, str]:
  """Compares `reader` against an exact sequential decode at random frame indices.

  Returns (ok, detail). A mean absolute pixel difference above `tolerance` at
  any probed index means the reader returned a different frame (small
  differences come from colour conversion in different decoders).
  """
  truth = (reference or read_all_frames_exact)(path)
  video = open_video(path, reader)
  try:
    if video.num_frames != len(truth):
      return False, f'{reader} counts {video.num_frames} frames, exact decode {len(truth)}'
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(truth), size=min(num_probes, len(truth)), replace=False))
    frames = video.get_frames(idx)
  finally:
    video.close()
  errs = np.abs(frames.astype(np.int16) - truth[idx].astype(np.int16)).mean(axis=(1, 2, 3))
  bad = [(int(i), round(float(e), 1)) for i, e in zip(idx, errs) if e > tolerance]
  if bad:
    return False, f'{reader} returns wrong frames at (index, mean abs diff) {bad}'
  return True, f'{reader} exact at {idx.tolist()}'
