"""TFDS video datasets (e.g. `ucf101`) as a clip source, decoding only the sampled frames.

TFDS stores videos as sequences of encoded images. The video feature is read
with `SkipDecoding`, so only the `num_frames` sampled images of each clip are
decoded (about 7x cheaper than letting TFDS decode every frame).

Hosts: host p of P reads only its part of the split (`tfds.even_splits` with
equal parts, so up to P - 1 trailing examples are left out and every host's
epoch has the same length), with a few files read in parallel. Its local
example l is element l % N_h of its epoch l // N_h, a seeded shuffle
(`shuffle_buffer`) of its part; l maps to the global example g of the batch
layout, and each clip is a function of (seed, epoch, g). The order depends on
the number of hosts (unlike the file sources, whose order does not). Resuming
reads, but does not decode, the skipped elements of the current epoch.

Bad elements (images that do not decode; TFDS validates images when it builds a
dataset, so this needs damaged data) are replaced, not dropped: element l is
served by the first of elements l, l + 1, ..., l + max_replacements of the same
stream that decodes, with the randomness of (seed, epoch, g, attempt), so
batches stay full, aligned and exactly resumable.
"""
from __future__ import annotations

import cv2
import numpy as np

from videomae_jax.data import clips as clips_lib
from videomae_jax.data import readers
from videomae_jax.data import sampling
from videomae_jax.data.stats import BadDataError, BadDataStats


class EncodedFramesVideo:
  """A VideoFile over a list of encoded images (one TFDS video feature)."""

  def __init__(self, encoded: np.ndarray, name: str):
    self.path = name
    self._encoded = encoded
    self.num_frames = len(encoded)
    self.stored_size = None

  def get_frames(self, indices: np.ndarray) -> np.ndarray:
    frames = []
    cache = {}
    for i in map(int, indices):
      if i not in cache:
        buf = np.frombuffer(self._encoded[i], np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if img is None:
          raise readers.DecodeError(f'{self.path}: frame {i} does not decode')
        cache[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
      frames.append(cache[i])
    out = np.stack(frames)
    self.stored_size = (out.shape[2], out.shape[1])
    return out

  def close(self) -> None:
    pass


def _video_and_label_keys(info) -> tuple[str, str | None]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  video_key = label_key = None
  for k, f in info.features.items():
    if video_key is None and isinstance(f, tfds.features.Video):
      video_key = k
    if label_key is None and isinstance(f, tfds.features.ClassLabel):
      label_key = k
  if video_key is None:
    raise ValueError(f'config.data.tfds_name={info.name!r} has no video feature '
                     f'(features: {list(info.features)})')
  return video_key, label_key


def _host_part(builder, split: str, process_index: int, process_count: int):
  """(split of this host, offset of its first row in `split`, its number of examples)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if process_count == 1:
    return split, 0, builder.info.splits[split].num_examples
  parts = tfds.even_splits(split, n=process_count, drop_remainder=True)
  sizes = [builder.info.splits[part].num_examples for part in parts]
  return parts[process_index], sum(sizes[:process_index]), sizes[process_index]


# Files of the split read at once by each host (TFDS interleaves them in a fixed order).
READ_PARALLELISM = 4


def tfds_clip_dataset(data_config, layout, start_step: int, stats: BadDataStats):
  """The batched tf.data pipeline over `config.data.tfds_name`/`tfds_split`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from videomae_jax.data.pipeline import batched_clip_dataset  # pylint: disable=g-import-not-at-top
  c = data_config
  builder = tfds.builder(c.tfds_name, data_dir=c.get('tfds_data_dir') or None)
  if c.get('tfds_download'):
    dl = tfds.download.DownloadConfig(manual_dir=c.get('tfds_manual_dir') or None)
    builder.download_and_prepare(download_config=dl)
  elif not tf.io.gfile.exists(builder.data_dir) or not builder.info.splits:
    raise FileNotFoundError(
        f'TFDS dataset {c.tfds_name!r} is not prepared under {builder.data_dir!r}; build it '
        f'once with config.data.tfds_download=True (and tfds_manual_dir for manual data), '
        f'or point config.data.tfds_data_dir at an existing copy')
  split = c.get('tfds_split', 'train')
  p, vph, vpb = layout.process_index, layout.videos_per_host, layout.videos_per_batch
  part, offset, num = _host_part(builder, split, p, layout.process_count)
  if num <= 0:
    raise ValueError(f'config.data.tfds_split={split!r} has too few examples for '
                     f'{layout.process_count} hosts')
  stats.num_files = num
  video_key, label_key = _video_and_label_keys(builder.info)
  read_config = tfds.ReadConfig(interleave_cycle_length=READ_PARALLELISM,
                                interleave_block_length=1,
                                num_parallel_calls_for_interleave_files=READ_PARALLELISM,
                                try_autocache=False)
  base = builder.as_dataset(split=part, shuffle_files=False,
                            decoders={video_key: tfds.decode.SkipDecoding()},
                            read_config=read_config)
  # Keep only what is needed; the position in the split identifies the video.
  base = base.enumerate().map(lambda i, ex: (
      ex[video_key], tf.cast(ex[label_key], tf.int64) if label_key
      else tf.constant(-1, tf.int64), i + offset))

  first_local = start_step * vph
  seed = int(c.seed)
  lookahead = max(0, int(c.get('max_replacements', 16)))

  def epoch_ds(epoch):
    ds = base.shuffle(int(c.shuffle_buffer), seed=seed * 1000003 + epoch,
                      reshuffle_each_iteration=False)
    ds = ds.enumerate()
    return ds.map(lambda pos, el: (epoch * num + pos,) + el)

  stream = tf.data.Dataset.range(first_local // num, np.iinfo(np.int64).max // max(num, 1))
  stream = stream.flat_map(epoch_ds).skip(first_local % num)
  # Sliding window: element l with its replacement candidates l + 1 ... l + lookahead.
  # The tensors are shared, not copied; only a needed candidate is ever decoded.
  empty = (tf.constant(-1, tf.int64), tf.zeros([0], tf.string), tf.constant(-1, tf.int64),
           tf.constant(-1, tf.int64))
  stream = stream.scan((empty,) * lookahead,
                       lambda state, el: (state[1:] + (el,), state + (el,))).skip(lookahead)

  s_, t_, size_ = c.num_sample, c.num_frames, c.input_size
  failed = np.zeros((s_, t_, size_, size_, 3), np.uint8)

  def load(local, attempt, encoded, label, index):
    local, attempt, index = int(local), int(attempt), int(index)
    epoch = local // num
    g = (local // vph) * vpb + p * vph + local % vph
    name = f'{c.tfds_name}/{split}[{index}]'
    ok = not stats.is_bad(name)  # A known-bad element fails again: skip its decode.
    clips = failed
    if ok:
      rng = (sampling.example_rng(seed, epoch, g) if attempt == 0 else
             sampling.example_rng(seed, epoch, g, 1000 + attempt))
      try:
        clips = clips_lib.make_clips(EncodedFramesVideo(encoded, name), rng, c)
        stats.record_success(replaced=attempt > 0)
      except readers.DecodeError as e:
        stats.record_failure(name, str(e))
        stats.check(float(c.max_bad_fraction))
        ok = False
    if not ok and attempt == lookahead:
      stats.fatal = (f'example {g}: none of {lookahead + 1} consecutive elements of '
                     f'{c.tfds_name}/{split} decodes (config.data.max_replacements='
                     f'{lookahead}); {len(stats.bad_files)} bad so far')
      raise BadDataError(stats.fatal)
    return (clips, np.full((s_,), label, np.int32), np.full((s_,), index, np.int64),
            np.full((s_,), g, np.int64), np.bool_(ok))

  out_types = (tf.uint8, tf.int32, tf.int64, tf.int64, tf.bool)

  def tf_load(*window):
    local = window[0][0]

    def attempt(k):
      _, encoded, label, index = window[k]
      return tuple(tf.numpy_function(load, [local, k, encoded, label, index], out_types,
                                     stateful=False))

    out = attempt(0)
    for k in range(1, lookahead + 1):  # Decodes candidate k only if all before it failed.
      out = tf.cond(out[-1], lambda o=out: o, lambda k=k: attempt(k))
    return out[:4]

  npc = int(c.get('num_parallel_calls', -1))
  decoded = stream.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE if npc < 0 else npc,
                       deterministic=True)
  shapes = ((s_, t_, size_, size_, 3), (s_,), (s_,), (s_,))
  keys = ('video', 'label', 'index', 'example')
  decoded = decoded.map(lambda *x: {k: tf.ensure_shape(v, sh)
                                    for k, v, sh in zip(keys, x, shapes)})
  return batched_clip_dataset(None, layout, c, start_step, predecoded=decoded)
