"""Fault tolerance: kill -9 / SIGTERM mid-run, damaged checkpoints, a full or unwritable workdir, non-finite losses
('halt' and 'skip'), and config drift on resume. All marked ``fault`` (``pytest -m fault`` runs just these).

The kill test runs real training processes (experiments/kill_test.py); its long version is
``python experiments/kill_test.py --kills 20``. The in-process tests share compiled step functions through
:func:`fast_builds` (``experiment.build_experiment`` memoized per config, the initial state per model): what they
test is the loop's saving, restoring and halting, not compilation, and each compile costs seconds on a 2-core CPU.
"""

import copy
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, set_keys
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib
from mtlmatch import train
from mtlmatch import experiment as experiment_lib

pytestmark = [
    pytest.mark.fault,
    # A restore that fails part-way leaves an orbax asyncio callback for a loop already closed; it is reported when
    # garbage-collected, in whichever test that happens.
    pytest.mark.filterwarnings('ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning'),
]

CONFIG = 'configs/affect.py:dm,smoke'  # two tasks and a distribution-matching term: every kind of named loss


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def smoke(tfds_dir, spec=CONFIG, **overrides):
  config = config_lib.load_config(f'{REPO}/{spec}')
  config.data.data_dir = tfds_dir
  config.checkpoint_every = 1
  config.log_every = 1
  return set_keys(config, **overrides)


_BUILDS: dict = {}
_INITS: dict = {}
_real_build = experiment_lib.build_experiment


def _init_key(config) -> str:
  """What the initial train state depends on (not the learning-rate schedule, the step counts or nonfinite)."""
  c = json.loads(config.to_json_best_effort())
  c['optimizer'] = {
      k: v
      for k, v in c['optimizer'].items()
      if k not in ('learning_rate', 'warmup_steps', 'final_lr_fraction', 'schedule')
  }
  c['data'] = {k: c['data'][k] for k in ('name', 'options')}
  return json.dumps(
      {k: c[k] for k in ('seed', 'tasks', 'data', 'encoder', 'head', 'optimizer', 'objective', 'weighting')},
      sort_keys=True,
  )


def _cached_init(exp, key):
  if key not in _INITS:
    _INITS[key] = jax.device_get(experiment_lib.Experiment.init_state(exp))
  return jax.tree.map(lambda x: jax.device_put(x, exp.replicated), _INITS[key])  # fresh buffers: they are donated


def fast_build(config, mesh=None, *, benchmark=None):
  """``experiment_lib.build_experiment`` memoized on the config (validation runs on the first build of each config)."""
  if mesh is not None or benchmark is not None:
    return _real_build(config, mesh, benchmark=benchmark)
  config = ml_collections.ConfigDict(config)
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _BUILDS:
    exp = _real_build(config)
    object.__setattr__(exp, 'init_state', functools.partial(_cached_init, exp, _init_key(config)))
    _BUILDS[key] = exp
  return _BUILDS[key]


@pytest.fixture
def fast_builds(monkeypatch):
  monkeypatch.setattr(experiment_lib, 'build_experiment', fast_build)


def poisoned(build, at_steps):
  """A builder whose step function gets a NaN image batch when it computes one of ``at_steps`` (1-based)."""

  def build_poisoned(*args, **kwargs):
    exp = build(*args, **kwargs)
    step_fn = exp.step_fn

    def step(state, batch):
      if int(jax.device_get(state.step)) + 1 in at_steps:
        batch = {**batch, 'image': batch['image'] * jnp.float32(np.nan)}
      return step_fn(state, batch)

    return dataclasses.replace(exp, step_fn=step)

  return build_poisoned


def snapshot(root) -> dict:
  """{relative path: (size, mtime_ns, sha1)} of every file under ``root``."""
  out = {}
  for path in sorted(glob.glob(os.path.join(str(root), '**'), recursive=True)):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = (
            os.path.getsize(path),
            os.stat(path).st_mtime_ns,
            hashlib.sha1(f.read()).hexdigest(),
        )
  return out


def content(root) -> dict:
  return {k: (size, sha) for k, (size, _, sha) in snapshot(root).items()}


def assert_same_state(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def restore(workdir, config):
  exp = experiment_lib.build_experiment(config)
  return ckpt_lib.Checkpointer(str(workdir)).restore_latest(ckpt_lib.abstract_like(exp.init_state()))


@pytest.fixture(scope='module')
def base(tfds_dir, tmp_path_factory):
  """A run of CONFIG (6 steps) stopped after step 4: checkpoints 3 and 4; plus those two states."""
  root = tmp_path_factory.mktemp('faults')
  config = smoke(tfds_dir, total_steps=6)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(experiment_lib, 'build_experiment', fast_build)
    assert train.train_and_evaluate(config, str(root / 'base'), stop_at=4)['step'] == 4
    assert ckpt_lib.Checkpointer(str(root / 'base')).all_steps() == [3, 4]
    good4 = jax.device_get(restore(root / 'base', config)[0])
    shutil.copytree(root / 'base', root / 'only3')
    shutil.rmtree(root / 'only3' / 'checkpoints' / '4')
    good3 = jax.device_get(restore(root / 'only3', config)[0])
  return {'workdir': root / 'base', 'config': config, 'good3': good3, 'good4': good4}


def copy_of(base, path):
  shutil.copytree(base['workdir'], path)
  return path


# ----------------------------------------------------------------------------------------------------------------
# 1. kill -9 and SIGTERM at chosen moments of a real run → bitwise equal to an uninterrupted run.


def _kill_test_module():
  spec = importlib.util.spec_from_file_location('kill_test', os.path.join(REPO, 'experiments', 'kill_test.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules['kill_test'] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_kill_restart_is_bitwise_equal(tfds_dir, tmp_path):
  kill_test = _kill_test_module()
  Event = kill_test.Event
  # The first start of each phase in a process is the longest (compilation, orbax set-up): the kills land inside.
  events = [Event('kill', 'step', 1, 0.5), Event('kill', 'save', 1, 0.5), Event('kill', 'eval', 1, 0.5)]
  summary = kill_test.run_kill_test(
      events=events,
      config='configs/affect.py:mtl,smoke',
      overrides={'data.data_dir': tfds_dir},
      total_steps=8,
      workroot=str(tmp_path),
      log=print,
  )
  assert summary['ok'], summary['problems']
  assert summary['bitwise_equal'] and summary['metrics_equal'] and summary['leaves_compared'] > 20
  assert summary['kills_landed'] == 3
  assert summary['kills_by_phase_at_death'] == {'step': 1, 'save': 1, 'eval': 1}
  assert summary['tmp_dirs_left'] == [] and summary['moved_to_corrupt'] == []


def test_sigterm_during_a_checkpoint_write_saves_and_the_rerun_continues_bitwise(
    base, tmp_path, monkeypatch, caplog, fast_builds
):
  """SIGTERM arrives (from another thread, as from the VM's agent) while step 2's checkpoint is being written: the
  write completes, step 3 is trained and saved, the run returns; the rerun resumes from 3 and reaches the same
  state at step 4 as the uninterrupted run. (kill_test.py does the same with real processes: --sigterms.)"""
  workdir = tmp_path / 'run'
  seen, save, handler = [], ckpt_lib.Checkpointer.save, train.Preemption._handler  # pylint: disable=protected-access

  def save_with_signal(self, step, state, meta):
    if step == 2:
      writing.append(step)
      threading.Timer(0.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    save(self, step, state, meta)
    writing.clear()

  def handler_recording(self, signum, frame):
    seen.append((list(writing), (workdir / 'checkpoints' / '2').exists()))
    handler(self, signum, frame)

  writing = []
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save_with_signal)
  monkeypatch.setattr(train.Preemption, '_handler', handler_recording)  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    assert train.train_and_evaluate(base['config'], str(workdir)) == {'step': 3, 'interrupted': True}
  assert seen == [([2], False)], seen  # handled inside the write of step 2, before it was committed
  assert 'SIGTERM received: checkpoint saved at step 3' in caplog.text
  assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [2, 3]
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save)
  assert train.train_and_evaluate(base['config'], str(workdir), stop_at=4)['step'] == 4
  assert_same_state(jax.device_get(restore(workdir, base['config'])[0]), base['good4'])


@pytest.mark.slow
def test_kill_restart_long(tmp_path, tfds_dir):
  """12 kills and 2 SIGTERMs at random moments of the DM + co-annotation + DGR config with FAMO weighting."""
  summary = _kill_test_module().run_kill_test(
      kills=12, sigterms=2, seed=1, overrides={'data.data_dir': tfds_dir}, workroot=str(tmp_path), log=print
  )
  assert summary['ok'], summary['problems']
  assert summary['kills_landed'] == 12 and summary['bitwise_equal']


# ----------------------------------------------------------------------------------------------------------------
# 2. Damaged checkpoints: fall back to the previous step, move the bad one aside with a warning naming it.


def _truncate(path, fraction=0.5):
  with open(path, 'r+b') as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _flip_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))


def _array_files(step_dir):
  # orbax merges each process's OCDBT data into state/d/ when a save completes; that is what a restore reads.
  files = glob.glob(os.path.join(step_dir, 'state', 'd', '*'))
  assert files, os.listdir(os.path.join(step_dir, 'state'))
  return files


CORRUPTIONS = {
    'truncated array data': lambda d: [_truncate(p) for p in _array_files(d)],
    'one byte flipped in array data': lambda d: [_flip_byte(p) for p in _array_files(d)],
    'array data file deleted': lambda d: [os.remove(p) for p in _array_files(d)],
    'truncated OCDBT manifest': lambda d: _truncate(os.path.join(d, 'state', 'manifest.ocdbt')),
    'tree metadata deleted': lambda d: os.remove(os.path.join(d, 'state', '_METADATA')),
    'truncated meta JSON': lambda d: _truncate(os.path.join(d, 'meta', 'metadata')),
    'state item deleted': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'empty step directory': lambda d: [shutil.rmtree(d), os.makedirs(d)],
    'every file emptied': lambda d: [
        _truncate(p, 0) for p in glob.glob(os.path.join(d, '**'), recursive=True) if os.path.isfile(p)
    ],
}


@pytest.mark.parametrize('damage', list(CORRUPTIONS))
def test_damaged_latest_step_falls_back_and_is_moved_aside(damage, base, tmp_path, caplog, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  bad = workdir / 'checkpoints' / '4'
  CORRUPTIONS[damage](str(bad))
  damaged = content(bad)
  with caplog.at_level(logging.WARNING):
    state, meta = restore(workdir, base['config'])
  assert meta['step'] == 3
  assert_same_state(jax.device_get(state), base['good3'])
  moved = sorted((workdir / 'checkpoints_corrupt').iterdir())
  assert len(moved) == 1 and moved[0].name.startswith('4-'), moved
  assert content(moved[0]) == damaged  # kept as it was, not repaired, not deleted
  assert not bad.exists() and ckpt_lib.Checkpointer(str(workdir)).all_steps() == [3]
  warning = caplog.text
  assert f'Checkpoint step 4 at {bad} cannot be restored' in warning and f'moved it to {moved[0]}' in warning


def test_training_resumes_past_a_damaged_step_and_ends_bitwise_equal(base, tmp_path, caplog, fast_builds):
  reference = copy_of(base, tmp_path / 'reference')
  assert train.train_and_evaluate(base['config'], str(reference))['step'] == 6
  workdir = copy_of(base, tmp_path / 'run')
  CORRUPTIONS['truncated array data'](str(workdir / 'checkpoints' / '4'))
  with caplog.at_level(logging.INFO):
    results = train.train_and_evaluate(base['config'], str(workdir))
  assert results['step'] == 6
  assert 'Checkpoint step 4 at' in caplog.text and 'Resumed from step 3' in caplog.text
  # It trained through step 4 again and saved a new step 4 (orbax refuses a step whose directory exists).
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_corrupt').iterdir()] == ['4']
  assert_same_state(
      jax.device_get(restore(workdir, base['config'])[0]), jax.device_get(restore(reference, base['config'])[0])
  )
  assert results['metrics'] == json.loads((reference / 'results.json').read_text())['metrics']


def test_every_step_damaged_starts_fresh_and_keeps_them_all(base, tmp_path, caplog, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  for step in (3, 4):
    CORRUPTIONS['truncated meta JSON'](str(workdir / 'checkpoints' / str(step)))
  with caplog.at_level(logging.WARNING):
    assert restore(workdir, base['config']) is None
  assert sorted(p.name.split('-')[0] for p in (workdir / 'checkpoints_corrupt').iterdir()) == ['3', '4']
  assert 'Checkpoint step 4' in caplog.text and 'Checkpoint step 3' in caplog.text


def test_leftover_temporary_directory_of_a_killed_write_is_ignored_and_cleaned(base, tmp_path, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  partial = workdir / 'checkpoints' / '5.orbax-checkpoint-tmp-1234567890'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'half_written').write_bytes(b'\0' * 100)
  state, meta = restore(workdir, base['config'])
  assert meta['step'] == 4 and not partial.exists()
  assert_same_state(jax.device_get(state), base['good4'])


# ----------------------------------------------------------------------------------------------------------------
# 3. A workdir that cannot take a run: a clear error before training, nothing written.


def test_workdir_under_a_regular_file(base, tmp_path, fast_builds):
  blocker = tmp_path / 'not_a_dir'
  blocker.write_text('a file')
  with pytest.raises(
      ValueError,
      match=r"workdir '.*not_a_dir/run': cannot write there \(Not a directory\); "
      r'expected a writable directory with free space',
  ):
    train.train_and_evaluate(base['config'], str(blocker / 'run'))
  assert blocker.read_text() == 'a file'


def test_disk_full_on_the_probe_write(base, tmp_path, fast_builds):
  """A real ENOSPC from the kernel: the workdir's write probe is a symlink to /dev/full (every write to it fails
  with 'No space left on device'), so the probe's synced write meets what a full disk returns."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full on this system')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink('/dev/full', workdir / '.write_probe')
  with pytest.raises(ValueError, match=r"workdir '.*run': cannot write there \(No space left on device\)"):
    train.train_and_evaluate(base['config'], str(workdir))
  assert sorted(os.listdir(workdir)) == ['.write_probe']


def test_too_little_free_space(base, tmp_path, monkeypatch, fast_builds):
  """The filesystem reports 5 MiB free (statvfs faked): refused before training, below the 64 MiB floor."""
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: real(path)._replace(free=5 * 2**20))
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r"workdir '.*run': 5\.0 MiB free on its filesystem, expected at least 64 MiB"):
    train.train_and_evaluate(base['config'], str(workdir))
  assert os.listdir(workdir) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through a read-only mode')
def test_read_only_workdir(base, tmp_path, fast_builds):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    with pytest.raises(ValueError, match=r'cannot write there \(Permission denied\)'):
      train.train_and_evaluate(base['config'], str(workdir))
  finally:
    workdir.chmod(0o700)


# ----------------------------------------------------------------------------------------------------------------
# 4. Non-finite losses: 'halt' names the step and the losses and keeps the last good checkpoint; 'skip' skips.


def test_nonfinite_halts_naming_step_tasks_and_term_and_keeps_the_checkpoint(base, tmp_path, monkeypatch, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  before = snapshot(workdir / 'checkpoints')
  monkeypatch.setattr(experiment_lib, 'build_experiment', poisoned(fast_build, {5}))
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(base['config'], str(workdir))
  message = str(error.value)
  assert message.startswith('non-finite training at step 5: non-finite '), message
  for name in ("task 'expression' = nan", "task 'aus' = nan", "term 'dm' = nan", 'grad_norm = nan'):
    assert name in message, message
  assert 'the last good checkpoint, step 4, is kept' in message and "config.nonfinite='skip'" in message
  assert snapshot(workdir / 'checkpoints') == before  # nothing written, nothing removed
  monkeypatch.setattr(experiment_lib, 'build_experiment', fast_build)
  state, meta = restore(workdir, base['config'])
  assert meta['step'] == 4
  assert_same_state(jax.device_get(state), base['good4'])


def test_skip_leaves_the_state_unchanged_and_counts(base, fast_builds):
  config = copy.deepcopy(base['config'])
  config.nonfinite = 'skip'
  exp = experiment_lib.build_experiment(config)
  batches = exp.train_batches(0)
  state = exp.init_state()
  history = []
  for step in range(1, 5):
    batch = next(batches)
    if step in (2, 3):  # two poisoned batches in a row
      batch = {**batch, 'image': batch['image'] * jnp.float32(np.nan)}
    before = jax.device_get(state)
    state, metrics = exp.step_fn(state, batch)
    after, metrics = jax.device_get((state, metrics))
    history.append((before, after, metrics))
  for step, (before, after, metrics) in enumerate(history, start=1):
    skipped = step in (2, 3)
    assert bool(metrics['finite']) is not skipped
    assert int(after.step) == step and int(after.skipped) == int(metrics['skipped']) == min(max(step - 1, 0), 2)
    if skipped:  # everything but the two counters is bitwise what it was
      assert np.isnan(metrics['loss'])
      assert_same_state(after.replace(step=before.step, skipped=before.skipped), before)
    else:
      assert np.isfinite(metrics['loss'])
  # The clean step after the skipped ones does update (step 1 does not: the warm-up starts at learning rate 0).
  before, after, _ = history[-1]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))


# ----------------------------------------------------------------------------------------------------------------
# 5. Config drift on resume: safe keys may change, anything else is refused before a byte is written.


def test_safe_change_resumes(base, tmp_path, caplog, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  config = copy.deepcopy(base['config'])
  config.total_steps, config.log_every, config.checkpoint_every, config.keep_checkpoints = 8, 2, 2, 3
  config.eval_every = 4
  with caplog.at_level(logging.INFO):
    results = train.train_and_evaluate(config, str(workdir))
  assert results['step'] == 8 and 'Resumed from step 4' in caplog.text
  assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [4, 6, 8]


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('optimizer.learning_rate', 0.002, r'optimizer\.learning_rate: saved 0\.001, now 0\.002'),
        ('batch_size', 24, r'batch_size: saved 16, now 24'),
        ('data.mixing', 'equal_per_task', r'data\.mixing: saved "weights", now "equal_per_task"'),
    ],
)
def test_unsafe_change_is_refused_and_writes_nothing(key, value, message, base, tmp_path, fast_builds):
  workdir = copy_of(base, tmp_path / 'run')
  before = snapshot(workdir)
  config = copy.deepcopy(base['config'])
  *path, last = key.split('.')
  target = config
  for part in path:
    target = target[part]
  target[last] = value
  with pytest.raises(
      ValueError,
      match=r'config differs from the one the checkpoint in the workdir was trained with '
      rf'\({message}\)\. Only \[.*\] may change on resume',
  ):
    train.train_and_evaluate(config, str(workdir))
  assert snapshot(workdir) == before


def test_config_drift_rules():
  saved = {
      'total_steps': 10,
      'seed': 0,
      'data': {'data_dir': '/a', 'seed': 0, 'options': {'idx_dir': '/x', 'n': 1}},
      'optimizer': {'learning_rate': 0.1},
  }
  ckpt_lib.check_config_drift(
      saved,
      {
          **saved,
          'total_steps': 20,
          'log_every': 5,
          'data': {**saved['data'], 'data_dir': '/b', 'options': {'idx_dir': '/y', 'n': 1}},
      },
  )
  for changed, key in [
      ({'seed': 1}, 'seed'),
      ({'data': {**saved['data'], 'seed': 2}}, r'data\.seed'),
      ({'data': {**saved['data'], 'options': {'idx_dir': '/x', 'n': 2}}}, r'data\.options\.n'),
      ({'optimizer': {}}, r'optimizer\.learning_rate: saved 0\.1, now <absent>'),
  ]:
    with pytest.raises(ValueError, match=key):
      ckpt_lib.check_config_drift(saved, {**saved, **changed})
  # How the same values are computed may change (remat, the Jacobian path); a key the saved config lacks is a change
  # like any other (0.1's ADDED_KEYS went with 0.1's checkpoints, which their version refuses).
  ckpt_lib.check_config_drift(saved, {**saved, 'remat': True})
  ckpt_lib.check_config_drift(
      {**saved, 'weighting': {'jacobian': 'vmap'}}, {**saved, 'weighting': {'jacobian': 'rows'}}
  )
  for changed, key in [
      ({'precision': 'bfloat16'}, r'precision: saved <absent>, now "bfloat16"'),
      ({'precision': 'float32'}, r'precision: saved <absent>, now "float32"'),
      ({'encoder': {'kwargs': {'stem': 'imagenet'}}}, r'encoder\.kwargs\.stem: saved <absent>, now "imagenet"'),
  ]:
    with pytest.raises(ValueError, match=key):
      ckpt_lib.check_config_drift(saved, {**saved, **changed})
  assert {
      'total_steps',
      'log_every',
      'eval_every',
      'checkpoint_every',
      'keep_checkpoints',
      'eval_batch_size',
      'nonfinite',
  } <= ckpt_lib.SAFE_TO_CHANGE
  assert not {'batch_size', 'seed', 'data', 'optimizer', 'encoder', 'objective', 'weighting', 'tasks'} & (
      ckpt_lib.SAFE_TO_CHANGE
  )
