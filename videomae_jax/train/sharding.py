"""Device mesh, parameter sharding rules and batch sharding."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; data=-1 takes the devices fsdp leaves."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover {len(devices)} devices")
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh((data, fsdp), devices)
  except Exception:  # noqa: BLE001 - odd topologies (e.g. forced CPU devices): plain order
    arr = np.asarray(devices).reshape(data, fsdp)
  return Mesh(arr, DATA_AXES)


def _spec_for(path: str, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
  for pattern, spec in rules:
    if not re.fullmatch(pattern, path):
      continue
    if spec == "replicate":
      return P()
    if spec == "fsdp":
      n = mesh.shape["fsdp"]
      if n == 1:
        return P()
      # Shard the largest axis that divides evenly; small leaves (biases) stay replicated.
      for axis in np.argsort(shape)[::-1]:
        if shape[axis] % n == 0 and shape[axis] >= n:
          spec = [None] * len(shape)
          spec[axis] = "fsdp"
          return P(*spec)
      return P()
    spec = tuple(spec)
    if len(spec) != len(shape):
      raise ValueError(f"sharding rule {pattern!r} gives {spec} for {path} of shape {shape}")
    return P(*spec)
  return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for any pytree (e.g. a TrainState): leaves named by their key path."""

  def one(path, leaf):
    name = path_name(path)
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, _spec_for(name, shape, rules, mesh) if shape else P())

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def path_name(path) -> str:
  """'params/encoder/blocks/...' for a jax tree path (the names the sharding rules match)."""
  return "/".join(_key_name(k) for k in path)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batches -> one global array per key, sharded over the data axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def param_shardings(abstract_params: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a params tree; the rules see each leaf as 'params/<path>' (as in a
  TrainState, so the same rule table serves both)."""
  return tree_shardings({"params": abstract_params}, mesh, rules)["params"]


def state_shardings(abstract_state: Any, mesh: Mesh, rules,
                    tx: optax.GradientTransformation) -> Any:
  """TrainState shardings: params by the rules; every optimizer leaf that mirrors a param (Adam's
  moments, ...) takes that param's sharding, found by ``optax.tree_map_params`` from the
  optimizer's own structure rather than by path names; the rest (counts, scalars) is
  replicated."""
  params_sh = param_shardings(abstract_state.params, mesh, rules)
  replicated = NamedSharding(mesh, P())
  # Leaves a masked transform keeps no state for (a linear probe's frozen encoder) stay
  # MaskedNode.
  def masked(v):
    return isinstance(v, optax.MaskedNode)

  opt_sh = optax.tree_map_params(tx, lambda v, sh: v if masked(v) else sh,
                                 abstract_state.opt_state, params_sh,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)
  everything = jax.tree.map(lambda _: replicated, abstract_state)
  return everything.replace(params=params_sh, opt_state=opt_sh)
