"""All checkpoint logic: save policy, keep-last-K, preemption, data position, restore-or-init.

A checkpoint holds the train state (params, optimizer state, step, non-finite counters) and a
JSON ``meta`` item with the data position and what defines the run: the seed, the batch size,
the data stream (``data.pipeline.describe``) and the model fields that define the parameter
layout (``model_meta``). The input pipeline is a pure function of (seed, step), so the step *is*
the data iterator state: a resumed run sees exactly the batches and masks an uninterrupted run
would.

Faults:
- A save is *complete* once orbax has renamed its ``<step>.orbax-checkpoint-tmp-*`` folder to
  ``<step>``; a process killed before that leaves the previous checkpoints as they were, and
  the next launch resumes from the newest complete one (orbax removes the temporary folder).
- A failed write (full disk, lost mount, ...) raises ``CheckpointError`` naming the directory,
  at the next save or at ``close()``: orbax only logs errors of its background writes, so each
  save is checked for having been committed. Old checkpoints are removed only after a newer
  one is committed, so the last ``keep`` good ones survive a failed write.
- When a save is committed, a ``file_sizes.json`` with the size of every file goes next to it.
  At start-up a checkpoint whose files do not match it, or whose JSON files do not parse, is
  moved aside to ``<step>.corrupt`` (never deleted) with a warning, and the run resumes from
  the previous one.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import handlers as ocp_handlers

log = logging.getLogger("videomae_jax.checkpoint")

CORRUPT_SUFFIX = ".corrupt"
SIZES_FILE = "file_sizes.json"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's commit record of a step
_UNKNOWN = object()

# Model fields that may change on resume: they change neither the parameter tree nor the
# arithmetic of a step beyond rounding (compute dtype, recomputation, attention and matmul
# kernels). The stored array shapes are checked as well, whatever the fields say.
RESUMABLE_MODEL_FIELDS = frozenset(
    {"dtype", "remat", "remat_policy", "attention_impl", "attention_remat", "layers_impl"})
# The meta entries a resumed run must share with the checkpoint.
GUARDED_META = ("seed", "batch_size", "model", "data")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


class ResumeMismatchError(ValueError):
  """The checkpoint in the workdir was written by a run with another model or data stream."""


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def model_meta(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The model fields stored with a checkpoint and compared on resume (all but
  ``RESUMABLE_MODEL_FIELDS``), e.g. ``scan``, which stacks the blocks' params."""
  return _jsonable({k: v for k, v in sorted(fields.items()) if k not in RESUMABLE_MODEL_FIELDS})


def _flatten(x: Any, prefix: str) -> dict[str, Any]:
  if isinstance(x, dict) and x:
    out = {}
    for k, v in x.items():
      out.update(_flatten(v, f"{prefix}.{k}"))
    return out
  return {prefix: x}


def meta_mismatches(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """'field: checkpoint X, config now Y' for every guarded field that differs. Fields that only
  one side has (a checkpoint of an older version) are not compared."""
  diffs = []
  for key in GUARDED_META:
    if key not in expected or key not in saved:
      continue
    a, b = _flatten(_jsonable(saved[key]), key), _flatten(_jsonable(expected[key]), key)
    for name in sorted(set(a) & set(b)):
      if a[name] != b[name]:
        label = name if name.endswith("fingerprint") else f"config.{name}"
        diffs.append(f"{label}: checkpoint {a[name]!r}, config now {b[name]!r}")
  return diffs


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return {_path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def layout_mismatch(stored: Any, abstract: Any) -> str | None:
  """The first array path whose presence or shape differs between the checkpoint's array
  metadata and the state to restore, or None."""
  have, want = _shapes(stored), _shapes(abstract)
  for path, shape in want.items():
    if path not in have:
      return f"{path} {shape} is not in the checkpoint"
    if have[path] != shape:
      return f"{path}: checkpoint {have[path]}, model now {shape}"
  for path, shape in have.items():
    if path not in want:
      return f"{path} {shape} is in the checkpoint but not in the model"
  return None


class _OrbaxErrors(logging.Handler):
  """Keeps the last error orbax logged: it logs the failures of background writes instead of
  raising them."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.last: str | None = None

  def emit(self, record):
    if "orbax" in record.pathname and record.exc_info and record.exc_info[1] is not None:
      e = record.exc_info[1]
      self.last = f"{type(e).__name__}: {e}"


class Checkpointer:
  """Wraps an orbax ``CheckpointManager`` with the trainer's save policy."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.every_steps = every_steps
    self.keep = keep
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.async_save = async_save
    # Retention is done here, after a save is known to be committed (see _prune).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    registry = ocp_handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)
    self._errors = _OrbaxErrors()
    logging.getLogger("absl").addHandler(self._errors)
    self._preempted = threading.Event()
    self._last_saved: int | None = None
    self._pending: int | None = None
    self._usable: Any = _UNKNOWN  # the step latest_step() found
    self._prev_handler = None

  # ---- preemption -------------------------------------------------------------------------

  def install_preemption_handler(self) -> None:
    """SIGTERM asks the loop to save and exit at the next step boundary.

    With several processes JAX's own preemption service (started by
    ``jax.distributed.initialize``) catches the signal instead and tells every host, so that
    they all stop at the same step.
    """
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return

    def handler(signum, frame):
      log.warning("received signal %d: checkpointing and exiting after this step", signum)
      self._preempted.set()

    self._prev_handler = signal.signal(signal.SIGTERM, handler)

  def reached_preemption(self, step: int) -> bool:
    """True once the run must save and stop (at the same step on every process)."""
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this runtime
        return False
    return self._preempted.is_set()

  # ---- integrity --------------------------------------------------------------------------

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _file_sizes(self, step: int) -> dict[str, int]:
    root = self._step_dir(step)
    sizes = {}
    for dirpath, _, files in os.walk(root):
      for name in files:
        p = os.path.join(dirpath, name)
        rel = os.path.relpath(p, root)
        if rel != SIZES_FILE:
          sizes[rel] = os.path.getsize(p)
    return sizes

  def _problem(self, step: int) -> str | None:
    """Why the checkpoint at ``step`` cannot be used, without reading its arrays; or None."""
    root = self._step_dir(step)
    try:
      sizes_path = os.path.join(root, SIZES_FILE)
      if os.path.exists(sizes_path):
        with open(sizes_path) as f:
          recorded = json.load(f)
        now = self._file_sizes(step)
        for rel, size in recorded.items():
          if now.get(rel) != size:
            return f"{rel} has {now.get(rel, 'no')} bytes, {size} were written"
      with open(os.path.join(root, _STEP_METADATA_FILE)) as f:
        json.load(f)
      self._read_meta(step)
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the step unusable
      return f"{type(e).__name__}: {e}"
    return None

  def _set_aside(self, step: int, why: str, then: str) -> None:
    dst = self._step_dir(step) + CORRUPT_SUFFIX
    n = 1
    while os.path.exists(dst):
      dst = f"{self._step_dir(step)}{CORRUPT_SUFFIX}{n}"
      n += 1
    if self.read_only:
      log.warning("checkpoint step %d in %s is unreadable (%s); %s", step, self.directory, why,
                  then)
      return
    if jax.process_index() == 0:
      os.rename(self._step_dir(step), dst)
    log.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s, %s", step,
                self.directory, why, dst, then)

  # ---- save / restore ---------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest usable checkpoint's step (unreadable ones are set aside), or None."""
    if self._usable is not _UNKNOWN:
      return self._usable
    usable = None
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = self._problem(step)
      if why is None:
        usable = step
        break
      self._set_aside(step, why, "falling back to the previous checkpoint")
    if jax.process_count() > 1:  # every process resumes where process 0 does
      usable = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if usable is None
                                                                 else usable)))
      usable = None if usable < 0 else usable
    self.manager.reload()
    self._usable = usable
    return usable

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def _write_error(self, step: int, cause: str) -> CheckpointError:
    self.manager.reload()
    good = [s for s in self.manager.all_steps() if s != step]
    kept = f"step {max(good)} is the last complete one and is kept" if good else \
        "there is no earlier complete one"
    return CheckpointError(
        f"checkpoint for step {step} could not be written to {self.directory} ({cause}); "
        f"{kept}. Fix the directory (free space, permissions) and run again to resume.")

  def _finish_pending(self) -> None:
    """Waits for the save in flight and raises if it was not committed; then records its file
    sizes and removes checkpoints beyond the last ``keep``."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(step, f"{type(e).__name__}: {e}") from e
    if not os.path.isdir(self._step_dir(step)):
      raise self._write_error(step, self._errors.last or "see the orbax error logged above")
    if jax.process_index() == 0:
      try:
        sizes = self._file_sizes(step)
        tmp = os.path.join(self._step_dir(step), SIZES_FILE + ".tmp")
        with open(tmp, "w") as f:
          json.dump(sizes, f)
        os.replace(tmp, os.path.join(self._step_dir(step), SIZES_FILE))
      except OSError as e:
        raise self._write_error(step, f"{type(e).__name__}: {e}") from e
    self._prune()

  def _prune(self) -> None:
    self.manager.reload()
    steps = sorted(self.manager.all_steps())
    for old in steps[:-self.keep]:
      self.manager.delete(old)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` (asynchronously if configured); a step saved already, e.g.
    a periodic save that falls on the final step, is not written twice. Raises
    ``CheckpointError`` if the previous save failed."""
    if step == self._last_saved or step in self.manager.all_steps():
      return False
    self._finish_pending()
    self._last_saved = step
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # noqa: BLE001
      raise self._write_error(step, f"{type(e).__name__}: {e}") from e
    if saved:
      self._pending = step
      self._usable = step
      log.info("checkpoint for step %d %s", step, "started (async)" if self.async_save else "saved")
      if not self.async_save:
        self._finish_pending()
    return saved

  def _read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def check_resumable(self, step: int, abstract_state: Any, expected_meta: Mapping) -> None:
    """Raises ``ResumeMismatchError`` naming what differs between the checkpoint at ``step`` and
    the current run (guarded meta fields, then the array tree and shapes), reading no arrays."""
    diffs = meta_mismatches(self._read_meta(step), expected_meta)
    if diffs:
      raise ResumeMismatchError(
          f"checkpoint at step {step} in {self.directory} was written by a different run: "
          + "; ".join(diffs) + ". Resuming would change the model or the data stream: use a "
          "new --workdir or restore the old settings.")
    stored = self.manager.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    bad = layout_mismatch(stored, abstract_state)
    if bad:
      raise ResumeMismatchError(
          f"checkpoint at step {step} in {self.directory} has another parameter layout: {bad}. "
          "A model field that changes the params (e.g. config.model.scan, depth, widths) "
          "differs from the run that wrote it: use a new --workdir or restore the old settings.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only ``state.params`` of the checkpoint at ``step`` (the optimizer state is not read)."""
    target = {"params": abstract_params}
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(
          os.path.join(self._step_dir(step), "state"),
          args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    return out["params"]

  def restore_or_init(self, init_fn: Callable[[], Any], abstract_state: Any,
                      expected_meta: dict) -> tuple[Any, int]:
    """Restores the latest usable checkpoint (sharded as ``abstract_state``) or calls
    ``init_fn``.

    Raises ``ResumeMismatchError`` before reading any array if the checkpoint was made with a
    different model layout, seed or data stream, which would make the resumed run fail or
    differ from an uninterrupted one.
    """
    step = self.latest_step()
    if step is None:
      return init_fn(), 0
    self.check_resumable(step, abstract_state, expected_meta)
    try:
      state, _ = self.restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001
      if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        raise  # the checkpoint is fine, the device is not
      # The input pipeline already starts at `step`: falling back here would misalign it.
      self._set_aside(step, f"{type(e).__name__}: {e}", "stopping")
      self._usable = _UNKNOWN
      prev = self.latest_step()
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: {e}); "
          f"run again to resume from {'step %d' % prev if prev is not None else 'scratch'}"
      ) from e
    log.info("resumed from step %d", step)
    return state, step

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    try:
      self._finish_pending()
    finally:
      self.manager.close()
      logging.getLogger("absl").removeHandler(self._errors)
      if self._prev_handler is not None:
        signal.signal(signal.SIGTERM, self._prev_handler)
        self._prev_handler = None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
