"""Reconstruction images never use the statistics of the pixels they reconstruct."""
import numpy as np

from videomae_jax.train.visualize import reconstruction_grid

GRID = (2, 4, 4)  # 4x32x32 clip, 2x8x8 tubelets


def _clip(seed):
  return np.random.default_rng(seed).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def test_masked_pixels_do_not_leak_into_the_reconstruction():
  masked = np.zeros(32, bool)
  masked[[1, 5, 6, 17, 20, 30]] = True
  pred = np.random.default_rng(1).normal(size=(masked.sum(), 2 * 8 * 8 * 3)).astype(np.float32)
  a = _clip(0)
  b = a.copy()
  # Change only the masked tubelets' pixels.
  for tok in np.flatnonzero(masked):
    t, rem = divmod(tok, 16)
    y, x = divmod(rem, 4)
    b[2 * t:2 * t + 2, 8 * y:8 * y + 8, 8 * x:8 * x + 8] = 255 - b[2 * t:2 * t + 2,
                                                                     8 * y:8 * y + 8,
                                                                     8 * x:8 * x + 8]
  img_a = reconstruction_grid(a, pred, masked, GRID, 2, 8, norm_pix=True)
  img_b = reconstruction_grid(b, pred, masked, GRID, 2, 8, norm_pix=True)
  rows = img_a.shape[0] // 3
  assert img_a.shape == (3 * 32, 4 * 32, 3) and img_a.dtype == np.uint8
  # Original rows differ, the masked-input and reconstruction rows are identical.
  assert not np.array_equal(img_a[:rows], img_b[:rows])
  np.testing.assert_array_equal(img_a[rows:], img_b[rows:])


def test_raw_pixel_predictions_are_pasted_in_place():
  masked = np.zeros(32, bool)
  masked[3] = True
  clip = _clip(2)
  pred = np.full((1, 2 * 8 * 8 * 3), 1.0, np.float32)  # white
  img = reconstruction_grid(clip, pred, masked, GRID, 2, 8, norm_pix=False)
  rec = img[64:]
  # token 3 = slot 0, row 0, column 3; frames are laid side by side, 32 px each.
  assert (rec[0:8, 24:32] == 255).all()
  np.testing.assert_array_equal(rec[8:32, 0:32], clip[0, 8:32])
