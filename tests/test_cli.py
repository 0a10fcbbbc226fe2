"""Documented switches that work: every encoder with every config file, every hyper-parameter as a
dotted key, one line for a misspelt key, ``--help`` listing every switch (the docs' config
reference is generated from it: tests/test_docs.py), and the CLI's modes run for
real in subprocesses (smoke configs, a few steps)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from mtlmatch import config_help, config_lib, models, weighting

CONFIGS = ('affect', 'shopping', 'multi_fashion')


def cli(*args, env=None, timeout=600, cwd=REPO, python=sys.executable):
  """``python -m mtlmatch.main ARGS`` on one CPU device, run in ``cwd``; (exit code, stdout, stderr)."""
  full_env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', **(env or {})}
  done = subprocess.run(
      [os.fspath(python), '-m', 'mtlmatch.main', *args],
      cwd=cwd,
      env=full_env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  return done.returncode, done.stdout, done.stderr


# Parses each command line with the CLI's own steps (main.prepare_argv, then ml_collections' --config flag with its
# overrides), builds the experiment and initialises the model abstractly: every encoder x every config file in one
# process. test_train_eval_predict_from_the_cli trains through the whole CLI.
_MATRIX = r"""
import sys
import jax, numpy as np
from absl import flags
from ml_collections import config_flags
from mtlmatch import experiment as experiment_lib
from mtlmatch import main, models
configs, tfds_dir, idx_dir = sys.argv[1].split(','), sys.argv[2], sys.argv[3]
DENSE = ('dilated_resnet', 'segnet')
for name in configs:
  for encoder in sorted(models.ENCODERS):
    if encoder in DENSE:
      continue  # a feature map for per-pixel heads: no config file has a dense task yet
    argv = main.prepare_argv(['main', f'--config=configs/{name}.py:dm+coann+dgr,smoke', '--workdir=unused',
                              f'--config.encoder.name={encoder}', '--config.encoder.kwargs.dtype=float32',
                              f'--config.data.data_dir={tfds_dir}'] +
                             ([f'--config.data.options.idx_dir={idx_dir}'] if name != 'affect' else []))
    sys.argv = argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True)
    flags.DEFINE_string('workdir', None, '', flag_values=values)
    values(argv)
    exp = experiment_lib.build_experiment(values.config)
    shapes = jax.eval_shape(exp.model.init, jax.random.PRNGKey(0), np.zeros((2, *exp.benchmark.image_shape)))
    print('OK', name, encoder, values.config.encoder.name, sorted(values.config.encoder.kwargs), flush=True)
"""


def test_every_encoder_with_every_config_file(tfds_dir, fashion_idx_dir):
  """What ``--config=configs/<name>.py:dm+coann+dgr,smoke --config.encoder.name=<encoder>`` builds: the encoder's
  own kwargs (the config files' CNN sizes do not follow it) and a model that initialises."""
  done = subprocess.run(
      [sys.executable, '-c', _MATRIX, ','.join(CONFIGS), tfds_dir, fashion_idx_dir],
      cwd=REPO,
      env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'},
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [line for line in done.stdout.splitlines() if line.startswith('OK ')]
  assert len(lines) == len(CONFIGS) * (len(models.ENCODERS) - 2), done.stdout  # not the 2 dense encoders
  for line in lines:
    _, name, encoder, chosen, *fields = line.replace('[', '').replace(']', '').replace(',', '').split()
    assert chosen == encoder and set(f.strip("'") for f in fields) == set(config_lib.encoder_kwargs(encoder)), line


def test_every_documented_hyperparameter_is_a_dotted_key():
  for method in weighting.METHODS:
    config = config_lib.load_config(config_lib.cli_spec(f'{REPO}/configs/affect.py:mtl', {'weighting.name': method}))
    assert config.weighting.name == method
    for key, spec in weighting.hparam_specs(method).items():
      assert config_help.key_error('configs/affect.py:mtl', f'weighting.hparams.{key}', config) is None
      assert config.weighting.hparams[key] == spec.default
    weighting.get_method(method, **config.weighting.hparams)  # the defaults validate
  for encoder in models.ENCODERS:
    config = config_lib.load_config(config_lib.cli_spec(f'{REPO}/configs/affect.py', {'encoder.name': encoder}))
    assert 'dtype' in config.encoder.kwargs
    models.build_encoder(encoder, **config.encoder.kwargs)  # the defaults build
  # A config naming only some fields equals one naming all (config.json records every field; resume compares them).
  partial = config_lib.base_config()
  partial.encoder.kwargs = {'widths': (8,)}
  assert dict(config_lib.resolved(partial).encoder.kwargs) == dict(config_lib.encoder_kwargs('cnn', widths=(8,)))
  with pytest.raises(
      ValueError,
      match=r"config.encoder.kwargs: got \['hidden'\] for encoder 'cnn', expected some "
      r"of \['conv_impl', 'dtype', 'features', 'widths'\] \(config_lib.set_encoder",
  ):
    partial.encoder.kwargs = {'hidden': (8,)}
    config_lib.resolved(partial)


def test_misspelt_keys_and_help(tmp_path):
  code, out, err = cli(
      '--config=configs/affect.py:mtl,smoke',
      f'--workdir={tmp_path}',
      '--config.weighting.hparams.temperature=2.0',
      '--config.objective.terms.dm.divergence=kl',
      '--config.encoder.kwargs.widht=3',
  )
  lines = err.strip().splitlines()
  assert code != 0 and len(lines) == 3 and 'Traceback' not in err, err
  assert lines[0].startswith(
      'error: --config.weighting.hparams.temperature: no such key in configs/affect.py:mtl,'
      'smoke; it exists with --config.weighting.name=dwa'
  )
  assert 'it exists with the `dm` variant (--config=configs/affect.py:dm,smoke)' in lines[1]
  assert 'closest valid: encoder.kwargs.widths' in lines[2]
  assert not os.listdir(tmp_path)

  code, out, err = cli('--help')
  assert code == 0, err
  for needle in (
      '--mode',
      '--source',
      'single=<task>',
      'encoder=<name>',
      'smoke',
      "vit_tiny   conv_impl='auto', depth=4, dim=192",
      'dwa         temperature=2.0 (float > 0; softmax temperature τ)',
      'encoder.kwargs.widths = (16, 32, 64)',
      'objective.terms.dm.divergence = ',
      'init_from = ',
  ):
    assert needle in out, needle
  for method, specs in ((m, weighting.hparam_specs(m)) for m in weighting.METHODS):
    assert all(f'{k}=' in out for k in specs), method


def test_train_eval_predict_from_the_cli(tmp_path, tfds_dir):
  """The documented switches and the three modes, one subprocess each."""
  workdir = tmp_path / 'vit'
  common = [
      '--config=configs/affect.py:mtl,smoke',
      f'--workdir={workdir}',
      f'--config.data.data_dir={tfds_dir}',
      '--config.encoder.name=vit_tiny',
      '--config.encoder.kwargs.dtype=bfloat16',
      '--config.weighting.name=dwa',
      '--config.weighting.hparams.temperature=3.0',
      '--config.total_steps=2',
  ]
  code, out, err = cli(*common)
  assert code == 0, err[-3000:]
  assert re.search(r'expression: accuracy \d\.\d{4}  macro_f1 \d\.\d{4}  count 96\n', out), out  # an int count
  assert 'Downloading and preparing' not in out + err and 'orbax' not in err.lower().replace('orbax-checkpoint', '')
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['encoder'] == {'name': 'vit_tiny', 'kwargs': {**saved['encoder']['kwargs'], 'dtype': 'bfloat16'}}
  assert saved['encoder']['kwargs']['dim'] == 16 and saved['weighting']['hparams'] == {
      'temperature': 3.0,
      'window': 100,
  }
  trained = json.loads((workdir / 'results.json').read_text())
  steps = sorted(os.listdir(workdir / 'checkpoints'))

  code, out, err = cli(*common, '--mode=eval')
  assert code == 0, err[-3000:]
  (written,) = (workdir / 'eval').iterdir()  # its own file: training's results.json stays as it was
  assert f'written to {written}' in out and json.loads((workdir / 'results.json').read_text()) == trained
  evaluated = json.loads(written.read_text())
  assert evaluated['step'] == 2 and evaluated['metrics'] == trained['metrics']
  assert sorted(os.listdir(workdir / 'checkpoints')) == steps  # nothing trained, nothing saved

  code, out, err = cli(*common, '--mode=predict', '--source=test')
  assert code == 0, err[-3000:]
  pred = np.load(workdir / 'predictions' / 'test.npz')
  np.testing.assert_array_equal(pred['rows'], np.arange(96))
  assert set(pred['part']) == {'test'}
  assert pred['expression'].shape == (96, 7) and pred['aus'].shape == (96, 17)
  assert set(np.unique(pred['labels/aus'])) <= {-1, 0, 1}


def test_library_info_lines_are_dropped_in_a_checkout_named_mtlmatch(tmp_path, tfds_dir):
  """The INFO filter keys on the module that logged, not on '/mtlmatch/' in its path: from a clone named
  ``mtlmatch`` whose ``.venv`` sits inside it, orbax's and TFDS's INFO lines are still dropped."""
  if sys.prefix == sys.base_prefix:
    pytest.skip('needs a virtual environment (linked into the fake checkout, so its libraries are under it)')
  checkout = tmp_path / 'mtlmatch'
  checkout.mkdir()
  for name in ('mtlmatch', 'configs'):
    (checkout / name).symlink_to(REPO / name)
  (checkout / '.venv').symlink_to(sys.prefix)
  python = checkout / '.venv' / 'bin' / os.path.basename(sys.executable)
  prefix = subprocess.run([python, '-c', 'import sys; print(sys.prefix)'], capture_output=True, text=True).stdout
  assert prefix.strip() == str(checkout / '.venv'), prefix  # the libraries' files are under .../mtlmatch/.venv/
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  args = ['--config=configs/affect.py:dm,smoke', '--workdir=run', f'--config.data.data_dir={tfds_dir}']
  code, out, err = cli(*args, '--config.total_steps=2', cwd=checkout, python=python, env=env)
  assert code == 0, err[-3000:]
  ours = {p.name for p in (REPO / 'mtlmatch').rglob('*.py')}
  ours |= {p.name for p in pathlib.Path(importlib.util.find_spec('clu').origin).parent.rglob('*.py')}
  files = [m.group(1) for m in re.finditer(r'^I\d{4} [\d:. ]+ \d+ (\S+\.py):\d+\]', err, re.M)]
  assert 'step 2/2' in err and 'main.py' in files, err[-3000:]  # our own INFO lines are kept
  assert [f for f in files if f not in ours] == [], err[-3000:]  # no orbax / TFDS INFO line


def test_a_relatedness_table_file_or_literal_from_the_command_line(tmp_path, tfds_dir):
  """``--config.objective.terms.dm.relatedness=`` takes a .json/.csv file (relative to the current directory) or the
  JSON text of a nested list; the run records what was given and the table it read."""
  table = np.random.default_rng(0).uniform(size=(7, 17)).round(3)
  (tmp_path / 'tables').mkdir()
  (tmp_path / 'tables' / 'r.csv').write_text('\n'.join(','.join(map(str, row)) for row in table.tolist()) + '\n')
  common = [f'--config={REPO}/configs/affect.py:dm,smoke', f'--config.data.data_dir={tfds_dir}']
  env = {'PYTHONPATH': str(REPO)}  # run from tmp_path, so that the relative path is read from there
  option = '--config.objective.terms.dm.relatedness='
  code, out, err = cli(
      *common, '--workdir=run', '--config.total_steps=1', option + 'tables/r.csv', cwd=tmp_path, env=env
  )
  assert code == 0, err[-3000:]
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['objective']['terms']['dm']['relatedness'] == (
      'tables/r.csv'
  )
  recorded = json.loads((tmp_path / 'run' / 'relatedness.json').read_text())
  np.testing.assert_allclose(recorded['expression->aus (tables/r.csv)'], table, rtol=1e-6)
  # The literal is read too (and checked: this one has the wrong shape), before anything is written.
  code, out, err = cli(*common, '--workdir=run2', option + '[[0.5,0.5],[0.5,0.5]]', cwd=tmp_path, env=env)
  assert code != 0 and (
      "objective term 'dm' (relatedness='[[0.5,0.5],[0.5,0.5]]'): relatedness: got shape (2, 2), expected 7 rows" in err
  ), err[-3000:]
  assert not (tmp_path / 'run2').exists()
