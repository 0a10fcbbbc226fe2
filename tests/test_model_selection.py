"""Validation hold-out of every training source and best-validation-step model selection (results.json)."""

import json

import numpy as np
import pytest

from conftest import REPO
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import metrics as metrics_lib
from mtlmatch import train
from mtlmatch.tasks import TaskSpec


def _toy_benchmark(n=50):
  rng = np.random.default_rng(0)
  tasks = [TaskSpec('a', 'multiclass', 3), TaskSpec('b', 'multiclass', 2)]
  images = rng.integers(0, 255, (n, 4, 4, 1)).astype(np.uint8)
  a = data.array_source('src_a', images, {'a': np.arange(n) % 3})
  b = data.array_source('src_b', images[::-1].copy(), {'b': np.arange(n) % 2})
  return data.make_benchmark('toy', tasks, [a, b])


def _positions(source, tasks, process_count):
  return np.concatenate(
      [
          data.load_examples(source, tasks, process_index=h, process_count=process_count).positions
          for h in range(process_count)
      ]
  )


def test_holdout_is_deterministic_disjoint_and_independent_of_hosts():
  bench = data.with_validation(_toy_benchmark(), 0.2, seed=3)
  assert [s.name for s in bench.validation_sources] == ['src_a', 'src_b']
  for train_part, val_part in zip(bench.train_sources, bench.validation_sources):
    val = _positions(val_part, bench.tasks, 1)
    rest = _positions(train_part, bench.tasks, 1)
    assert len(val) == val_part.num_examples() == 10 and len(rest) == train_part.num_examples() == 40
    assert set(val).isdisjoint(rest) and set(val) | set(rest) == set(range(50))
    for hosts in (2, 3):  # each host reads its slice; together they hold exactly the same parts
      np.testing.assert_array_equal(np.sort(_positions(val_part, bench.tasks, hosts)), np.sort(val))
      np.testing.assert_array_equal(np.sort(_positions(train_part, bench.tasks, hosts)), np.sort(rest))
      sizes = [
          len(data.load_examples(val_part, bench.tasks, process_index=h, process_count=hosts)) for h in range(hosts)
      ]
      assert val_part.max_host_examples(hosts) == max(sizes)
  # Same seed → same split; another seed or another source name → another split.
  again = data.with_validation(_toy_benchmark(), 0.2, seed=3)
  other = data.with_validation(_toy_benchmark(), 0.2, seed=4)
  first = _positions(bench.validation_sources[0], bench.tasks, 1)
  np.testing.assert_array_equal(_positions(again.validation_sources[0], bench.tasks, 1), first)
  assert set(_positions(other.validation_sources[0], bench.tasks, 1)) != set(first)
  assert set(_positions(bench.validation_sources[1], bench.tasks, 1)) != set(first)
  # The validation part of a source annotates only that source's tasks (disjoint per-task validation sets).
  labels = data.load_examples(bench.validation_sources[0], bench.tasks).labels
  assert np.all(labels['b'] == -1) and np.all(labels['a'] >= 0)


def test_eval_iterator_over_a_validation_part_counts_every_example_once():
  bench = data.with_validation(_toy_benchmark(), 0.3, seed=0)
  source = bench.validation_sources[0]
  counts = []
  for h in range(3):
    batches = list(data.eval_iterator(source, bench.tasks, global_batch_size=6, process_index=h, process_count=3))
    assert len(batches) == -(-source.max_host_examples(3) // 2)  # every host runs the same number of steps
    counts.append(sum(float(b['mask'].sum()) for b in batches))
  assert sum(counts) == source.num_examples() == 15


def test_with_validation_refuses_bad_fractions():
  bench = _toy_benchmark()
  assert data.with_validation(bench, 0.0, seed=0) is bench
  for bad in (1.0, -0.1, '0.1', True):
    with pytest.raises(ValueError, match=r'config.data.validation_fraction: got .*expected a number in \[0, 1\)'):
      data.with_validation(bench, bad, seed=0)


def _config(tfds_dir, **overrides):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,smoke')
  config.data.data_dir = tfds_dir
  config.total_steps, config.eval_every, config.checkpoint_every = 8, 2, 4
  for key, value in overrides.items():
    config[key] = value
  return config


def test_results_report_test_metrics_at_the_best_validation_step_and_resume_keeps_the_record(tfds_dir, tmp_path):
  config = _config(tfds_dir)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  selection = full['selection']
  assert [h['step'] for h in selection['history']] == [2, 4, 6, 8]
  assert selection['metric'] == {'expression': 'accuracy', 'aus': 'mean_f1'}
  scores = [h['score'] for h in selection['history']]
  best = selection['history'][int(np.argmax(scores))]  # argmax: the earliest of equal scores
  assert selection['best_step'] == best['step'] and selection['best_score'] == max(scores)
  for task, metric in selection['metric'].items():
    assert selection['metrics'][task][metric] == best['test'][task]
    assert selection['validation'][task][metric] == best['validation'][task]
  # The score is the mean over tasks of the validation primary metrics, and the last entry is the final model.
  last = selection['history'][-1]
  assert last['score'] == pytest.approx(np.mean([full['validation'][t][m] for t, m in selection['metric'].items()]))
  assert last['test'] == {t: full['metrics'][t][m] for t, m in selection['metric'].items()}
  assert full['validation']['expression']['count'] > 0 and full['validation']['aus']['count'] > 0
  # Interrupted after step 3 and resumed: the same record, byte for byte.
  assert train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at=3)['interrupted']
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert json.dumps(resumed['selection'], sort_keys=True) == json.dumps(selection, sort_keys=True)


def test_early_stopping_stops_after_patience_and_stays_stopped(tfds_dir, tmp_path):
  # Learning rate 0: the validation score never improves after the first evaluation.
  config = _config(tfds_dir, early_stopping_patience=2)
  config.optimizer.learning_rate = 0.0
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['stopped_early'] and results['step'] == 6
  assert results['selection']['best_step'] == 2
  assert [h['step'] for h in results['selection']['history']] == [2, 4, 6]
  again = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert again['step'] == 6
  assert json.dumps(again['selection'], sort_keys=True) == json.dumps(results['selection'], sort_keys=True)  # NaNs


def test_selection_score_is_the_mean_primary_metric():
  tasks = {'e': TaskSpec('e', 'multiclass', 3), 'u': TaskSpec('u', 'multilabel', 2)}
  metrics = {'e': {'accuracy': 0.5, 'macro_f1': 0.1}, 'u': {'mean_f1': 0.7, 'accuracy': 0.9}}
  assert metrics_lib.selection_score(tasks, metrics) == pytest.approx(0.6)
  assert metrics_lib.selection_score(tasks, {'e': {'accuracy': float('nan')}, 'u': {'mean_f1': 0.7}}) == 0.7
  assert np.isnan(metrics_lib.selection_score(tasks, {}))
