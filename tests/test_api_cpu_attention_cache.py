"""The fused kernel's build cache loads only a library this user built and can verify."""
import logging
import os
import shutil
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from videomae_jax.models import cpu_attention

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or bool(
        [f for f in cpu_attention.CPU_FLAGS if f not in cpu_attention._cpu_flags()]),
    reason="needs a C++ compiler and an AVX512-BF16 CPU")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A fresh cache folder and a count of compiler runs (not of `--version` queries)."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("VIDEOMAE_JAX_CACHE", str(cache))
  builds = []
  real = cpu_attention.subprocess.run

  def run(cmd, *a, **kw):
    if "-shared" in cmd:
      builds.append(cmd)
    return real(cmd, *a, **kw)

  monkeypatch.setattr(cpu_attention.subprocess, "run", run)
  cpu_attention.unavailable_reason.cache_clear()
  yield cache, builds
  cpu_attention.unavailable_reason.cache_clear()


def _kernel_works():
  qkv = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 3, 1, 16)), jnp.bfloat16)
  out = cpu_attention.attention(qkv, 0.25)
  return out.shape == (1, 8, 1, 16) and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_planted_library_without_a_valid_sidecar_is_rebuilt_not_loaded(fresh, tmp_path):
  cache, builds = fresh
  # The library name the cache uses, from a build in another folder.
  other = tmp_path / "other"
  os.environ["VIDEOMAE_JAX_CACHE"] = str(other)
  assert cpu_attention.unavailable_reason() is None
  (name,) = [p.name for p in other.glob("cpu_attention_*.so")]
  cpu_attention.unavailable_reason.cache_clear()
  builds.clear()

  for sidecar in (None, "0" * 64):
    os.environ["VIDEOMAE_JAX_CACHE"] = str(cache)
    cache.mkdir(mode=0o700, exist_ok=True)
    planted = cache / name
    # A new file, as an attacker would write: truncating the library this process already
    # mapped (the previous round's build) would crash it with SIGBUS.
    planted.unlink(missing_ok=True)
    planted.write_bytes(b"\x7fELF garbage, loading this would fail or worse" * 50)
    side = cache / (name + ".sha256")
    if sidecar is None:
      side.unlink(missing_ok=True)
    else:
      side.write_text(sidecar)
    cpu_attention.unavailable_reason.cache_clear()
    assert cpu_attention.unavailable_reason() is None, "the planted file was loaded"
    assert len(builds) == 1, "the library must be rebuilt"
    builds.clear()
    assert b"garbage" not in planted.read_bytes()
    assert _kernel_works()
  # A verified library is reused without compiling.
  cpu_attention.unavailable_reason.cache_clear()
  assert cpu_attention.unavailable_reason() is None and not builds


def test_group_writable_cache_folder_is_not_used(fresh, caplog):
  cache, builds = fresh
  cache.mkdir()
  os.chmod(cache, 0o777)
  with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
    assert cpu_attention.unavailable_reason() is None
  assert not list(cache.iterdir()), "nothing may be built into or loaded from that folder"
  assert len(builds) == 1
  assert str(cache) in caplog.text and "writable" in caplog.text


def test_new_cache_folder_is_private(fresh):
  cache, _ = fresh
  assert cpu_attention.unavailable_reason() is None
  assert (os.stat(cache).st_mode & 0o777) == 0o700


def test_concurrent_first_uses_build_once(fresh):
  cache, builds = fresh
  barrier = threading.Barrier(4)
  results = []

  def use():
    barrier.wait()
    results.append(cpu_attention.unavailable_reason())

  threads = [threading.Thread(target=use) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == [None] * 4
  assert len(builds) == 1
  assert len(list(cache.glob("cpu_attention_*.so"))) == 1
