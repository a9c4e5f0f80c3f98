"""Targets against an independent numpy implementation of the reference's formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import losses, masking
from videomae_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize


def numpy_targets(video, kt, p, norm_pix):
  """Loops over tubelets, pixel order (dt, dy, dx, c) written out explicitly."""
  b, t, h, w, c = video.shape
  x = video * IMAGENET_STD + IMAGENET_MEAN
  out = []
  for bi in range(b):
    toks = []
    for ti in range(t // kt):
      for hi in range(h // p):
        for wi in range(w // p):
          cube = x[bi, ti * kt:(ti + 1) * kt, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p, :]
          cube = cube.astype(np.float64)
          if norm_pix:
            flat = cube.reshape(-1, c)
            mean = flat.mean(0)
            std = np.sqrt(((flat - mean) ** 2).sum(0) / (flat.shape[0] - 1))  # unbiased
            cube = (cube - mean) / (std + 1e-6)  # eps on the std
          vec = np.empty(kt * p * p * c)
          for dt in range(kt):
            for dy in range(p):
              for dx in range(p):
                for ci in range(c):
                  vec[((dt * p + dy) * p + dx) * c + ci] = cube[dt, dy, dx, ci]
          toks.append(vec)
    out.append(toks)
  return np.array(out)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_targets_match_numpy(norm_pix):
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, 4, 8, 12, 3)).astype(np.float32)
  got = np.asarray(losses.targets(video, tubelet_size=2, patch_size=4, norm_pix=norm_pix))
  np.testing.assert_allclose(got, numpy_targets(video, 2, 4, norm_pix), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_uint8_clips_give_the_targets_and_loss_of_the_normalised_input(norm_pix):
  """The train step builds targets straight from the uint8 clip (pixel / 255, the reference's
  [0, 1] values); that equals going through the ImageNet-normalised float input."""
  rng = np.random.default_rng(1)
  u8 = rng.integers(0, 256, (2, 4, 8, 12, 3), dtype=np.uint8)
  video = normalize(u8)
  np.testing.assert_allclose(
      np.asarray(losses.targets(u8, tubelet_size=2, patch_size=4, norm_pix=norm_pix)),
      numpy_targets(np.asarray(video), 2, 4, norm_pix), atol=3e-5, rtol=1e-5)
  mask = masking.tube_mask(jax.random.key(0), 2, (2, 2, 3), 0.5)
  pred = jnp.asarray(rng.normal(size=(2, mask.masked_idx.shape[1], 96)), jnp.float32)
  kw = dict(tubelet_size=2, patch_size=4)
  np.testing.assert_allclose(losses.reconstruction_loss(u8, pred, mask, norm_pix, **kw),
                             losses.reconstruction_loss(video, pred, mask, norm_pix, **kw),
                             rtol=1e-5)


def test_loss_is_mse_over_masked_tokens_only():
  rng = np.random.default_rng(1)
  video = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32)
  mask = masking.tube_mask(__import__("jax").random.key(0), 2, (2, 2, 2), 0.5)
  tgt = numpy_targets(video, 2, 4, True)
  pred = rng.normal(size=(2, mask.num_masked, 96)).astype(np.float32)
  loss = losses.reconstruction_loss(video, pred, mask, tubelet_size=2, patch_size=4)
  m = np.asarray(mask.masked)
  expected = np.mean([((pred[b] - tgt[b][m[b]]) ** 2).mean() for b in range(2)])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # A perfect prediction of the masked tokens gives zero whatever the visible ones are.
  perfect = np.stack([tgt[b][m[b]] for b in range(2)]).astype(np.float32)
  assert float(losses.reconstruction_loss(video, perfect, mask, tubelet_size=2,
                                          patch_size=4)) < 1e-9


def test_loss_rejects_mismatched_shapes():
  video = np.zeros((1, 4, 8, 8, 3), np.float32)
  mask = masking.tube_mask(__import__("jax").random.key(0), 1, (2, 2, 2), 0.5)
  with pytest.raises(ValueError, match="pred has shape"):
    losses.reconstruction_loss(video, np.zeros((1, 4, 10), np.float32), mask, tubelet_size=2,
                               patch_size=4)
  with pytest.raises(ValueError, match="not divisible"):
    losses.reconstruction_loss(video, np.zeros((1, 4, 96), np.float32), mask, tubelet_size=2,
                               patch_size=3)


def test_normalize_matches_reference_transform():
  u8 = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 1, 16, 16, 3)
  got = np.asarray(normalize(u8))
  np.testing.assert_allclose(got, (u8 / 255.0 - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-6)
  assert normalize(u8, jnp.bfloat16).dtype == jnp.bfloat16
