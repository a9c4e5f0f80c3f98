"""All checkpoint logic: save policy, keep-last-K, preemption, data position, restore-or-init.

A checkpoint holds the train state (params, optimizer state, step, non-finite counters) and a
JSON ``meta`` item with the data position and what defines the stream of batches (seed, data
fields). The input pipeline is a pure function of (seed, step), so the step *is* the data
iterator state: a resumed run sees exactly the batches and masks an uninterrupted run would.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("videomae_jax.checkpoint")


class Checkpointer:
  """Wraps an orbax ``CheckpointManager`` with the trainer's save policy."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "meta"))
    self._preempted = threading.Event()
    self._last_saved: int | None = None
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

  # ---- save / restore ---------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` (asynchronously if configured); a step saved already, e.g.
    a periodic save that falls on the final step, is not written twice."""
    if step == self._last_saved or step in self.manager.all_steps():
      return False
    self._last_saved = step
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      log.info("checkpoint for step %d %s", step,
               "started (async)" if self.manager._options.enable_async_checkpointing else "saved")  # noqa: SLF001
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_or_init(self, init_fn: Callable[[], Any], abstract_state: Any,
                      expected_meta: dict) -> tuple[Any, int]:
    """Restores the latest checkpoint (sharded as ``abstract_state``) or calls ``init_fn``.

    Raises if the checkpoint was made with a different seed or data stream, which would make
    the resumed run differ from an uninterrupted one.
    """
    step = self.latest_step()
    if step is None:
      return init_fn(), 0
    state, meta = self.restore(step, abstract_state)
    for key in ("seed", "data", "batch_size"):
      if key in expected_meta and meta.get(key) != expected_meta[key]:
        raise ValueError(
            f"checkpoint at step {step} in {self.manager.directory} was written with {key}="
            f"{meta.get(key)!r}, the config now says {expected_meta[key]!r}; resuming would "
            "change the data order. Use a new --workdir or restore the old settings.")
    log.info("resumed from step %d", step)
    return state, step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._prev_handler is not None:
      signal.signal(signal.SIGTERM, self._prev_handler)
      self._prev_handler = None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
