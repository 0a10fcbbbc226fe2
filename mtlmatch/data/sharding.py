"""Hosts and devices: batch-size checks, host-local numpy batches → global ``jax.Array``s, prefetch to device.

Each host produces ``global_batch_size / process_count`` examples per step from its own slice of every source;
:func:`to_global` turns that host-local batch into global arrays sharded on the mesh's batch axis with
``jax.make_array_from_process_local_data``, and :func:`prefetch_to_device` keeps a couple of batches in flight::

    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec('data'))
    for batch in prefetch_to_device(numpy_batches, sharding, size=2): ...
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def resolve_process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """``(process_index, process_count)``, defaulting to JAX's (overridable so tests can simulate hosts)."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
    raise ValueError(f'process_count: got {process_count!r}, expected an int >= 1')
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
    raise ValueError(f'process_index: got {process_index!r}, expected an int in [0, {count})')
  return int(index), int(count)


def batch_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding every batch leaf gets: its leading (batch) axis split like ``sharding.spec[0]``, the rest whole."""
  if not isinstance(sharding, NamedSharding):
    raise ValueError(
        f'sharding: got {type(sharding).__name__}, expected a jax.sharding.NamedSharding over a 1-D ' "'data' mesh"
    )
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if spec else None))


def batch_devices(sharding: NamedSharding) -> int:
  """How many ways the batch axis is split (the product of the mesh axes named by ``spec[0]``)."""
  axes = batch_sharding(sharding).spec[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def per_host_batch_size(global_batch_size: int, process_count: int, sharding: Optional[NamedSharding] = None) -> int:
  """``global_batch_size / process_count`` after checking it splits evenly over hosts and devices (else ValueError)."""
  if (
      isinstance(global_batch_size, bool)
      or not isinstance(global_batch_size, (int, np.integer))
      or (global_batch_size < 1)
  ):
    raise ValueError(f'global_batch_size: got {global_batch_size!r}, expected an int >= 1')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size: got {global_batch_size}, expected a multiple of process_count='
        f'{process_count} (each host reads global_batch_size / process_count examples)'
    )
  if sharding is not None:
    devices = batch_devices(sharding)
    if global_batch_size % devices:
      raise ValueError(
          f'global_batch_size: got {global_batch_size}, expected a multiple of the {devices} devices '
          'the batch is sharded over'
      )
    if process_count != jax.process_count():
      raise ValueError(
          f'process_count: got {process_count} with a sharding, expected jax.process_count()='
          f'{jax.process_count()} (simulated hosts only work without a sharding)'
      )
  return int(global_batch_size // process_count)


def to_global(batch, sharding: NamedSharding):
  """Host-local numpy batch (leading axis = this host's examples) → global ``jax.Array`` leaves, sharded on axis 0."""
  leaf_sharding = batch_sharding(sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(leaf_sharding, np.asarray(x)), batch)


def prefetch_to_device(batches: Iterable, sharding: NamedSharding, size: int = 2) -> Iterator:
  """Yields ``to_global(batch)`` while keeping ``size`` batches already transferred (host→device copy overlaps)."""
  queue = collections.deque()
  iterator = iter(batches)

  def enqueue(n):
    for _ in range(n):
      try:
        queue.append(to_global(next(iterator), sharding))
      except StopIteration:
        return

  enqueue(max(1, size))
  while queue:
    yield queue.popleft()
    enqueue(1)
