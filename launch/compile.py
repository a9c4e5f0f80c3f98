r"""Ahead-of-time compilation of the pre-training step for a TPU slice, on any host.

  python -m launch.compile --config=configs/pretrain_k400_vit_b.py --topology=v5e:2x2 \
      --config.batch_size=128 --config.model.dtype=bfloat16 [--json=out.json]

Compiles exactly the step `launch.pretrain` runs (`train.program.build_train_program`: same
optimizer, shardings over the `(data, fsdp)` mesh of the slice's chips, donated state) with
the TPU compiler from libtpu (`pip install -e '.[tpu]'`), without TPUs, and prints per-chip
HBM, FLOPs and bytes per step, the roofline step time and MFU bound (`videomae_jax.aot`).
Every `--config.*` override of `launch.pretrain` works here. No data is read.

Exit status: 0 fits, 3 out of HBM (message names the config), 2 no libtpu / unknown
topology, 1 a config that cannot run (message names the field).
"""
from __future__ import annotations

import json
import sys
import traceback

from videomae_jax import aot

# Before jax starts: CPU as the default backend, libtpu used only as a compiler.
aot.quiet_libtpu_env()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2",
                                "TPU slice: v5e:2x2, v5e:16x16, v4:2x2x1, v5p:4x4x4, v6e:2x2...")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")


def _write_json(path: str | None, payload: dict) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)


def main(argv) -> None:
  del argv
  from videomae_jax.train.config import ConfigError
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    analysis = aot.analyze_config(_CONFIG.value, _TOPOLOGY.value, config_name=name)
  except aot.OutOfMemoryError as e:
    payload = {"config": name, "topology": _TOPOLOGY.value, "fits": False, "error": str(e)}
    if e.analysis is not None:
      payload.update(e.analysis.as_dict(), fits=False)
    _write_json(_JSON.value, payload)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  except aot.AotUnavailableError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except ConfigError as e:
    print(f"error: {name}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except Exception as e:  # noqa: BLE001 - the compiler's own error, after its traceback
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:500]
    print(f"error: {name} does not compile for {_TOPOLOGY.value}: {type(e).__name__}: {first}",
          file=sys.stderr, flush=True)
    sys.exit(1)
  print(analysis.report(), flush=True)
  _write_json(_JSON.value, dict(analysis.as_dict(), fits=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
