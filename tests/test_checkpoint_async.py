"""Asynchronous checkpoint writes (checkpoint.py): save returns before the step is committed, the train step may
donate the saved buffers right away, and a failed background write is raised at the next wait."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from mtlmatch import checkpoint as ckpt_lib


def _state():
  return {'w': jnp.arange(4096, dtype=jnp.float32) + 0, 'step': jnp.asarray(1, jnp.int32) + 0}


def test_save_returns_before_the_commit_and_the_saved_buffers_may_be_donated(tmp_path, monkeypatch):
  release, commit = threading.Event(), async_checkpointer._on_commit_callback  # pylint: disable=protected-access

  def held_commit(*args, **kwargs):  # the rename that makes the step visible waits until the test lets it
    assert release.wait(30), 'the test never released the commit'
    commit(*args, **kwargs)

  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', held_commit)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  state = _state()
  expected = jax.tree.map(np.array, state)
  checkpointer.save(1, state, {'step': 1})
  directory = tmp_path / 'checkpoints'
  assert not (directory / '1').exists() and [p.name for p in directory.iterdir()] == ['1.orbax-checkpoint-tmp']
  state = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 7, s), donate_argnums=0)(state)  # as the train step
  jax.block_until_ready(state)
  release.set()
  assert checkpointer.latest_step() == 1 and (directory / '1').exists()  # latest_step waits for the commit
  checkpointer.close()
  restored, meta = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(ckpt_lib.abstract_like(state))
  assert meta == {'step': 1}
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)  # the values at save time, not the donated ones


def test_a_failed_background_write_is_raised_at_the_next_wait_and_the_previous_step_stays(tmp_path, monkeypatch):
  commit = async_checkpointer._on_commit_callback  # pylint: disable=protected-access

  def disk_full_at_steps_2_and_3(tmpdir, *args, **kwargs):  # the commit (rename) of steps 2 and 3 fails
    if tmpdir.get_final().name in ('2', '3'):
      raise OSError(28, 'No space left on device')
    commit(tmpdir, *args, **kwargs)

  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', disk_full_at_steps_2_and_3)
  checkpointer, state = ckpt_lib.Checkpointer(str(tmp_path), keep=1), _state()
  checkpointer.save(1, state, {'step': 1})
  checkpointer.save(2, state, {'step': 2})  # returns: the failure happens in the background
  with pytest.raises(ckpt_lib.CheckpointWriteError, match=r'step 2 could not be written .*No space left.* step is 1'):
    checkpointer.latest_step()
  assert checkpointer.all_steps() == [1]  # raised once; step 1 is neither reported away nor deleted (keep=1)
  checkpointer.save(3, state, {'step': 3})
  with pytest.raises(ckpt_lib.CheckpointWriteError, match='step 3'):
    checkpointer.save(4, state, {'step': 4})  # the next save waits for the failed one first
  checkpointer.save(4, state, {'step': 4})
  checkpointer.close()
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [4]
