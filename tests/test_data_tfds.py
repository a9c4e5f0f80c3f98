"""The TFDS source on a tiny dataset built offline from local videos."""
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


class CorruptVideos(LocalVideos):
  """The same videos, except that element 2 holds images that do not decode."""

  def _generate_examples(self, folder):
    for i, (key, ex) in enumerate(super()._generate_examples(folder)):
      if i == 2:
        ex = {'video': [b'not a jpeg'] * len(ex['video']), 'label': ex['label']}
      yield key, ex


@pytest.fixture(scope='module')
def video_folder(tmp_path_factory):
  vdir = str(tmp_path_factory.mktemp('tfds_videos'))
  for i, n in enumerate((70, 40, 100, 5, 66)):
    dv.write_video(os.path.join(vdir, f'v{i}.mp4'), n)
  os.environ[VIDEO_DIR_ENV] = vdir
  return vdir


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory, video_folder):
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  LocalVideos(data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def corrupt_dir(tmp_path_factory, video_folder):
  data_dir = str(tmp_path_factory.mktemp('tfds_corrupt'))
  CorruptVideos(data_dir=data_dir).download_and_prepare()
  return data_dir


def config(data_dir, **kw):
  return dv.data_config(**{'tfds_name': 'local_videos', 'tfds_data_dir': data_dir,
                           'shuffle_buffer': 8, 'seed': 5, **kw})


take = dv.take


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


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_tfds_resume_and_sharding(tfds_dir):
  c = config(tfds_dir)
  full = take(data.build_pretrain_dataset(c, global_batch_size=2), 5)
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=2, start_step=3), 2)
  assert_batches_equal(full[3:], resumed)
  # Each host reads only its own part of the split (4 of the 5 videos: equal
  # parts keep the hosts' epochs aligned) and serves its slice of each batch.
  ref = tfds.builder('local_videos', data_dir=tfds_dir).as_dataset(split='train',
                                                                  shuffle_files=False)
  lengths = [len(ex['video']) for ex in tfds.as_numpy(ref)]
  hosts = [take(data.build_pretrain_dataset(c, global_batch_size=4, process_index=p,
                                            process_count=2), 4) for p in (0, 1)]
  seen = []
  for p, batches in enumerate(hosts):
    assert [b['example'].tolist() for b in batches] == [
        [4 * s + 2 * p, 4 * s + 2 * p + 1] for s in range(4)]
    idx = np.concatenate([b['index'] for b in batches])
    seen.append(set(idx.tolist()))
    for local, (b, j) in enumerate((b, j) for b in batches for j in range(2)):
      g = int(b['example'][j])
      want = sampling.sample_frame_indices(lengths[b['index'][j]], 8, 4,
                                           sampling.example_rng(5, local // 2, g))
      assert dv.decode_indices(b['video'][j]) == want.tolist()
  assert seen == [{0, 1}, {2, 3}]
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=4, process_index=1,
                                             process_count=2, start_step=1), 3)
  assert_batches_equal(hosts[1][1:], resumed)


def test_tfds_undecodable_element_is_replaced_deterministically(corrupt_dir):
  ref = tfds.builder('corrupt_videos', data_dir=corrupt_dir).as_dataset(
      split='train', shuffle_files=False, decoders={'video': tfds.decode.SkipDecoding()})
  rows = [ex['video'][0] for ex in tfds.as_numpy(ref)]
  bad = rows.index(b'not a jpeg')  # Its row in the stored (hashed) order.
  c = config(corrupt_dir, tfds_name='corrupt_videos', max_bad_fraction=0.5)
  ds = data.build_pretrain_dataset(c, global_batch_size=2)
  full = take(ds, 6)
  # No example is dropped: batches stay full and aligned with the global index.
  assert [b['example'].tolist() for b in full] == [[2 * s, 2 * s + 1] for s in range(6)]
  assert all(b['video'].shape == (2, 8, 64, 64, 3) for b in full)
  assert not any(bad in b['index'] for b in full)
  s = ds.stats.summary()
  assert list(s['bad_files']) == [f'corrupt_videos/train[{bad}]'] and s['replacements'] >= 2
  assert all(b['video'].std() > 10 for b in full)  # Real clips, not zeros.
  assert_batches_equal(full, take(data.build_pretrain_dataset(c, global_batch_size=2), 6))
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=2, start_step=3), 3)
  assert_batches_equal(full[3:], resumed)


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  c = config(str(tmp_path), tfds_name='local_videos')
  with pytest.raises(FileNotFoundError, match='tfds_download'):
    data.build_pretrain_dataset(c, global_batch_size=2)
