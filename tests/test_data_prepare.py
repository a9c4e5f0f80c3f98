"""`python -m launch.prepare_videos` on real and generated videos, including bad ones."""
import os
import subprocess
import sys

import numpy as np
import pytest

import data_videos as dv
from videomae_jax.data import readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_folder_resizes_converts_and_reports(tmp_path):
  src = tmp_path / 'src'
  (src / 'cls_a').mkdir(parents=True)
  (src / 'cls_b').mkdir()
  dv.write_video(str(src / 'cls_a' / 'v.webm'), 30, codec='libvpx-vp9', w=160, h=120)
  dv.write_video(str(src / 'cls_b' / 'b.avi'), 40, codec='mpeg4', motion=True, b_frames=2)
  dv.garbage(str(src / 'cls_b' / 'corrupt.mp4'))
  open(src / 'cls_b' / 'empty.mp4', 'wb').close()
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, '-m', 'launch.prepare_videos', '--src_dir', str(src),
                      '--out_dir', str(out), '--short_side', '64', '--workers', '2',
                      '--check_frames'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  lines = (out / 'train_list.txt').read_text().split('\n')
  assert sorted(l for l in lines if l) == ['cls_a/v.webm.mp4 0', 'cls_b/b.avi.mp4 1']
  bad = dict(l.split('\t') for l in (out / 'bad_files.txt').read_text().splitlines())
  assert set(map(os.path.basename, bad)) == {'corrupt.mp4', 'empty.mp4'}
  # webm -> mp4 at short side 64 (aspect kept), every frame kept and in order.
  v = readers.open_video(str(out / 'cls_a' / 'v.webm.mp4'), 'decord')
  assert v.num_frames == 30
  frames = v.get_frames(np.arange(30))
  assert frames.shape == (30, 64, 86, 3)  # 160x120 -> 85.3 -> even 86
  assert dv.decode_indices(frames) == list(range(30))
  # The B-frame AVI became an mp4 on which decord is exact.
  src_truth = readers.read_all_frames_exact(str(src / 'cls_b' / 'b.avi'))
  out_truth = readers.read_all_frames_exact(str(out / 'cls_b' / 'b.avi.mp4'))
  assert len(out_truth) == len(src_truth) == 40
  ok, detail = readers.check_frame_accuracy(str(out / 'cls_b' / 'b.avi.mp4'), 'decord', 8)
  assert ok, detail


def test_prepare_list_input_and_errors(tmp_path):
  dv.write_video(str(tmp_path / 'a.mp4'), 12, w=128, h=96)
  (tmp_path / 'list.txt').write_text('a.mp4 5\nmissing.mp4 2\n')
  out = tmp_path / 'out'
  from launch import prepare_videos
  assert prepare_videos.main(['--src_list', str(tmp_path / 'list.txt'), '--root', str(tmp_path),
                              '--out_dir', str(out), '--short_side', '0', '--workers', '1']) == 0
  assert (out / 'train_list.txt').read_text() == 'a.mp4 5\n'
  assert 'does not exist' in (out / 'bad_files.txt').read_text()
  assert prepare_videos.main(['--src_list', str(tmp_path / 'nope.txt'),
                              '--out_dir', str(out)]) == 2
  assert prepare_videos.output_size(1280, 720, 320) == (568, 320)
  assert prepare_videos.output_size(320, 240, 320) == (320, 240)


def test_outputs_keep_extension_and_folders(tmp_path):
  from launch import prepare_videos
  src = tmp_path / 'src'
  lengths = {'a.avi': 10, 'a.mp4': 14, 'x/a.mp4': 16, 'y/a.mp4': 18}
  for rel, n in lengths.items():
    os.makedirs(os.path.dirname(src / rel), exist_ok=True)
    dv.write_video(str(src / rel), n, codec='mpeg4' if rel.endswith('.avi') else 'libx264',
                   w=64, h=48)
  out = tmp_path / 'out'
  assert prepare_videos.main(['--src_dir', str(src), '--out_dir', str(out), '--short_side', '0',
                              '--workers', '2']) == 0
  lines = sorted((out / 'train_list.txt').read_text().splitlines())
  assert lines == ['a.avi.mp4 -1', 'a.mp4 -1', 'x/a.mp4 0', 'y/a.mp4 1']
  names = {'a.avi': 'a.avi.mp4', 'a.mp4': 'a.mp4', 'x/a.mp4': 'x/a.mp4', 'y/a.mp4': 'y/a.mp4'}
  for rel, n in lengths.items():
    assert prepare_videos.verify(str(out / names[rel])) == n, rel
  # A list without --root: paths are mirrored below their common folder, not flattened.
  (tmp_path / 'list.txt').write_text(f'{src}/x/a.mp4 3\n{src}/y/a.mp4 4\n')
  out2 = tmp_path / 'out2'
  assert prepare_videos.main(['--src_list', str(tmp_path / 'list.txt'), '--out_dir', str(out2),
                              '--short_side', '0', '--workers', '2']) == 0
  assert sorted((out2 / 'train_list.txt').read_text().splitlines()) == ['x/a.mp4 3', 'y/a.mp4 4']
  assert prepare_videos.verify(str(out2 / 'y' / 'a.mp4')) == 18


def test_output_collision_is_detected_before_starting(tmp_path):
  from launch import prepare_videos
  from videomae_jax.data import VideoRecord
  recs = [VideoRecord(str(tmp_path / 'a.avi')), VideoRecord(str(tmp_path / 'a.avi.mp4'))]
  with pytest.raises(ValueError, match=r'a\.avi .*a\.avi\.mp4.*a\.avi\.mp4'):
    prepare_videos.output_paths(recs, str(tmp_path))
  # The same source listed twice is one output.
  same = [VideoRecord(str(tmp_path / 'b.webm'), 1), VideoRecord(str(tmp_path / 'b.webm'), 2)]
  assert prepare_videos.output_paths(same, str(tmp_path)) == ['b.webm.mp4', 'b.webm.mp4']


def test_parallel_plan_fits_the_cores():
  from launch import prepare_videos
  plan = prepare_videos.plan_parallelism
  assert plan(8) == (8, 1)                 # One encoder thread per process by default.
  assert plan(8, threads=2) == (4, 2)
  assert plan(8, workers=3) == (3, 2)
  assert plan(1, threads=4) == (1, 4)      # At least one worker.
  with pytest.raises(ValueError, match='--workers=4 x --threads=4 = 16 .* 8 cores'):
    plan(8, workers=4, threads=4)
  opts = prepare_videos.encoder_options(crf=23, preset='veryfast', gop=25, threads=2)
  assert opts['threads'] == '2' and opts['g'] == '25'
