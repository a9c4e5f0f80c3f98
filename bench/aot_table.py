r"""Planning table: per model size and TPU slice, the largest per-chip batch whose train step
fits in HBM, with its roofline bound, from ahead-of-time compiles (``videomae_jax.aot``).

Each cell compiles the recipe of that size (``configs/pretrain_k400_vit_{s,b,l,h}.py``,
``configs/pretrain_k400_vit_g_v2.py``) with the given mesh, remat and decoder masking, at
per-chip batches taken from ``--batches`` by bisection: a batch that fits moves the search up,
one that runs out of HBM moves it down, so a cell costs about log2(len(batches)) + 1 compiles.
Results are appended to ``--json`` after every compile (a killed run keeps what it measured,
and a re-run skips compiles already in the file).

  python bench/aot_table.py --cells vit_base:v5e:2x2 --batches 16,32,64 --json aot.json
  python bench/aot_table.py --cells "vit_giant:v5p:4x4x4:fsdp=16:remat:run_cell" \
      --batches 16 --json aot.json
  python bench/aot_table.py --print aot.json          # the markdown table of a results file

A cell is ``size:topology[:fsdp=N][:remat|:noremat][:run_cell|:none][:scan|:noscan]
[:config=PATH][:k=v...]``; by default the mesh's fsdp, remat and decoder masking are the
recipe's, scan is on (one block body compiled instead of every block: much faster to compile),
compute is bf16. ``k=v`` pairs are ``config.model`` overrides (e.g. ``attention_impl=xla``).
XLA counts a scanned block once, so a scanned cell's row has no roofline unless the cell has
``:extrapolate``: three more compiles, unrolled at (1, 1), (2, 1) and (1, 2) encoder/decoder
blocks, give the cost per block, extrapolated linearly to the model's depths.
``--lock PATH`` holds an exclusive ``flock`` on PATH around every compile.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videomae_jax import aot  # noqa: E402

aot.quiet_libtpu_env()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {f"vit_{size}": f"configs/pretrain_k400_vit_{size[0]}.py"
           for size in ("small", "base", "large", "huge")}
RECIPES["vit_giant"] = "configs/pretrain_k400_vit_g_v2.py"
TAG = ""  # --tag: recorded in every row (e.g. the commit measured)


def _value(v: str) -> Any:
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(v.lower(), v)


def parse_cell(text: str) -> dict[str, Any]:
  parts = text.split(":")
  if len(parts) < 3:
    raise ValueError(f"--cells entry {text!r}: expected size:topology[:options], e.g. "
                     "vit_base:v5e:2x2:fsdp=4:remat")
  cell: dict[str, Any] = dict(size=parts[0], topology=f"{parts[1]}:{parts[2]}", fsdp=None,
                              remat=None, decoder_type=None, scan=True, model={},
                              config=None, extrapolate=False)
  if cell["size"] not in RECIPES:
    raise ValueError(f"--cells entry {text!r}: size must be one of {', '.join(RECIPES)}")
  for opt in parts[3:]:
    if opt.startswith("fsdp="):
      cell["fsdp"] = int(opt[5:])
    elif opt in ("remat", "noremat"):
      cell["remat"] = opt == "remat"
    elif opt in ("run_cell", "none"):
      cell["decoder_type"] = opt
    elif opt == "extrapolate":
      cell["extrapolate"] = True
    elif opt in ("scan", "noscan"):
      cell["scan"] = opt == "scan"
    elif opt.startswith("config="):
      cell["config"] = opt[7:]
    elif "=" in opt:
      k, v = opt.split("=", 1)
      cell["model"][k] = _value(v)
    else:
      raise ValueError(f"--cells entry {text!r}: unknown option {opt!r}")
  return cell


def cell_key(cell: dict[str, Any], per_chip: int) -> str:
  extra = ",".join(f"{k}={v}" for k, v in sorted(cell["model"].items()))
  return (f"{cell['size']}|{cell['topology']}|fsdp={cell['fsdp']}|remat={cell['remat']}|"
          f"dec={cell['decoder_type']}|scan={cell['scan']}|{extra}|b={per_chip}")


def make_config(cell: dict[str, Any], per_chip: int, num_chips: int):
  import importlib.util
  path = os.path.join(ROOT, cell["config"] or RECIPES[cell["size"]])
  spec = importlib.util.spec_from_file_location("aot_recipe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.dtype = "bfloat16"
  c.model.scan = bool(cell["scan"])
  if cell["remat"] is not None:
    c.model.remat = bool(cell["remat"])
  if cell["decoder_type"] is not None:
    c.mask.decoder_type = cell["decoder_type"]
  for k, v in cell["model"].items():
    c.model[k] = v
  if cell["fsdp"] is not None:
    c.mesh.fsdp = int(cell["fsdp"])
  c.mesh.data = -1
  c.batch_size = per_chip * num_chips
  return c, os.path.relpath(path, ROOT)


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
  if not path:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def compile_one(cell, per_chip: int, lock: str | None) -> dict[str, Any]:
  num_chips = len(aot.topology_devices(cell["topology"]))
  config, name = make_config(cell, per_chip, num_chips)
  t0 = time.time()
  with locked(lock):
    try:
      a = aot.analyze_config(config, cell["topology"], config_name=name)
      row = dict(a.as_dict(), fits=True)
    except aot.OutOfMemoryError as e:
      row = dict(e.analysis.as_dict() if e.analysis else {}, fits=False, error=str(e))
    except Exception as e:  # noqa: BLE001 - a program that does not compile: recorded, not fatal
      row = dict(fits=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:500]}")
  row.update(cell=cell, per_chip_batch=per_chip, config=name, wall_s=time.time() - t0,
             when=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), tag=TAG)
  return row


def search(cell, batches: list[int], lock: str | None, results: dict[str, Any],
           save) -> dict[str, Any]:
  """Largest batch of ``batches`` (ascending) that fits, by bisection; reuses ``results``."""
  lo, hi = 0, len(batches) - 1
  best = None
  while lo <= hi:
    mid = (lo + hi) // 2
    b = batches[mid]
    key = cell_key(cell, b)
    if key not in results:
      print(f"[{time.strftime('%H:%M:%S')}] compiling {key}", flush=True)
      results[key] = compile_one(cell, b, lock)
      save()
      r = results[key]
      print(f"  -> fits={r['fits']} "
            + (f"hbm {r['hbm']['total'] / aot.GIB:.2f} GiB, mfu bound "
               f"{100 * r['roofline']['mfu_bound']:.1f}%" if 'hbm' in r else r.get('error', ''))
            + f" ({r['wall_s']:.0f} s)", flush=True)
    if results[key]["fits"] is None:  # compile error: no point trying other batches
      print(f"  compile failed: {results[key]['error']}", flush=True)
      break
    if results[key]["fits"]:
      best = results[key]
      lo = mid + 1
    else:
      hi = mid - 1
  return best or {}


def extrapolate(cell, best: dict[str, Any], lock: str | None, results: dict[str, Any],
                save) -> dict[str, Any]:
  """The unrolled step's FLOPs and bytes for a scanned cell, from three small unrolled
  compiles: cost(d, dd) = other + d x encoder block + dd x decoder block, at (1, 1), (2, 1)
  and (1, 2) blocks, evaluated at the model's depths. XLA counts a scanned block once, so
  the scanned compile's own cost covers one block of each."""
  import numpy as np
  b = best["per_chip_batch"]
  cost = {}
  for d, dd in ((1, 1), (2, 1), (1, 2)):
    small = dict(cell, scan=False, model=dict(cell["model"], depth=d, decoder_depth=dd))
    key = cell_key(small, b)
    if key not in results:
      print(f"[{time.strftime('%H:%M:%S')}] compiling {key} (extrapolation)", flush=True)
      results[key] = compile_one(small, b, lock)
      save()
    r = results[key]
    if not r.get("xla_flops"):
      print(f"  extrapolation compile failed: {r.get('error')}", flush=True)
      return {}
    cost[d, dd] = (r["xla_flops"], r["xla_bytes"], r.get("hbm_traffic_bytes") or np.nan)
  c11, c21, c12 = (np.array(cost[k]) for k in ((1, 1), (2, 1), (1, 2)))
  enc, dec = c21 - c11, c12 - c11
  other = c11 - enc - dec
  from videomae_jax.models import preset
  fields = {**preset(best["model"]["name"]), **{k: v for k, v in cell["model"].items()}}
  flops, nbytes, traffic = other + fields["depth"] * enc + fields["decoder_depth"] * dec
  args = (best["model_flops"], best["clips_per_chip"], best["peak_flops"], best["hbm_bandwidth"])
  out = dict(xla_flops=float(flops), xla_bytes=float(nbytes),
             roofline=aot.roofline(float(flops), float(nbytes), *args),
             per_block=dict(encoder=enc.tolist(), decoder=dec.tolist(), other=other.tolist()))
  if np.isfinite(traffic):
    out.update(hbm_traffic_bytes=float(traffic),
               roofline_hbm_traffic=aot.roofline(float(flops), float(traffic), *args))
  return out


def table(rows: list[dict[str, Any]]) -> str:
  head = ("| size | slice | mesh (data x fsdp) | remat | decoder mask | clips/chip | HBM/chip "
          "| XLA GFLOP/chip | GB accessed/chip | roofline ms | bound | MFU bound | "
          "clips/s/chip bound | HBM traffic GB/chip | MFU bound (HBM traffic) | commit |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if not r.get("hbm"):
      continue
    rf = r["roofline"]
    m = r["model"]
    flops, nbytes = f"{r['xla_flops'] / 1e9:.0f}", f"{r['xla_bytes'] / 1e9:.0f}"
    src = r
    if r.get("extrapolated"):  # scanned: the unrolled cost from small unrolled compiles
      e = src = r["extrapolated"]
      rf = dict(e["roofline"], bound=e["roofline"]["bound"] + " (extrapolated)")
      flops, nbytes = f"{e['xla_flops'] / 1e9:.0f}", f"{e['xla_bytes'] / 1e9:.0f}"
    elif r.get("loops_counted_once"):  # XLA counted one loop iteration: no roofline
      rf = dict(rf, step_s=float("nan"), bound="n/a (scan)", mfu_bound=float("nan"),
                clips_per_s_per_chip=float("nan"))
      flops = nbytes = "n/a"
      src = {}
    # Rows compiled before the HBM traffic was measured have none.
    traffic, traffic_bound = "-", "-"
    if src.get("hbm_traffic_bytes"):
      traffic = f"{src['hbm_traffic_bytes'] / 1e9:.0f}"
      traffic_bound = f"{100 * src['roofline_hbm_traffic']['mfu_bound']:.0f}%"
    out.append(
        f"| {m['name']} | {r['topology']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
        f"{'yes' if m['remat'] else 'no'} | {m['decoder_type']} | {r['clips_per_chip']:g}"
        f"{'' if r['fits'] else ' (OOM)'} | {r['hbm']['total'] / aot.GIB:.1f} / "
        f"{r['hbm_capacity'] / aot.GIB:.0f} GiB | {flops} | {nbytes} | "
        f"{1e3 * rf['step_s']:.0f} | {rf['bound']} | "
        f"{100 * rf['mfu_bound']:.0f}% | {rf['clips_per_s_per_chip']:.0f} | "
        f"{traffic} | {traffic_bound} | {r.get('tag', '')} |")
  return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cells", default="", help="';'-separated cells (see the module docs)")
  p.add_argument("--batches", default="8,16,32,64", help="per-chip batch candidates")
  p.add_argument("--json", default="aot_table.json")
  p.add_argument("--lock", default=None, help="flock this file around each compile")
  p.add_argument("--print", dest="print_only", default=None, metavar="JSON",
                 help="only print the table of these results files (comma-separated)")
  p.add_argument("--tag", default="", help="recorded in every row, e.g. the commit")
  args = p.parse_args(argv)
  global TAG
  TAG = args.tag
  if args.print_only:
    results = {}
    for path in args.print_only.split(","):
      with open(path) as f:
        results.update(json.load(f))
    print(table([r for r in results.values() if r.get("fits") is not None
                 and not r["cell"]["model"].get("depth")]))  # not the extrapolation compiles
    return results
  results: dict[str, Any] = {}
  if os.path.exists(args.json):
    with open(args.json) as f:
      results = json.load(f)

  def save():
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, args.json)

  batches = sorted({int(b) for b in args.batches.split(",")})
  best = []
  for text in filter(None, (c.strip() for c in args.cells.split(";"))):
    cell = parse_cell(text)
    r = search(cell, batches, args.lock, results, save)
    if r and cell["extrapolate"] and r.get("loops_counted_once"):
      r["extrapolated"] = extrapolate(cell, r, args.lock, results, save)
      save()
    if r:
      best.append(r)
    else:
      print(f"{text}: none of the batches {batches} fits", flush=True)
  print(table(best))
  return results


if __name__ == "__main__":
  main()
