"""Starting a run from another run's encoder (and optionally heads): ``--config.init_from=<workdir or checkpoint>``.

Fine-tuning and single-task → multi-task warm starts. Only parameters (and the encoder's BatchNorm statistics) are
taken; the optimizer, the weighting method's state and the step start afresh. ``config.init_heads=True`` also takes
the head of every task both runs have; the other heads keep their fresh initialisation. Any difference of shape
between what is taken and what this run builds is one ValueError naming the leaves. ``init_from`` is read only when
a run starts: once the workdir has a checkpoint of its own, the run resumes from that.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np


def resolve(path: str) -> str:
  """The orbax ``state`` item under ``path``: a workdir (its newest checkpoint), its ``checkpoints/`` directory, or
  one step directory."""
  candidates = [path, os.path.join(path, 'checkpoints')]
  if os.path.isdir(os.path.join(path, 'state')):
    return os.path.join(path, 'state')
  for directory in candidates:
    steps = sorted(int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else ()) if d.isdigit())
    for step in reversed(steps):
      if os.path.isdir(os.path.join(directory, str(step), 'state')):
        return os.path.join(directory, str(step), 'state')
  raise ValueError(
      f'config.init_from: got {path!r}, expected a workdir with checkpoints/<step>/state, its '
      'checkpoints/ directory or one <step> directory'
  )


def restore_raw(state_dir: str) -> Any:
  """A saved train state as nested dicts of arrays on this process's first device (no target tree needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
      meta,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'),
  )
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    return checkpointer.restore(epath.Path(state_dir), args=ocp.args.StandardRestore(target))


def _layout(tree, prefix: str) -> dict[str, tuple]:
  """``{'<prefix>.a.b': shape}`` of every leaf."""

  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))

  return {
      '.'.join([prefix] + [name(k) for k in path]): tuple(np.shape(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _take(saved, current, *, where: str, source: str):
  """``saved`` placed like ``current`` (replicated), after checking that both have the same leaves and shapes."""
  old, new = _layout(saved, where), _layout(current, where)
  show = lambda shape: 'absent' if shape is None else f'shape {shape}'  # noqa: E731
  diffs = [
      f'{p}: saved {show(old.get(p))}, now {show(new.get(p))}'
      for p in sorted(set(old) | set(new))
      if old.get(p) != new.get(p)
  ]
  if diffs:
    raise ValueError(
        f'config.init_from={source!r}: {where} does not match this run ({len(diffs)} differences: '
        f'{"; ".join(diffs[:4])}{"; ..." if len(diffs) > 4 else ""}); expected the same encoder name '
        'and kwargs (and head) as the run that wrote it'
    )

  def place(s, c):
    host = np.asarray(jax.device_get(s)).astype(c.dtype)
    return jax.make_array_from_callback(host.shape, c.sharding, lambda index: host[index])

  return jax.tree.map(place, saved, current)


def apply(state, config) -> Any:
  """``state`` with the encoder (and, with ``config.init_heads``, the shared tasks' heads) of ``config.init_from``."""
  source = config.init_from
  saved = restore_raw(resolve(source))
  params = dict(state.params)
  params['encoder'] = _take(saved['params']['encoder'], state.params['encoder'], where='params.encoder', source=source)
  batch_stats = state.batch_stats
  if state.batch_stats or saved.get('batch_stats'):
    batch_stats = _take(saved.get('batch_stats') or {}, state.batch_stats, where='batch_stats', source=source)
  taken = ['encoder']
  if config.init_heads:
    heads = dict(params['heads'])
    for task in heads:
      if task in saved['params']['heads']:
        heads[task] = _take(saved['params']['heads'][task], heads[task], where=f'params.heads.{task}', source=source)
        taken.append(f'head {task!r}')
    params['heads'] = heads
  logging.info('Initialised %s from %s', ', '.join(taken), source)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=state.opt_state)
