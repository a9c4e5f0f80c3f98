"""Ahead-of-time analysis of the pre-training step for a TPU topology, on any host.

With libtpu installed (``pip install -e '.[tpu]'``), ``jax.experimental.topologies`` describes a
TPU slice (e.g. ``v5e:2x2``) without any TPU attached; the train program of
``train.program.build_train_program`` is lowered on ShapeDtypeStructs sharded over those
devices and compiled by the real TPU compiler. XLA's own analyses of that executable give:

- HBM per chip (``memory_analysis``): arguments, outputs, temporaries, generated code; outputs
  that alias donated arguments (the train state, updated in place) are counted once.
- FLOPs and bytes per step (``cost_analysis``). For an SPMD program both analyses describe the
  partitioned per-device program, i.e. one chip (checked: the same program over 1 and 4 chips
  at 4x the global batch reports the same FLOPs).
- XLA counts a while-loop body once: with blocks under ``scan`` or gradient accumulation the
  FLOPs and bytes cover one iteration (flagged as ``loops_counted_once``); the roofline needs
  the unrolled step (``scan=False``, ``accum_steps=1``). Memory is exact either way.
- The roofline step time: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth). Collectives
  (ICI) and latency are not in it, so it is a lower bound on the step time and an upper bound
  on MFU. MFU uses model FLOPs (``videomae_jax.flops``: matmuls, no recomputation), not XLA's.
- XLA's "bytes accessed" also counts on-chip VMEM traffic (prefetch copies and the operands
  they feed, :mod:`videomae_jax.hbm_traffic`), so a second roofline uses the HBM traffic: those
  bytes less their on-chip part, an upper bound on what the program reads and writes in HBM.

Used by ``launch/compile.py`` and ``bench/aot_table.py``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

GIB = 2**30

# Per chip: HBM capacity (bytes) and bandwidth (B/s). Keyed like the peak table in
# train.metrics (JAX device_kind; the longest matching name wins).
_HBM: dict[str, tuple[int, float]] = {
    "TPU v4": (32 * GIB, 1.2e12),
    "TPU v5 lite": (16 * GIB, 819e9), "TPU v5e": (16 * GIB, 819e9),
    "TPU v5": (95 * GIB, 2.76e12), "TPU v5p": (95 * GIB, 2.76e12),
    "TPU v6 lite": (32 * GIB, 1.64e12), "TPU v6e": (32 * GIB, 1.64e12),
}

# XLA:TPU reports a program that does not fit as a compile error with one of these.
_OOM_PATTERNS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "exceeded hbm capacity",
                 "Exceeded hbm capacity")


class AotUnavailableError(RuntimeError):
  """libtpu cannot be loaded here, or the topology name is not known to it."""


class OutOfMemoryError(RuntimeError):
  """The step does not fit in one chip's HBM; ``analysis`` holds XLA's numbers when the
  compiler produced a program (None when it refused to)."""

  def __init__(self, message: str, analysis: "Analysis | None" = None):
    super().__init__(message)
    self.analysis = analysis


def _lookup(kind: str, table: dict[str, Any]) -> Any:
  matches = [name for name in table
             if kind == name or kind.startswith(name + " ") or kind.startswith(name + "-")]
  return table[max(matches, key=len)] if matches else None


def hbm_spec(device_kind: str) -> tuple[int, float]:
  """(HBM bytes, HBM bytes/s) of one chip of ``device_kind``."""
  spec = _lookup(device_kind, _HBM)
  if spec is None:
    raise KeyError(f"no HBM capacity/bandwidth known for device kind {device_kind!r}; known: "
                   f"{', '.join(_HBM)}")
  return spec


def quiet_libtpu_env() -> None:
  """Environment for using libtpu on a host without TPUs, set before jax starts: no TPU
  metadata lookups, the CPU as the default backend, and no exclusive libtpu lock (so that a
  compile does not fail while another process has libtpu loaded)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str) -> list:
  """The abstract devices of a TPU slice, e.g. ``v5e:2x2``, ``v4:2x2x1``, ``v5p:4x4x4``."""
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # noqa: BLE001 - libtpu missing, unloadable, or a bad name
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise AotUnavailableError(
        f"--topology={topology}: no TPU topology ({type(e).__name__}: {first}). Install "
        "libtpu with `pip install -e '.[tpu]'`; names look like v5e:2x2, v4:2x2x1, "
        "v5p:4x4x4, v6e:2x2") from e
  return list(topo.devices)


def libtpu_unavailable_reason() -> str | None:
  """None when libtpu can describe a TPU topology here; otherwise why not."""
  try:
    topology_devices("v5e:2x2")
  except AotUnavailableError as e:
    return str(e)
  return None


def roofline(xla_flops: float, xla_bytes: float, model_flops: float, clips_per_chip: float,
             peak_flops: float, hbm_bandwidth: float) -> dict[str, Any]:
  """Roofline of one chip's step: time, bound, MFU bound (model FLOPs) and clips/s bound."""
  compute_s = xla_flops / peak_flops
  memory_s = xla_bytes / hbm_bandwidth
  step_s = max(compute_s, memory_s)
  return dict(
      compute_s=compute_s, memory_s=memory_s, step_s=step_s,
      bound="compute" if compute_s >= memory_s else "memory",
      # Model FLOPs over the roofline time: the best MFU this program can reach.
      mfu_bound=model_flops / peak_flops / step_s,
      # XLA's FLOPs (recomputation and elementwise work included) over the same time.
      xla_flops_utilization_bound=compute_s / step_s,
      clips_per_s_per_chip=clips_per_chip / step_s,
      arithmetic_intensity=xla_flops / max(xla_bytes, 1.0),
      ridge_intensity=peak_flops / hbm_bandwidth)


@dataclasses.dataclass
class Analysis:
  """The numbers of one compiled step, per chip. ``as_dict()`` is what ``--json`` writes."""
  config: str
  topology: str
  device_kind: str
  num_chips: int
  mesh: dict[str, int]
  global_batch: int
  clips_per_chip: float
  model: dict[str, Any]
  hbm: dict[str, int]
  hbm_capacity: int
  xla_flops: float
  xla_bytes: float
  model_flops_per_clip: float
  peak_flops: float
  hbm_bandwidth: float
  compile_s: float
  # Blocks under scan or gradient accumulation: XLA's cost analysis counts a while-loop body
  # once, so FLOPs, bytes and the roofline cover one iteration (memory is exact).
  loops_counted_once: bool = False
  # JAX devices per chip (v4 topologies: 2 TensorCores); every per-chip number above is then
  # per device, against that device's share of the chip (HBM, FLOP/s, bandwidth).
  devices_per_chip: int = 1
  # xla_bytes less its on-chip (VMEM) part, from the executable's HLO (hbm_traffic module);
  # None when not measured.
  hbm_traffic_bytes: float | None = None

  @property
  def model_flops(self) -> float:
    """Model FLOPs of one chip's share of the step."""
    return self.model_flops_per_clip * self.clips_per_chip

  def roofline(self, hbm_traffic: bool = False) -> dict[str, Any]:
    """The roofline with XLA's bytes accessed, or with ``hbm_traffic`` the HBM traffic."""
    nbytes = self.hbm_traffic_bytes if hbm_traffic else self.xla_bytes
    return roofline(self.xla_flops, nbytes, self.model_flops, self.clips_per_chip,
                    self.peak_flops, self.hbm_bandwidth)

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["hbm_fraction"] = self.hbm["total"] / self.hbm_capacity
    out["model_flops"] = self.model_flops
    out["xla_over_model_flops"] = self.xla_flops / self.model_flops if self.model_flops else None
    out["roofline"] = self.roofline()
    out["roofline_hbm_traffic"] = (self.roofline(hbm_traffic=True)
                                   if self.hbm_traffic_bytes is not None else None)
    out["per_chip"] = True  # every flops/bytes/hbm number above is for one chip
    return out

  def report(self) -> str:
    """The human-readable summary that launch.compile prints."""
    r = self.roofline()
    h = self.hbm
    g = _bytes
    m = self.model
    lines = [
        f"{self.config} on {self.topology} ({self.num_chips} x {self.device_kind}), mesh "
        f"data={self.mesh.get('data')} fsdp={self.mesh.get('fsdp')}, global batch "
        f"{self.global_batch} = {_num(self.clips_per_chip)} clips/chip; {m['name']} "
        f"{m['num_frames']}x{m['img_size']} dtype={m['dtype']} remat={m['remat']} "
        f"({m['remat_policy']}) scan={m['scan']} attention_impl={m['attention_impl']} "
        f"decoder_mask={m['decoder_type']} accum_steps={m['accum_steps']}",
        f"compiled in {self.compile_s:.1f} s",
        "HBM per chip (XLA memory_analysis):",
        f"  arguments       {g(h['arguments'])}  (train state shards + batch)",
        f"  outputs         {g(h['outputs'])}  ({g(h['aliased'])} of it aliases the donated "
        "state: counted once)",
        f"  temporaries     {g(h['temporaries'])}",
        f"  generated code  {g(h['generated_code'])}",
        f"  total           {g(h['total'])} of {g(self.hbm_capacity)} "
        f"({100 * h['total'] / self.hbm_capacity:.0f}%)",
        "Per chip per step (XLA cost_analysis of the partitioned program):",
        f"  XLA FLOPs       {self.xla_flops:.3e}   model FLOPs {self.model_flops:.3e} "
        f"({self.model_flops_per_clip / 1e9:.1f} GFLOP/clip; XLA/model "
        f"{self.xla_flops / self.model_flops:.2f})",
        f"  bytes accessed  {self.xla_bytes:.3e}   ({r['arithmetic_intensity']:.0f} FLOP/B; "
        f"ridge {r['ridge_intensity']:.0f})",
    ]
    if self.hbm_traffic_bytes is not None:
      lines.append(f"  HBM traffic     {self.hbm_traffic_bytes:.3e}   (at most: bytes accessed "
                   "less on-chip VMEM traffic, i.e. prefetch copies and VMEM-resident operands)")
    lines += [
        f"Roofline ({self.peak_flops / 1e12:.0f} TFLOP/s, {self.hbm_bandwidth / 1e9:.0f} GB/s; "
        "no collectives), with XLA's bytes accessed:",
        f"  compute {1e3 * r['compute_s']:.1f} ms, memory {1e3 * r['memory_s']:.1f} ms -> "
        f"step >= {1e3 * r['step_s']:.1f} ms ({r['bound']}-bound)",
        f"  MFU bound {100 * r['mfu_bound']:.1f}% (model FLOPs; XLA FLOPs: "
        f"{100 * r['xla_flops_utilization_bound']:.1f}%), <= "
        f"{r['clips_per_s_per_chip']:.1f} clips/s/chip",
    ]
    if self.hbm_traffic_bytes is not None:
      t = self.roofline(hbm_traffic=True)
      lines += [
          "Roofline with the HBM traffic:",
          f"  memory {1e3 * t['memory_s']:.1f} ms -> step >= {1e3 * t['step_s']:.1f} ms "
          f"({t['bound']}-bound), MFU bound {100 * t['mfu_bound']:.1f}%, <= "
          f"{t['clips_per_s_per_chip']:.1f} clips/s/chip",
      ]
    if self.devices_per_chip > 1:
      lines.append(f"  note: this topology has {self.devices_per_chip} devices (TensorCores) "
                   "per chip: every number above is per device, against its share of the "
                   f"chip; per chip: {self.devices_per_chip}x the clips, HBM and clips/s")
    if self.loops_counted_once:
      lines.append("  note: XLA's cost analysis counts a loop body once, and this step loops "
                   "(blocks under scan or gradient accumulation): FLOPs, bytes and the "
                   "roofline above leave out all but one iteration. Compile with "
                   "--config.model.scan=False --config.optim.accum_steps=1 for the roofline; "
                   "the HBM numbers are exact either way")
    elif self.xla_flops < 0.9 * self.model_flops:
      lines.append("  note: XLA counts fewer FLOPs than the model has: kernels XLA cannot see "
                   "into (custom calls without a cost estimate) are missing from its count, "
                   "so the roofline is optimistic")
    return "\n".join(lines)


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def _bytes(b: int) -> str:
  return f"{b / GIB:.2f} GiB" if b >= GIB // 4 else f"{b / 2**20:.1f} MiB"


def _first_line_matching(text: str, patterns) -> str:
  for line in text.splitlines():
    if any(p in line for p in patterns):
      return line.strip()[:400]
  return (text.strip().splitlines() or [""])[0][:400]


def analyze_config(config, topology: str, *, config_name: str = "config") -> Analysis:
  """Compiles ``config``'s train step for ``topology`` and reads XLA's analyses.

  Raises ``config_lib.ConfigError`` for a config that cannot run on that many chips,
  ``OutOfMemoryError`` (naming ``config_name``) when the step does not fit in HBM, and
  ``AotUnavailableError`` without libtpu.
  """
  import jax
  from videomae_jax import flops as flops_lib
  from videomae_jax import hbm_traffic
  from videomae_jax.train import config as config_lib
  from videomae_jax.train import metrics as metrics_lib
  from videomae_jax.train import program as program_lib
  from videomae_jax.train import sharding

  devices = topology_devices(topology)
  kind = devices[0].device_kind
  capacity, bandwidth = hbm_spec(kind)
  # v4 topologies describe each TensorCore as a device (2 per chip, no megacore): the per-device
  # program then gets half a chip's HBM, FLOP/s and bandwidth.
  chips = len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)})
  per_chip = max(len(devices) // max(chips, 1), 1)
  capacity, bandwidth = capacity // per_chip, bandwidth / per_chip
  config = config_lib.resolve(config)
  config_lib.validate(config, len(devices))
  model = config_lib.build_model(config)
  peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device, model.dtype,
                                           device_kind=kind)
  if not peak:
    raise KeyError(f"no peak FLOP/s known for {kind!r}: set --config.peak_flops_per_device")
  if not config.peak_flops_per_device:
    peak /= per_chip
  mesh = sharding.make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices)
  steps_per_epoch = int(config.steps_per_epoch) or 1000  # shapes nothing but the schedule
  total_steps = int(config.total_steps) or int(config.num_epochs) * steps_per_epoch
  program = program_lib.build_train_program(config, model, mesh, total_steps=total_steps,
                                            steps_per_epoch=steps_per_epoch,
                                            init_rng=jax.random.key(config.seed))
  n = len(devices)
  clips_per_chip = config.batch_size / n
  desc = (f"{config_name} (model {config.model_name}, global batch {config.batch_size} = "
          f"{_num(clips_per_chip)} clips/chip, mesh data={mesh.shape['data']} "
          f"fsdp={mesh.shape['fsdp']}, remat={model.remat}, dtype={model.dtype})")
  t0 = time.perf_counter()
  try:
    compiled = program.lower().compile()
  except Exception as e:  # noqa: BLE001 - XLA's errors are XlaRuntimeError/JaxRuntimeError
    text = str(e)
    if any(p in text for p in _OOM_PATTERNS):
      raise OutOfMemoryError(
          f"out of HBM: {desc} does not fit on {topology} ({kind}, "
          f"{capacity / GIB:.0f} GiB per chip). XLA: {_first_line_matching(text, _OOM_PATTERNS).rstrip('.')}"
          ". Lower --config.batch_size, raise --config.mesh.fsdp, or set "
          "--config.model.remat=True") from e
    raise
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  hbm = dict(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
             aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
             generated_code=int(ma.generated_code_size_in_bytes))
  hbm["total"] = (hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
                  + hbm["generated_code"])
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  xla_bytes = float(ca.get("bytes accessed", 0.0))
  decoder_ratio = config.mask.decoder_ratio if config.mask.decoder_type == "run_cell" else None
  model_info = dict(name=config.model_name, num_frames=model.num_frames, img_size=model.img_size,
                    dtype=str(model.dtype), remat=bool(model.remat),
                    remat_policy=str(model.remat_policy), scan=bool(model.scan),
                    attention_impl=model.attention_impl, mask_ratio=float(config.mask.ratio),
                    mask_type=config.mask.type, decoder_type=config.mask.decoder_type,
                    accum_steps=int(config.optim.accum_steps))
  analysis = Analysis(
      config=config_name, topology=topology, device_kind=kind, num_chips=n,
      mesh={k: int(v) for k, v in mesh.shape.items()}, global_batch=int(config.batch_size),
      clips_per_chip=clips_per_chip, model=model_info, hbm=hbm, hbm_capacity=capacity,
      xla_flops=float(ca.get("flops", 0.0)), xla_bytes=xla_bytes,
      hbm_traffic_bytes=hbm_traffic.hbm_traffic(compiled.as_text(), xla_bytes),
      model_flops_per_clip=float(flops_lib.train_flops(model, config.mask.ratio, decoder_ratio,
                                                       config.mask.type)),
      peak_flops=float(peak), hbm_bandwidth=bandwidth, compile_s=compile_s,
      loops_counted_once=bool(model.scan) or int(config.optim.accum_steps) > 1,
      devices_per_chip=per_chip)
  if hbm["total"] > capacity:
    raise OutOfMemoryError(
        f"out of HBM: {desc} needs {hbm['total'] / GIB:.2f} GiB per chip on {topology} "
        f"({kind}, {capacity / GIB:.0f} GiB). Lower --config.batch_size, raise "
        "--config.mesh.fsdp, or set --config.model.remat=True", analysis)
  return analysis

