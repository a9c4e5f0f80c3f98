"""tf.data wiring: per-host sharding, parallel decode, batching, resume by step."""
from __future__ import annotations

import atexit
import dataclasses
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import numpy as np

from videomae_jax.data.clips import ClipDecoder, check_sampling_config
from videomae_jax.data.sources import file_source_from_config
from videomae_jax.data.stats import BadDataError, BadDataStats


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch of clips maps to videos and hosts.

  A global batch of `global_batch_size` clips holds `videos_per_batch` =
  global_batch_size / num_sample decoded videos (examples). Host p holds the
  contiguous block of examples [p * videos_per_host, (p + 1) * videos_per_host)
  of each global batch, so concatenating the hosts' batches in process order
  gives the global batch.
  """
  global_batch_size: int
  num_sample: int
  process_index: int
  process_count: int

  def __post_init__(self):
    if self.global_batch_size % self.num_sample:
      raise ValueError(f'global_batch_size={self.global_batch_size} (clips) is not divisible by '
                       f'config.data.num_sample={self.num_sample}')
    if self.videos_per_batch % self.process_count:
      raise ValueError(
          f'global_batch_size={self.global_batch_size} gives {self.videos_per_batch} videos per '
          f'batch (num_sample={self.num_sample}), not divisible by process_count='
          f'{self.process_count}')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} not in [0, {self.process_count})')

  @property
  def videos_per_batch(self) -> int:
    return self.global_batch_size // self.num_sample

  @property
  def videos_per_host(self) -> int:
    return self.videos_per_batch // self.process_count

  @property
  def local_batch_size(self) -> int:
    return self.videos_per_host * self.num_sample

  def global_example(self, local_i: int) -> int:
    """Global example index of this host's `local_i`-th example."""
    step, j = divmod(local_i, self.videos_per_host)
    return step * self.videos_per_batch + self.process_index * self.videos_per_host + j


_live_iterators: 'weakref.WeakSet[PretrainDataset]' = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
  # A process that exits while a tf.data iterator still has numpy_function calls
  # in flight can hang forever; release every iterator before interpreter exit.
  for ds in list(_live_iterators):
    ds.close()


class LoadGate:
  """Lets a tf.data iterator over `numpy_function` calls be released without a deadlock.

  Releasing the iterator from Python holds the GIL while TensorFlow waits for the calls in
  flight, and those need the GIL to return: a release during a refill can hang for good (seen
  after a failed decode ended the stream). `drain()` first makes every new call return at
  once (with placeholder arrays nobody reads) and waits, with the GIL free, until no call
  has been running for `quiet_s`.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._closing = False
    self._active = 0
    self._last = time.monotonic()

  def enter(self) -> bool:
    """Called at the start of a load; False once the iterator is being released."""
    with self._lock:
      self._last = time.monotonic()
      if self._closing:
        return False
      self._active += 1
      return True

  def exit(self) -> None:
    with self._lock:
      self._active -= 1
      self._last = time.monotonic()

  def drain(self, max_s: float, quiet_s: float = 0.1) -> bool:
    """Stops new loads and waits up to `max_s` for the running ones; True when quiet."""
    with self._lock:
      self._closing = True
    deadline = time.monotonic() + max_s
    while True:
      with self._lock:
        if self._active == 0 and time.monotonic() - self._last >= quiet_s:
          return True
      if time.monotonic() > deadline:
        return False
      time.sleep(0.01)


class PretrainDataset:
  """An endless iterable of host-local numpy batches.

  Each batch: `video` uint8 (B_local, T, H, W, 3), `label` int32 (B_local,),
  `index` int64 (row of the source, after replacement), `example` int64 (global
  example index; the `num_sample` clips of one video share it). `stats` holds
  the decode failures; call `close()` (or use as a context manager) when done.
  """

  def __init__(self, make_tf_dataset: Callable[[LoadGate], Any], layout: BatchLayout,
               stats: BadDataStats, start_step: int, drain_s: float = 30.0):
    """`make_tf_dataset(gate)` builds the tf.data pipeline of one iterator, its loads guarded
    by `gate`; `drain_s` bounds the wait for running loads when an iterator is released."""
    self.make_tf_dataset = make_tf_dataset
    self.drain_s = drain_s
    self.layout = layout
    self.stats = stats
    self.start_step = start_step
    self._generators = weakref.WeakSet()
    _live_iterators.add(self)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    gen = self._generate()
    self._generators.add(gen)
    return gen

  def _generate(self) -> Iterator[dict[str, np.ndarray]]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    gate = LoadGate()  # One per iterator: releasing one must not starve another.
    it = iter(self.make_tf_dataset(gate))
    try:
      while True:
        try:
          batch = next(it)
        except tf.errors.OpError as e:
          if self.stats.fatal:
            raise BadDataError(self.stats.fatal) from None
          raise RuntimeError(f'input pipeline failed: {e.message}') from None
        yield {k: v._numpy() for k, v in batch.items()}  # pylint: disable=protected-access
    finally:
      gate.drain(self.drain_s)
      del it  # Releases the tf.data iterator; no load is running now.

  def close(self) -> None:
    """Stops every iterator of this dataset and releases its tf.data resources."""
    for gen in list(self._generators):
      try:
        gen.close()
      except ValueError:  # Running in another thread right now; it ends with that thread.
        pass

  def __enter__(self) -> 'PretrainDataset':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # `ClipDecoder.load_example` for file sources (set by build_pretrain_dataset); None for TFDS.
  load_example: Callable[[int], dict[str, np.ndarray]] | None = None

  def example(self, global_index: int, epoch: int = 0) -> np.ndarray:
    """The first clip of example `global_index` of `epoch` (uint8 (T, H, W, 3)), decoded now:
    a pure function of (seed, epoch, global_index), the clip the stream serves there,
    whichever host asks and wherever the stream started. Not for TFDS sources."""
    if self.load_example is None:
      raise NotImplementedError('example() needs a file source (train_list or video_dir)')
    n = self.stats.num_files
    if not 0 <= global_index < n:
      raise IndexError(f'global_index={global_index} not in [0, {n})')
    return self.load_example(epoch * n + global_index)['video'][0]


def _tf_options(data_config):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  opts = tf.data.Options()
  opts.deterministic = True
  # Every decode is one thread; TF ops of the map (reshapes) must not start a second pool
  # of per-core threads on top of the decode threads.
  opts.threading.max_intra_op_parallelism = 1
  if data_config.get('num_threads', 0):
    opts.threading.private_threadpool_size = int(data_config.num_threads)
  return opts


def batched_clip_dataset(load_fn: Callable[[int], dict[str, np.ndarray]] | None,
                         layout: BatchLayout, data_config, start_step: int, predecoded=None,
                         gate: LoadGate | None = None):
  """A tf.data pipeline calling `load_fn(global_example)` in parallel, batched per host.

  Examples are this host's share of the endless stream from `start_step` on.
  Alternatively `predecoded` is a dataset of per-example dicts (video
  (S, T, H, W, 3), label, index, example) that only needs batching. The map is
  deterministic, so batch contents do not depend on thread timing.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  c = data_config
  s, t, size = c.num_sample, c.num_frames, c.input_size
  keys = ('video', 'label', 'index', 'example')
  dtypes = (tf.uint8, tf.int32, tf.int64, tf.int64)
  shapes = ((s, t, size, size, 3), (s,), (s,), (s,))

  placeholder = []

  def load(g):
    if gate is not None and not gate.enter():
      if not placeholder:
        placeholder.extend(np.zeros(sh, d.as_numpy_dtype) for sh, d in zip(shapes, dtypes))
      return tuple(placeholder)
    try:
      out = load_fn(int(g))
    finally:
      if gate is not None:
        gate.exit()
    return tuple(out[k] for k in keys)

  def tf_load(g):
    vals = tf.numpy_function(load, [g], dtypes, stateful=False)
    return {k: tf.ensure_shape(v, sh) for k, v, sh in zip(keys, vals, shapes)}

  if predecoded is None:
    vph = layout.videos_per_host
    examples = tf.data.Dataset.range(start_step * vph, np.iinfo(np.int64).max).map(
        lambda i: (i // vph) * layout.videos_per_batch + layout.process_index * vph + i % vph)
    npc = int(c.get('num_parallel_calls', -1))
    ds = examples.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE if npc < 0 else npc,
                      deterministic=True)
  else:
    ds = predecoded
  ds = ds.batch(layout.videos_per_host, drop_remainder=True)
  b = layout.local_batch_size
  ds = ds.map(lambda d: {k: tf.reshape(v, (b,) + tuple(v.shape[2:])) for k, v in d.items()})
  ds = ds.prefetch(int(c.get('prefetch', 2)))
  return ds.with_options(_tf_options(c))


def build_pretrain_dataset(data_config, *, global_batch_size: int,
                           process_index: int | None = None, process_count: int | None = None,
                           start_step: int = 0) -> PretrainDataset:
  """The pre-training input pipeline for this host.

  Args:
    data_config: `config.data` (see `default_data_config()`).
    global_batch_size: clips per global batch over all hosts. With
      `num_sample` > 1 each decoded video yields `num_sample` clips, so a batch
      holds global_batch_size / num_sample videos.
    process_index: this host; None (default) means `jax.process_index()`.
    process_count: number of hosts; None (default) means `jax.process_count()`.
    start_step: first step to produce; batches equal those an uninterrupted run
      produces at that step, and skipped steps are not decoded.

  Returns:
    An endless iterable of host-local batches of global_batch_size /
    process_count clips (see `PretrainDataset`).
  """
  if process_index is None or process_count is None:
    # Resolved at call time: a multi-host caller that omits them must not train
    # every host on host 0's slice.
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  layout = BatchLayout(global_batch_size, int(data_config.num_sample), int(process_index),
                       int(process_count))
  if start_step < 0:
    raise ValueError(f'start_step={start_step} < 0')
  check_sampling_config(data_config)
  stats = BadDataStats()
  if data_config.get('tfds_name'):
    from videomae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    ds = tfds_source.tfds_clip_dataset(data_config, layout, start_step, stats)
    make = lambda gate: ds
  else:
    if data_config.get('frame_store'):
      from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
      store = frame_store.FrameStore(data_config.frame_store)
      decoder = ClipDecoder(store.records, data_config, stats, opener=store.open)
    else:
      decoder = ClipDecoder(file_source_from_config(data_config), data_config, stats)
    make = lambda gate: batched_clip_dataset(decoder.load_example, layout, data_config,
                                             start_step, gate=gate)
  # A running load ends within one decode timeout (then it is abandoned) plus its replacement.
  timeout = float(data_config.get('decode_timeout_s', 0))
  dataset = PretrainDataset(make, layout, stats, start_step,
                            drain_s=2 * timeout + 10 if timeout > 0 else 30.0)
  if not data_config.get('tfds_name'):
    dataset.load_example = decoder.load_example
  return dataset


# `config.data` fields that do not change which clips come out in which order: where the files
# live (a moved dataset resumes), how fast they are decoded, and when to give up. Every other
# field, including any added later, defines the stream and is compared on resume.
NON_STREAM_FIELDS = frozenset({
    'train_list', 'val_list', 'root', 'video_dir', 'frame_store', 'tfds_data_dir',
    'tfds_manual_dir', 'tfds_download',
    'decode_timeout_s', 'max_abandoned_decodes', 'max_bad_fraction', 'max_replacements',
    'num_parallel_calls',
    'num_threads', 'prefetch'})


def source_fingerprint(data_config) -> str | None:
  """sha256 of a file source's videos in order: paths relative to their common folder, and
  labels (for a frame store: source names, labels and frame counts). The same videos under
  another root give the same fingerprint. None for TFDS."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if data_config.get('tfds_name') or data_config.get('synthetic'):
    return None
  if data_config.get('frame_store'):
    from videomae_jax.data import frame_store  # pylint: disable=g-import-not-at-top
    return frame_store.FrameStore(data_config.frame_store).fingerprint()
  if not (data_config.get('train_list') or data_config.get('video_dir')):
    return None
  records = file_source_from_config(data_config)
  paths = [r.path for r in records]
  try:
    base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    rel = [os.path.relpath(p, base) if base else p for p in paths]
  except ValueError:  # absolute and relative paths mixed
    rel = paths
  h = hashlib.sha256()
  for p, r in zip(rel, records):
    h.update(f'{p}\t{r.label}\n'.encode())
  return h.hexdigest()


def describe(data_config) -> dict[str, Any]:
  """What defines the stream of clips, compared with the checkpoint's on resume: every field
  but `NON_STREAM_FIELDS`, and for file sources `source_fingerprint` (the videos, not where
  they are)."""
  import json  # pylint: disable=g-import-not-at-top
  d = {k: v for k, v in sorted(data_config.items()) if k not in NON_STREAM_FIELDS}
  fingerprint = source_fingerprint(data_config)
  if fingerprint is not None:
    d['source_fingerprint'] = fingerprint
  return json.loads(json.dumps(d, default=str))
