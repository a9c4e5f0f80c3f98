"""The loss, targets and reconstruction images take the token geometry from the model, the mask
or the shapes, never from a silent default; float videos say what they hold; encoder and
decoder masks are accepted alike."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import losses, masking
from videomae_jax.models import VideoMAEPretrain
from videomae_jax.normalization import normalize
from videomae_jax.train.visualize import reconstruction_grid

# 4x32x32 clips, patch 8, tubelet 2: grid (2, 4, 4), 384 values per token.
P8 = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=2, embed_dim=32, depth=1,
          num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def _p8_setup(batch=2):
  model = VideoMAEPretrain(**P8)
  u8 = np.random.default_rng(0).integers(0, 256, (batch, 4, 32, 32, 3), dtype=np.uint8)
  video = normalize(u8)
  mask = masking.tube_mask(jax.random.key(0), batch, model.grid, 0.75)
  params = model.init(jax.random.key(1), video, mask)["params"]
  return model, params, u8, video, mask


def test_patch8_loss_needs_no_geometry_arguments():
  model, params, u8, video, mask = _p8_setup()
  pred = model.apply({"params": params}, video, mask)
  explicit = losses.reconstruction_loss(u8, pred, mask, tubelet_size=2, patch_size=8)
  # From the Mask's grid, from the model, and from the shapes with a bare bool mask (unique
  # here: 3*t*p*p = 384 with t | 4 and p | 32 only for t=2, p=8).
  np.testing.assert_array_equal(losses.reconstruction_loss(u8, pred, mask), explicit)
  np.testing.assert_array_equal(losses.reconstruction_loss(u8, pred, mask, model=model),
                                explicit)
  np.testing.assert_array_equal(
      losses.reconstruction_loss(u8, pred, np.asarray(mask.masked)), explicit)
  np.testing.assert_array_equal(losses.targets(u8, model=model),
                                losses.targets(u8, tubelet_size=2, patch_size=8))


def test_ambiguous_geometry_of_a_bare_bool_mask_is_an_error():
  # 16x224x224 with 1536 values per token: tubelet 2 / patch 16 and tubelet 8 / patch 8 both fit.
  video = np.zeros((1, 16, 224, 224, 3), np.uint8)
  masked = np.zeros((1, 1568), bool)
  masked[0, :1400] = True
  pred = np.zeros((1, 1400, 1536), np.float32)
  with pytest.raises(ValueError, match=r"tubelet_size=2, patch_size=16.*tubelet_size=8, "
                                       r"patch_size=8.*model="):
    losses.reconstruction_loss(video, pred, masked)
  # Any one of the ways of naming the geometry resolves it.
  a = losses.reconstruction_loss(video, pred, masked, tubelet_size=2, patch_size=16)
  b = losses.reconstruction_loss(video, pred, masking.mask_from_bool(masked, grid=(8, 14, 14)))
  c = losses.reconstruction_loss(video, pred, masked, model=VideoMAEPretrain())
  assert float(a) == float(b) == float(c)
  with pytest.raises(ValueError, match="targets needs"):
    losses.targets(video)


def test_geometry_that_contradicts_the_mask_is_an_error():
  model, params, u8, video, mask = _p8_setup()
  pred = model.apply({"params": params}, video, mask)
  with pytest.raises(ValueError, match="grid"):
    losses.reconstruction_loss(u8, pred, mask, tubelet_size=1, patch_size=16)


def test_masks_carry_their_grid():
  grid = (2, 4, 6)
  assert masking.tube_mask(jax.random.key(0), 2, grid, 0.5).grid == grid
  assert masking.random_mask(jax.random.key(0), 2, grid, 0.5).grid == grid
  assert masking.running_cell_mask(jax.random.key(0), 2, grid).grid == grid
  # Static aux data: it survives jit.
  m = jax.jit(lambda k: masking.tube_mask(k, 2, grid, 0.5))(jax.random.key(0))
  assert m.grid == grid
  with pytest.raises(ValueError, match="grid"):
    masking.mask_from_bool(np.zeros((1, 10), bool), grid=grid)


def test_float_pixel_video_is_not_taken_for_a_normalised_one():
  model, params, u8, video, mask = _p8_setup()
  pred = model.apply({"params": params}, video, mask)
  pixels = u8.astype(np.float32)  # [0, 255] floats
  with pytest.raises(ValueError, match="video_space"):
    losses.reconstruction_loss(pixels, pred, mask)
  with pytest.raises(ValueError, match="video_space"):
    losses.targets(pixels, model=model)
  # Saying what the floats are gives the uint8 result.
  np.testing.assert_allclose(losses.reconstruction_loss(pixels, pred, mask, video_space="pixels"),
                             losses.reconstruction_loss(u8, pred, mask), rtol=1e-6)
  np.testing.assert_allclose(
      losses.reconstruction_loss(video, pred, mask, video_space="normalized"),
      losses.reconstruction_loss(u8, pred, mask), rtol=1e-5)
  # Under jit the values are unknown; a uint8 clip needs no check at all.
  jitted = jax.jit(lambda v, p: losses.reconstruction_loss(v, p, mask))
  # (jit may fuse the reduction differently: equal to float32 rounding)
  np.testing.assert_allclose(jitted(u8, pred), losses.reconstruction_loss(u8, pred, mask),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="video_space"):
    losses.reconstruction_loss(u8, pred, mask, video_space="rgb")


def test_bool_decoder_mask_is_accepted_like_a_mask():
  model, params, u8, video, mask = _p8_setup()
  dmask = masking.running_cell_mask(jax.random.key(3), 2, model.grid, 0.5)
  as_bool = np.asarray(dmask.masked)
  pred = model.apply({"params": params}, video, mask, dmask)
  pred_b = model.apply({"params": params}, video, np.asarray(mask.masked), as_bool)
  np.testing.assert_array_equal(pred_b, pred)
  np.testing.assert_array_equal(
      losses.reconstruction_loss(u8, pred_b, np.asarray(mask.masked), decoder_mask=as_bool),
      losses.reconstruction_loss(u8, pred, mask, decoder_mask=dmask))


def test_reconstruction_grid_takes_the_geometry_from_the_mask():
  model, params, u8, video, mask = _p8_setup(batch=1)
  pred = np.asarray(model.apply({"params": params}, video, mask))[0]
  explicit = reconstruction_grid(u8[0], pred, np.asarray(mask.masked)[0], norm_pix=True,
                                 tubelet_size=2, patch_size=8)
  np.testing.assert_array_equal(reconstruction_grid(u8[0], pred, mask, norm_pix=True), explicit)
  np.testing.assert_array_equal(
      reconstruction_grid(u8[0], pred, np.asarray(mask.masked)[0], norm_pix=True, model=model),
      explicit)
