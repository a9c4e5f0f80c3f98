"""TFDS video datasets (e.g. `ucf101`) as a clip source, decoding only the sampled frames.

TFDS stores videos as sequences of encoded images. The video feature is read
with `SkipDecoding`, so only the `num_frames` sampled images of each clip are
decoded (about 7x cheaper than letting TFDS decode every frame).

Order: each epoch is a seeded shuffle (`shuffle_buffer`) of the split; example
`g` is element `g % N` of epoch `g // N`. Resuming reads (but does not decode)
the skipped elements of the current epoch. Elements whose images do not decode
are dropped and counted; TFDS validates images when the dataset is built, so
this does not happen with intact data, and resume is exact only when it does not.
"""
from __future__ import annotations

import cv2
import numpy as np

from videomae_jax.data import clips as clips_lib
from videomae_jax.data import readers
from videomae_jax.data import sampling
from videomae_jax.data.stats import BadDataStats


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
  num = builder.info.splits[split].num_examples
  stats.num_files = num
  video_key, label_key = _video_and_label_keys(builder.info)
  base = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={video_key: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
  # Keep only what is needed; the split position identifies the video.
  base = base.enumerate().map(lambda i, ex: (
      ex[video_key], ex[label_key] if label_key else tf.constant(-1, tf.int64), i))

  vph, vpb, p = layout.videos_per_host, layout.videos_per_batch, layout.process_index
  first_global = start_step * vpb
  seed = int(c.seed)

  def epoch_ds(epoch):
    ds = base.shuffle(int(c.shuffle_buffer), seed=seed * 1000003 + epoch,
                      reshuffle_each_iteration=False)
    ds = ds.enumerate()
    return ds.map(lambda pos, el: (epoch * num + pos, el))

  stream = tf.data.Dataset.range(first_global // num, np.iinfo(np.int64).max // max(num, 1))
  stream = stream.flat_map(epoch_ds).skip(first_global % num)
  # Every host reads the whole stream (cheap: encoded bytes) and decodes its share.
  stream = stream.filter(lambda g, el: (g % vpb) // vph == p)

  def load(g, encoded, label, index):
    g = int(g)
    epoch = g // num
    video = EncodedFramesVideo(encoded, f'{c.tfds_name}/{split}[{int(index)}]')
    rng = sampling.example_rng(seed, epoch, g)
    try:
      clips = clips_lib.make_clips(video, rng, c)
      stats.record_success(replaced=False)
      ok = True
    except readers.DecodeError as e:
      stats.record_failure(video.path, str(e))
      stats.check(float(c.max_bad_fraction))
      clips = np.zeros((c.num_sample, c.num_frames, c.input_size, c.input_size, 3), np.uint8)
      ok = False
    s = c.num_sample
    return (clips, np.full((s,), label, np.int32), np.full((s,), index, np.int64),
            np.full((s,), g, np.int64), np.bool_(ok))

  def tf_load(g, el):
    encoded, label, index = el
    out = tf.numpy_function(load, [g, encoded, label, index],
                            (tf.uint8, tf.int32, tf.int64, tf.int64, tf.bool), stateful=False)
    return out

  # Decode in parallel, drop failures, then batch with the shared helper.
  npc = int(c.get('num_parallel_calls', -1))
  decoded = stream.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE if npc < 0 else npc,
                       deterministic=True).filter(lambda *x: x[-1])
  shapes = ((c.num_sample, c.num_frames, c.input_size, c.input_size, 3),
            (c.num_sample,), (c.num_sample,), (c.num_sample,))
  keys = ('video', 'label', 'index', 'example')
  decoded = decoded.map(lambda *x: {k: tf.ensure_shape(v, sh)
                                    for k, v, sh in zip(keys, x[:4], shapes)})
  return batched_clip_dataset(None, layout, c, start_step, predecoded=decoded)
