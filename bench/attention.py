r"""One attention layer, forward + backward: the fused CPU kernel vs XLA vs PyTorch SDPA.

Times d(sum(attention(q, k, v) * cotangent)) / d(q, k, v) at one shape for:
  - videomae-jax "cpu_fused" (bf16, the AVX512-BF16 kernel of models/cpu_attention.cc),
  - videomae-jax "einsum" (XLA's two batched matmuls, softmax in float32; bf16 and float32, with
    the probabilities recomputed per query chunk as the decoder does by default),
  - PyTorch ``scaled_dot_product_attention`` (its fused CPU kernel; float32 and bfloat16),
alternating between them, median of ``--steps``. GFLOP/s count the 2 forward and 4 backward
matmuls of attention (recomputation not counted).

  python bench/attention.py                        # ViT-S decoder at batch 2: (2, 1568, 3, 64)
  python bench/attention.py --shape 2,1568,6,64    # ViT-B decoder
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.train_step import num_cores, timed  # noqa: E402
from videomae_jax.models import cpu_attention, layers  # noqa: E402


def jax_sides(b, n, h, d):
  rng = np.random.default_rng(0)
  scale = d**-0.5
  sides = {}
  for dt in ("bfloat16", "float32"):
    qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)), dt)
    cot = jnp.asarray(rng.standard_normal((b, n, h, d)), dt)
    impls = ["einsum"] + (["cpu_fused"] if dt == "bfloat16" and cpu_attention.available() else [])
    for impl in impls:
      if impl == "cpu_fused":
        fn = lambda x: cpu_attention.attention(x, scale)
      else:
        fn = lambda x: layers.einsum_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], scale, True)
      grad = jax.jit(jax.grad(lambda x, fn=fn, cot=cot: jnp.vdot(fn(x), cot).astype(jnp.float32)))
      sides[f"jax {impl} {dt}"] = lambda grad=grad, qkv=qkv: grad(qkv).block_until_ready()
  return sides


def torch_sides(b, n, h, d, threads):
  import torch
  torch.set_num_threads(threads)
  sides = {}
  for dt in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(b, h, n, d, dtype=dt, requires_grad=True) for _ in range(3))
    cot = torch.randn(b, h, n, d, dtype=dt)

    def step(q=q, k=k, v=v, cot=cot):
      for t in (q, k, v):
        t.grad = None
      torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(cot)

    sides[f"torch sdpa {str(dt).split('.')[-1]}"] = step
  return sides


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="2,1568,3,64", help="batch,tokens,heads,head_dim")
  p.add_argument("--steps", type=int, default=7)
  p.add_argument("--threads", type=int, default=num_cores())
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  b, n, h, d = (int(x) for x in args.shape.split(","))
  sides = jax_sides(b, n, h, d)
  if not args.no_torch:
    sides.update(torch_sides(b, n, h, d, args.threads))
  for fn in sides.values():
    fn()  # compile / warm up
  times = {k: [] for k in sides}
  for _ in range(args.steps):
    for k, fn in sides.items():  # alternate so that machine drift hits all alike
      times[k].append(timed(fn))
  flop = 6 * 2 * b * h * n * n * d
  out = dict(shape=[b, n, h, d], fused_kernel=cpu_attention.unavailable_reason() or "available",
             results={})
  print(f"attention fwd+bwd, (B, N, heads, head_dim) = {(b, n, h, d)}, {args.threads} threads")
  print("| implementation | ms | GFLOP/s |\n|---|---|---|")
  for k, ts in times.items():
    med = statistics.median(ts)
    out["results"][k] = dict(ms=med * 1e3, gflops=flop / med / 1e9)
    print(f"| {k} | {med * 1e3:.1f} | {flop / med / 1e9:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
