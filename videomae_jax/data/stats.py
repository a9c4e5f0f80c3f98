"""Bookkeeping of videos that could not be decoded, shared by all decode threads."""
from __future__ import annotations

import dataclasses
import logging
import threading

log = logging.getLogger('videomae_jax.data')


class BadDataError(RuntimeError):
  """Too many videos failed to decode to keep training (see `config.data.max_bad_fraction`)."""


@dataclasses.dataclass
class BadDataStats:
  """Counts of decode failures; `bad_files` maps each failing path to its first error.

  Thread-safe. The trainer can log `summary()` periodically or at the end.
  """
  num_files: int = 0
  decoded: int = 0          # Examples decoded successfully (after replacements).
  failures: int = 0         # Failed decodes (after their retry); a TFDS element per failure.
  replacements: int = 0     # Examples served by a replacement video.
  timeouts: int = 0         # Decode attempts abandoned after `decode_timeout_s`.
  retries: int = 0          # Failed decodes tried once more before counting the file bad.
  abandoned_running: int = 0  # Abandoned decodes whose threads have not stopped yet.
  bad_files: dict[str, str] = dataclasses.field(default_factory=dict)
  fatal: str = ''           # Set once the bad fraction is exceeded.
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def is_bad(self, path: str) -> bool:
    return path in self.bad_files

  def record_success(self, replaced: bool) -> None:
    with self._lock:
      self.decoded += 1
      self.replacements += int(replaced)

  def record_timeout(self) -> None:
    with self._lock:
      self.timeouts += 1

  def record_retry(self, path: str, reason: str) -> None:
    with self._lock:
      self.retries += 1
    log.info('Retrying video %s after: %s', path, reason)

  def record_failure(self, path: str, reason: str, timeout: bool = False) -> None:
    """Counts a failure; logs each path once; sets `fatal` past the allowed fraction."""
    with self._lock:
      self.failures += 1
      self.timeouts += int(timeout)
      first = path not in self.bad_files
      if first:
        self.bad_files[path] = reason
    if first:
      log.warning('Skipping undecodable video %s: %s', path, reason)

  def check(self, max_bad_fraction: float) -> None:
    """Raises BadDataError when more than `max_bad_fraction` of all files are bad."""
    n_bad = len(self.bad_files)
    if self.num_files and n_bad > max_bad_fraction * self.num_files:
      examples = '\n  '.join(f'{p}: {r}' for p, r in list(self.bad_files.items())[:10])
      self.fatal = (
          f'{n_bad} of {self.num_files} videos failed to decode, more than '
          f'config.data.max_bad_fraction={max_bad_fraction}. First failures:\n  {examples}')
      raise BadDataError(self.fatal)

  def summary(self) -> dict:
    """A snapshot: counts plus the list of bad paths with reasons."""
    with self._lock:
      return {
          'num_files': self.num_files, 'decoded': self.decoded, 'failures': self.failures,
          'replacements': self.replacements, 'timeouts': self.timeouts,
          'retries': self.retries, 'abandoned_running': self.abandoned_running,
          'num_bad_files': len(self.bad_files), 'bad_files': dict(self.bad_files),
      }
