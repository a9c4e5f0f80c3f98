"""Reconstruction images: the third row never uses the statistics of the pixels it
reconstructs; the fourth draws them as the reference's run_videomae_vis.py does."""
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
  img_a = reconstruction_grid(a, pred, masked, norm_pix=True, tubelet_size=2, patch_size=8)
  img_b = reconstruction_grid(b, pred, masked, norm_pix=True, tubelet_size=2, patch_size=8)
  assert img_a.shape == (4 * 32, 4 * 32, 3) and img_a.dtype == np.uint8
  # Original rows differ, the masked-input and reconstruction rows are identical.
  assert not np.array_equal(img_a[:32], img_b[:32])
  np.testing.assert_array_equal(img_a[32:96], img_b[32:96])


def test_fourth_row_uses_each_tubelets_own_statistics_as_the_reference():
  masked = np.zeros(32, bool)
  masked[[2, 9, 21]] = True
  rng = np.random.default_rng(4)
  pred = rng.normal(size=(3, 2 * 8 * 8 * 3)).astype(np.float32)
  clip = _clip(5)
  img = reconstruction_grid(clip, pred, masked, norm_pix=True, tubelet_size=2, patch_size=8)
  row = img[96:].astype(np.float32) / 255  # frames side by side, 32 px each
  x = clip.astype(np.float32) / 255
  for k, tok in enumerate([2, 9, 21]):
    t, rem = divmod(tok, 16)
    y, xx = divmod(rem, 4)
    cube = x[2 * t:2 * t + 2, 8 * y:8 * y + 8, 8 * xx:8 * xx + 8].reshape(-1, 3)
    # run_videomae_vis.py: rec * (var(unbiased).sqrt() + 1e-6) + mean, per channel.
    want = pred[k].reshape(-1, 3) * (cube.std(0, ddof=1) + 1e-6) + cube.mean(0)
    want = np.clip(want, 0, 1).reshape(2, 8, 8, 3)
    for f in range(2):
      col = 32 * (2 * t + f)
      got = row[8 * y:8 * y + 8, col + 8 * xx:col + 8 * xx + 8]
      np.testing.assert_allclose(got, want[f], atol=0.5 / 255 + 1e-6)
  np.testing.assert_array_equal(img[96:104, 0:8], clip[0, 0:8, 0:8])  # token 0: visible


def test_raw_pixel_predictions_are_pasted_in_place():
  masked = np.zeros(32, bool)
  masked[3] = True
  clip = _clip(2)
  pred = np.full((1, 2 * 8 * 8 * 3), 1.0, np.float32)  # white
  img = reconstruction_grid(clip, pred, masked, norm_pix=False, tubelet_size=2, patch_size=8)
  rec = img[64:]
  # token 3 = slot 0, row 0, column 3; frames are laid side by side, 32 px each.
  assert (rec[0:8, 24:32] == 255).all()
  np.testing.assert_array_equal(rec[8:32, 0:32], clip[0, 8:32])


def test_v2_decoder_mask_shows_what_the_model_predicts():
  """With dual masking the predictions cover the decoder's kept tokens: masked tokens it keeps
  show their prediction, masked tokens it drops stay grey, visible ones are the original."""
  masked = np.zeros(32, bool)
  masked[[0, 1, 2, 3]] = True
  dropped = np.zeros(32, bool)
  dropped[[1, 3, 4, 5]] = True  # kept: 28 tokens, among them masked 0 and 2
  pred = np.zeros((28, 2 * 8 * 8 * 3), np.float32)
  kept = np.flatnonzero(~dropped)
  pred[list(kept).index(0)] = 1.0  # white
  pred[list(kept).index(2)] = 0.0  # black
  clip = _clip(3)
  img = reconstruction_grid(clip, pred, masked, norm_pix=False, decoder_mask=dropped,
                            tubelet_size=2, patch_size=8)
  rec = img[64:]
  assert (rec[0:8, 0:8] == 255).all()     # token 0: predicted
  assert (rec[0:8, 16:24] == 0).all()     # token 2: predicted
  assert (rec[0:8, 8:16] == 128).all()    # token 1: masked, dropped by the decoder
  assert (rec[0:8, 24:32] == 128).all()   # token 3: masked, dropped by the decoder
  np.testing.assert_array_equal(rec[8:16, 0:32], clip[0, 8:16])  # tokens 4-7: visible
