"""Every CPU core by default: one XLA:CPU device per core (``--xla_force_host_platform_device_count``), chosen
before JAX starts, unless the user set that flag.

JAX gives the CPU one device by default, and XLA:CPU then runs most of a small model's step on one core. With one
fake device per core the data-parallel train step (``mtlmatch.train``: batch sharded on ``data``) runs its shards
side by side. The flag only concerns the host platform, so on a GPU/TPU machine it changes nothing about the
accelerators. The device count must divide the global batch (the train loop's rule), so the count is the largest
``d ≤ cores`` dividing every batch size given.

Used by ``mtlmatch.main`` (from the parsed config, before importing JAX) and by ``experiments/sweep.py`` (for each
run's subprocess, which makes ``experiments/case_studies.py`` use it too). Pure: both build the new ``XLA_FLAGS``
string here and set it themselves.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

FLAG = '--xla_force_host_platform_device_count'


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def device_count_for(cores: int, batch_sizes: Sequence[int] = ()) -> int:
  """The largest ``d`` in ``[1, cores]`` that divides every batch size (so the batch shards evenly)."""
  if not isinstance(cores, int) or cores < 1:
    raise ValueError(f'cores: got {cores!r}, expected an int >= 1')
  for d in range(cores, 0, -1):
    if all(b % d == 0 for b in batch_sizes):
      return d
  return 1


def user_device_count(xla_flags: Optional[str]) -> Optional[int]:
  """The device count the user's ``XLA_FLAGS`` already asks for, or None."""
  match = re.search(FLAG + r'=(\d+)', xla_flags or '')
  return int(match.group(1)) if match else None


def xla_flags_with_cores(xla_flags: Optional[str], cores: int, batch_sizes: Sequence[int] = ()) -> str:
  """``xla_flags`` plus ``--xla_force_host_platform_device_count=d`` (:func:`device_count_for`), unchanged when it
  already sets a device count (the user's choice wins)."""
  xla_flags = (xla_flags or '').strip()
  if user_device_count(xla_flags) is not None:
    return xla_flags
  return f'{xla_flags} {FLAG}={device_count_for(cores, batch_sizes)}'.strip()
