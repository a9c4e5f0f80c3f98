"""remat_policy chooses what the plain layers save for the backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax import losses, masking
from videomae_jax.models import VideoMAEPretrain
from videomae_jax.models import layers

SMALL = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, remat=True,
             layers_impl="plain", attention_impl="einsum", attention_remat="none")


def _loss_and_inputs(model):
  video = jax.random.normal(jax.random.key(0), (2, model.num_frames, *model.image_hw, 3))
  mask = masking.tube_mask(jax.random.key(1), 2, model.grid, 0.75)
  params = model.init(jax.random.key(0), video, mask)["params"]

  def loss(p):
    pred = model.apply({"params": p}, video, mask)
    return losses.reconstruction_loss(video, pred, mask, tubelet_size=2, patch_size=8)

  return loss, params


def _saved(model, capsys) -> str:
  loss, params = _loss_and_inputs(model)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  return capsys.readouterr().out


def _temp_bytes(model) -> int:
  loss, params = _loss_and_inputs(model)
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("scan", [False, True])
def test_two_policies_save_different_residuals_and_memory(capsys, scan):
  nothing = VideoMAEPretrain(**SMALL, scan=scan, remat_policy="nothing_saveable")
  named = nothing.clone(remat_policy="save_only_these_names:qkv,fc1,mlp_hidden")
  saved_nothing, saved_named = _saved(nothing, capsys), _saved(named, capsys)
  assert saved_nothing != saved_named
  assert _temp_bytes(nothing) != _temp_bytes(named)
  if scan:  # the saved names sit inside the loop's stacked residuals
    return
  for name in ("qkv", "fc1", "mlp_hidden"):
    assert f"named '{name}'" in saved_named and f"named '{name}'" not in saved_nothing
  # The policy changes what is stored, not the gradient.
  loss_a, params = _loss_and_inputs(nothing)
  loss_b, _ = _loss_and_inputs(named)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.grad(loss_a)(params), jax.grad(loss_b)(params))


def test_dots_saveable_differs_from_nothing_saveable_on_plain_layers():
  nothing = VideoMAEPretrain(**SMALL, remat_policy="nothing_saveable")
  dots = nothing.clone(remat_policy="dots_saveable")
  assert _temp_bytes(nothing) != _temp_bytes(dots)


def test_remat_policy_strings_are_checked():
  assert layers.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
  with pytest.raises(ValueError, match="remat_policy='save_only_these_names:qkvv'.*qkvv"):
    layers.remat_policy("save_only_these_names:qkvv")
  with pytest.raises(ValueError, match="remat_policy='everything'"):
    layers.remat_policy("everything")
  model = VideoMAEPretrain(**dict(SMALL, remat_policy="no_such_policy"))
  with pytest.raises(ValueError, match="no_such_policy"):
    _loss_and_inputs(model)
  with pytest.raises(ValueError, match="layers_impl='fast'"):
    _loss_and_inputs(model.clone(remat_policy="nothing_saveable", layers_impl="fast"))


def test_layers_impl_is_a_config_knob():
  from videomae_jax.train import config as config_lib
  config = config_lib.base_config()
  assert config_lib.build_model(config).layers_impl is None
  config.model.layers_impl = "plain"
  config.model.remat_policy = "save_only_these_names:qkv"
  model = config_lib.build_model(config)
  assert model.layers_impl == "plain" and model.remat_policy == "save_only_these_names:qkv"
