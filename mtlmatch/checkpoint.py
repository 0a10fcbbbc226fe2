"""Checkpoints: orbax ``CheckpointManager`` over ``<workdir>/checkpoints``.

Each step directory holds ``state`` (the whole train state: params, batch statistics, optimizer, weighting state,
fixed DGR dummy heads, RNG) and ``meta`` (JSON: step, data position, config). orbax writes each step to a temporary
directory and renames it when complete, so a killed write never looks like a finished checkpoint.

Restore order (the "init sources", as in maxtext/big_vision): the newest step that restores cleanly wins; a step that
fails to restore (truncated, corrupted) is reported by a warning that names it and is *left on disk* for inspection,
and the previous step is tried; with no usable checkpoint the run starts from the fresh initialisation.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

# Config keys that may differ between a checkpoint's run and the run resuming it: they change how long or how
# verbosely the run goes, never the model, the data stream or the maths of a step.
SAFE_TO_CHANGE = frozenset({'total_steps', 'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints',
                            'eval_batch_size', 'nonfinite'})


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs; synchronous so a step is on disk when ``save`` returns."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any, *, check_meta: Optional[Callable[[dict], None]] = None
                     ) -> Optional[tuple[Any, dict]]:
    """Newest restorable ``(state, meta)``, falling back past unreadable steps; None if there is none.

    ``check_meta(meta)`` runs on a step's metadata before its state is read (e.g. the config-drift check); what it
    raises propagates, so a refused resume never falls back to an older step or a fresh start.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
      except Exception as e:  # orbax raises many types for a damaged directory; all mean "unusable".
        self._warn(step, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored['state'], meta
      except Exception as e:  # pylint: disable=broad-except
        self._warn(step, e)
    return None

  def _warn(self, step: int, error: Exception) -> None:
    logging.warning('Checkpoint step %d in %s could not be restored (%s: %s); it is left on disk for inspection '
                    'and the previous step is tried.', step, self.directory, type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else '')

  def close(self) -> None:
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding description of ``state`` for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def check_config_drift(saved: dict, current: dict) -> None:
  """Refuses to resume when the saved config differs from the new one outside :data:`SAFE_TO_CHANGE`."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  changed = sorted(k for k in set(flat_saved) | set(flat_current)
                   if k.split('.')[0] not in SAFE_TO_CHANGE and flat_saved.get(k, '<absent>') != flat_current.get(
                       k, '<absent>'))
  if changed:
    details = '; '.join(f'{k}: saved {flat_saved.get(k, "<absent>")}, now {flat_current.get(k, "<absent>")}'
                        for k in changed[:8])
    raise ValueError(f'config differs from the one the checkpoint in the workdir was trained with ({details}). '
                     f'Only {sorted(SAFE_TO_CHANGE)} may change on resume; use a new --workdir for a new run.')


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  # JSON round-trips turn tuples into lists; compare canonical JSON text.
  return {prefix[:-1]: json.dumps(tree, sort_keys=True, default=str)}
