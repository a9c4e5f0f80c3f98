"""Fused bfloat16 self-attention for x86 CPUs with AVX512-BF16, as an XLA FFI custom call.

XLA:CPU runs attention as separate batched matmuls with the (B, heads, N, N) scores in
memory between them, at a fraction of the machine's bf16 matmul rate. ``cpu_attention.cc``
computes blocks of 64 rows at a time with the scores in cache, bf16 operands and float32
accumulation: the forward pass per query block, the backward pass per (batch, head, key range)
over 64x64 tiles with the probabilities recomputed from the saved log-sum-exp (FlashAttention-2).

Its packed operands and per-worker scratch are a workspace output of the custom call, so XLA
allocates them and counts them in the step's memory (``workspace_bytes``).

The kernel is compiled from source with the system C++ compiler (``$CXX``, default ``g++``) on
first use and cached under ``$VIDEOMAE_JAX_CACHE`` (default ``~/.cache/videomae_jax``, created
0700), keyed by the source, the compiler and its version, the jaxlib version and the flags. A
cached library is loaded only if it and its ``.sha256`` sidecar belong to this user, are not
group/world-writable and agree; otherwise it is rebuilt. A cache folder that others could write
to is not used (the kernel is built in a private temporary folder, with a warning). Where the CPU lacks AVX512-BF16, or no compiler is
found, :func:`unavailable_reason` says why and the model falls back to the XLA einsum path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl",
             "-mavx512bf16", "-mfma", "-w")
_FWD, _BWD = "videomae_attention_fwd", "videomae_attention_bwd"
_BLOCK = 64  # query / key rows per task (kBlock)
_registered: list[ctypes.CDLL] = []  # the library whose handlers XLA holds


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("VIDEOMAE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "videomae_jax")
  return pathlib.Path(root)


def _private(st: os.stat_result) -> bool:
  """Owned by this user and not writable by group or others."""
  return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


_fallback_dir: list[pathlib.Path] = []


def _build_dir() -> pathlib.Path:
  """The cache folder (created 0700), or, when someone else could write there, a private
  temporary folder for this process: a library that another user could have replaced is never
  loaded."""
  d = _cache_dir()
  try:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(d)
    if stat.S_ISDIR(st.st_mode) and _private(st):
      return d
    why = "is not owned by this user or is group/world-writable"
  except OSError as e:
    why = f"is not usable ({e})"
  if not _fallback_dir:
    _fallback_dir.append(pathlib.Path(tempfile.mkdtemp(prefix="videomae_jax_kernel_")))
  logging.getLogger(__name__).warning(
      "$VIDEOMAE_JAX_CACHE folder %s %s; building the fused CPU attention kernel in %s instead",
      d, why, _fallback_dir[0])
  return _fallback_dir[0]


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(lib: pathlib.Path) -> bool:
  """True when ``lib`` and its ``.sha256`` sidecar are regular files of this user, not group or
  world-writable, and the sidecar holds the library's digest."""
  side = lib.with_name(lib.name + ".sha256")
  try:
    for f in (lib, side):
      st = os.lstat(f)
      if not stat.S_ISREG(st.st_mode) or not _private(st):
        return False
    return side.read_text().strip() == _sha256(lib)
  except OSError:
    return False


def _compiler_version(cxx: str) -> str:
  proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
  return proc.stdout + proc.stderr


def _library_name(cxx: str) -> str:
  """Keyed by the source, the compiler (path and ``--version``), jaxlib and the flags."""
  import jaxlib
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), cxx.encode(), _compiler_version(cxx).encode(),
               jaxlib.__version__.encode(), " ".join(CXX_FLAGS).encode(),
               jax.ffi.include_dir().encode()):
    key.update(hashlib.sha256(part).digest())
  return f"cpu_attention_{key.hexdigest()[:16]}.so"


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _compile(cxx: str, out: pathlib.Path) -> None:
  """Compiles to a private name, renames it to ``out`` (concurrent processes never load a
  partial file), then writes the digest sidecar, also by rename."""
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
  os.chmod(tmp, 0o700)
  digest = _sha256(pathlib.Path(tmp))
  os.replace(tmp, out)
  _atomic_write(out.with_name(out.name + ".sha256"), digest.encode())


def _build(cxx: str) -> pathlib.Path:
  """The path of a verified library: the cached one, or one compiled now."""
  out = _build_dir() / _library_name(cxx)
  for _ in range(3):
    if _verified(out):
      return out
    # Missing, planted or stale: never loaded, always rebuilt. A second pass only happens when
    # another process renamed its own build over this one in between.
    _compile(cxx, out)
  raise RuntimeError(f"{out} kept changing while it was built; not loading it")


_lock = threading.Lock()
_reason: list = []  # the cached result of _load


def unavailable_reason() -> str | None:
  """None when the kernel is compiled and registered; otherwise why it cannot be used (logged
  once). Thread-safe: concurrent first uses build once."""
  with _lock:
    if not _reason:
      reason = _load()
      if reason is not None:
        logging.getLogger(__name__).info("fused CPU attention unavailable: %s", reason)
      _reason.append(reason)
    return _reason[0]


def _cache_clear() -> None:
  with _lock:
    _reason.clear()


unavailable_reason.cache_clear = _cache_clear  # as for a functools.cache


def _load() -> str | None:
  missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
  if missing:
    return f"the CPU lacks {', '.join(missing)}"
  cxx = shutil.which(os.environ.get("CXX", "g++"))
  if cxx is None:
    return "no C++ compiler ($CXX or g++) on PATH"
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
  except (OSError, RuntimeError) as e:
    return str(e)
  if not _registered:  # XLA's registry is process-wide and takes each name once
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.VideomaeAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.VideomaeAttentionBwd), platform="cpu")
    _registered.append(lib)
  return None


def available() -> bool:
  return unavailable_reason() is None


def _require() -> None:
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"fused CPU attention is unavailable: {reason}")


def _check(qkv: jax.Array) -> None:
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"cpu_attention: qkv must be (B, N, 3, heads, head_dim), got {qkv.shape}")
  if qkv.dtype != jnp.bfloat16:
    raise ValueError(f"cpu_attention: qkv must be bfloat16, got {qkv.dtype}")
  if qkv.shape[-1] % 2:
    raise ValueError(f"cpu_attention: head dim {qkv.shape[-1]} is odd; the kernel needs pairs")


def _slots() -> int:
  """Workers one call may use: XLA:CPU's intra-op pool has one thread per usable core."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def workspace_bytes(b: int, n: int, h: int, d: int, *, backward: bool, slots: int) -> int:
  """Bytes of the kernel's workspace (packed operands + per-worker scratch); the layouts of
  ``Workspace`` and ``BwdWorkspace`` in cpu_attention.cc."""
  rup = lambda x, m: -(-x // m) * m
  n_pad, d_pad, bh = rup(n, 32), rup(d, 32), b * h
  pack = n_pad * d_pad
  if not backward:
    return 2 * bh * pack * 2 + slots * (_BLOCK * n_pad * 6 + _BLOCK * d_pad * 4)
  key_blocks = -(-n // _BLOCK)
  splits = min(key_blocks, max(1, -(-2 * slots // bh)))
  tile = _BLOCK * _BLOCK
  slot = 2 * tile * 4 + 3 * tile * 2 + 2 * d_pad * _BLOCK * 4
  return (5 * bh * pack * 2 + rup(bh * n * 4, 64) + bh * splits * pack * 4 + slots * slot)


def _workspace(shape, backward: bool):
  b, n, _, h, d = shape
  slots = _slots()
  size = workspace_bytes(b, n, h, d, backward=backward, slots=slots)
  return jax.ShapeDtypeStruct((size,), jnp.uint8), np.int64(slots)


def _forward(qkv: jax.Array, scale: float):
  _check(qkv)
  _require()
  b, n, _, h, d = qkv.shape
  ws, slots = _workspace(qkv.shape, backward=False)
  o, lse, _ = jax.ffi.ffi_call(
      _FWD, (jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16),
             jax.ShapeDtypeStruct((b, h, n), jnp.float32), ws),
      vmap_method="sequential")(qkv, scale=np.float32(scale), slots=slots)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v for qkv (B, N, 3, heads, head_dim) bfloat16 -> (B, N, heads,
  head_dim) bfloat16. The head dim must be even. Requires :func:`available`."""
  return _forward(qkv, scale)[0]


def _attention_fwd(qkv, scale):
  o, lse = _forward(qkv, scale)
  return o, (qkv, o, lse)


def _attention_bwd(scale, res, do):
  qkv, o, lse = res
  ws, slots = _workspace(qkv.shape, backward=True)
  dqkv, _ = jax.ffi.ffi_call(_BWD, (jax.ShapeDtypeStruct(qkv.shape, jnp.bfloat16), ws),
                             vmap_method="sequential")(
                                 qkv, o, lse, do.astype(jnp.bfloat16), scale=np.float32(scale),
                                 slots=slots)
  return (dqkv,)


attention.defvjp(_attention_fwd, _attention_bwd)
