"""The evaluator seam (mtlmatch/evaluators.py): the registry and config.evals errors, classification metrics against
numpy, the JAX linear probe against scikit-learn and hand numbers, and evaluators at their own intervals in a smoke
run (the resume of the selection record is tests/test_model_selection.py)."""

import os
import sys

import numpy as np
import pytest

from conftest import REPO
from mtlmatch import config_checks
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import evaluators
from mtlmatch import probe as probe_lib
from mtlmatch import train
from mtlmatch import experiment as experiment_lib
from mtlmatch.tasks import TaskSpec

sys.path.insert(0, str(REPO))
from experiments import report  # noqa: E402


def test_registry_and_the_default_entries():
  assert {'classification', 'selection', 'linear_probe'} <= set(evaluators.EVALUATORS)
  config = config_lib.base_config()
  config_checks.validate_config(config)
  assert {n: e.kind for n, e in config.evals.items()} == {
      'test': 'classification',
      'validation': 'classification',
      'selection': 'selection',
      'linear_probe': 'linear_probe',
  }
  assert config.evals.test.every is None and not config.evals.linear_probe.enabled
  config.evals.test.every = 5  # an int, e.g. --config.evals.test.every=5
  config_checks.validate_config(config)


@pytest.mark.parametrize(
    'entry, message',
    [
        (
            {'kind': 'magic'},
            r"config\.evals\.x\.kind: got 'magic', expected one of \['classification', 'linear_probe', "
            r"'selection'\]",
        ),
        ({'kind': 'classification', 'every': -1}, r'config\.evals\.x\.every: got -1, expected an int >= 0'),
        ({'kind': 'selection', 'every': True}, r'config\.evals\.x\.every: got True, expected an int >= 0'),
        (
            {'kind': 'classification', 'split': 'train'},
            r"config\.evals\.x\.split: got 'train', expected one of \['test', 'validation'\]",
        ),
        (
            {'kind': 'classification', 'splt': 'test'},
            r"config\.evals\.x: got unknown keys \['splt'\] for kind 'classification', expected some of",
        ),
        ({'kind': 'selection', 'enabled': 'yes'}, r"config\.evals\.x\.enabled: got 'yes', expected True or False"),
        ({'kind': 'linear_probe', 'c': 0.0}, r'config\.evals\.x\.c: got 0\.0, expected a number > 0'),
        ({'kind': 'linear_probe', 'train_examples': 0}, r'config\.evals\.x\.train_examples: got 0, expected an int'),
    ],
)
def test_config_evals_errors_name_the_value_and_what_was_expected(entry, message):
  config = config_lib.base_config()
  config.evals.x = entry
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)


def test_records_come_back_from_checkpoint_metadata_old_and_new():
  evals = {'selection': evaluators.Selection.__new__(evaluators.Selection), 'test': object()}
  record = {'best_step': 2, 'history': []}
  assert evaluators.records_from_meta(evals, {'evals': {'selection': record, 'gone': {}}}) == {'selection': record}
  # The 0.1 layout ({'selection': record}) is no longer read: its checkpoints are refused by their version
  # (tests/test_learned_relatedness.py), so the evaluators' records always come from meta['evals'].
  assert evaluators.records_from_meta(evals, {'evals': {}}) == {}


def _toy(n=40, seed=0):
  rng = np.random.default_rng(seed)
  tasks = [TaskSpec('a', 'multiclass', 3), TaskSpec('b', 'multilabel', 4)]

  def source(name, m, tasks_of, split='train'):
    images = rng.integers(0, 255, (m, 4, 4, 1)).astype(np.uint8)
    labels = {'a': rng.integers(0, 3, m), 'b': np.where(rng.random((m, 4)) < 0.2, -1, rng.integers(0, 2, (m, 4)))}
    return data.array_source(name, images, {t: labels[t] for t in tasks_of}, split=split)

  train_sources = [source('tr_a', n, ['a']), source('tr_b', n, ['b'])]
  tests = [source('te_ab', 21, ['a', 'b'], 'test'), source('te_b', 13, ['b'], 'test')]
  return data.make_benchmark('toy', tasks, train_sources, eval_sources=tests)


def test_classification_metrics_equal_numpy_per_source_and_pooled():
  config = config_lib.base_config()
  config_lib.set_encoder(config, 'mlp', hidden=(16,))
  config.batch_size, config.eval_batch_size = 8, 16
  exp = experiment_lib.build_experiment(config, benchmark=_toy())
  state = exp.init_state()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def numpy_metrics(sources):
    got = {'a': ([], []), 'b': ([], [])}
    for source in sources:
      ex = data.load_examples(source, exp.benchmark.tasks)
      outputs, _ = exp.model.apply(variables, ex.images.astype(np.float32) / 127.5 - 1.0, train=False)
      for t in got:
        got[t][0].append(np.asarray(outputs['logits'][t]))
        got[t][1].append(ex.labels[t])
    (la, ya), (lb, yb) = [(np.concatenate(x), np.concatenate(y)) for x, y in got.values()]
    labelled = ya != -1
    accuracy = np.mean(la.argmax(1)[labelled] == ya[labelled]) if labelled.any() else np.nan
    f1 = []
    for k in range(4):
      y, p = yb[:, k], lb[:, k] > 0
      tp, fp, fn = (np.sum((y != -1) & c) for c in (p & (y == 1), p & (y == 0), ~p & (y == 1)))
      if tp + fp + fn:
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {
        'a': {'accuracy': accuracy, 'count': int(labelled.sum())},
        'b': {'mean_f1': np.mean(f1) if f1 else np.nan, 'count': int(np.sum((yb != -1).any(1)))},
    }

  for split, sources in (('test', exp.benchmark.eval_sources), ('validation', exp.benchmark.validation_sources)):
    got = evaluators.classification_metrics(exp.view, state, split)
    checks = [(got['metrics'], numpy_metrics(sources))]
    checks += [(got['per_source'][s.name], numpy_metrics([s])) for s in sources]
    for metrics, expected in checks:
      assert set(metrics) == set(expected)
      for task, values in expected.items():
        for name, value in values.items():
          assert metrics[task][name] == pytest.approx(value, abs=1e-9, nan_ok=True), (split, task, name)


def _blobs(rng, n, k, d=5, noise=1.5):
  centers = rng.normal(size=(k, d))
  y = rng.integers(0, k, n)
  return centers[y] + noise * rng.normal(size=(n, d)) + 3.0, y


def test_probe_matches_scikit_learn_logistic_regression():
  linear_model = pytest.importorskip('sklearn.linear_model')
  rng = np.random.default_rng(0)
  x, y = _blobs(rng, 104, 4)  # 64 to fit (the probe's smallest padded size: one compilation here)
  x_test, y_test = x[64:], y[64:]
  x, y = x[:64], y[:64]
  mean, std = x.mean(0), x.std(0)
  task = TaskSpec('t', 'multiclass', 4)
  ours = probe_lib.fit_logistic(x, y, task)
  theirs = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit((x - mean) / std, y)
  np.testing.assert_allclose(ours.w, theirs.coef_.T, atol=1e-4)
  np.testing.assert_allclose(ours.b, theirs.intercept_, atol=1e-4)
  accuracy = probe_lib.probe_metrics(task, (x, y), (x_test, y_test))['accuracy']
  assert 0.4 < accuracy == pytest.approx(np.mean(theirs.predict((x_test - mean) / std) == y_test), abs=1e-9)
  # Multilabel: one binary regression per label over its labelled entries (-1 = missing).
  labels = np.where(x[:, :3] + rng.normal(size=(64, 3)) > 3, 1, 0)
  labels[rng.random((64, 3)) < 0.2] = -1
  ours = probe_lib.fit_logistic(x, labels, TaskSpec('m', 'multilabel', 3))
  for k in range(3):
    keep = labels[:, k] != -1
    theirs = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(
        ((x - mean) / std)[keep], labels[keep, k]
    )
    np.testing.assert_allclose(ours.w[:, k], theirs.coef_[0], atol=1e-4)
    np.testing.assert_allclose(ours.b[k], theirs.intercept_[0], atol=1e-4)


def test_probe_hand_cases():
  task = TaskSpec('t', 'multiclass', 3)
  # Uninformative (constant) features: the intercept alone, softmax(b) = the training label frequencies (3:1), and
  # every test example gets the majority class: accuracy = its share of the test set.
  y = np.array([0, 0, 0, 1, 0, 0, 0, 1])
  probe = probe_lib.fit_logistic(np.ones((8, 2)), y, task)
  np.testing.assert_allclose(np.exp(probe.b[:2]) / np.exp(probe.b[:2]).sum(), [0.75, 0.25], atol=1e-5)
  metrics = probe_lib.probe_metrics(task, (np.ones((8, 2)), y), (np.ones((5, 2)), np.array([0, 1, 2, 0, 0])))
  assert metrics['accuracy'] == pytest.approx(3 / 5) and metrics['recall_2'] == 0.0
  # Separable along one feature: every test example right.
  x = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
  assert (
      probe_lib.probe_metrics(task, (x, np.array([0, 0, 0, 1, 1, 1])), (np.array([[-3.0], [3.0]]), np.array([0, 1])))[
          'accuracy'
      ]
      == 1.0
  )
  # Multilabel: a label with one value in training is left out of the score (F1 NaN), the others count.
  ml = TaskSpec('m', 'multilabel', 2)
  y_train = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])
  metrics = probe_lib.probe_metrics(ml, (x[2:], y_train), (np.array([[-3.0], [3.0]]), np.array([[0, 1], [1, 1]])))
  assert np.isnan(metrics['f1_1']) and metrics['f1_0'] == metrics['mean_f1'] == 1.0


class Confidence(evaluators.Evaluator):
  """docs/howto/extending.md's evaluator of one's own: the mean prediction entropy on the test sources."""

  OPTIONS = {}

  def run(self, at, record):
    entropy = {t: m['mean_entropy'] for t, m in at.classification('test')['metrics'].items()}
    return evaluators.Report(scalars={f'{self.name}/{t}': v for t, v in entropy.items()}, results={self.name: entropy})


def test_each_evaluator_runs_at_its_own_interval_and_at_the_end(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(evaluators.EVALUATORS, 'confidence', Confidence)
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,encoder=mlp,smoke')  # the cheapest to compile
  config.data.data_dir = tfds_dir
  config.total_steps, config.eval_every = 6, 0
  config.evals.test.every = 2
  config.evals.validation.every = 3  # the selection follows eval_every = 0: only at the end
  config.evals.linear_probe.update(enabled=True, every=4, train_examples=64, test_examples=48)
  config.evals.confidence = {'kind': 'confidence', 'every': 5}
  results = train.train_and_evaluate(config, str(tmp_path))
  scalars = report.read_scalars(str(tmp_path))
  steps = lambda tag: scalars[tag][0].tolist()  # noqa: E731
  assert steps('eval/expression/accuracy') == [2, 4, 6] and steps('eval/aus/mean_f1') == [2, 4, 6]
  assert steps('validation/expression/accuracy') == [3, 6]
  assert steps('linear_probe/expression/accuracy') == [4, 6] and steps('linear_probe/aus/mean_f1') == [4, 6]
  assert [h['step'] for h in results['selection']['history']] == [6]
  assert steps('confidence/expression') == [5, 6]
  assert set(results) == {
      'step',
      'wall_time_s',
      'metrics',
      'per_source',
      'validation',
      'selection',
      'stopped_early',
      'linear_probe',
      'confidence',
  }
  assert results['confidence']['aus'] == results['metrics']['aus']['mean_entropy']
  assert results['metrics']['aus']['mean_f1'] == pytest.approx(scalars['eval/aus/mean_f1'][1][-1])
  probe = results['linear_probe']
  assert set(probe) == {'expression', 'aus'} and 0 <= probe['expression']['accuracy'] <= 1
  assert probe['expression']['count'] == 48
  assert probe['aus']['mean_f1'] == pytest.approx(scalars['linear_probe/aus/mean_f1'][1][-1])
  assert os.path.isfile(tmp_path / 'results.json')
