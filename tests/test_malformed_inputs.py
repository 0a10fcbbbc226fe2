"""Malformed input is caught before training: configs, sources, labels, relatedness tables and checkpoints.

Every case runs ``train.train_and_evaluate`` (or the constructor that refuses the input first) against a workdir
that already holds a run, and checks one ``ValueError`` whose message names the offending value and the expected
one, and that no file of the workdir changed (contents and mtimes). docs/reference/errors.md lists these cases.
"""

import copy

import numpy as np
import pytest

from mtlmatch import data
from mtlmatch import experiment as experiment_lib
from mtlmatch import train
from mtlmatch.tasks import TaskSpec
from test_faults import fast_build, smoke, snapshot

SIZE = 32  # the synthetic affect images are 32 x 32 x 1


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  """A workdir holding 2 steps of configs/affect.py:dm,smoke (checkpoints, config.json, logs, no results yet)."""
  workdir = tmp_path_factory.mktemp('malformed') / 'run'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(experiment_lib, 'build_experiment', fast_build)  # shares the compiled steps of test_faults.py's runs
    assert train.train_and_evaluate(base_config(tfds_dir), str(workdir), stop_at=2)['step'] == 2
  return workdir


@pytest.fixture
def fast_builds(monkeypatch):
  monkeypatch.setattr(experiment_lib, 'build_experiment', fast_build)


def base_config(tfds_dir):
  return smoke(tfds_dir, total_steps=6)  # the config of test_faults.py's runs


def with_changes(config, changes):
  """A copy of ``config`` with dotted keys replaced, also by values of another type (as a config file could)."""
  config = copy.deepcopy(config)
  for key, value in changes.items():
    *path, last = key.split('.')
    target = config
    for part in path:
      target = target[part]
    with target.unlocked():
      if last in target:
        del target[last]
      target[last] = value
  return config


def expect_refusal(config, workdir, message, benchmark=None):
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(workdir), benchmark=benchmark)
  assert snapshot(workdir) == before, 'the workdir changed'


# ----------------------------------------------------------------------------------------------------------------
# Configs (including relatedness tables given in the config).

R_OK = np.full((7, 17), 0.5).tolist()

CONFIG_CASES = {
    'unknown encoder': (
        {'encoder.name': 'transformer'},
        r"config\.encoder\.name: got 'transformer', expected one of \['cnn', 'dilated_resnet', 'mlp', 'resnet18', "
        r"'resnet50', 'segnet', 'vit_tiny'\]",
    ),
    'unknown weighting method': (
        {'weighting.name': 'magic'},
        r"config\.weighting\.name: got 'magic', expected one of \['aligned_mtl', ",
    ),
    'bad weighting hyper-parameter': (
        {'weighting.name': 'dwa', 'weighting.hparams': {'temperature': -1.0}},
        r"dwa hparam 'temperature': got -1\.0, expected a finite float > 0",
    ),
    'batch not divisible by devices': (
        {'batch_size': 12},
        r'config\.batch_size=12 / eval_batch_size=64: expected multiples of the ' r'device count 8',
    ),
    'zero steps': ({'total_steps': 0}, r'config\.total_steps: got 0, expected an int >= 1'),
    'negative seed': ({'seed': -1}, r'config\.seed: got -1, expected an int >= 0'),
    'unknown nonfinite policy': (
        {'nonfinite': 'ignore'},
        r"config\.nonfinite: got 'ignore', expected 'halt' or 'skip'",
    ),
    'unknown mixing': (
        {'data.mixing': 'random'},
        r"config\.data\.mixing: got 'random', expected one of \('weights', 'equal_per_task'\)",
    ),
    'unknown augmentation': (
        {'data.augment': 'rotate'},
        r"config\.data\.augment: got 'rotate', expected a bool or a subset of \('flip', 'crop', 'scale_crop'\)",
    ),
    'unknown optimizer': (
        {'optimizer.name': 'lamb'},
        r"config\.optimizer\.name: got 'lamb', expected one of \['adam', 'adamw', 'sgd'\]",
    ),
    'unknown benchmark': (
        {'data.name': 'imagenet'},
        r"benchmark name: got 'imagenet', expected one of \['faces', 'multi_fashion', 'nyuv2', 'scenes', 'shopping', "
        r"'synthetic_affect', 'utkface'\]",
    ),
    'unknown trained task': (
        {'tasks': ('expression', 'pose')},
        r"config\.tasks: got task 'pose', expected names from benchmark 'synthetic_affect': "
        r"\['expression', 'aus'\]",
    ),
    'unknown task in a DM term': (
        {'objective.terms.dm.task_b': 'pose'},
        r"objective term 'dm': got task 'pose', expected one of the trained tasks " r"\['expression', 'aus'\]",
    ),
    'unknown DM divergence': (
        {'objective.terms.dm.divergence': 'l2'},
        r"objective term 'dm': divergence: got 'l2', expected one of \('xent', 'kl'\)",
    ),
    'negative task weight': (
        {'objective.task_weights': {'aus': -1.0}},
        r'config\.objective\.task_weights\.aus: got -1\.0, expected a finite number >= 0',
    ),
    'relatedness of the wrong shape': (
        {'objective.terms.dm.relatedness': np.full((6, 17), 0.5).tolist()},
        r"objective term 'dm' \(relatedness=.*\): relatedness: got shape \(6, 17\), " r'expected 7 rows',
    ),
    'relatedness with NaN': (
        {'objective.terms.dm.relatedness': [[float('nan')] + row[1:] for row in R_OK]},
        r"objective term 'dm' \(relatedness=.*\): relatedness: got non-finite value nan at "
        r'\[0, 0\], expected finite probabilities in \[0, 1\]',
    ),
    'relatedness outside [0, 1]': (
        {'objective.terms.dm.relatedness': [R_OK[0]] * 3 + [[1.5] * 17] + [R_OK[0]] * 3},
        r"objective term 'dm' \(relatedness=.*\): relatedness: got value 1\.5 at \[3, 0\], "
        r'expected values in \[0, 1\]',
    ),
    'relatedness from an unknown source': (
        {'objective.terms.dm.relatedness': 'estimate:nowhere'},
        r"relatedness 'estimate:nowhere': no source 'nowhere', expected one of "
        r"\['aus', 'coannotated', 'coannotated_32', 'expressions'\]",
    ),
    'unknown prior': (
        {'objective.terms.dm.relatedness': 'prior:emotions'},
        r"prior name: got 'emotions', expected one of \['expressions_to_aus'\]",
    ),
}


@pytest.mark.parametrize('case', list(CONFIG_CASES))
def test_config_case(case, trained, tfds_dir, fast_builds):
  changes, message = CONFIG_CASES[case]
  expect_refusal(with_changes(base_config(tfds_dir), changes), trained, message)


# ----------------------------------------------------------------------------------------------------------------
# Sources and labels: a custom benchmark like the synthetic one, with one thing wrong.

TASKS = [TaskSpec('expression', 'multiclass', 7), TaskSpec('aus', 'multilabel', 17)]


def arrays(n, seed=0, size=SIZE):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, 7, n), rng.integers(0, 2, (n, 17)))


def benchmark(expressions=None, aus=None, test=None):
  """Sources 'expressions' (expression only), 'aus' (AUs only), test set 'test' (both); each replaceable."""
  x, y, _ = arrays(64, 0)
  xa, _, za = arrays(48, 1)
  xt, yt, zt = arrays(40, 2)
  return data.make_benchmark(
      'custom',
      TASKS,
      [
          expressions or data.array_source('expressions', x, {'expression': y}),
          aus or data.array_source('aus', xa, {'aus': za}),
      ],
      eval_sources=[test or data.array_source('test', xt, {'expression': yt, 'aus': zt}, split='test')],
  )


def _labels_out_of_range():
  x, y, _ = arrays(64)
  y[5] = 7
  return benchmark(expressions=data.array_source('expressions', x, {'expression': y}))


def _eval_labels_out_of_range():
  x, y, z = arrays(40, 2)
  y[-1] = 9
  return benchmark(test=data.array_source('test', x, {'expression': y, 'aus': z}, split='test'))


def _multilabel_value():
  x, _, z = arrays(48, 1)
  z[3, 4] = 2
  return benchmark(aus=data.array_source('aus', x, {'aus': z}))


def _multilabel_width():
  x, _, z = arrays(48, 1)
  return benchmark(aus=data.array_source('aus', x, {'aus': z[:, :16]}))


def _non_integer_labels():
  x, y, _ = arrays(64)
  return benchmark(expressions=data.array_source('expressions', x, {'expression': y + 0.5}))


def _empty_source():
  reader = data.ArrayReader(
      {'train': (np.zeros((0, SIZE, SIZE, 1), np.uint8), {'expression': np.zeros(0)})}, description='expressions'
  )
  return benchmark(expressions=data.Source('expressions', reader, ('expression',)))


def _labels_missing_for_a_claimed_task():
  x, y, _ = arrays(64)
  return benchmark(expressions=data.array_source('expressions', x, {'expression': y}, tasks=('expression', 'aus')))


SOURCE_CASES = {
    'label outside its range in a training source': (
        _labels_out_of_range,
        r"labels of task 'expression' in source 'expressions': got value 7, expected values "
        r'in \[-1, 7\) \(-1 = missing\)',
    ),
    'label outside its range in the test set': (
        _eval_labels_out_of_range,
        r"labels of task 'expression' in source 'test': got value 9, expected values in " r'\[-1, 7\)',
    ),
    'multilabel value other than -1/0/1': (
        _multilabel_value,
        r"labels of task 'aus' in source 'aus': got value 2, expected values in \{-1, 0, 1\}",
    ),
    'multilabel labels of the wrong width': (
        _multilabel_width,
        r"labels of task 'aus' in source 'aus': got shape \(48, 16\), expected \[B, 17\] " r'\(multilabel\)',
    ),
    'non-integer labels': (
        _non_integer_labels,
        r"labels of task 'expression' in source 'expressions': got non-integer values \(dtype "
        r'float64\), expected integers',
    ),
    'source with zero examples': (
        _empty_source,
        r"Source 'expressions': got 0 examples in split 'train', expected at least one",
    ),
    'source claims a task it has no labels for': (
        _labels_missing_for_a_claimed_task,
        r"Source 'expressions' annotates task 'aus', but its reader has labels " r"only for \['expression'\]",
    ),
}


@pytest.mark.parametrize('case', list(SOURCE_CASES))
def test_source_case(case, trained, tfds_dir, fast_builds):
  make, message = SOURCE_CASES[case]
  expect_refusal(base_config(tfds_dir), trained, message, benchmark=make())


CONSTRUCTION_CASES = {
    'images of different shapes across sources': (
        lambda: benchmark(aus=data.array_source('aus', arrays(48, 1, size=28)[0], {'aus': arrays(48, 1)[2]})),
        r"Source 'aus' images: got shape \(28, 28, 1\), expected \(32, 32, 1\) like the other sources",
    ),
    'negative mixing weight': (
        lambda: data.array_source('aus', *arrays(48, 1)[:1], {'aus': arrays(48, 1)[2]}, weight=-1.0),
        r"Source\('aus'\)\.weight: got -1\.0, expected a finite number > 0",
    ),
    'source annotating an unknown task': (
        lambda: benchmark(aus=data.array_source('aus', arrays(48, 1)[0], {'pose': arrays(48, 1)[1]})),
        r"Source 'aus' tasks: got unknown task names \['pose'\], expected names from \['expression', 'aus'\]",
    ),
    'float images outside [0, 1]': (
        lambda: data.array_source('aus', arrays(48, 1)[0].astype(np.float32), {'aus': arrays(48, 1)[2]}),
        r'images of aus/train: got float values in \[0\.0, 255\.0\], expected uint8 or floats in \[0, 1\]',
    ),
}


@pytest.mark.parametrize('case', list(CONSTRUCTION_CASES))
def test_construction_case(case):
  """Refused where the source or benchmark is built, so before train_and_evaluate can even be called."""
  make, message = CONSTRUCTION_CASES[case]
  with pytest.raises(ValueError, match=message):
    make()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints in the workdir that the new run cannot continue.


def test_saved_config_disagrees_on_model_shape(trained, tfds_dir, fast_builds):
  config = with_changes(base_config(tfds_dir), {'encoder.kwargs': {'widths': (8, 16), 'features': 64}})
  expect_refusal(
      config,
      trained,
      r'config differs from the one the checkpoint in the workdir was trained with '
      r'\(encoder\.kwargs\.features: saved 32, now 64\)',
  )


def test_saved_state_of_another_layout_under_the_same_config(trained, tfds_dir, fast_builds):
  """Same config, but a custom benchmark of RGB images resuming the grey-image run: the config-drift check cannot
  see it (the benchmark is not part of the config); the saved train state's layout gives it away."""

  def rgb(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)

  _, y, _ = arrays(64)
  _, _, z = arrays(48, 1)
  bench = data.make_benchmark(
      'rgb',
      TASKS,
      [
          data.array_source('expressions', rgb(64, 0), {'expression': y}),
          data.array_source('aus', rgb(48, 1), {'aus': z}),
      ],
  )
  expect_refusal(
      base_config(tfds_dir),
      trained,
      r'checkpoint step 2 in .*/checkpoints holds a train state of another layout than this run builds '
      r'\(3 differences: params\.encoder\.conv_0\.kernel: saved shape \(3, 3, 1, 8\) float32, now shape '
      r'\(3, 3, 3, 8\) float32; opt_state\..*\)\. Expected the same model, tasks and optimizer',
      benchmark=bench,
  )
