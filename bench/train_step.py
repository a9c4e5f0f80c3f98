r"""Pre-training step throughput: videomae-jax vs HF transformers VideoMAE (PyTorch), one process.

Both sides run the whole step on the same uint8 clips: mask drawing, ImageNet normalisation,
forward, norm-pix MSE loss, backward and an AdamW update (betas 0.9/0.95, weight decay 0.05 on
kernels only). videomae-jax runs the trainer's own step (``train.step.make_train_step`` on a
config from ``train.config.base_config()``), jitted with the state donated. PyTorch runs
``VideoMAEForPreTraining`` with SDPA attention and ``torch.set_num_threads(cores)``, masks drawn
per clip with numpy as the reference's ``TubeMaskingGenerator`` does, and ``AdamW(foreach=True)``.

Timing: after warm-up (compilation excluded), the two frameworks alternate step by step so that
drift of a shared machine hits both alike; the median of ``--steps`` steps is reported.

FLOPs: ``videomae_jax.flops.train_flops`` (exact matmul count; the same model math on both
sides). GFLOP/s = clips/s x FLOPs per clip.

Peak memory ("live bytes"): the most bytes held by live tensors during one step, state included.
JAX: XLA's buffer assignment of the compiled step (arguments + outputs - donated aliases +
temporaries), the memory the step needs on any backend. PyTorch: parameters + AdamW state, plus
the high-water mark of the CPU allocator's allocations during one step traced by
``torch.profiler`` (gradients are freed between steps, ``zero_grad(set_to_none=True)``).
Allocator caches and framework runtime are not counted on either side.

  python bench/train_step.py                                # ViT-S/B, batch 1 and 2, v1 and v2
  python bench/train_step.py --sizes vit_small --batches 2 --dtype bfloat16
  python bench/train_step.py --sizes vit_base --batches 2 --decoder-masking run_cell --no-hf
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from videomae_jax import flops as flops_lib  # noqa: E402
from videomae_jax.models import layers  # noqa: E402
from videomae_jax.train import config as config_lib  # noqa: E402
from videomae_jax.train import optim, step as step_lib  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


@dataclasses.dataclass
class Case:
  size: str
  batch: int


def _parse_value(v: str) -> Any:
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {"true": True, "false": False, "null": None}.get(v.lower(), v)


def make_config(args, case: Case, decoder_masking: str = "none", variant: str = ""):
  """The trainer's config for one case: base recipe + size, input, mask and perf knobs."""
  c = config_lib.base_config()
  c.model_name = case.size
  c.model.num_frames = args.frames
  c.model.img_size = args.img_size
  c.model.dtype = args.dtype
  c.model.remat = args.remat
  c.model.scan = args.scan
  if args.attention_impl:
    c.model.attention_impl = args.attention_impl
  for kv in filter(None, ",".join([args.model_override or "", variant]).split(",")):
    k, v = kv.split("=")
    c.model[k] = _parse_value(v)
  c.mask.ratio = args.mask_ratio
  c.mask.decoder_type = decoder_masking
  c.batch_size = case.batch
  c.total_steps = 10_000
  c.optim.warmup_steps = 100
  return c


# ---- videomae-jax -----------------------------------------------------------------------------

class JaxSide:
  """The trainer's jitted step with its state; ``step()`` runs one update and waits for it."""

  def __init__(self, config, video_u8: np.ndarray, seed: int = 0):
    model = config_lib.build_model(config)
    self.model = model
    tx, schedule = optim.make_optimizer(config, config.total_steps, 100)
    self.state = jax.jit(step_lib.make_init_fn(model, tx, jax.random.key(seed)))()
    fn = step_lib.make_train_step(model, tx, schedule, mask_cfg=config.mask,
                                  norm_pix=config.norm_pix)
    self.batch = {"video": jax.device_put(video_u8)}
    self.rng = jax.random.key(seed + 1)
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=(0,)).lower(self.state, self.batch, self.rng)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.param_count = sum(x.size for x in jax.tree.leaves(self.state.params))

  def step(self) -> float:
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    return float(metrics["loss"])  # blocks until the step is done

  def xla_flops(self) -> float:
    ca = self.compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))

  def peak_bytes(self) -> int | None:
    ma = self.compiled.memory_analysis()
    if ma is None:
      return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes)


# ---- HF transformers (PyTorch) ----------------------------------------------------------------

class TorchSide:
  """HF ``VideoMAEForPreTraining`` with the same size, masks drawn per clip with numpy."""

  def __init__(self, model_fields: dict[str, Any], config, video_u8: np.ndarray, threads: int,
               autocast: str | None = None, seed: int = 0):
    import torch
    from transformers import VideoMAEConfig, VideoMAEForPreTraining
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    f = model_fields
    d, dd = f["embed_dim"], f["decoder_embed_dim"]
    hf_cfg = VideoMAEConfig(
        image_size=f.get("img_size", 224), patch_size=f.get("patch_size", 16),
        num_frames=f["num_frames"], tubelet_size=f["tubelet_size"], hidden_size=d,
        num_hidden_layers=f["depth"], num_attention_heads=f["num_heads"],
        intermediate_size=int(d * f.get("mlp_ratio", 4.0)), decoder_hidden_size=dd,
        decoder_num_hidden_layers=f["decoder_depth"],
        decoder_num_attention_heads=f["decoder_num_heads"],
        decoder_intermediate_size=int(dd * f.get("mlp_ratio", 4.0)),
        layer_norm_eps=f.get("layer_norm_eps", 1e-6), norm_pix_loss=config.norm_pix,
        use_mean_pooling=False)
    hf_cfg._attn_implementation = "sdpa"
    self.torch = torch
    self.model = VideoMAEForPreTraining(hf_cfg).train()
    o = config.optim
    decay = [p for n, p in self.model.named_parameters() if p.ndim > 1 and "mask_token" not in n]
    no_decay = [p for n, p in self.model.named_parameters()
                if not (p.ndim > 1 and "mask_token" not in n)]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=optim.scaled_lr(o.base_lr, config.batch_size),
                                 betas=(o.b1, o.b2), eps=o.eps, foreach=True)
    # The reference's loader hands (C, T, H, W) clips; HF takes (B, T, C, H, W).
    self.video = torch.from_numpy(np.ascontiguousarray(video_u8.transpose(0, 1, 4, 2, 3)))
    self.mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    self.std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    t, h, w = (f["num_frames"] // f["tubelet_size"],
               f.get("img_size", 224) // f.get("patch_size", 16),
               f.get("img_size", 224) // f.get("patch_size", 16))
    self.grid = (t, h * w)
    self.num_masked = int(config.mask.ratio * h * w)
    self.np_rng = np.random.default_rng(seed)
    self.autocast = autocast
    self.param_count = sum(p.numel() for p in self.model.parameters())

  def _masks(self):
    """The reference's TubeMaskingGenerator: one shuffled spatial mask per clip, tiled in time."""
    t, hw = self.grid
    out = np.empty((self.video.shape[0], t * hw), bool)
    for i in range(out.shape[0]):
      m = np.hstack([np.zeros(hw - self.num_masked), np.ones(self.num_masked)])
      self.np_rng.shuffle(m)
      out[i] = np.tile(m, (t, 1)).reshape(-1)
    return self.torch.from_numpy(out)

  def step(self) -> float:
    torch = self.torch
    masks = self._masks()
    x = (self.video.float() / 255.0 - self.mean) / self.std
    self.opt.zero_grad(set_to_none=True)
    if self.autocast:
      with torch.autocast("cpu", dtype=getattr(torch, self.autocast)):
        loss = self.model(pixel_values=x, bool_masked_pos=masks).loss
    else:
      loss = self.model(pixel_values=x, bool_masked_pos=masks).loss
    loss.backward()
    self.opt.step()
    return float(loss.detach())

  def state_bytes(self) -> int:
    """Parameters + AdamW moments (gradients are freed between steps)."""
    n = sum(p.numel() * p.element_size() for p in self.model.parameters())
    return n + sum(v.numel() * v.element_size() for s in self.opt.state.values()
                   for v in s.values() if self.torch.is_tensor(v))


# ---- peak memory of the PyTorch step ----------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes_rss(side, state_bytes: Callable[[], int]) -> int:
  """State + the resident-set high-water mark above the state over one step.

  glibc is told to serve every block of 256 KiB or more with its own mmap and to give freed
  memory back at once, so that resident memory follows the live buffers; VmHWM is reset just
  before the step. Run in a fresh process: the allocator setting would slow later timed steps.
  """
  import ctypes
  libc = ctypes.CDLL("libc.so.6")
  libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
  libc.mallopt(_M_TRIM_THRESHOLD, 0)
  side.step()
  side.step()
  if hasattr(side, "opt"):
    side.opt.zero_grad(set_to_none=True)  # the step's own gradients count as its memory
  libc.malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  base = _rss_kib("VmRSS")
  side.step()
  # The state is counted after the steps: AdamW moments appear at the first one.
  return state_bytes() + (_rss_kib("VmHWM") - base) * 1024


def memory_in_child(args, case: Case, framework: str, variant: str = "",
                    decoder_masking: str = "none") -> float:
  """Runs ``peak_bytes_rss`` for one side in a fresh interpreter; returns MiB."""
  import subprocess
  cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", framework, "--sizes",
         case.size, "--batches", str(case.batch), "--frames", str(args.frames), "--img-size",
         str(args.img_size), "--mask-ratio", str(args.mask_ratio), "--threads", str(args.threads),
         "--model-override", ",".join(filter(None, [args.model_override, variant])),
         "--decoder-masking", decoder_masking, "--dtype", args.dtype]
  if args.attention_impl:
    cmd += ["--attention-impl", args.attention_impl]
  if args.remat:
    cmd += ["--remat"]
  if args.scan:
    cmd += ["--scan"]
  if args.hf_autocast:
    cmd += ["--hf-autocast", args.hf_autocast]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return float(out.strip().splitlines()[-1])


def memory_child(args) -> None:
  case = Case(args.sizes, int(args.batches))
  video = np.random.default_rng(0).integers(
      0, 256, (case.batch, args.frames, args.img_size, args.img_size, 3), dtype=np.uint8)
  config = make_config(args, case, args.decoder_masking)
  if args.memory_child == "hf":
    fields = {**config_lib.model_fields(config), "num_frames": args.frames,
              "img_size": args.img_size}
    side = TorchSide(fields, config, video, args.threads, args.hf_autocast)
    state = side.state_bytes
  else:
    side = JaxSide(config, video)
    state = lambda: sum(x.nbytes for x in jax.tree.leaves(side.state))
  print(peak_bytes_rss(side, state) / 2**20)


# ---- driver -----------------------------------------------------------------------------------

def timed(fn: Callable[[], float]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def run_case(args, case: Case) -> dict[str, Any]:
  """Times HF and one JAX step per (variant, decoder masking), all alternating in one loop."""
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (case.batch, args.frames, args.img_size, args.img_size, 3),
                       dtype=np.uint8)
  dms = ["none", "run_cell"] if args.decoder_masking == "both" else [args.decoder_masking]
  variants = [v.strip() for v in args.variants.split(";")] if args.variants else [""]
  sides: dict[str, Any] = {}
  res: dict[str, Any] = dict(size=case.size, batch=case.batch, frames=args.frames,
                             img_size=args.img_size, mask_ratio=args.mask_ratio, jax={})
  for variant in variants:
    for dm in dms:
      config = make_config(args, case, dm, variant)
      model = config_lib.build_model(config)
      dec_ratio = config.mask.decoder_ratio if dm == "run_cell" else None
      jx = JaxSide(config, video)
      label = f"{variant}|{dm}" if variant else dm
      sides[label] = jx
      res["jax"][label] = dict(
          variant=variant, decoder_masking=dm, dtype=config.model.dtype,
          attention_impl=str(layers.resolve_attention_impl(model.attention_impl, model.dtype)),
          attention_remat=model.attention_remat, params=jx.param_count,
          train_gflop_per_clip=flops_lib.train_flops(
              model, config.mask.ratio, dec_ratio, config.mask.type) / 1e9,
          train_gflop_per_clip_with_recompute=flops_lib.train_flops(
              model, config.mask.ratio, dec_ratio, config.mask.type, recompute=True) / 1e9,
          xla_gflop_per_clip=jx.xla_flops() / case.batch / 1e9, compile_s=jx.compile_s,
          xla_peak_mib=(jx.peak_bytes() or float("nan")) / 2**20)
  if not args.no_hf:
    config = make_config(args, case)
    fields = {**config_lib.model_fields(config), "num_frames": args.frames,
              "img_size": args.img_size}
    hf = TorchSide(fields, config, video, args.threads, args.hf_autocast)
    first = next(iter(sides.values()))
    if hf.param_count != first.param_count:
      raise RuntimeError(f"parameter counts differ: HF {hf.param_count}, JAX "
                         f"{first.param_count}")
    sides["hf"] = hf
    res["hf"] = dict(train_gflop_per_clip=flops_lib.train_flops(
        config_lib.build_model(config), config.mask.ratio, None, config.mask.type) / 1e9,
                     autocast=args.hf_autocast)
  for _ in range(args.warmup):
    for s in sides.values():
      s.step()
  times: dict[str, list[float]] = {k: [] for k in sides}
  for _ in range(args.steps):
    for k, s in sides.items():  # alternate so that machine drift cancels in the ratios
      times[k].append(timed(s.step))
  for k in sides:
    med = statistics.median(times[k])
    r = res["hf"] if k == "hf" else res["jax"][k]
    r.update(step_s=med, step_s_all=[round(t, 4) for t in times[k]],
             clips_s=case.batch / med, gflops=case.batch * r["train_gflop_per_clip"] / med)
  if "hf" in res:
    for r in res["jax"].values():
      r["ratio"] = r["clips_s"] / res["hf"]["clips_s"]
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    # Accelerators: the allocator's high-water mark of this process so far (every side and
    # case before this one included; run one case per process to read it per step).
    res["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  sides.clear()  # free every state before the memory children start
  if args.memory:
    for label, r in res["jax"].items():
      # XLA's buffer assignment is what the step holds (one preallocated slab for the
      # temporaries); --jax-rss measures the resident set instead, as for PyTorch.
      r["peak_mib"] = (memory_in_child(args, case, "jax", r["variant"], r["decoder_masking"])
                       if args.jax_rss else r["xla_peak_mib"])
    if "hf" in res:
      res["hf"]["peak_mib"] = memory_in_child(args, case, "hf")
  return res


def print_table(rows: list[dict[str, Any]]) -> None:
  hf = any("hf" in r for r in rows)
  head = ["size", "batch", "jax variant", "GFLOP/clip", "jax clips/s", "jax GFLOP/s",
          "jax peak MiB"]
  if hf:
    head += ["hf clips/s", "hf GFLOP/s", "hf peak MiB", "jax/hf"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    for label, j in r["jax"].items():
      cells = [r["size"], str(r["batch"]), label, f"{j['train_gflop_per_clip']:.1f}",
               f"{j['clips_s']:.3f}", f"{j['gflops']:.1f}", f"{j.get('peak_mib', float('nan')):.0f}"]
      if hf:
        h = r["hf"]
        cells += [f"{h['clips_s']:.3f}", f"{h['gflops']:.1f}",
                  f"{h.get('peak_mib', float('nan')):.0f}", f"{j['ratio']:.2f}x"]
      print("| " + " | ".join(cells) + " |")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="vit_small,vit_base", help="comma-separated model presets")
  p.add_argument("--batches", default="1,2")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--img-size", type=int, default=224)
  p.add_argument("--mask-ratio", type=float, default=0.9)
  p.add_argument("--decoder-masking", default="both", choices=["none", "run_cell", "both"],
                 help="VideoMAE V2 decoder masking on the JAX side (the HF model has none)")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                 help="JAX compute dtype (params, LayerNorm, softmax and loss stay float32); "
                      "bfloat16 is the mixed precision of the reference's recipes")
  p.add_argument("--attention-impl", default=None,
                 help="model attention_impl (default: resolved per backend)")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--model-override", default="",
                 help="extra config.model fields, e.g. depth=2,embed_dim=64 (tiny runs)")
  p.add_argument("--hf-autocast", default=None, choices=[None, "bfloat16"],
                 help="run the PyTorch forward under torch.autocast")
  p.add_argument("--no-hf", action="store_true", help="time videomae-jax only")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=num_cores())
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--variants", default="",
                 help="';'-separated config.model overrides timed side by side, e.g. "
                      "'attention_impl=xla;attention_impl=einsum'")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                 help="measure peak memory (one fresh process per side)")
  p.add_argument("--jax-rss", action="store_true",
                 help="measure JAX peak memory as resident set too (a fresh process per side)")
  p.add_argument("--memory-child", choices=["jax", "hf"], help=argparse.SUPPRESS)
  return p.parse_args(argv)



def main(argv=None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.memory_child:
    memory_child(args)
    return []
  print(f"jax {jax.__version__} ({jax.default_backend()}), {args.threads} threads, "
        f"{args.frames}x{args.img_size}x{args.img_size}, mask {args.mask_ratio}, "
        f"dtype {args.dtype}, load avg {os.getloadavg()[0]:.2f}", flush=True)
  rows = []
  for size in args.sizes.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      r = run_case(args, Case(size, batch))
      print(json.dumps(r), flush=True)
      rows.append(r)
  print(f"load avg at end {os.getloadavg()[0]:.2f}")
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
