"""The first hour from the command line, as a new user types it: the real CLI in subprocesses, from a checkout
folder named ``mtlmatch``, with relative paths (issue 25 items 1-4, 7, 8). The face recipe's manifests of generated
JPEGs make the file-source cases (rows and paths of predictions, a new test manifest)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_cli import cli
from test_files import face_manifests, write_csv

FACES = 'configs/faces.py:dm+coann,encoder=cnn,smoke'


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  """``<tmp>/mtlmatch``: the package and the configs of this repository, and the face data under ``data/``."""
  root = tmp_path_factory.mktemp('newuser') / 'mtlmatch'
  root.mkdir()
  for name in ('mtlmatch', 'configs'):
    (root / name).symlink_to(REPO / name)
  (root / 'data').mkdir()
  options, _ = face_manifests(root / 'data')
  return root, {k: os.path.relpath(v, root) for k, v in options.items()}


def run(checkout, *args, **kwargs):
  root, _ = checkout
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return cli(*args, cwd=root, env=env, **kwargs)


def data_flags(options, **replaced):
  return [f'--config.data.options.{k}={replaced.get(k, v)}' for k, v in options.items()] + [
      '--config.data.validation_fraction=0.25'
  ]


@pytest.fixture(scope='module')
def trained(checkout):
  _, options = checkout
  code, out, err = run(checkout, f'--config={FACES}', '--workdir=workdirs/faces', *data_flags(options))
  assert code == 0, err[-3000:]
  assert 'written to workdirs/faces/results.json' in out
  return checkout[0] / 'workdirs' / 'faces'


def test_eval_writes_its_own_file_with_the_saved_config_and_accepts_a_new_test_manifest(checkout, trained):
  root, options = checkout
  before = (trained / 'results.json').read_bytes()
  code, out, err = run(checkout, '--workdir=workdirs/faces', '--mode=eval')  # item 4: no --config to retype
  assert code == 0, err[-3000:]
  (written,) = (trained / 'eval').iterdir()
  assert f'written to {written}:' in out  # item 1: says where, and training's results.json stays as it was
  assert (trained / 'results.json').read_bytes() == before
  assert json.loads(written.read_text())['metrics'] == json.loads(before)['metrics']
  # Item 4: a new test set is accepted; other training data or another model are refused, in one line.
  rows = [line.split(',') for line in (root / options['au_test_manifest']).read_text().splitlines()]
  new_test = write_csv(root / 'data' / 'au_test_new.csv', rows[0], [r for r in rows[1:5]])
  flags = data_flags(options, au_test_manifest=os.path.relpath(new_test, root))
  code, out, err = run(checkout, f'--config={FACES}', '--workdir=workdirs/faces', '--mode=eval', *flags)
  assert code == 0, err[-3000:]
  assert json.loads(sorted((trained / 'eval').iterdir())[-1].read_text())['metrics']['aus']['count'] == 4
  rows = [line.split(',') for line in (root / options['expression_manifest']).read_text().splitlines()]
  relabelled = [rows[1][0], '3' if rows[1][1] != '3' else '4']
  other = write_csv(root / 'data' / 'expressions_other.csv', rows[0], [relabelled] + rows[2:])
  flags = data_flags(options, expression_manifest=os.path.relpath(other, root))
  code, out, err = run(checkout, f'--config={FACES}', '--workdir=workdirs/faces', '--mode=eval', *flags)
  assert code == 1 and 'was trained on other data' in err and 'Traceback' not in err, err[-3000:]
  code, out, err = run(
      checkout, f'--config={FACES}', '--workdir=workdirs/faces', '--mode=eval', '--config.seed=3', *data_flags(options)
  )
  assert code == 1 and 'config differs' in err and 'seed: saved 0, now 3' in err and 'Traceback' not in err


def test_predictions_name_their_rows_paths_and_parts(checkout, trained):
  """Item 2: a training source's file has every manifest row once, in order, with its file and its part."""
  root, options = checkout
  code, out, err = run(checkout, '--workdir=workdirs/faces', '--mode=predict', '--source=expressions')
  assert code == 0, err[-3000:]
  pred = np.load(trained / 'predictions' / 'expressions.npz')
  manifest = (root / options['expression_manifest']).read_text().splitlines()[1:]
  np.testing.assert_array_equal(pred['rows'], np.arange(len(manifest)))
  assert [os.path.relpath(p, root / 'data') for p in pred['paths']] == [line.split(',')[0] for line in manifest]
  assert {str(p): int((pred['part'] == p).sum()) for p in set(pred['part'])} == {'train': 18, 'validation': 6}
  code, out, err = run(checkout, '--workdir=workdirs/faces', '--mode=predict', '--source=nope')
  assert code == 1 and err.strip().splitlines()[-1].startswith("error: --source: got 'nope'"), err[-3000:]


def test_fine_tune_with_relative_paths_and_one_line_errors(checkout, trained):
  """Item 3: README's fine-tune command with relative paths; item 8: errors on user input are one line."""
  del trained
  _, options = checkout
  tune = [f'--config={FACES}', '--workdir=workdirs/ft', '--config.init_from=workdirs/faces', *data_flags(options)]
  code, out, err = run(checkout, *tune)
  assert code == 0, err[-3000:]
  code, out, err = run(checkout, '--config=configs/faces.py:smok', '--workdir=workdirs/x')
  assert code == 1 and err.strip().startswith('error: config variant') and 'Traceback' not in err, err[-3000:]
  code, out, err = run(checkout, *tune, '--config.optimizer.learning_rate=0.5')  # a changed learning rate on resume
  assert code == 1 and 'optimizer.learning_rate: saved 0.001, now 0.5' in err and 'Traceback' not in err, err[-3000:]
  code, out, err = run(checkout, *tune, '--config.optimizer.learning_rate=0.5', '--traceback')
  assert code == 1 and 'Traceback' in err
  missing = [f'--config={FACES}', '--workdir=workdirs/y', *data_flags(options, expression_manifest='data/gone.csv')]
  code, out, err = run(checkout, *missing)
  assert code == 1 and 'gone.csv' in err and 'Traceback' not in err, err[-3000:]


def test_ctrl_c_checkpoints_and_exits_130(checkout, tfds_dir):
  """Item 7: the first Ctrl-C checkpoints after the step, says so and exits 130; the run resumes from there."""
  root, _ = checkout
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  args = [
      '--config=configs/affect.py:mtl,smoke',
      '--workdir=workdirs/ctrl_c',
      f'--config.data.data_dir={tfds_dir}',
      '--config.total_steps=100000',
      '--config.checkpoint_every=100000',
  ]
  process = subprocess.Popen(
      [sys.executable, '-m', 'mtlmatch.main', *args],
      cwd=root,
      env={**env, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  lines = []
  for line in process.stderr:  # the progress of a few logged steps, then Ctrl-C
    lines.append(line)
    if 'step 4/100000' in line:
      process.send_signal(signal.SIGINT)
      break
  out, rest = process.communicate(timeout=600)
  err = ''.join(lines) + rest
  assert process.returncode == 130, err[-3000:]
  assert 'Stopped by Ctrl-C at step' in out and 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  step = int(out.split('Stopped by Ctrl-C at step ')[1].split(',')[0])
  assert step >= 4 and (root / 'workdirs' / 'ctrl_c' / 'checkpoints' / str(step)).is_dir()
