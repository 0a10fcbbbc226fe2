"""What a run shows while it trains: a progress line or bar by default, no library chatter.

Under the CLI (absl logging at INFO) the progress line is a log line every ``log_every`` steps; from Python or a
notebook, where INFO is not shown unless logging is configured, it is a tqdm bar on stderr instead, so
``train_and_evaluate`` never runs silently (tqdm shows the rate; under logging, clu's ReportProgress logs steps/s
and the ETA). :func:`quiet_libraries` drops the INFO lines of orbax, TFDS and JAX
(which go through absl's logger) in both cases; their warnings and errors pass.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

# The packages whose INFO lines a run shows (the progress line, metrics); every other library's INFO is dropped.
KEPT_PACKAGES = ('mtlmatch', 'clu')


def _package_dirs(names: Sequence[str]) -> tuple[str, ...]:
  """The real directories of the packages ``names`` (each ending in a separator), without importing them."""
  dirs = []
  for name in names:
    spec = importlib.util.find_spec(name)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
      dirs.append(os.path.join(os.path.realpath(location), ''))
  return tuple(dirs)


class QuietLibraries(logging.Filter):
  """Keeps INFO lines from mtlmatch and clu (the progress line, metrics) and drops the libraries' INFO chatter
  (orbax, TFDS, JAX); warnings and errors from everyone pass.

  absl names every record's logger ``absl``, so a record is told apart by the module that logged it: the file it
  comes from must lie in one of the :data:`KEPT_PACKAGES`' own directories (where Python imported them from). A
  folder of the same name above the libraries (a clone named ``mtlmatch`` holding its ``.venv``) does not count."""

  def __init__(self, packages: Sequence[str] = KEPT_PACKAGES):
    super().__init__()
    self._packages = tuple(packages)
    self._dirs: Optional[tuple[str, ...]] = None
    self._kept: dict[str, bool] = {}  # record.pathname -> whether it is a file of a kept package

  def filter(self, record) -> bool:
    if record.levelno > logging.INFO:
      return True
    kept = self._kept.get(record.pathname)
    if kept is None:
      if self._dirs is None:
        self._dirs = _package_dirs(self._packages)
      kept = self._kept[record.pathname] = os.path.realpath(record.pathname).startswith(self._dirs)
    return kept


def quiet_libraries() -> None:
  """Installs :class:`QuietLibraries` on absl's logger (once; idempotent)."""
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(QuietLibraries())


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

  def log(self, step: int, total: int, loss: float) -> None:
    """``loss``: the mean over the steps since the last log. (Steps/s and the ETA: clu's ReportProgress.)"""
    if self._bar is not None:
      self._bar.set_postfix_str(f'loss {loss:.4f}', refresh=False)
      self.advance(step)
    else:
      logging.info('step %d/%d  loss %.4f', step, total, loss)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
