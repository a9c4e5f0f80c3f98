"""Random erasing (the official cube variant): one box for the whole clip, fills per frame."""
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference_augment as ref
from videomae_jax.augment import erasing

T, H, W, C = 3, 40, 56, 3


def _clip(seed=0):
  return jax.random.normal(jax.random.key(seed), (T, H, W, C)) * 0.1 + 3.0  # far from N(0, 1)


def _erased(out, clip):
  return np.asarray(out) != np.asarray(clip)


@pytest.fixture(scope="module")
def erase_many():
  """2000 seeded clips through random_erasing(probability=0.25): erased masks (N, T, H, W)
  (zero fill: the cheapest to draw, the boxes are the same in every mode)."""
  clip = _clip()
  run = jax.jit(jax.vmap(lambda k: erasing.random_erasing(k, clip, probability=0.25,
                                                          mode="const")))
  out = run(jax.random.split(jax.random.key(7), 2000))
  return np.any(_erased(out, clip[None]), axis=-1)


def test_one_box_on_every_frame_pixel_fill_per_frame():
  clip = _clip()
  run = jax.jit(lambda k: erasing.random_erasing(k, clip, probability=1.0, mode="pixel"))
  for seed in range(5):
    out = np.asarray(run(jax.random.key(seed)))
    mask = _erased(out, clip)
    assert mask.any()
    assert (mask == mask[:1]).all()           # the same pixels on every frame and channel...
    assert (mask == mask[..., :1]).all()
    rows, cols = np.nonzero(mask[0, :, :, 0])
    box = np.zeros((H, W), bool)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert (mask[0, :, :, 0] == box).all()    # ...forming one rectangle
    np.testing.assert_array_equal(out[~mask], np.asarray(clip)[~mask])  # the rest untouched
    filled = out[mask].reshape(T, -1)
    assert not np.allclose(filled[0], filled[1])  # per-frame N(0, 1) draws
    assert abs(filled.mean()) < 0.2 and abs(filled.std() - 1) < 0.2


def test_rand_and_const_fills():
  clip = _clip()
  out = np.asarray(erasing.random_erasing(jax.random.key(3), clip, probability=1.0, mode="rand"))
  mask = _erased(out, clip)[..., 0]
  for t in range(T):
    colour = out[t][mask[t]]
    assert (colour == colour[:1]).all()  # one colour per frame...
  assert not np.allclose(out[0][mask[0]][0], out[1][mask[1]][0])  # ...drawn per frame
  out = np.asarray(erasing.random_erasing(jax.random.key(3), clip, probability=1.0, mode="const"))
  mask = _erased(out, clip)
  assert mask.any() and (out[mask] == 0).all()
  with pytest.raises(ValueError):
    erasing.random_erasing(jax.random.key(0), clip, probability=1.0, mode="blur")


def test_probability_and_box_statistics(erase_many):
  masks = erase_many[:, 0]                     # (N, H, W), frame 0
  hit = masks.any(axis=(1, 2))
  assert abs(hit.mean() - 0.25) < 0.04, hit.mean()
  assert (erase_many[hit] == erase_many[hit][:, :1]).all()
  h = masks[hit].any(axis=2).sum(axis=1)
  w = masks[hit].any(axis=1).sum(axis=1)
  assert (masks[hit].sum(axis=(1, 2)) == h * w).all()  # rectangles
  frac = h * w / (H * W)
  # h, w are rounded from sqrt(area * aspect): allow a pixel of rounding on each side.
  assert frac.min() >= 0.02 * 0.6 and frac.max() <= (math.sqrt(H * W / 3 * 0.3) + 1) * (
      math.sqrt(H * W / 3 / 0.3) + 1) / (H * W)
  aspect = h / w
  assert aspect.min() > 0.3 * 0.8 and aspect.max() < 1 / 0.3 * 1.25
  assert (h < H).all() and (w < W).all()


def test_box_distribution_matches_the_official_draw(erase_many):
  """Mean box area and log-aspect against a transcription of the official retry loop (5000
  draws each, within 4 standard errors)."""
  rng = random.Random(0)
  boxes = [ref.official_erase_box(rng, H, W) for _ in range(5000)]
  boxes = np.array([b for b in boxes if b is not None], float)
  keys = jax.random.split(jax.random.key(11), 5000)
  found, top, left, h, w = jax.jit(jax.vmap(lambda k: erasing._box(
      jax.random.uniform(k, (2 * erasing.TRIES + 2,)), H, W, 1, min_area=erasing.MIN_AREA,
      max_area=erasing.MAX_AREA,
      log_aspect=(math.log(0.3), math.log(1 / 0.3)))))(keys)
  found, top, left, h, w = (np.asarray(a) for a in (found, top, left, h, w))
  assert found.mean() > 0.99
  assert (top + h <= H).all() and (left + w <= W).all() and (top >= 0).all()
  ours_area = (h * w)[found] / (H * W)
  theirs_area = boxes[:, 2] * boxes[:, 3] / (H * W)
  se = math.hypot(ours_area.std() / math.sqrt(len(ours_area)),
                  theirs_area.std() / math.sqrt(len(theirs_area)))
  assert abs(ours_area.mean() - theirs_area.mean()) < 4 * se
  ours_log = np.log(h[found] / w[found])
  theirs_log = np.log(boxes[:, 2] / boxes[:, 3])
  se = math.hypot(ours_log.std() / math.sqrt(len(ours_log)),
                  theirs_log.std() / math.sqrt(len(theirs_log)))
  assert abs(ours_log.mean() - theirs_log.mean()) < 4 * se
  # The box position is uniform over the valid offsets.
  centre = (top[found] + h[found] / 2) / H
  assert abs(centre.mean() - 0.5) < 0.02


def test_several_boxes_and_no_fit():
  clip = _clip()
  out = erasing.random_erasing(jax.random.key(5), clip, probability=1.0, mode="const", count=3)
  assert _erased(out, clip).any()
  # A 1-pixel-high clip: no box has h < 1, so nothing is erased (the reference gives up).
  thin = jnp.ones((2, 1, 64, 3))
  np.testing.assert_array_equal(
      np.asarray(erasing.random_erasing(jax.random.key(0), thin, probability=1.0)),
      np.asarray(thin))
