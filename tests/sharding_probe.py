"""Multi-device probes for tests/test_sharding.py, run in a subprocess with simulated CPU
devices (XLA_FLAGS must be set before jax starts): ``python -m tests.sharding_probe CASE``
prints one JSON line."""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from videomae_jax.train import config as config_lib
from videomae_jax.train import optim, sharding, step as step_lib


def tiny_config(batch: int, accum: int = 1, data: int = 8, fsdp: int = 1):
  c = config_lib.base_config()
  c.model_name = "vit_small"
  c.model.update(img_size=64, patch_size=8, num_frames=8, embed_dim=64, depth=2, num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
  c.mask.ratio = 0.75
  c.batch_size = batch
  c.optim.accum_steps = accum
  c.optim.warmup_steps = 1
  c.optim.base_lr = 1e-2
  c.mesh.data, c.mesh.fsdp = data, fsdp
  return c


def _program(config, mesh, accum):
  model = config_lib.build_model(config)
  tx, schedule = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
  init = step_lib.make_init_fn(model, tx, jax.random.key(0))
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules, tx)
  fn = step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask, accum_steps=accum,
                                mesh=mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sh = {"video": sharding.batch_sharding(mesh)}
  step = jax.jit(fn, in_shardings=(state_sh, batch_sh, replicated),
                 out_shardings=(state_sh, replicated))
  state = jax.jit(init, out_shardings=state_sh)()
  return model, step, state, batch_sh


def accumulation() -> dict:
  """Temporaries and the float32 loss trajectory of accum 1 vs 4 on a data=8 mesh."""
  batch = 32
  out = {}
  for accum in (1, 4):
    config = tiny_config(batch, accum)
    mesh = sharding.make_mesh(8, 1)
    model, step, state, batch_sh = _program(config, mesh, accum)
    rng = jax.random.key(1)
    videos = [jax.random.randint(jax.random.key(10 + i), (batch, model.num_frames,
                                                          *model.image_hw, 3), 0, 256,
                                 jnp.int32).astype(jnp.uint8) for i in range(3)]
    videos = [jax.device_put(v, batch_sh["video"]) for v in videos]
    compiled = step.lower(state, {"video": videos[0]}, rng).compile()
    hlo = compiled.as_text()
    losses = []
    for v in videos:
      state, m = step(state, {"video": v}, rng)
      losses.append(float(m["loss"]))
    out[accum] = {"temp": int(compiled.memory_analysis().temp_size_in_bytes), "losses": losses,
                  "all_gathers_of_video": hlo.count("all-gather")}
  return out


def moments() -> dict:
  """Param and Adam moment specs under FSDP, with rules that name only params."""
  config = tiny_config(8, data=2, fsdp=4)
  config.sharding_rules = ((r"params/.*", "fsdp"),)
  mesh = sharding.make_mesh(2, 4)
  model = config_lib.build_model(config)
  tx, _ = optim.make_optimizer(config, total_steps=10, steps_per_epoch=10)
  abstract = jax.eval_shape(step_lib.make_init_fn(model, tx, jax.random.key(0)))
  state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules, tx)
  params = {sharding.path_name(p): str(s.spec)
            for p, s in jax.tree_util.tree_flatten_with_path(state_sh.params)[0]}
  opt = {sharding.path_name(p): str(s.spec)
         for p, s in jax.tree_util.tree_flatten_with_path(state_sh.opt_state)[0]}
  state = jax.jit(step_lib.make_init_fn(model, tx, jax.random.key(0)),
                  out_shardings=state_sh)()
  actual = {sharding.path_name(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  return {"params": params, "opt": opt, "actual_opt": actual}


if __name__ == "__main__":
  print(json.dumps({"accumulation": accumulation, "moments": moments}[sys.argv[1]]()))
