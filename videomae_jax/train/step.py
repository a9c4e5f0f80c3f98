"""The train state and the pure update step ``(state, batch, rng) -> (state, metrics)``."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from videomae_jax import losses, masking
from videomae_jax.models import VideoMAEPretrain
from videomae_jax.normalization import normalize


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # steps taken (= batches consumed), skipped ones included
  params: Any
  opt_state: Any
  nonfinite_in_row: jax.Array  # consecutive skipped (non-finite) steps
  nonfinite_total: jax.Array


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_in_row=jnp.zeros((), jnp.int32),
                    nonfinite_total=jnp.zeros((), jnp.int32))


def make_init_fn(model: VideoMAEPretrain, tx: optax.GradientTransformation,
                 rng: jax.Array) -> Callable[[], TrainState]:
  """``() -> TrainState`` with params from ``rng``: jit it with ``out_shardings`` to create the
  state directly sharded, or ``jax.eval_shape`` it for the shapes."""

  def init() -> TrainState:
    return init_state(model.init(rng, *model.example_inputs())["params"], tx)

  return init


def draw_masks(rng: jax.Array, batch: int, model: VideoMAEPretrain, mask_cfg):
  """Encoder mask (and the V2 decoder mask when configured) for one batch."""
  enc_rng, dec_rng = jax.random.split(rng)
  mask = masking.MASKERS[mask_cfg.type](enc_rng, batch, model.grid, mask_cfg.ratio)
  dmask = None
  if mask_cfg.decoder_type == "run_cell":
    dmask = masking.running_cell_mask(dec_rng, batch, model.grid, mask_cfg.decoder_ratio)
  return mask, dmask


def make_train_step(model: VideoMAEPretrain, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mask_cfg, norm_pix: bool = True,
                    accum_steps: int = 1) -> Callable:
  """Builds the update step. Masks come from ``fold_in(rng, step)``; normalisation of the uint8
  video runs here, on the device. A non-finite loss or gradient leaves params and optimizer
  state untouched and is counted."""
  dtype = jnp.dtype(model.dtype)

  def loss_fn(params, video_u8, rng):
    video = normalize(video_u8, dtype)
    mask_rng, drop_rng = jax.random.split(rng)
    mask, dmask = draw_masks(mask_rng, video.shape[0], model, mask_cfg)
    pred = model.apply({"params": params}, video, mask, dmask, train=True,
                       rngs={"dropout": drop_rng})
    # Targets from the uint8 pixels: exact [0, 1] values whatever the compute dtype.
    return losses.reconstruction_loss(video_u8, pred, mask, norm_pix,
                                      tubelet_size=model.tubelet_size,
                                      patch_size=model.patch_size, decoder_mask=dmask)

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    video = batch["video"]
    if accum_steps == 1:
      loss, grads = grad_fn(state.params, video, step_rng)
    else:
      micro = video.reshape(accum_steps, video.shape[0] // accum_steps, *video.shape[1:])

      def body(carry, xs):
        loss_sum, grad_sum = carry
        i, v = xs
        l, g = grad_fn(state.params, v, jax.random.fold_in(step_rng, i))
        return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                      (jnp.arange(accum_steps), micro))
      loss = loss / accum_steps
      grads = jax.tree.map(lambda g: g / accum_steps, grads)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    def apply(params_opt):
      params, opt_state = params_opt
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A branch, not a select: the update runs in place on the donated buffers.
    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda po: po,
                                             (state.params, state.opt_state))
    # Skipped steps apply no update, so the schedule has advanced by the applied ones only.
    applied = state.step - state.nonfinite_total
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(applied),
        # Of the updated params: a norm of the old ones would be read after the in-place
        # update and make XLA copy every parameter first.
        "param_norm": optax.tree.norm(new_state.params),
        "skipped": (~finite).astype(jnp.int32),
        "nonfinite_in_row": new_state.nonfinite_in_row,
        "nonfinite_total": new_state.nonfinite_total,
    }
    return new_state, metrics

  return train_step
