"""Decode-once multi-view evaluation: the official test views of every video from one decode.

The official test loader (kinetics.py / ssv2.py, `mode='test'`) opens and decodes a video once
per view (15 times for 5 clips x 3 crops). Here each video is opened once, the union of its
views' frames is decoded with one `get_frames` call and resized once (short side to
`short_side`, OpenCV bilinear as the official `video_transforms.Resize`), and every view is a
slice of that. Views are clip-major: view `c * num_crops + k` is clip c, crop k.

Reads through the same sources and readers as pre-training (video files or a frame store);
only the frame indices and the crops differ.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from videomae_jax.data import augment
from videomae_jax.data import clips as clips_lib
from videomae_jax.data import readers
from videomae_jax.data import sampling
from videomae_jax.data.sources import VideoRecord
from videomae_jax.data.stats import BadDataStats

EVAL_SAMPLINGS = ('dense', 'segment')


def eval_view_count(num_clips: int, num_crops: int) -> int:
  """Views per video: temporal clips x spatial crops."""
  if num_clips < 1 or num_crops < 1:
    raise ValueError(f'num_clips={num_clips}, num_crops={num_crops}: both must be >= 1')
  return int(num_clips) * int(num_crops)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Which views of a video are evaluated: `num_clips` x `num_crops` clips of `num_frames`
  frames, `short_side` pixels square. `frame_sampling` 'dense' (K400, every
  `sampling_rate`-th frame) or 'segment' (SSv2, one frame per segment)."""
  num_clips: int
  num_crops: int
  short_side: int
  frame_sampling: str
  num_frames: int
  sampling_rate: int

  def __post_init__(self):
    eval_view_count(self.num_clips, self.num_crops)
    if self.frame_sampling not in EVAL_SAMPLINGS:
      raise ValueError(f'frame_sampling={self.frame_sampling!r}; expected one of '
                       f'{EVAL_SAMPLINGS}')
    if self.short_side < 1 or self.num_frames < 1 or self.sampling_rate < 1:
      raise ValueError(f'{self}: short_side, num_frames and sampling_rate must be >= 1')

  @property
  def num_views(self) -> int:
    return self.num_clips * self.num_crops


def view_spec(data_config, *, num_clips: int, num_crops: int, short_side: int | None = None,
              frame_sampling: str | None = None) -> ViewSpec:
  """The ViewSpec of `config.data`: its num_frames and sampling_rate; `short_side` defaults
  to input_size and `frame_sampling` to config.data.frame_sampling, where the pre-training
  'pretrain' means 'dense' (both read every sampling_rate-th frame)."""
  mode = frame_sampling or data_config.get('frame_sampling', 'pretrain')
  if mode == 'pretrain':
    mode = 'dense'
  return ViewSpec(int(num_clips), int(num_crops),
                  int(short_side if short_side else data_config.input_size), mode,
                  int(data_config.num_frames), int(data_config.sampling_rate))


def eval_frame_indices(num_video_frames: int, spec: ViewSpec) -> np.ndarray:
  """(num_clips, num_frames) frame indices of the test clips of a video."""
  if spec.frame_sampling == 'dense':
    return sampling.dense_test_indices(num_video_frames, spec.num_frames, spec.sampling_rate,
                                       spec.num_clips)
  return sampling.segment_test_indices(num_video_frames, spec.num_frames, spec.num_clips)


def render_views(video: readers.VideoFile, spec: ViewSpec,
                 num_video_frames: int | None = None) -> np.ndarray:
  """(num_views, T, S, S, 3) uint8: every view of `video` from one `get_frames` call.

  The resized size and crop offsets follow the stored video's size (`stored_size`): frames
  decoded smaller (a frame store) are resized to the size the stored video would give.
  """
  n = num_video_frames or video.num_frames
  if n < 1:
    raise readers.DecodeError(f'{video.path}: no frames')
  idx = eval_frame_indices(n, spec)
  uniq = np.unique(idx)
  frames = video.get_frames(uniq)
  if frames.ndim != 4 or frames.shape[0] != len(uniq) or frames.shape[-1] != 3:
    raise readers.DecodeError(f'{video.path}: decoder returned frames of shape {frames.shape}')
  stored_w, stored_h = video.stored_size or (frames.shape[2], frames.shape[1])
  size = augment.short_side_resize_size(stored_w, stored_h, spec.short_side)
  frames = augment.resize_frames(frames, size)
  offsets = augment.long_side_crop_offsets(size[0], size[1], spec.short_side, spec.num_crops)
  pos = np.searchsorted(uniq, idx)
  s = spec.short_side
  out = augment.aligned_empty((spec.num_views, spec.num_frames, s, s, 3))
  for c in range(spec.num_clips):
    for k, (x, y) in enumerate(offsets):
      out[c * spec.num_crops + k] = frames[pos[c], y:y + s, x:x + s]
  return out


class MultiViewLoader:
  """This host's share of an evaluation set as static-shape batches of all views per video.

  Host p evaluates videos p, p + P, p + 2P, ... (P hosts): together the hosts cover every
  video exactly once. Every host yields the same number of batches, ceil(ceil(N / P) /
  videos_per_batch), so hosts stay in step through collectives; rows past a host's videos
  are padding (valid=False). A video that fails its decode and one retry is recorded in
  `stats` and yielded with valid=False (zeros), up to `config.data.max_bad_fraction` of this
  host's videos, past which iteration raises BadDataError. Later passes skip videos known
  to be bad.

  Each batch: `video` uint8 (V, num_views, T, S, S, 3), `label` int32 (V,), `index` int64
  (V,) (the row of `records`), `valid` bool (V,). Padding rows copy a real video of the
  batch (zeros when there is none) with its label and index.
  """

  def __init__(self, data_config, records: Sequence[VideoRecord], spec: ViewSpec, *,
               process_index: int, process_count: int, videos_per_batch: int,
               opener: Callable[[int], readers.VideoFile] | None = None,
               stats: BadDataStats | None = None, close_fn: Callable[[], None] | None = None):
    if not records:
      raise ValueError('empty evaluation set')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if videos_per_batch < 1:
      raise ValueError(f'videos_per_batch={videos_per_batch} < 1')
    self.config = data_config
    self.records = list(records)
    self.spec = spec
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.videos_per_batch = int(videos_per_batch)
    self.videos = np.arange(self.process_index, len(self.records), self.process_count)
    per_host = math.ceil(len(self.records) / self.process_count)
    self.num_batches = math.ceil(per_host / self.videos_per_batch)
    self.stats = stats or BadDataStats()
    self.stats.num_files = len(self.videos)
    self._runner = clips_lib.TimedDecodes(data_config.get('max_abandoned_decodes', 4),
                                          self.stats)
    self._opener = opener
    self._close_fn = close_fn
    if opener is None:
      clips_lib.import_backends(self.records, data_config.reader)

  def __len__(self) -> int:
    return self.num_batches

  def _open(self, vid: int) -> readers.VideoFile:
    if self._opener is not None:
      return self._opener(vid)
    # Stored resolution, as the official test loader decodes.
    return readers.open_video(self.records[vid].path, self.config.reader)

  def _decode(self, vid: int) -> np.ndarray:
    path = self.records[vid].path
    video = self._open(vid)
    try:
      readers.checkpoint(path)  # Abandoned while opening: close the file now.
      return render_views(video, self.spec)
    except readers.ShortRead as e:
      # The header overstated the frame count: the views of the frames that exist.
      video.close()
      video = self._open(vid)
      return render_views(video, self.spec, num_video_frames=e.num_frames)
    finally:
      video.close()

  def load_video(self, vid: int) -> np.ndarray | None:
    """All views of video `vid` (num_views, T, S, S, 3), or None when it does not decode."""
    path = self.records[vid].path
    if self.stats.is_bad(path):
      return None
    views = clips_lib.decode_with_retry(lambda: self._decode(vid), path, self._runner,
                                        self.stats, self.config)
    if views is not None:
      self.stats.record_success(replaced=False)
    return views

  def _num_workers(self) -> int:
    n = int(self.config.get('num_parallel_calls', -1))
    return max(1, n if n > 0 else (os.cpu_count() or 1))

  def _batch(self, rows: list[tuple[int, np.ndarray | None] | None]) -> dict[str, np.ndarray]:
    spec, v = self.spec, self.videos_per_batch
    s = spec.short_side
    video = np.zeros((v, spec.num_views, spec.num_frames, s, s, 3), np.uint8)
    label = np.zeros((v,), np.int32)
    index = np.zeros((v,), np.int64)
    valid = np.zeros((v,), bool)
    for j, row in enumerate(rows):
      if row is None:
        continue
      vid, views = row
      label[j], index[j] = self.records[vid].label, vid
      if views is not None:
        video[j], valid[j] = views, True
    real = np.flatnonzero(valid)
    for j, row in enumerate(rows):
      if row is None:
        # Padding: a copy of a real video (not counted), so the model sees realistic input.
        if real.size:
          video[j], label[j], index[j] = video[real[0]], label[real[0]], index[real[0]]
        elif self.videos.size:
          label[j], index[j] = self.records[self.videos[0]].label, self.videos[0]
    return {'video': video, 'label': label, 'index': index, 'valid': valid}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    v = self.videos_per_batch
    workers = self._num_workers()
    window = max(workers, v * (int(self.config.get('prefetch', 2)) + 1))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='eval-decode')
    pending = collections.deque()
    todo = iter(self.videos.tolist())

    def top_up():
      while len(pending) < window:
        vid = next(todo, None)
        if vid is None:
          return
        pending.append((vid, pool.submit(self.load_video, vid)))

    try:
      top_up()
      for b in range(self.num_batches):
        rows = []
        for slot in range(b * v, (b + 1) * v):
          if slot < len(self.videos):
            vid, fut = pending.popleft()
            top_up()
            rows.append((vid, fut.result()))  # BadDataError past the cap ends the pass.
          else:
            rows.append(None)
        yield self._batch(rows)
    finally:
      # Running decodes finish in their threads; queued ones are dropped.
      pool.shutdown(wait=False, cancel_futures=True)

  def close(self) -> None:
    """Releases the source (the frame store's shard readers)."""
    if self._close_fn is not None:
      self._close_fn()
      self._close_fn = None

  def __enter__(self) -> 'MultiViewLoader':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def build_eval_dataset(data_config, records: Sequence[VideoRecord] | None = None, *,
                       num_clips: int, num_crops: int, short_side: int | None = None,
                       frame_sampling: str | None = None, process_index: int | None = None,
                       process_count: int | None = None, videos_per_batch: int = 1,
                       opener: Callable[[int], readers.VideoFile] | None = None
                       ) -> MultiViewLoader:
  """The multi-view evaluation loader of this host (see `MultiViewLoader`).

  Args:
    data_config: `config.data` (num_frames, sampling_rate, reader, decode and bad-data
      limits, num_parallel_calls, prefetch).
    records: the evaluation videos, e.g. `sources.load_annotation_list(val_list, root)`.
      None reads the frame store `config.data.frame_store` (records and opener from
      `frame_store.FrameStore`).
    num_clips, num_crops: views per video (official K400 5 x 3, SSv2 2 x 3).
    short_side: side of the square views and of the resized short side (default
      config.data.input_size; official 224).
    frame_sampling: 'dense' or 'segment' (default: config.data.frame_sampling, where
      'pretrain' means 'dense').
    process_index, process_count: this host and the number of hosts; None means
      `jax.process_index()` / `jax.process_count()`.
    videos_per_batch: videos per host-local batch.
    opener: `opener(i)` opens video i of `records`; by default its path with
      config.data.reader, at stored resolution.
  """
  clips_lib.check_sampling_config(data_config)
  spec = view_spec(data_config, num_clips=num_clips, num_crops=num_crops,
                   short_side=short_side, frame_sampling=frame_sampling)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  close_fn = None
  if records is None:
    if not data_config.get('frame_store'):
      raise ValueError('build_eval_dataset: pass records, or set config.data.frame_store')
    from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
    store = frame_store.FrameStore(data_config.frame_store)
    records, opener, close_fn = store.records, store.open, store.close
  return MultiViewLoader(data_config, records, spec, process_index=int(process_index),
                         process_count=int(process_count),
                         videos_per_batch=int(videos_per_batch), opener=opener,
                         close_fn=close_fn)


def build_val_dataset(data_config, records: Sequence[VideoRecord] | None = None, *,
                      short_side: int | None = None, frame_sampling: str | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      videos_per_batch: int = 1,
                      opener: Callable[[int], readers.VideoFile] | None = None
                      ) -> MultiViewLoader:
  """The 1 x 1 fast validation of fine-tuning: the middle clip (dense: the middle window;
  segment: each segment's middle frame), centre crop; batches as `build_eval_dataset`."""
  return build_eval_dataset(data_config, records, num_clips=1, num_crops=1,
                            short_side=short_side, frame_sampling=frame_sampling,
                            process_index=process_index, process_count=process_count,
                            videos_per_batch=videos_per_batch, opener=opener)
