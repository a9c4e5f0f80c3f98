#!/usr/bin/env bash
# GPU check of the pre-training step: ViT-B 16x224, mask 0.9, bf16 compute, AdamW, at batch 32
# and 64 on one GPU, JAX only (no PyTorch/HF needed). Prints clips/s, MFU (model FLOPs over the
# GPU's bf16 dense peak from videomae_jax.train.metrics) and peak memory (XLA's buffer
# assignment of the step, and the device allocator's high-water mark). Every command runs under
# `timeout` (60 + 2 x 180 s), so the check ends within 8 minutes.
#
# Assumes the project is installed with JAX's CUDA plugin:
#   pip install -U "jax[cuda12]" && pip install -e '.[train]'
#
#   bash bench/gpu_check.sh               # on a GPU machine
#   bash bench/gpu_check.sh --dry-run     # print the commands only
#   bash bench/gpu_check.sh --cpu-smoke   # the same pipeline at a tiny size on the CPU
#
# Env: PYTHON (default python), OUT_DIR (default /tmp/videomae_gpu_check), STEPS (default 10),
# BATCHES (default "32 64"), DECODER_MASKING (none | run_cell | both; default none).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-/tmp/videomae_gpu_check}
STEPS=${STEPS:-10}
BATCHES=${BATCHES:-"32 64"}
DECODER_MASKING=${DECODER_MASKING:-none}
MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac

SIZE_ARGS=(--sizes vit_base --frames 16 --img-size 224)
if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  BATCHES="2"
  STEPS=1
  SIZE_ARGS=(--sizes vit_small --frames 4 --img-size 32 --model-override
             "patch_size=8,embed_dim=64,depth=1,num_heads=2,decoder_embed_dim=32,decoder_depth=1,decoder_num_heads=2")
else
  # The GPU backend, whatever else is installed (libtpu would otherwise be tried first).
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
fi

run() {
  echo "+ $*"
  if [ "$MODE" != dry ]; then "$@"; fi
}

mkdir -p "$OUT_DIR"
if [ "$MODE" != cpu ]; then
  run timeout 60 "$PY" -c '
import jax
d = jax.devices()
assert d[0].platform == "gpu", f"no GPU visible to JAX: {d}; install jax[cuda12]"
print(f"jax {jax.__version__}: {len(d)} x {d[0].device_kind}")'
fi

for b in $BATCHES; do
  # One process per batch: the allocator peak then belongs to that batch's step alone.
  run timeout 180 "$PY" bench/train_step.py "${SIZE_ARGS[@]}" --batches "$b" --no-hf \
    --dtype bfloat16 --mask-ratio 0.9 --decoder-masking "$DECODER_MASKING" \
    --steps "$STEPS" --warmup 2 --json "$OUT_DIR/train_step_b$b.json"
done

run "$PY" - "$OUT_DIR" <<'EOF'
import glob, json, os, sys
import jax
from videomae_jax.train import metrics
out_dir = sys.argv[1]
kind = jax.devices()[0].device_kind
peak = metrics.peak_flops_per_device(0.0, "bfloat16")
print(f"\n{kind}: bf16 dense peak " + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"))
print("| size | batch | decoder mask | attention | clips/s | model GFLOP/clip | MFU "
      "| XLA peak MiB | device peak MiB |")
print("|---|---|---|---|---|---|---|---|---|")
paths = sorted(glob.glob(os.path.join(out_dir, "train_step_b*.json")),
               key=lambda p: int(p.rsplit("_b", 1)[1].split(".")[0]))
if not paths:
  sys.exit(f"no results in {out_dir}")
nan = float("nan")
for path in paths:
  for row in json.load(open(path)):
    for j in row["jax"].values():
      mfu = j["clips_s"] * j["train_gflop_per_clip"] * 1e9 / peak if peak else nan
      print(f"| {row['size']} | {row['batch']} | {j['decoder_masking']} | "
            f"{j['attention_impl']} | {j['clips_s']:.1f} | {j['train_gflop_per_clip']:.4g} | "
            f"{100 * mfu:.1f}% | {j.get('peak_mib', nan):.0f} | "
            f"{row.get('device_peak_mib', nan):.0f} |")
EOF
