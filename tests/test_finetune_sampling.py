"""Fine-tuning frame sampling, RandomResizedCrop, test views and label checks against the
official code (transcribed in tests/reference_sampling.py)."""
import random

import numpy as np
import pytest

import reference_sampling as ref
from videomae_jax import data
from videomae_jax.data import augment, clips as clips_lib, sampling, sources

LENGTHS = [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 66, 100, 301]


class FixedInt:
  """Stands in for the generator: `integers` returns the value chosen by the test."""

  def __init__(self, value=None):
    self.value, self.calls = value, []

  def integers(self, *args, **kw):
    self.calls.append((args, kw))
    if self.value is None:
      raise AssertionError('no random number expected')
    return self.value


@pytest.mark.parametrize('t,rate', [(16, 4), (16, 2), (8, 8), (4, 5)])
@pytest.mark.parametrize('n', LENGTHS)
def test_dense_train_matches_official_for_every_end(n, t, rate):
  window = t * rate
  ends = range(window, n) if n > window else [None]
  for end in ends:
    rng = FixedInt(end)
    got = sampling.dense_train_indices(n, t, rate, rng)
    drawn = []
    want = ref.kinetics_train_index(n, t, rate, lambda lo, hi: drawn.append((lo, hi)) or end)
    assert got.tolist() == [int(i) for i in want], (n, end)
    assert got.dtype == np.int64 and len(got) == t
    assert 0 <= got.min() and got.max() < n
    # The same draw: np.random.randint(window, n), high excluded; none for short videos.
    assert [c[0] for c in rng.calls] == drawn


def test_dense_train_edge_cases():
  # Shorter than the rate (n // rate == 0): the last frame everywhere.
  assert sampling.dense_train_indices(3, 16, 4, FixedInt()).tolist() == [2] * 16
  assert sampling.dense_train_indices(1, 16, 4, FixedInt()).tolist() == [0] * 16
  # Shorter than num_frames: linspace(0, 10, 2) = 0, 10 -> clipped 9, padded with 9.
  assert sampling.dense_train_indices(10, 16, 4, FixedInt()).tolist() == [0] + [9] * 15
  # Exactly the window: linspace(0, 64, 16), truncated, the last clipped to 63.
  got = sampling.dense_train_indices(64, 16, 4, FixedInt()).tolist()
  assert got == [int(x) for x in np.linspace(0, 64, 16)[:-1]] + [63]
  # Long: the clip spans [end - 64, end - 1] for the drawn end.
  got = sampling.dense_train_indices(300, 16, 4, FixedInt(100))
  assert got[0] == 36 and got[-1] == 99
  with pytest.raises(ValueError):
    sampling.dense_train_indices(0, 16, 4, FixedInt())


def test_dense_train_end_is_uniform_with_a_real_generator():
  firsts = [sampling.dense_train_indices(100, 16, 4, np.random.default_rng(s))[0]
            for s in range(1500)]
  # end uniform in [64, 100): the first frame end - 64 in [0, 35].
  assert min(firsts) == 0 and max(firsts) == 35 and len(set(firsts)) == 36
  for s in range(20):  # The same numbers in: the official's randint fed by one generator.
    g = np.random.default_rng(s)
    want = ref.kinetics_train_index(300, 16, 4, lambda lo, hi: g.integers(lo, hi))
    assert sampling.dense_train_indices(300, 16, 4, np.random.default_rng(s)).tolist() == want


@pytest.mark.parametrize('t', [16, 8])
@pytest.mark.parametrize('n', LENGTHS)
def test_segment_train_matches_official(n, t):
  for seed in range(5):
    g = np.random.default_rng(seed)
    want = ref.ssv2_train_index(n, t, lambda high, size: g.integers(high, size=size))
    got = sampling.segment_train_indices(n, t, np.random.default_rng(seed))
    assert got.tolist() == [int(i) for i in want], (n, seed)
    assert got.dtype == np.int64 and len(got) == t and 0 <= got.min() and got.max() < n
  if n < t:  # Official fallback: frame 0 everywhere, no draw.
    assert sampling.segment_train_indices(n, t, FixedInt()).tolist() == [0] * t
  else:  # One frame from each segment of n // t frames.
    seg = n // t
    got = sampling.segment_train_indices(n, t, np.random.default_rng(0))
    assert ((got // seg) == np.arange(t)).all()


def test_train_frame_indices_dispatch_and_pretrain_unchanged():
  c = data.default_data_config()
  assert c.frame_sampling == 'pretrain' and c.crop == 'multiscale'
  for s in range(10):
    got = sampling.train_frame_indices(200, c, np.random.default_rng(s))
    want = sampling.sample_frame_indices(200, 16, 4, np.random.default_rng(s))
    assert got.tolist() == want.tolist()
  c.frame_sampling = 'dense'
  assert (sampling.train_frame_indices(200, c, np.random.default_rng(3)).tolist()
          == sampling.dense_train_indices(200, 16, 4, np.random.default_rng(3)).tolist())
  c.frame_sampling = 'segment'
  assert (sampling.train_frame_indices(200, c, np.random.default_rng(3)).tolist()
          == sampling.segment_train_indices(200, 16, np.random.default_rng(3)).tolist())
  c.frame_sampling = 'tsn'
  with pytest.raises(ValueError, match='frame_sampling'):
    clips_lib.check_sampling_config(c)
  c.frame_sampling, c.crop = 'dense', 'center'
  with pytest.raises(ValueError, match='crop'):
    clips_lib.check_sampling_config(c)
  c.crop, c.flip = 'random_resized', True
  with pytest.raises(ValueError, match='flip'):
    clips_lib.check_sampling_config(c)


def _view_buffer(all_index, h, w):
  """A decoded 'buffer' whose pixel (t, y, x) holds (frame, y, x): int64, of a size the
  official Resize leaves alone (short side = the test size), so views read back exactly."""
  buf = np.empty((len(all_index), h, w, 3), np.int64)
  buf[..., 0] = np.asarray(all_index)[:, None, None]
  buf[..., 1] = np.arange(h)[None, :, None]
  buf[..., 2] = np.arange(w)[None, None, :]
  return buf


@pytest.mark.parametrize('n', LENGTHS + [250])
@pytest.mark.parametrize('num_clips', [2, 5, 4, 10])
def test_dense_test_views_match_official(n, num_clips):
  t, rate, s = 16, 4, 8
  all_index = ref.kinetics_test_buffer_index(n, t, rate)
  got = sampling.dense_test_indices(n, t, rate, num_clips)
  assert got.shape == (num_clips, t)
  for hw in [(s, 13), (11, s)]:  # Landscape: crops along x; portrait: along y.
    buf = _view_buffer(all_index, *hw)
    offsets = augment.long_side_crop_offsets(hw[1], hw[0], s, 3)
    for c in range(num_clips):
      for k in range(3):
        view = ref.kinetics_test_view(buf, c, k, t, s, num_clips, 3)
        assert view.shape == (t, s, s, 3)
        assert view[:, 0, 0, 0].tolist() == got[c].tolist(), (n, c)
        assert (view[0, 0, 0, 2], view[0, 0, 0, 1]) == offsets[k]


@pytest.mark.parametrize('n', LENGTHS)
def test_dense_test_single_clip_is_the_middle(n):
  all_index = ref.kinetics_test_buffer_index(n, 16, 4)
  mid = (len(all_index) - 16) // 2
  assert sampling.dense_test_indices(n, 16, 4, 1).tolist() == [all_index[mid:mid + 16]]


@pytest.mark.parametrize('n', LENGTHS + [48, 250])
@pytest.mark.parametrize('t', [16, 8])
def test_segment_test_views_match_official(n, t):
  s = 8
  all_index = ref.ssv2_test_buffer_index(n, t, 2)
  got = sampling.segment_test_indices(n, t, 2)
  for hw in [(s, 13), (11, s)]:
    buf = _view_buffer(all_index, *hw)
    for c in range(2):
      for k in range(3):
        view = ref.ssv2_test_view(buf, c, k, s, 3)
        assert view[:, 0, 0, 0].tolist() == got[c].tolist(), (n, c)
  # One clip: the segment middles (the official 2-clip test's second clip).
  assert sampling.segment_test_indices(n, t, 1).tolist() == [got[1].tolist()]
  if n >= 2 * t:  # Starts and middles differ once segments hold two frames.
    assert (got[1] > got[0]).all()


@pytest.mark.parametrize('wh', [(320, 240), (240, 320), (176, 144), (640, 272), (1280, 720),
                                (224, 500), (500, 224), (224, 224), (100, 100), (97, 61)])
def test_short_side_resize_and_crops_along_the_long_side(wh):
  w, h, s = wh[0], wh[1], 224
  oh, ow = ref.get_resize_sizes(h, w, s)
  assert augment.short_side_resize_size(w, h, s) == (ow, oh)
  assert min(ow, oh) == s
  frames = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  want = np.stack(ref.resize_clip(list(frames), s))
  assert np.array_equal(augment.resize_frames(frames, (ow, oh)), want)
  for num_crops in (2, 3, 5):
    offs = augment.long_side_crop_offsets(ow, oh, s, num_crops)
    step = (max(ow, oh) - s) / (num_crops - 1)
    starts = [int(k * step) for k in range(num_crops)]
    if oh >= ow:  # Portrait (and square): down the height.
      assert offs == [(0, y) for y in starts]
    else:
      assert offs == [(x, 0) for x in starts]
    assert offs[0] == (0, 0) and max(offs[-1]) == max(ow, oh) - s
  # One crop: the validation CenterCrop.
  assert augment.long_side_crop_offsets(ow, oh, s, 1) == [ref.center_crop_offset(ow, oh, s, s)]


class PyRandomGen:
  """numpy-Generator-like `uniform` / `integers` drawing from Python's `random.Random`, the
  source the official crop uses."""

  def __init__(self, seed):
    self.r = random.Random(seed)

  def uniform(self, a, b):
    return self.r.uniform(a, b)

  def integers(self, lo, hi):
    return self.r.randint(lo, hi - 1)


RRC_SIZES = [(340, 256), (256, 340), (176, 144), (640, 272), (1280, 720), (16, 16), (2, 2),
             (1000, 10), (10, 1000), (160, 120)]


@pytest.mark.parametrize('wh', RRC_SIZES)
def test_random_resized_crop_matches_official(wh):
  w, h = wh
  scale, ratio = (0.08, 1.0), (0.75, 1.3333)
  fallbacks = 0
  for seed in range(200):
    r, placed = random.Random(seed), []
    i, j, bh, bw = ref.get_param_spatial_crop(
        scale, ratio, h, w, r.uniform, lambda a, b: placed.append(1) or r.randint(a, b))
    box = augment.random_resized_crop_box(w, h, scale, ratio, PyRandomGen(seed))
    assert box == augment.CropBox(j, i, bw, bh), (wh, seed)
    assert 0 <= box.x and box.x + box.w <= w and 0 <= box.y and box.y + box.h <= h
    fallbacks += not placed  # All ten tries failed: the centred fallback.
  if wh in [(1000, 10), (10, 1000)]:  # Far outside the ratio: always the fallback.
    assert fallbacks == 200
    assert augment.random_resized_crop_box(w, h, scale, ratio, PyRandomGen(0)) == (
        augment.CropBox(493, 0, 13, 10) if w > h else augment.CropBox(0, 493, 10, 13))
  elif wh == (340, 256):
    assert fallbacks <= 2  # Ten tries almost always place a box.
  # A numpy generator: the official fed with the same generator's numbers.
  for seed in range(50):
    g = np.random.default_rng(seed)
    i, j, bh, bw = ref.get_param_spatial_crop(scale, ratio, h, w, g.uniform,
                                              lambda a, b: g.integers(a, b + 1))
    assert augment.random_resized_crop_box(w, h, scale, ratio, np.random.default_rng(seed)) \
        == augment.CropBox(j, i, bw, bh)


def test_random_resized_crop_area_and_ratio_with_a_real_generator():
  rng = np.random.default_rng(0)
  boxes = [augment.random_resized_crop_box(340, 256, (0.08, 1.0), (0.75, 1.3333), rng)
           for _ in range(3000)]
  areas = np.array([b.w * b.h for b in boxes]) / (340 * 256)
  ratios = np.array([b.w / b.h for b in boxes])
  assert areas.min() > 0.07 and areas.max() <= 1.0 and 0.4 < areas.mean() < 0.65
  assert ratios.min() > 0.73 and ratios.max() < 1.36
  assert len({(b.x, b.y) for b in boxes}) > 1000


class ArrayVideo:
  """A `readers.VideoFile` over frames in memory."""

  def __init__(self, frames):
    self.path, self.frames = 'array.mp4', frames
    self.num_frames = len(frames)
    self.stored_size = (frames.shape[2], frames.shape[1])

  def get_frames(self, indices):
    return self.frames[np.asarray(indices)]

  def close(self):
    pass


def test_make_clips_random_resized_crop_per_clip_without_flip():
  frames = np.random.default_rng(1).integers(0, 256, (120, 90, 160, 3), dtype=np.uint8)
  c = data.default_data_config()
  c.update(frame_sampling='dense', crop='random_resized', num_frames=8, sampling_rate=4,
           input_size=32, num_sample=3)
  out = clips_lib.make_clips(ArrayVideo(frames), np.random.default_rng(7), c)
  assert out.shape == (3, 8, 32, 32, 3)
  rng = np.random.default_rng(7)  # Frames first, then one box per clip.
  idx = sampling.dense_train_indices(120, 8, 4, rng)
  boxes = [augment.random_resized_crop_box(160, 90, c.rrc_scale, c.rrc_ratio, rng)
           for _ in range(3)]
  assert len(set(boxes)) == 3
  for k, box in enumerate(boxes):
    want = augment.crop_resize(frames[idx], box, (160, 90), 32, flip=False)
    assert np.array_equal(out[k], want)


def test_multiscale_crop_path_unchanged():
  """Default config: the pre-training draws (window, then box and flip per clip)."""
  frames = np.random.default_rng(2).integers(0, 256, (80, 96, 128, 3), dtype=np.uint8)
  c = data.default_data_config()
  c.update(num_frames=8, input_size=48, num_sample=2, flip=True)
  out = clips_lib.make_clips(ArrayVideo(frames), np.random.default_rng(5), c)
  rng = np.random.default_rng(5)
  idx = sampling.sample_frame_indices(80, 8, 4, rng)
  for k in range(2):
    box = augment.sample_crop_box(128, 96, 48, tuple(c.scales), 1, rng)
    flip = bool(rng.integers(2))
    assert np.array_equal(out[k], augment.crop_resize(frames[idx], box, (128, 96), 48, flip))


def test_check_labels(tmp_path):
  lst = tmp_path / 'val.csv'
  lst.write_text('a.mp4 0\nb.mp4 3\nc.mp4 400\nd.mp4 -1\n')
  records = sources.load_annotation_list(str(lst), root='/videos')
  with pytest.raises(data.SourceError) as e:
    data.check_labels(records, 400, str(lst))
  msg = str(e.value)
  assert str(lst) in msg and '/videos/c.mp4' in msg and 'label 400' in msg and '2 of 4' in msg
  with pytest.raises(data.SourceError, match=r"d.mp4.*no label \(-1\)"):
    data.check_labels(records[3:], 400, str(lst))
  assert data.check_labels(records[:2], 400, str(lst)) == 2
  assert data.check_labels(records[:2] * 3, 4, 'val') == 2
  with pytest.raises(data.SourceError, match='label 3'):
    data.check_labels(records[:2], 3, 'val')
