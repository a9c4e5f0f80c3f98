"""The pre-training program: model, optimizer, shardings and the jitted step, built once.

``launch.pretrain`` runs it and ``launch.compile`` compiles it ahead of time for a TPU
topology, so both see exactly the same program: the same optimizer, the same state and batch
shardings over the mesh, the same donation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videomae_jax.models import VideoMAEPretrain
from videomae_jax.train import optim, sharding, step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """Everything the loop needs to create the state and run the step."""
  model: VideoMAEPretrain
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[], step_lib.TrainState]  # jit with out_shardings=state_shardings
  abstract_state: Any          # TrainState of ShapeDtypeStruct (no shardings)
  state_shardings: Any         # TrainState of NamedSharding
  batch_shardings: dict[str, NamedSharding]
  replicated: NamedSharding
  step: Any                    # jitted (state, batch, rng) -> (state, metrics), state donated
  global_batch: int

  def abstract_inputs(self) -> tuple[Any, dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """(state, batch, rng) as ShapeDtypeStructs carrying their shardings: what ``step.lower``
    takes to compile without any array (e.g. for devices of a TPU topology description)."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         self.abstract_state, self.state_shardings)
    m = self.model
    video = jax.ShapeDtypeStruct((self.global_batch, m.num_frames, *m.image_hw, m.in_chans),
                                 jnp.uint8, sharding=self.batch_shardings["video"])
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    return state, {"video": video}, rng

  def lower(self):
    """The step lowered for the abstract inputs (``.compile()`` it for memory and cost)."""
    return self.step.lower(*self.abstract_inputs())


def build_train_program(config, model: VideoMAEPretrain, mesh: Mesh, *, total_steps: int,
                        steps_per_epoch: int, init_rng: jax.Array) -> TrainProgram:
  """Builds the optimizer, the sharded state plan and the jitted step for ``config``.

  ``total_steps`` and ``steps_per_epoch`` only shape the learning-rate schedule; ``init_rng``
  draws the initial params when ``init_state`` runs.
  """
  tx, schedule = optim.make_optimizer(config, total_steps, steps_per_epoch)
  init_state = step_lib.make_init_fn(model, tx, init_rng)
  abstract = jax.eval_shape(init_state)
  state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules, tx)
  train_step = step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask,
                                        norm_pix=config.norm_pix,
                                        accum_steps=int(config.optim.accum_steps),
                                        mesh=mesh)
  replicated = NamedSharding(mesh, P())
  batch_sh = {"video": sharding.batch_sharding(mesh)}
  p_step = jax.jit(train_step, in_shardings=(state_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
  return TrainProgram(model=model, mesh=mesh, tx=tx, schedule=schedule, init_state=init_state,
                      abstract_state=abstract, state_shardings=state_sh,
                      batch_shardings=batch_sh, replicated=replicated, step=p_step,
                      global_batch=int(config.batch_size))
