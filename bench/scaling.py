r"""Numbers to plan pre-training runs: FLOPs, parameter/optimizer/activation memory, step time.

Three parts:
1. ``table``: per size (S/B/L/H/g) and input (16x224, 32x224, 16x320, 32x320): tokens, exact
   train FLOPs per clip (v1 and with V2 decoder masking), parameters, and the bytes of params +
   AdamW moments + gradients (16 B/param in float32). Pure arithmetic.
2. ``activations``: temporary memory of the compiled train step from XLA's buffer assignment of
   ahead-of-time compiles on the CPU (no step is run) at batch 1 and 2, without and with block
   remat: the difference is the activation memory per clip, the rest (gradients, optimizer and
   scan temporaries) is fixed. Blocks run under ``scan`` in both, which is also what makes remat
   effective on XLA:CPU (its scheduler may hoist recomputation out of an unrolled backward).
3. ``measured``: CPU step time of a small model while frames, resolution and mask ratio vary,
   next to the FLOP count, to show the step time follows the FLOPs.
Plus ``--aot``: an ahead-of-time compile of the sharded step for a TPU topology
(``jax.experimental.topologies``, needs libtpu) or, without it, for N forced CPU devices with
the same mesh, printing the per-device shardings and memory.

  python bench/scaling.py                      # everything (about 8 minutes on 2 cores)
  python bench/scaling.py --skip-measure --activation-sizes vit_small,vit_base
  python bench/scaling.py --aot --aot-topology v5e:4x4 --aot-model vit_large --aot-fsdp 16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = ("vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")
INPUTS = ((16, 224), (32, 224), (16, 320), (32, 320))
GIB = 2**30


def _config(size: str, frames: int, res: int, **model):
  from videomae_jax.train import config as config_lib
  c = config_lib.base_config()
  c.model_name = size
  c.model.num_frames = frames
  c.model.img_size = res
  for k, v in model.items():
    c.model[k] = v
  c.batch_size = 1
  c.total_steps = 1000
  return c


def table() -> list[dict[str, Any]]:
  from videomae_jax import flops
  from videomae_jax.models import VideoMAEPretrain, preset
  rows = []
  for size in SIZES:
    for frames, res in INPUTS:
      fields = preset(size)
      p = fields.get("patch_size", 16)
      if res % p:  # ViT-g/14: the nearest multiple of its patch
        res = res // p * p
      m = VideoMAEPretrain(**fields, num_frames=frames, img_size=res)
      n_params = flops.param_counts(m)["total"]
      rows.append(dict(
          size=size, frames=frames, res=res, tokens=m.num_tokens,
          visible=flops.token_counts(m)["visible"], params_m=n_params / 1e6,
          train_gflop=flops.train_flops(m) / 1e9,
          train_gflop_v2=flops.train_flops(m, decoder_mask_ratio=0.5) / 1e9,
          state_gib=16 * n_params / GIB))
  return rows


def activation_bytes(size: str, frames: int, res: int, remat: bool, batch: int = 1,
                     **model: Any) -> dict[str, float]:
  """XLA buffer assignment of the train step, compiled ahead of time (nothing runs)."""
  import jax
  import jax.numpy as jnp
  from videomae_jax.train import config as config_lib
  from videomae_jax.train import optim, step as step_lib
  c = _config(size, frames, res, scan=True, remat=remat, **model)
  model = config_lib.build_model(c)
  tx, schedule = optim.make_optimizer(c, c.total_steps, 100)
  video = jax.ShapeDtypeStruct((batch, frames, res, res, 3), jnp.uint8)
  state = jax.eval_shape(step_lib.make_init_fn(model, tx, jax.random.key(0)))
  fn = step_lib.make_train_step(model, tx, schedule, mask_cfg=c.mask, norm_pix=c.norm_pix)
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, {"video": video},
                                                    jax.random.key(1)).compile()
  ma = compiled.memory_analysis()
  return dict(temp_gib=ma.temp_size_in_bytes / GIB, args_gib=ma.argument_size_in_bytes / GIB,
              compile_s=time.perf_counter() - t0)


def measure(size: str, frames: int, res: int, ratio: float, steps: int,
            **model: Any) -> dict[str, Any]:
  """CPU step time of the real train step (batch 1) for one input shape and mask ratio."""
  import statistics
  import numpy as np
  from bench.train_step import JaxSide
  from videomae_jax import flops
  from videomae_jax.train import config as config_lib
  c = _config(size, frames, res, **model)
  c.mask.ratio = ratio
  video = np.random.default_rng(0).integers(0, 256, (1, frames, res, res, 3), dtype=np.uint8)
  side = JaxSide(c, video)
  side.step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    side.step()
    times.append(time.perf_counter() - t0)
  model = config_lib.build_model(c)
  return dict(size=size, frames=frames, res=res, mask_ratio=ratio,
              step_s=statistics.median(times),
              train_gflop=flops.train_flops(model, ratio) / 1e9)


def aot_check(args) -> dict[str, Any]:
  """Compiles the sharded train step for a TPU topology, or for forced CPU devices.

  The program is ``train.program.build_train_program``'s, as in launch.pretrain; for the full
  TPU analysis (roofline, HBM against capacity) use ``python -m launch.compile``."""
  import jax
  from videomae_jax import aot
  from videomae_jax.train import config as config_lib
  from videomae_jax.train import program as program_lib, sharding
  devices, target = None, None
  try:
    devices, target = aot.topology_devices(args.aot_topology), f"TPU {args.aot_topology}"
  except aot.AotUnavailableError as e:  # no libtpu here: same mesh over forced CPU devices
    print(f"{e}; compiling for {jax.device_count()} CPU devices", flush=True)
    devices, target = jax.devices(), f"{jax.device_count()} CPU devices"
  fsdp = args.aot_fsdp
  c = _config(args.aot_model, 16, 224, dtype=args.aot_dtype, remat=args.aot_remat,
              scan=True)
  c.batch_size = args.aot_batch
  c.mesh.fsdp = fsdp
  model = config_lib.build_model(c)
  mesh = sharding.make_mesh(len(devices) // fsdp, fsdp, devices)
  program = program_lib.build_train_program(c, model, mesh, total_steps=c.total_steps,
                                            steps_per_epoch=100, init_rng=jax.random.key(0))
  state_sh = program.state_shardings
  t0 = time.perf_counter()
  compiled = program.lower().compile()
  ma = compiled.memory_analysis()
  specs = {}
  for path, s in jax.tree_util.tree_flatten_with_path(state_sh.params)[0][:6]:
    specs["/".join(str(getattr(k, "key", k)) for k in path)] = str(s.spec)
  out = dict(target=target, model=args.aot_model, mesh=dict(mesh.shape), batch=c.batch_size,
             dtype=args.aot_dtype, remat=args.aot_remat, compile_s=time.perf_counter() - t0,
             per_device_gib=dict(arguments=ma.argument_size_in_bytes / GIB,
                                 outputs=ma.output_size_in_bytes / GIB,
                                 aliased=ma.alias_size_in_bytes / GIB,
                                 temp=ma.temp_size_in_bytes / GIB),
             example_param_specs=specs)
  print(json.dumps(out, indent=1), flush=True)
  return out


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
  p.add_argument("--activation-sizes", default="vit_small,vit_base,vit_large,vit_huge,vit_giant")
  p.add_argument("--skip-activations", action="store_true")
  p.add_argument("--skip-measure", action="store_true")
  p.add_argument("--measure-size", default="vit_small")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--aot", action="store_true", help="only the ahead-of-time sharded compile")
  p.add_argument("--aot-topology", default="v5e:2x4")
  p.add_argument("--aot-devices", type=int, default=8, help="forced CPU devices without libtpu")
  p.add_argument("--aot-model", default="vit_large")
  p.add_argument("--aot-fsdp", type=int, default=8)
  p.add_argument("--aot-batch", type=int, default=32)
  p.add_argument("--aot-dtype", default="bfloat16")
  p.add_argument("--aot-remat", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--aot-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  if args.aot_child:
    return aot_check(args)
  if args.aot:
    # A fresh interpreter: the forced CPU device count must be set before JAX starts.
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               TPU_ACCELERATOR_TYPE=os.environ.get("TPU_ACCELERATOR_TYPE", ""),
               ALLOW_MULTIPLE_LIBTPU_LOAD=os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={args.aot_devices}"))
    cmd = [sys.executable, os.path.abspath(__file__), "--aot-child"] + [
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--aot"]
    subprocess.run(cmd, check=True, env=env)
    return {}

  out: dict[str, Any] = {"table": table()}
  print("| size | input | tokens (visible) | params | train GFLOP/clip | with V2 decoder "
        "masking | params+AdamW+grads |")
  print("|---|---|---|---|---|---|---|")
  for r in out["table"]:
    print(f"| {r['size']} | {r['frames']}x{r['res']} | {r['tokens']} ({r['visible']}) | "
          f"{r['params_m']:.1f}M | {r['train_gflop']:.0f} | {r['train_gflop_v2']:.0f} | "
          f"{r['state_gib']:.2f} GiB |", flush=True)

  if args.tiny:
    act_sizes, act_inputs = ["vit_small"], [(4, 32)]
    grid = [("vit_small", 4, 32, 0.9), ("vit_small", 4, 48, 0.9), ("vit_small", 8, 32, 0.9),
            ("vit_small", 4, 32, 0.75)]
    steps, model_kw = 1, dict(depth=1, decoder_depth=1)
  else:
    act_sizes, act_inputs = args.activation_sizes.split(","), [(16, 224)]
    s = args.measure_size
    grid = ([(s, f, 112, 0.9) for f in (4, 8, 16)] + [(s, 8, r, 0.9) for r in (64, 160)]
            + [(s, 8, 112, r) for r in (0.5, 0.75)])
    steps, model_kw = args.steps, {}
  out["activations"] = []
  if not args.skip_activations:
    print("\n| size | input | activations per clip | with remat | other temporaries | with "
          "remat |\n|---|---|---|---|---|---|")
    for size in act_sizes:
      for frames, res in act_inputs:
        row = dict(size=size, frames=frames, res=res)
        for remat in (False, True):
          # Temporaries at batch 1 and 2: the difference is what one more clip costs; the rest
          # (gradients, optimizer and scan temporaries) does not grow with the batch.
          t1, t2 = (activation_bytes(size, frames, res, remat, b, **model_kw)["temp_gib"]
                    for b in (1, 2))
          key = "remat" if remat else "plain"
          row[f"per_clip_gib_{key}"] = t2 - t1
          row[f"fixed_gib_{key}"] = 2 * t1 - t2
        out["activations"].append(row)
        print(f"| {size} | {frames}x{res} | {row['per_clip_gib_plain']:.2f} GiB | "
              f"{row['per_clip_gib_remat']:.2f} GiB | {row['fixed_gib_plain']:.2f} GiB | "
              f"{row['fixed_gib_remat']:.2f} GiB |", flush=True)
  out["measured"] = []
  if not args.skip_measure:
    print(f"\nload avg {os.getloadavg()[0]:.2f}\n| size | frames x res | mask | step s | "
          "train GFLOP/clip | GFLOP/s |\n|---|---|---|---|---|---|")
    for size, frames, res, ratio in grid:
      m = measure(size, frames, res, ratio, steps, **model_kw)
      out["measured"].append(m)
      print(f"| {size} | {frames}x{res} | {ratio} | {m['step_s']:.3f} | {m['train_gflop']:.1f} | "
            f"{m['train_gflop'] / m['step_s']:.1f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
