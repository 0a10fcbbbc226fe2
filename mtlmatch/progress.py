"""What a run shows while it trains: a progress line by default, the rate over the last interval, no library chatter.

Under the CLI (absl logging at INFO) the progress line is a log line every ``log_every`` steps; from Python or a
notebook, where INFO is not shown unless logging is configured, it is a tqdm bar on stderr instead, so
``train_and_evaluate`` never runs silently. :func:`quiet_libraries` drops the INFO lines of orbax, TFDS and JAX
(which go through absl's logger) in both cases; their warnings and errors pass.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional


class QuietLibraries(logging.Filter):
  """Keeps INFO lines from mtlmatch and clu (the progress line, metrics) and drops the libraries' INFO chatter
  (orbax, TFDS, JAX); warnings and errors from everyone pass."""

  def filter(self, record) -> bool:
    return record.levelno > logging.INFO or any(f'/{p}/' in record.pathname for p in ('mtlmatch', 'clu'))


def quiet_libraries() -> None:
  """Installs :class:`QuietLibraries` on absl's logger (once; idempotent)."""
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(QuietLibraries())


class RateMeter:
  """Steps per second over the interval since the previous call (not since the start, which counts compilation)."""

  def __init__(self, step: int, now: Optional[float] = None):
    self._step, self._time = step, time.time() if now is None else now

  def rate(self, step: int, now: Optional[float] = None) -> float:
    now = time.time() if now is None else now
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate


class Progress:
  """The progress of one run from ``start`` to ``total`` steps: a log line at each :meth:`log` under configured
  logging, else a tqdm bar (advanced every step, loss and rate shown at each :meth:`log`)."""

  def __init__(self, total: int, start: int, *, enabled: bool = True):
    self._bar = None
    if enabled and not logging.getLogger().isEnabledFor(logging.INFO):
      import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm.tqdm(
          total=total,
          initial=start,
          desc='train',
          unit='step',
          file=sys.stderr,
          leave=True,
          dynamic_ncols=True,
          mininterval=1.0,
      )

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, step: int, total: int, loss: float, rate: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(f'loss {loss:.4f}, {rate:.2f} steps/s', refresh=False)
      self.advance(step)
    else:
      logging.info(
          'step %d/%d  loss %.4f  %.2f steps/s  ETA %s', step, total, loss, rate, eta((total - step) / max(rate, 1e-9))
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
