"""Checkpoints: orbax ``CheckpointManager`` over ``<workdir>/checkpoints``.

Each step directory holds ``state`` (the whole train state: params, batch statistics, optimizer, weighting state,
fixed DGR dummy heads, RNG) and ``meta`` (JSON: the package version, step, data position, config). Usage::

    checkpointer = Checkpointer(workdir, keep=2)
    restored = checkpointer.restore_latest(abstract_like(state), check_meta=lambda meta: ...)  # None: fresh start
    checkpointer.save(step, state, meta)          # starts the write; returns once the arrays are off the device
    checkpointer.wait()                           # the write is committed (or its error raised) when this returns
    checkpointer.close()                          # waits too

Writes are asynchronous (orbax async checkpointing): ``save`` returns once orbax has copied the state's arrays to
host memory — the train step donates the state's buffers right after, so that copy must be complete; orbax does it
before ``save`` returns because no ``save_device_host_concurrent_bytes`` limit is set (with a limit it would defer
part of the copy into the background) — and the files are written, and the step directory committed, in a
background thread while training goes on. (On CPU the host copy is a view of the device buffer: XLA then does not
donate that buffer to the next step but allocates a new one, so the saved values stay intact.) Whatever needs a
finished write waits for it: the next ``save``, ``wait``, ``close``, ``all_steps``/``latest_step`` (a step is
reported only once committed) and ``restore_latest``. A failed background write raises :class:`CheckpointWriteError`
at the next of these, naming the step and the cause; the previous step stays the newest. ``asynchronous=False``
waits inside ``save``.

What survives what (tested in tests/test_faults.py, experiments/kill_test.py):

* **A killed write** (kill -9, power loss; also one killed in the background, during the next train steps) never
  looks like a finished checkpoint: orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
  when complete; leftover temporary directories of killed writes are removed when the next run opens the workdir
  (``cleanup_tmp_directories``). ``keep`` newest steps are kept.
* **A damaged step** (truncated or corrupted file, missing item): restore order — the "init sources", as in
  maxtext/big_vision — is newest step first; a step that cannot be read is *moved aside* to
  ``<workdir>/checkpoints_corrupt/<step>-<timestamp>`` with a warning naming both paths (never deleted, and out of
  the way of orbax, which would refuse to save that step number again), and the previous step is tried; with no
  usable checkpoint the run starts from the fresh initialisation.
* **A checkpoint of a different run** is refused, never skipped: ``check_meta`` (the config-drift check) raises for
  an unsafe config change, and a saved train state whose layout (tree paths, shapes, dtypes) differs from the one
  this run builds raises a ValueError naming the first differing leaves — e.g. a custom benchmark with another
  number of classes under an identical config. Neither is treated as damage.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from mtlmatch import __version__

# Config keys (a top-level name covers its subtree) that may differ between a checkpoint's run and the run resuming
# it: how long or how verbosely the run goes, how a non-finite update is handled, and where the same data are read
# from — never the model, the data stream or the maths of a finite step. Deliberately absent: batch_size, seed and
# the rest of data.* (the data stream), optimizer.*, encoder, head, objective, weighting and tasks (the maths).
# total_steps is safe in this sense but not neutral: the cosine schedule spans total_steps, so training longer
# changes the learning rate from the resumed step on (the steps already taken are kept as they are). init_from and
# init_heads are read only when a run starts (a resumed run continues from its own checkpoint). evals (what is
# measured) never changes a step; an evaluator added on resume starts its record afresh, a removed one's is dropped.
# encoder.kwargs.conv_impl, remat and weighting.jacobian choose how the same values are computed (a CPU GEMM or the
# native convolution; activations kept or recomputed; Jacobian rows vmapped or one by one), never the maths; the
# profile_* keys only trace some steps.
SAFE_TO_CHANGE = frozenset(
    {
        'total_steps',
        'log_every',
        'eval_every',
        'checkpoint_every',
        'keep_checkpoints',
        'eval_batch_size',
        'nonfinite',
        'early_stopping_patience',
        'data.data_dir',
        'data.options.idx_dir',
        'encoder.kwargs.conv_impl',
        'remat',
        'weighting.jacobian',
        'profile_steps',
        'profile_first_step',
        'init_from',
        'init_heads',
        'evals',
    }
)

# The version of the package that writes a checkpoint, in its metadata (``meta['version']``). A 0.x package makes no
# promise across minor versions: a checkpoint of another minor version is refused with one message naming both.
VERSION = __version__


def check_version(meta: dict, *, where: str) -> None:
  """Refuses a checkpoint written by another minor version of mtlmatch (0.1 wrote no version)."""
  saved = meta.get('version', '0.1')  # the one key a 0.1 checkpoint cannot have: its absence is the version
  if saved.split('.')[:2] != VERSION.split('.')[:2]:
    raise ValueError(
        f'{where} was written by mtlmatch {saved}; this is mtlmatch {VERSION}, whose train state and metadata '
        'differ (0.x versions keep no compatibility across minor versions). Train again in a new --workdir, or '
        f'resume it with mtlmatch {saved}.'
    )


CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointWriteError(RuntimeError):
  """A checkpoint write that failed in the background; raised at the next wait (see the module docstring)."""


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs; ``save`` starts an asynchronous write (``asynchronous=False``: waits
  for it), and everything that needs a committed step waits for the write in flight first."""

  def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.corrupt_directory = os.path.join(self.workdir, CORRUPT_DIR)
    self.asynchronous = asynchronous
    self._writing: Optional[int] = None  # the step whose write may still be in flight
    self._closed = False
    # No save_device_host_concurrent_bytes: with that limit orbax would copy part of the state off the device in the
    # background, after save returns and the train step has donated the buffers.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True
        ),
    )

  def wait(self) -> None:
    """Blocks until the write in flight (if any) is committed; raises :class:`CheckpointWriteError` if it failed."""
    step, self._writing = self._writing, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # whatever the background write raised
      # orbax has already dropped from its list the steps this write was to replace (keep), but deletes them only
      # after a successful commit: they are still on disk, so read the list again.
      self._manager.reload()
      done = self._manager.all_steps()
      raise CheckpointWriteError(
          f'checkpoint step {step} could not be written to {self.directory} ({type(e).__name__}: {e}); expected a '
          f'committed step directory {self._step_dir(step)}. The newest committed step is '
          f'{max(done) if done else "none"}; check free space and permissions.'
      ) from e

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (waits for the write in flight)."""
    self.wait()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing ``(state, meta)`` as ``step``; returns once ``state`` is copied off the device (its buffers may
    then be donated) and, with ``asynchronous=False``, once the step is committed."""
    self.wait()  # a failed previous write is raised here, before another starts
    # Serialised in the background: later changes to the caller's dicts must not leak in. The package version rides
    # along (check_version reads it back; restore_latest returns the caller's meta without it).
    meta = {'version': VERSION, **copy.deepcopy(meta)}
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )
    self._writing = step
    if not self.asynchronous:
      self.wait()

  def restore_latest(
      self, abstract_state: Any, *, check_meta: Optional[Callable[[dict], None]] = None
  ) -> Optional[tuple[Any, dict]]:
    """Newest restorable ``(state, meta)``, moving unreadable steps aside; None if no step is usable.

    ``check_meta(meta)`` runs on a step's metadata before its state is read (e.g. the config-drift check); what it
    raises propagates, so a refused resume never falls back to an older step or a fresh start. A saved state whose
    layout differs from ``abstract_state`` raises ValueError (see :func:`check_state_layout`) for the same reason.
    """
    moved = False
    try:
      for step in reversed(self.all_steps()):
        try:
          meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
          saved_layout = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(step)) / 'state').tree
        except Exception as e:  # pylint: disable=broad-except  # orbax raises many types; all mean "unreadable".
          moved |= self._set_aside(step, e)
          continue
        where = f'checkpoint step {step} in {self.directory}'
        check_version(meta, where=where)
        if check_meta is not None:
          check_meta(meta)
        check_state_layout(saved_layout, abstract_state, where=where)
        try:
          restored = self._manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
          )
          return restored['state'], {k: v for k, v in meta.items() if k != 'version'}
        except Exception as e:  # pylint: disable=broad-except
          moved |= self._set_aside(step, e)
      return None
    finally:
      if moved:
        self._manager.reload()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_aside(self, step: int, error: Exception) -> bool:
    """Moves an unreadable step directory to ``checkpoints_corrupt/<step>-<timestamp>`` (process 0 only)."""
    reason = f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}'
    source = self._step_dir(step)
    if jax.process_index() != 0 or not os.path.exists(source):
      logging.warning(
          'Checkpoint step %d at %s cannot be restored (%s); trying the previous step.', step, source, reason
      )
      return False
    os.makedirs(self.corrupt_directory, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    target, n = os.path.join(self.corrupt_directory, f'{step}-{stamp}'), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.corrupt_directory, f'{step}-{stamp}-{n}')
    shutil.move(source, target)
    logging.warning(
        'Checkpoint step %d at %s cannot be restored (%s); moved it to %s (kept for inspection, not '
        'deleted) and trying the previous step.',
        step,
        source,
        reason,
        target,
    )
    return True

  @contextlib.contextmanager
  def closed_on_error(self):
    """Closes the checkpointer if the block raises, so that no write is left in flight behind the error (a rerun in
    the same workdir would remove its temporary directory); a write error is then logged, not raised over it."""
    try:
      yield self
    except BaseException:
      try:
        self.close()
      except CheckpointWriteError:
        logging.exception('While handling the error below, the checkpoint write in flight failed too:')
      raise

  def close(self) -> None:
    """Waits for the write in flight (raising its error, see :meth:`wait`) and releases orbax's threads; idempotent."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._manager.close()


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding description of ``state`` for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def check_state_layout(saved: Any, abstract_state: Any, *, where: str = 'checkpoint') -> None:
  """Refuses a saved train state whose leaves (paths, shapes, dtypes) differ from ``abstract_state``'s.

  ``saved``: orbax's tree metadata of the state item (nested dicts/lists of leaves with ``.shape``/``.dtype``).
  """

  def layout(tree) -> dict[str, tuple]:
    return {
        '.'.join(_key_name(k) for k in path): (
            tuple(getattr(leaf, 'shape', ())),
            str(getattr(leaf, 'dtype', type(leaf).__name__)),
        )
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  old, new = layout(saved), layout(abstract_state)
  diffs = []
  for path in sorted(set(old) | set(new), key=lambda p: (not p.startswith('params.'), p)):  # params first
    if old.get(path) != new.get(path):
      show = lambda v: 'absent' if v is None else f'shape {v[0]} {v[1]}'  # noqa: E731
      diffs.append(f'{path}: saved {show(old.get(path))}, now {show(new.get(path))}')
  if diffs:
    raise ValueError(
        f'{where} holds a train state of another layout than this run builds '
        f'({len(diffs)} differences: {"; ".join(diffs[:4])}{"; ..." if len(diffs) > 4 else ""}). '
        'Expected the same model, tasks and optimizer; resume with the code, config and data that '
        'wrote it, or use a new --workdir.'
    )


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


# Keys added after some workdirs were written, with the value that means what those runs did: a saved config without
# the key equals a current one holding that value (a workdir of before `arch` resumes with arch.name='hps').
ADDED_KEYS = {'arch.name': 'hps'}


def check_config_drift(saved: dict, current: dict) -> None:
  """Refuses to resume when the saved config differs from the new one outside :data:`SAFE_TO_CHANGE`; a key of
  :data:`ADDED_KEYS` that either config lacks counts as holding its value there."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  for key, value in ADDED_KEYS.items():  # absent on either side (an old workdir, a hand-built config): that value
    flat_saved.setdefault(key, json.dumps(value, sort_keys=True, default=str))
    flat_current.setdefault(key, json.dumps(value, sort_keys=True, default=str))
  changed = sorted(
      k
      for k in set(flat_saved) | set(flat_current)
      if not _is_safe(k) and flat_saved.get(k, '<absent>') != flat_current.get(k, '<absent>')
  )
  if changed:
    details = '; '.join(
        f'{k}: saved {flat_saved.get(k, "<absent>")}, now {flat_current.get(k, "<absent>")}' for k in changed[:8]
    )
    raise ValueError(
        f'config differs from the one the checkpoint in the workdir was trained with ({details}). '
        f'Only {sorted(SAFE_TO_CHANGE)} may change on resume; use a new --workdir for a new run.'
    )


def _is_safe(key: str) -> bool:
  parts = key.split('.')
  return any('.'.join(parts[:i]) in SAFE_TO_CHANGE for i in range(1, len(parts) + 1))


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  # JSON round-trips turn tuples into lists; compare canonical JSON text.
  return {prefix[:-1]: json.dumps(tree, sort_keys=True, default=str)}
