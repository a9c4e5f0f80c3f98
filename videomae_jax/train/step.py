"""The train state and the pure update step ``(state, batch, rng) -> (state, metrics)``."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videomae_jax import losses, masking
from videomae_jax.models import VideoMAEPretrain, attention
from videomae_jax.normalization import normalize
from videomae_jax.train import sharding


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


def micro_batches(tree: Any, accum_steps: int, mesh: Mesh | None = None) -> Any:
  """Splits every (B, ...) leaf into (accum_steps, B / accum_steps, ...), micro-batch i taking
  rows i::accum_steps.

  A batch sharded over the devices in contiguous blocks keeps each device's rows on that device:
  every micro-batch takes B / (devices * accum_steps) rows from each device's shard, so it spans
  all devices (no data moves, and each device holds a 1/accum_steps slice of the activations).
  With ``mesh`` the micro-batch axis is constrained to the mesh's batch axes.
  """
  batch_axes = None
  if mesh is not None:
    batch_axes = tuple(a for a in sharding.DATA_AXES if a in mesh.axis_names) or None

  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes)))
    return x

  return jax.tree.map(split, tree)


def per_platform(model, build: Callable[[Any], Callable]) -> Callable:
  """``build(model)`` (a gradient function), with the layer forms and attention implementation
  the model leaves open (None) chosen per platform at lowering time.

  They are chosen here, around the whole gradient, rather than in each layer: differentiating
  through a per-layer platform choice keeps (zero) residuals of the forms not taken, and under
  `scan` those are stacked per block. Same program, chosen at lowering time all the same.
  """
  if model.layers_impl is not None and model.attention_impl is not None:
    return build(model)
  impls = attention.platform_impls(model.attention_impl, jnp.dtype(model.dtype))

  def form(platform: str, layers: str) -> Callable:
    return build(model.clone(layers_impl=model.layers_impl or layers,
                             attention_impl=impls[platform]))

  branches = {"cpu": form("cpu", "cpu"), "tpu": form("tpu", "plain"),
              "cuda": form("cuda", "plain"), "default": form("default", "plain")}

  def grad_fn(*args):
    return jax.lax.platform_dependent(*args, **branches)

  return grad_fn


def accumulated_grads(grad_fn: Callable, params, inputs: tuple, drop_rng: jax.Array,
                      accum_steps: int, mesh: Mesh | None):
  """``grad_fn(params, *inputs, rng) -> ((loss, aux), grads)`` over the whole batch, or summed
  over ``accum_steps`` micro-batches (:func:`micro_batches`); loss, aux and grads are means."""
  if accum_steps == 1:
    return grad_fn(params, *inputs, drop_rng)
  micro = micro_batches(inputs, accum_steps, mesh)

  def body(carry, xs):
    i, mb = xs
    (l, aux), g = grad_fn(params, *mb, jax.random.fold_in(drop_rng, i))
    return jax.tree.map(jnp.add, carry, ((l, aux), g)), None

  (_, aux0), _ = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro), drop_rng)
  zeros = ((jnp.zeros((), jnp.float32), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0)),
           jax.tree.map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  return jax.tree.map(lambda x: x / accum_steps, total)


def apply_if_finite(state: TrainState, loss: jax.Array, grads, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update, unless the loss or the gradient is non-finite (then params and
  optimizer state stay as they were, and the skip is counted); the step's common metrics."""
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


def on_mesh(mesh: Mesh | None):
  """The context a step traces in: the mesh's abstract mesh, so logical constraints resolve."""
  return (jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None
          else contextlib.nullcontext())


def make_train_step(model: VideoMAEPretrain, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mask_cfg, norm_pix: bool = True,
                    accum_steps: int = 1, mesh: Mesh | None = None) -> Callable:
  """Builds the update step. Masks come from ``fold_in(rng, step)``, drawn for the whole batch
  (so gradient accumulation sees the same examples and masks as one big batch); normalisation
  of the uint8 video runs here, on the device. A non-finite loss or gradient leaves params and
  optimizer state untouched and is counted.

  ``accum_steps`` > 1 splits each device's shard of the batch into micro-batches
  (:func:`micro_batches`) and sums their gradients in a loop. ``mesh``: the mesh the step runs
  on; the model's activations and the micro-batches are then constrained to its batch axes
  (logical axis ``'batch'``).
  """
  dtype = jnp.dtype(model.dtype)

  def value_and_grad(m: VideoMAEPretrain) -> Callable:
    def loss_fn(params, video_u8, mask, dmask, drop_rng):
      video = normalize(video_u8, dtype)
      pred = m.apply({"params": params}, video, mask, dmask, train=True,
                     rngs={"dropout": drop_rng})
      # Targets from the uint8 pixels: exact [0, 1] values whatever the compute dtype.
      return losses.reconstruction_loss(video_u8, pred, mask, norm_pix,
                                        tubelet_size=m.tubelet_size,
                                        patch_size=m.patch_size, decoder_mask=dmask), {}
    return jax.value_and_grad(loss_fn, has_aux=True)

  grad_fn = per_platform(model, value_and_grad)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    with on_mesh(mesh):
      step_rng = jax.random.fold_in(rng, state.step)
      video = batch["video"]
      mask_rng, drop_rng = jax.random.split(step_rng)
      mask, dmask = draw_masks(mask_rng, video.shape[0], model, mask_cfg)
      (loss, _), grads = accumulated_grads(grad_fn, state.params, (video, mask, dmask),
                                           drop_rng, accum_steps, mesh)
      return apply_if_finite(state, loss, grads, tx, schedule)

  return train_step
