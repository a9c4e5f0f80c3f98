"""Clip sampling and multi-scale crop against literal translations of the reference code."""
import random

import numpy as np
import pytest

from videomae_jax.data import augment, sampling


def reference_train_indices(num_frames, new_length, new_step, start):
  """The reference `_sample_train_indices` + `_video_TSN_decord_batch_loader`, start given."""
  skip_length = new_length * new_step
  average_duration = num_frames - skip_length + 1
  offset0 = (start if average_duration > 0 else 0) + 1  # 1-based, as in the reference.
  frame_ids = []
  offset = offset0
  for _ in range(0, skip_length, new_step):
    frame_ids.append(offset - 1 if offset <= num_frames else offset0 - 1)
    if offset + new_step < num_frames:
      offset += new_step
  return frame_ids


class FixedStart:
  """Stands in for the generator: returns the start chosen by the test."""

  def __init__(self, start):
    self.start, self.high = start, None

  def integers(self, high):
    self.high = high
    return self.start


@pytest.mark.parametrize('n', [1, 2, 5, 15, 16, 63, 64, 65, 66, 100, 300])
@pytest.mark.parametrize('t,step', [(16, 4), (16, 2), (8, 8)])
def test_indices_match_reference_for_every_start(n, t, step):
  window = t * step
  starts = range(n - window + 1) if n >= window else [0]
  for start in starts:
    rng = FixedStart(start)
    got = sampling.sample_frame_indices(n, t, step, rng)
    assert got.tolist() == reference_train_indices(n, t, step, start), (n, start)
    assert got.dtype == np.int64 and len(got) == t
    assert 0 <= got.min() and got.max() < n
    # The reference draws the start with randint(n - window + 1).
    assert rng.high == (n - window + 1 if n >= window else None)


def test_short_video_is_clamped():
  idx = sampling.sample_frame_indices(10, 16, 4, np.random.default_rng(0))
  # A step is taken while index + 4 <= n - 2 = 8: 0, 4, 8, then 8 repeats.
  assert idx.tolist() == [0, 4, 8] + [8] * 13


def test_window_start_is_uniform():
  starts = [sampling.sample_frame_indices(100, 16, 4, np.random.default_rng(s))[0]
            for s in range(2000)]
  assert min(starts) == 0 and max(starts) == 100 - 64
  assert len(set(starts)) == 37


def reference_crop_choices(image_w, image_h, input_size, scales, max_distort=1):
  """Every (w, h, x, y) GroupMultiScaleCrop can return (literal translation)."""
  base_size = min(image_w, image_h)
  crop_sizes = [int(base_size * x) for x in scales]
  crop_h = [input_size if abs(x - input_size) < 3 else x for x in crop_sizes]
  crop_w = [input_size if abs(x - input_size) < 3 else x for x in crop_sizes]
  pairs = []
  for i, h in enumerate(crop_h):
    for j, w in enumerate(crop_w):
      if abs(i - j) <= max_distort:
        pairs.append((w, h))
  out = set()
  for w, h in pairs:
    w_step, h_step = (image_w - w) // 4, (image_h - h) // 4
    offs = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step),
            (2 * w_step, 2 * h_step), (0, 2 * h_step), (4 * w_step, 2 * h_step),
            (2 * w_step, 4 * h_step), (2 * w_step, 0 * h_step), (1 * w_step, 1 * h_step),
            (3 * w_step, 1 * h_step), (1 * w_step, 3 * h_step), (3 * w_step, 3 * h_step)]
    out.update((w, h, x, y) for x, y in offs)
  return out


@pytest.mark.parametrize('size,input_size', [((340, 256), 224), ((455, 256), 224),
                                             ((320, 240), 224), ((128, 96), 64),
                                             ((1280, 720), 224)])
def test_crop_choice_set_matches_reference(size, input_size):
  scales = (1, .875, .75, .66)
  want = reference_crop_choices(*size, input_size, scales)
  rng = np.random.default_rng(0)
  boxes = [augment.sample_crop_box(*size, input_size, scales, 1, rng) for _ in range(6000)]
  got = {(b.w, b.h, b.x, b.y) for b in boxes}
  assert got == want
  for w, h, x, y in got:
    assert x + w <= size[0] and y + h <= size[1]


def test_thirteen_offsets_and_snapping():
  offs = augment.fixed_offsets(340, 256, 224, 224)
  assert len(offs) == 13 and len(set(offs)) == 13
  # int(256 * .875) = 224 and int(256 * 1) = 256: the first is snapped to 224 exactly.
  sizes = {b.w for b in (augment.sample_crop_box(340, 256, 226, (1, .875), 0,
                                                 np.random.default_rng(i)) for i in range(50))}
  assert sizes == {256, 226}


def test_crop_resize_keeps_scene_at_reduced_resolution():
  # A frame with a bright square: cropping the same box from a half-size decode
  # must show the square in the same place.
  big = np.zeros((1, 200, 300, 3), np.uint8)
  big[:, 50:100, 100:150] = 255
  small = big[:, ::2, ::2]
  box = augment.CropBox(80, 20, 120, 120)
  a = augment.crop_resize(big, box, (300, 200), 60)
  b = augment.crop_resize(small, box, (300, 200), 60)
  assert a.shape == b.shape == (1, 60, 60, 3)
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
  assert a[0, 25, 20, 0] == 255 and a[0, 5, 5, 0] == 0
  flipped = augment.crop_resize(big, box, (300, 200), 60, flip=True)
  np.testing.assert_array_equal(flipped, a[:, :, ::-1])


def test_decode_size_only_when_it_pays():
  assert augment.decode_size(1280, 720, 340) == (604, 340)
  assert augment.decode_size(340, 256, 340) is None
  assert augment.decode_size(455, 320, 340) is None
  assert augment.decode_size(400, 300, 0) is None


def test_example_rng_is_pure():
  a = sampling.example_rng(3, 1, 77).integers(1 << 30, size=4)
  b = sampling.example_rng(3, 1, 77).integers(1 << 30, size=4)
  c = sampling.example_rng(3, 1, 78).integers(1 << 30, size=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  p = sampling.epoch_permutation(0, 2, 10)
  assert sorted(p.tolist()) == list(range(10))
  assert not np.array_equal(p, sampling.epoch_permutation(0, 3, 10))
  random.seed(0)  # The pipeline never uses the global generators.
