"""The TFDS source on a tiny dataset built offline from local videos."""
import itertools
import os

import numpy as np
import pytest

import data_videos as dv
from videomae_jax import data
from videomae_jax.data import readers, sampling

tfds = pytest.importorskip('tensorflow_datasets')

VIDEO_DIR_ENV = 'VIDEOMAE_TEST_TFDS_VIDEOS'


class LocalVideos(tfds.core.GeneratorBasedBuilder):
  """Index-coded videos from a local folder (the layout of a user's own builder)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(shape=(None, 96, 128, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(os.environ[VIDEO_DIR_ENV])}

  def _generate_examples(self, folder):
    for i, name in enumerate(sorted(os.listdir(folder))):
      frames = readers.read_all_frames_exact(os.path.join(folder, name))
      yield name, {'video': frames, 'label': i % 3}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  vdir = str(tmp_path_factory.mktemp('tfds_videos'))
  for i, n in enumerate((70, 40, 100, 5, 66)):
    dv.write_video(os.path.join(vdir, f'v{i}.mp4'), n)
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  os.environ[VIDEO_DIR_ENV] = vdir
  LocalVideos(data_dir=data_dir).download_and_prepare()
  return data_dir


def config(data_dir, **kw):
  c = data.default_data_config()
  c.update(tfds_name='local_videos', tfds_data_dir=data_dir, input_size=64, num_frames=8,
           shuffle_buffer=8, num_parallel_calls=2, prefetch=1, seed=5)
  c.update(kw)
  return c


def take(ds, n):
  with ds:
    return list(itertools.islice(iter(ds), n))


def test_tfds_clips_exact_frames(tfds_dir):
  c = config(tfds_dir, num_sample=2)
  # Frame count and label of each element, in the split's stored order.
  ref = tfds.builder('local_videos', data_dir=tfds_dir).as_dataset(split='train',
                                                                  shuffle_files=False)
  truth = [(len(ex['video']), int(ex['label'])) for ex in tfds.as_numpy(ref)]
  assert sorted(n for n, _ in truth) == [5, 40, 66, 70, 100]
  batches = take(data.build_pretrain_dataset(c, global_batch_size=4), 4)
  for b in batches:
    assert b['video'].shape == (4, 8, 64, 64, 3) and b['video'].dtype == np.uint8
    for clip, idx, g, label in zip(b['video'], b['index'], b['example'], b['label']):
      rng = sampling.example_rng(5, g // 5, g)
      want = sampling.sample_frame_indices(truth[idx][0], 8, 4, rng)
      assert dv.decode_indices(clip) == want.tolist()
      assert label == truth[idx][1]
  ex = np.concatenate([b['example'][0::2] for b in batches]).tolist()
  assert ex == list(range(8))
  # One epoch is a permutation of the split.
  epoch0 = np.concatenate([b['index'][0::2] for b in batches])[:5]
  assert sorted(epoch0.tolist()) == [0, 1, 2, 3, 4]


def test_tfds_resume_and_sharding(tfds_dir):
  c = config(tfds_dir)
  full = take(data.build_pretrain_dataset(c, global_batch_size=2), 5)
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=2, start_step=3), 2)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  hosts = [take(data.build_pretrain_dataset(c, global_batch_size=2, process_index=p,
                                            process_count=2), 3) for p in (0, 1)]
  for step in range(3):
    for k in full[step]:
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][k], hosts[1][step][k]]), full[step][k])


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  c = config(str(tmp_path), tfds_name='local_videos')
  with pytest.raises(FileNotFoundError, match='tfds_download'):
    data.build_pretrain_dataset(c, global_batch_size=2)
