"""Turns one example coordinate (seed, epoch, global example index) into uint8 clips."""
from __future__ import annotations

import math
import queue
import threading
from typing import Callable, Sequence

import numpy as np

from videomae_jax.data import augment
from videomae_jax.data import readers
from videomae_jax.data import sampling
from videomae_jax.data.sources import VideoRecord
from videomae_jax.data.stats import BadDataError, BadDataStats


def auto_decode_short_side(data_config) -> int:
  """`decode_short_side`, with 0 meaning: large enough that no crop is upsampled."""
  if data_config.get('decode_short_side', 0):
    return int(data_config.decode_short_side)
  return int(math.ceil(data_config.input_size / min(data_config.scales)))


def make_clips(video: readers.VideoFile, rng: np.random.Generator, data_config,
               num_frames_override: int | None = None) -> np.ndarray:
  """Samples the frames of one clip of `video` (`config.data.frame_sampling`), decodes them
  once and crops them `num_sample` times (`config.data.crop`).

  Returns (num_sample, T, input_size, input_size, 3) uint8. The frames are shared
  by the `num_sample` clips (repeated sampling); each gets its own crop and flip.
  The generator draws the frame indices, then (crop, flip) per clip, whatever the
  reader: a video that knows its stored size before decoding and can render crops
  itself (`render_clips`, the frame store) decodes only what the crops need.
  """
  c = data_config
  n = num_frames_override or video.num_frames
  if n < max(1, c.get('min_frames', 1)):
    raise readers.DecodeError(f'{video.path}: too short ({n} frames, min_frames={c.min_frames})')
  idx = sampling.train_frame_indices(n, c, rng)
  render = getattr(video, 'render_clips', None)
  if render is not None and video.stored_size:
    crops = [_sample_crop(video.stored_size, c, rng) for _ in range(c.num_sample)]
    return render(idx, crops, c.input_size)
  frames = video.get_frames(idx)
  if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
    raise readers.DecodeError(f'{video.path}: decoder returned frames of shape {frames.shape}')
  stored = video.stored_size or (frames.shape[2], frames.shape[1])
  out = augment.aligned_empty((c.num_sample, len(idx), c.input_size, c.input_size, 3))
  for k in range(c.num_sample):
    box, flip = _sample_crop(stored, c, rng)
    augment.crop_resize(frames, box, stored, c.input_size, flip, out=out[k])
  return out


def _sample_crop(stored_size: tuple[int, int], c, rng: np.random.Generator
                 ) -> tuple[augment.CropBox, bool]:
  """One clip's crop (in stored-video pixels) and flip: multi-scale, or RandomResizedCrop,
  which the fine-tuning step follows with its own flip on the device (none here)."""
  if c.get('crop', 'multiscale') == 'random_resized':
    return augment.random_resized_crop_box(stored_size[0], stored_size[1], tuple(c.rrc_scale),
                                           tuple(c.rrc_ratio), rng), False
  box = augment.sample_crop_box(stored_size[0], stored_size[1], c.input_size, tuple(c.scales),
                                c.get('max_distort', 1), rng)
  return box, bool(c.flip) and bool(rng.integers(2))


def check_sampling_config(data_config) -> None:
  """Raises ValueError for an unknown `frame_sampling` or `crop`, once, before decoding
  (inside a decode a ValueError would count every video as bad)."""
  mode = data_config.get('frame_sampling', 'pretrain')
  if mode not in sampling.FRAME_SAMPLINGS:
    raise ValueError(f'config.data.frame_sampling={mode!r}; expected one of '
                     f'{sampling.FRAME_SAMPLINGS}')
  crop = data_config.get('crop', 'multiscale')
  if crop not in augment.CROPS:
    raise ValueError(f'config.data.crop={crop!r}; expected one of {augment.CROPS}')
  if crop == 'random_resized':
    if data_config.get('flip', False):
      raise ValueError('config.data.flip=True with config.data.crop=random_resized: the '
                       'fine-tuning step flips on the device; set config.data.flip=False')
    for key in ('rrc_scale', 'rrc_ratio'):
      lo, hi = (float(v) for v in data_config[key])
      if not 0 < lo <= hi:
        raise ValueError(f'config.data.{key}={tuple(data_config[key])}; expected 0 < lo <= hi')


class _DecodeWorker:
  """A long-lived daemon thread that runs one decode at a time from its queue.

  Threads are reused because a fresh thread per clip measured ~0.7 ms of CPU, about 12% of
  a frame-store clip (bench/README.md, "Input pipeline"). The thread is named
  `video-decode` while it runs a decode and `video-decode-idle` while it waits.
  """

  def __init__(self):
    self.tasks: queue.SimpleQueue = queue.SimpleQueue()
    self.thread = threading.Thread(target=self._loop, daemon=True, name='video-decode-idle')
    self.thread.start()

  def _loop(self) -> None:
    while True:
      task = self.tasks.get()
      if task is None:
        return
      self.thread.name = 'video-decode'
      task()


class TimedDecodes:
  """Runs decodes with a timeout, stops abandoned ones and caps how many still run.

  A decode runs on a worker thread (reused from decode to decode). After `timeout_s` the
  caller gives up and sets the decode's cancel event: the readers check it before every
  frame (`readers.checkpoint`), so the abandoned decode stops at its next frame and closes
  its file, and its worker becomes free again. A decode stuck inside one native call (a
  stalled read) cannot be stopped from Python; at most `max_abandoned` such decodes may be
  running at once. A new decode waits up to `timeout_s` for one of them to end, then raises
  BadDataError: storage that keeps stalling must not pile up threads and files.
  """

  MAX_IDLE_WORKERS = 64

  def __init__(self, max_abandoned: int, stats: BadDataStats):
    self.max_abandoned = max(1, int(max_abandoned))
    self.stats = stats
    self._cond = threading.Condition()
    self._abandoned = 0
    self._idle: list[_DecodeWorker] = []

  @property
  def abandoned(self) -> int:
    """Abandoned decodes that are still running."""
    return self._abandoned

  def _set_abandoned(self, n: int) -> None:
    self._abandoned = n
    self.stats.abandoned_running = n
    self._cond.notify_all()

  def _release(self, worker: _DecodeWorker) -> None:
    """Called with the lock held by a worker whose decode ended."""
    worker.thread.name = 'video-decode-idle'
    if len(self._idle) < self.MAX_IDLE_WORKERS:
      self._idle.append(worker)
    else:
      worker.tasks.put(None)

  def run(self, fn: Callable[[], np.ndarray], timeout_s: float, path: str) -> np.ndarray:
    if not timeout_s or timeout_s <= 0:
      return fn()
    with self._cond:
      if not self._cond.wait_for(lambda: self._abandoned < self.max_abandoned, timeout_s):
        msg = (f'{path}: {self._abandoned} decodes abandoned after config.data.'
               f'decode_timeout_s={timeout_s} are still running (config.data.'
               f'max_abandoned_decodes={self.max_abandoned}); the storage or decoder keeps '
               f'stalling')
        self.stats.fatal = msg
        raise BadDataError(msg)
      worker = self._idle.pop() if self._idle else None
    if worker is None:
      worker = _DecodeWorker()
    cancel = threading.Event()
    done = threading.Event()
    state = {'done': False, 'abandoned': False, 'result': None}

    def task():
      readers.cancel_current_thread_on(cancel)
      try:
        outcome = (True, fn())
      except BaseException as e:  # pylint: disable=broad-except
        outcome = (False, e)
      readers.cancel_current_thread_on(None)
      with self._cond:
        state['done'] = True
        if state['abandoned']:
          self._set_abandoned(self._abandoned - 1)
        else:
          state['result'] = outcome
        self._release(worker)
      # Nobody reads an abandoned result: drop it here (its traceback holds
      # decoder objects) rather than leave it to the garbage collector.
      del outcome
      done.set()

    worker.tasks.put(task)
    done.wait(timeout_s)
    with self._cond:
      if not state['done']:
        state['abandoned'] = True
        cancel.set()
        self._set_abandoned(self._abandoned + 1)
        raise TimeoutError(f'decode did not finish within {timeout_s} s')
    ok, value = state['result']
    state['result'] = None
    if not ok:
      raise value
    return value


# Failed decodes of one file are retried this many times before the file counts
# as bad: a transient stall (NFS, a busy disk) must not blacklist a good file.
DECODE_RETRIES = 1

DECODE_ERRORS = (readers.DecodeError, RuntimeError, ValueError, OSError, MemoryError)


def decode_with_retry(fn: Callable[[], np.ndarray], path: str, runner: TimedDecodes,
                      stats: BadDataStats, data_config) -> np.ndarray | None:
  """`fn()` under `decode_timeout_s`, tried 1 + DECODE_RETRIES times; None once every try
  failed (the file is then recorded as bad, and BadDataError raised past
  `max_bad_fraction`)."""
  timeout_s = float(data_config.get('decode_timeout_s', 0))
  for trial in range(DECODE_RETRIES + 1):
    timed_out = False
    try:
      return runner.run(fn, timeout_s, path)
    except readers.BackendUnavailable as e:
      stats.fatal = str(e)  # Not the file's fault: stop, do not skip every video.
      raise
    except BadDataError:
      raise
    except TimeoutError as e:
      reason, timed_out = str(e), True
    except DECODE_ERRORS as e:
      reason = f'{type(e).__name__}: {e}'
    if timed_out:
      stats.record_timeout()
    if trial < DECODE_RETRIES:
      stats.record_retry(path, reason)
  stats.record_failure(path, reason)
  stats.check(float(data_config.max_bad_fraction))
  return None


def import_backends(records: Sequence[VideoRecord], reader: str) -> None:
  """Imports the decoder module every record needs: a missing one fails here, once,
  instead of as a bad file per video."""
  first = {}
  for rec in records:
    first.setdefault(readers.resolve_reader(reader, rec.path), rec.path)
  for name, path in first.items():
    readers.import_backend(name, path)


class ClipDecoder:
  """Decodes examples of a file source with deterministic replacement of bad videos.

  Example `g` of the infinite stream belongs to epoch `g // N` and shows video
  `perm(seed, epoch)[g % N]`; its window, crops and flips come from
  `example_rng(seed, epoch, g)`. A video that fails is recorded in `stats` and
  the example is served by video `example_rng(seed, epoch, g, attempt)` instead,
  so the result depends only on (seed, epoch, g) and on which files are bad.
  """

  def __init__(self, records: Sequence[VideoRecord], data_config,
               stats: BadDataStats | None = None,
               opener: Callable[[int], readers.VideoFile] | None = None):
    """`opener(i)` opens video i of `records` (the frame store); by default `records[i].path`
    is a video file opened with `config.data.reader`."""
    if not records:
      raise ValueError('empty video source')
    check_sampling_config(data_config)
    self.records = list(records)
    self.config = data_config
    self.stats = stats or BadDataStats()
    self.stats.num_files = len(self.records)
    self._short_side = auto_decode_short_side(data_config)
    self._runner = TimedDecodes(data_config.get('max_abandoned_decodes', 4), self.stats)
    self._opener = opener
    if opener is None:
      import_backends(self.records, data_config.reader)

  def _open(self, vid: int) -> readers.VideoFile:
    if self._opener is not None:
      return self._opener(vid)
    return readers.open_video(self.records[vid].path, self.config.reader, self._short_side)

  def _decode(self, vid: int, rng_factory: Callable[[], np.random.Generator]) -> np.ndarray:
    c = self.config
    path = self.records[vid].path
    video = self._open(vid)
    try:
      readers.checkpoint(path)  # Abandoned while opening: close the file now.
      return make_clips(video, rng_factory(), c)
    except readers.ShortRead as e:
      # The header overstated the frame count: sample again (same randomness)
      # over the frames that really exist.
      video.close()
      video = self._open(vid)
      return make_clips(video, rng_factory(), c, num_frames_override=e.num_frames)
    finally:
      video.close()

  def _decode_with_retry(self, vid: int, rng_factory) -> np.ndarray | None:
    """The clips of video `vid`, or None once it failed 1 + DECODE_RETRIES times (then bad)."""
    return decode_with_retry(lambda: self._decode(vid, rng_factory), self.records[vid].path,
                             self._runner, self.stats, self.config)

  def load_example(self, example: int) -> dict[str, np.ndarray]:
    """Clips of global example `example`: video (S, T, H, W, 3) uint8, label, index, example."""
    c = self.config
    n = len(self.records)
    epoch, pos = divmod(int(example), n)
    for attempt in range(int(c.get('max_replacements', 16)) + 1):
      if attempt == 0:
        vid = int(sampling.epoch_permutation(int(c.seed), epoch, n)[pos])
      else:
        vid = int(sampling.example_rng(c.seed, epoch, example, attempt).integers(n))
      rec = self.records[vid]
      if self.stats.is_bad(rec.path):
        continue
      # Attempt-specific stream, separate from the replacement draw above; a
      # retry uses the same stream, so its clips equal an undisturbed decode.
      rng_factory = lambda a=attempt: sampling.example_rng(c.seed, epoch, example, 1000 + a)
      clips = self._decode_with_retry(vid, rng_factory)
      if clips is None:
        continue
      self.stats.record_success(replaced=attempt > 0)
      s = clips.shape[0]
      return {
          'video': clips,
          'label': np.full((s,), rec.label, np.int32),
          'index': np.full((s,), vid, np.int64),
          'example': np.full((s,), example, np.int64),
      }
    raise BadDataError(
        f'example {example}: no decodable video after {c.get("max_replacements", 16)} '
        f'replacements; {len(self.stats.bad_files)} of {n} files are bad so far')
