"""Workdir I/O: what a run writes besides its checkpoints, in one place.

A workdir holds ``checkpoints/`` (``mtlmatch/checkpoint.py``), TensorBoard event files, and the files below, each
written atomically (a synced temporary file renamed over the old one: readers see the old or the new file):

* ``config.json``: the resolved config of the run (every field of the chosen encoder and method);
* ``relatedness.json``: the relatedness tables the objective resolved, by pair and spec;
* ``relatedness_learned.json``: the latest learned tables, their step and their ``history`` (docs/maths.md §8);
* ``results.json``: the final results of training (:func:`write_results`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

CONFIG_FILE = 'config.json'
RELATEDNESS_FILE = 'relatedness.json'
LEARNED_RELATEDNESS_FILE = 'relatedness_learned.json'
RESULTS_FILE = 'results.json'

# Below this much free space on the workdir's filesystem a run is refused at start (a floor, not a capacity plan:
# a full disk otherwise shows up as a failed checkpoint write hours later; the previous checkpoint survives that).
MIN_FREE_BYTES = 64 * 2**20


def check_writable(workdir: str) -> None:
  """A clear error before training when the workdir cannot be written (a path under a file, read-only, ENOSPC on a
  synced probe write) or its filesystem has less than :data:`MIN_FREE_BYTES` free."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_probe')
    with open(probe, 'w') as f:
      f.write('ok')
      f.flush()
      os.fsync(f.fileno())
    try:
      os.remove(probe)
    except FileNotFoundError:  # another host of this run probed the same shared workdir at the same moment
      pass
    free = shutil.disk_usage(workdir).free
  except OSError as e:
    raise ValueError(
        f'workdir {workdir!r}: cannot write there ({e.strerror or e}); expected a writable directory with free space'
    ) from None
  if free < MIN_FREE_BYTES:
    raise ValueError(
        f'workdir {workdir!r}: {free / 2 ** 20:.1f} MiB free on its filesystem, expected at least '
        f'{MIN_FREE_BYTES / 2 ** 20:.0f} MiB for checkpoints'
    )


def write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a synced temporary file and a rename: readers see the old or the new file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def jsonable(value):
  """``json.dumps``'s ``default``: arrays as nested lists, numpy scalars as Python numbers."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'not JSON serialisable: {type(value)}')


def write_json(workdir: str, name: str, value: Any, *, indent: int = 1) -> str:
  """``value`` as JSON in ``<workdir>/<name>``, atomically; returns the path."""
  path = os.path.join(workdir, name)
  write_atomically(path, json.dumps(value, indent=indent, default=jsonable))
  return path


def read_json(workdir: str, name: str) -> Any:
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def exists(workdir: str, name: str) -> bool:
  return os.path.exists(os.path.join(workdir, name))


def write_results(workdir: str, results: dict) -> str:
  """``results.json``: the final results of training (step, wall time, each evaluator's part)."""
  return write_json(workdir, RESULTS_FILE, results)


def read_results(workdir: str) -> dict:
  return read_json(workdir, RESULTS_FILE)


def learned_history(workdir: str) -> list:
  """The ``history`` of ``relatedness_learned.json`` written by an earlier run in ``workdir`` ([] if none)."""
  if not exists(workdir, LEARNED_RELATEDNESS_FILE):
    return []
  return read_json(workdir, LEARNED_RELATEDNESS_FILE)['history']


def write_learned(workdir: str, step: int, tables: dict, history: list) -> None:
  """``relatedness_learned.json``: the latest learned tables, their step and every logged ``{step, tables}``."""
  write_atomically(
      os.path.join(workdir, LEARNED_RELATEDNESS_FILE), json.dumps({'step': step, 'tables': tables, 'history': history})
  )
