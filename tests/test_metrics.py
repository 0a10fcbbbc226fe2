"""Tests of mtlmatch.metrics against scikit-learn and numpy references: random data with missing labels and
padding masks, chunked accumulation = one pass, sharded over 8 devices = unsharded, the F1 edge cases, errors."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn.metrics import accuracy_score, f1_score

from mtlmatch.metrics import (accumulate, finalize, finalize_tasks, task_statistics, tasks_statistics, zero_statistics)
from mtlmatch.tasks import TaskSpec

# Jitted (as in the eval step): one compile per input shape instead of one per primitive.
stats_fn = jax.jit(task_statistics, static_argnums=0)

MC = TaskSpec('expr', 'multiclass', 6)
ML = TaskSpec('au', 'multilabel', 6)


def _multiclass_data(rng, b=64):
  logits = rng.normal(size=(b, 6)).astype(np.float32)
  logits[:, 5] -= 100.0  # class 5: never predicted ...
  labels = rng.integers(0, 5, size=b).astype(np.int32)  # ... and never labelled: F1 undefined, left out
  labels[rng.random(b) < 0.25] = -1
  mask = (rng.random(b) < 0.8).astype(np.float32)
  return logits, labels, mask


def _multilabel_data(rng, b=64):
  logits = rng.normal(size=(b, 6)).astype(np.float32)
  labels = rng.integers(0, 2, size=(b, 6)).astype(np.int32)
  labels[rng.random((b, 6)) < 0.3] = -1
  labels[:, 3] = -1  # label 3: never annotated
  labels[:, 4] = np.where(labels[:, 4] == -1, -1, 0)  # label 4: all negative ...
  logits[:, 4] = -5.0  # ... and never predicted: undefined F1
  labels[:, 5] = np.where(rng.random(b) < 0.5, -1, 0)  # label 5: all negative, some false positives: F1 = 0
  labels[:2] = -1  # examples with no labelled entry do not count
  mask = (rng.random(b) < 0.8).astype(np.float32)
  return logits, labels, mask


def test_multiclass_matches_sklearn():
  logits, labels, mask = _multiclass_data(np.random.default_rng(0))
  stats = stats_fn(MC, logits, labels, mask)
  metrics = finalize(MC, stats)
  keep = (labels != -1) & (mask > 0)
  y, p = labels[keep], logits[keep].argmax(-1)
  assert metrics['count'] == keep.sum()
  assert math.isclose(metrics['accuracy'], accuracy_score(y, p), rel_tol=1e-12)
  assert math.isclose(metrics['macro_f1'], f1_score(y, p, average='macro'), rel_tol=1e-12)
  for c in range(6):  # per-class counts against numpy
    assert stats['tp'][c] == np.sum((p == c) & (y == c))
    assert stats['fp'][c] == np.sum((p == c) & (y != c))
    assert stats['fn'][c] == np.sum((p != c) & (y == c))
  assert stats['tp'][5] + stats['fp'][5] + stats['fn'][5] == 0


def test_multilabel_matches_sklearn_per_label():
  logits, labels, mask = _multilabel_data(np.random.default_rng(1))
  metrics = finalize(ML, stats_fn(ML, logits, labels, mask))
  valid = (labels != -1) & (mask[:, None] > 0)
  pred = (logits > 0).astype(int)
  f1s = {}
  for k in range(6):
    v = valid[:, k]
    if v.any() and (labels[v, k].any() or pred[v, k].any()):
      f1s[k] = f1_score(labels[v, k], pred[v, k])
      assert math.isclose(metrics[f'f1_{k}'], f1s[k], rel_tol=1e-12, abs_tol=1e-15), k
    else:
      assert math.isnan(metrics[f'f1_{k}']), k
  assert sorted(f1s) == [0, 1, 2, 5] and f1s[5] == 0.0
  assert math.isclose(metrics['mean_f1'], np.mean(list(f1s.values())), rel_tol=1e-12)
  assert math.isclose(metrics['accuracy'], np.mean(pred[valid] == labels[valid]), rel_tol=1e-12)
  assert metrics['count'] == np.sum(valid.any(axis=1))


def test_no_mask_and_nothing_to_evaluate():
  logits, labels, _ = _multiclass_data(np.random.default_rng(2), b=8)
  with_ones = stats_fn(MC, logits, labels, np.ones(8))
  jax.tree.map(np.testing.assert_array_equal, stats_fn(MC, logits, labels), with_ones)
  empty = finalize(MC, stats_fn(MC, logits, np.full(8, -1), np.ones(8)))
  assert empty['count'] == 0 and math.isnan(empty['accuracy']) and math.isnan(empty['macro_f1'])
  empty = finalize(ML, zero_statistics(ML))
  assert empty['count'] == 0 and math.isnan(empty['accuracy']) and math.isnan(empty['mean_f1'])


def _assert_stats_equal(got, want):
  """The integer counts exactly; the float entropy sum up to summation order."""
  for key in want:
    if key == 'entropy':
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    else:
      np.testing.assert_array_equal(got[key], want[key])


def _assert_metrics_equal(got, want):
  np.testing.assert_allclose(got.pop('mean_entropy'), want.pop('mean_entropy'), rtol=1e-6)
  np.testing.assert_equal(got, want)  # NaN == NaN here


@pytest.mark.parametrize('task', [MC, ML], ids=['multiclass', 'multilabel'])
def test_chunked_accumulation_equals_one_pass(task):
  data = (_multiclass_data if task is MC else _multilabel_data)(np.random.default_rng(3), b=60)
  whole = stats_fn(task, *data)
  total, total0 = None, zero_statistics(task)
  for lo, hi in [(0, 7), (7, 30), (30, 31), (31, 60)]:
    chunk = stats_fn(task, *(a[lo:hi] for a in data))
    total, total0 = accumulate(total, chunk), accumulate(total0, chunk)
  for got in (total, total0):
    _assert_stats_equal(got, whole)
  _assert_metrics_equal(finalize(task, total), finalize(task, whole))


def test_sharded_over_8_devices_equals_unsharded():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  tasks = {'expr': MC, 'au': ML}
  rng = np.random.default_rng(4)
  (mc_logits, mc_labels, mask), (ml_logits, ml_labels, _) = _multiclass_data(rng), _multilabel_data(rng)
  logits, labels = {'expr': mc_logits, 'au': ml_logits}, {'expr': mc_labels, 'au': ml_labels}
  ref = tasks_statistics(tasks, logits, labels, mask)
  step = jax.jit(lambda lg, lb, m: tasks_statistics(tasks, lg, lb, m))
  out = step(*jax.device_put((logits, labels, mask), shard))
  for name in tasks:
    _assert_stats_equal(out[name], ref[name])
    _assert_metrics_equal(finalize_tasks(tasks, out)[name], finalize_tasks(tasks, ref)[name])


def test_errors():
  with pytest.raises(ValueError, match=r"logits of task 'expr': got shape \(4, 5\), expected \[B, 6\]"):
    task_statistics(MC, np.zeros((4, 5)), np.zeros(4, int))
  with pytest.raises(ValueError, match=r"labels of task 'au': got shape \(4,\), expected \[4, 6\]"):
    task_statistics(ML, np.zeros((4, 6)), np.zeros(4, int))
  with pytest.raises(ValueError, match=r'mask: got shape \(3,\), expected \[4\]'):
    task_statistics(MC, np.zeros((4, 6)), np.zeros(4, int), np.ones(3))
  with pytest.raises(ValueError, match="stats of task 'au': got keys"):
    finalize(ML, zero_statistics(MC))
  with pytest.raises(ValueError, match='accumulate: got statistics with structures'):
    accumulate(zero_statistics(MC), zero_statistics(ML))
  with pytest.raises(ValueError, match=r"got no entry for tasks \['au'\]"):
    tasks_statistics({'au': ML}, {}, {})


def test_entropy_and_recall_match_numpy():
  # mean_entropy: the mean prediction entropy of the counted examples; recall_<k>: the confusion-matrix diagonal.
  rng = np.random.default_rng(7)
  logits, labels, mask = _multiclass_data(rng)
  metrics = finalize(MC, stats_fn(MC, logits, labels, mask))
  keep = (labels != -1) & (mask > 0)
  z = logits[keep].astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1))
  assert math.isclose(metrics['mean_entropy'], want, rel_tol=1e-5)
  y, pred = labels[keep], logits[keep].argmax(-1)
  for c in range(5):
    assert math.isclose(metrics[f'recall_{c}'], np.mean(pred[y == c] == c), rel_tol=1e-12)
  assert math.isnan(metrics['recall_5'])  # never labelled
  logits, labels, mask = _multilabel_data(rng)
  metrics = finalize(ML, stats_fn(ML, logits, labels, mask))
  counted = np.any((labels != -1) & (mask[:, None] > 0), axis=1)
  q = 1 / (1 + np.exp(-logits[counted].astype(np.float64)))
  want = np.mean(np.mean(-(q * np.log(q) + (1 - q) * np.log(1 - q)), -1))
  assert math.isclose(metrics['mean_entropy'], want, rel_tol=1e-5)


def test_per_class_metrics_are_named_by_the_class_names():
  # The synthetic affect tasks carry the prior's names: recall_happy, f1_AU12, ...; the values are those of the same
  # task without names (by index), and index 13 of the AUs (the f1_13 that was 0.0 in affect) is AU23.
  from mtlmatch.data import synthetic_affect  # pylint: disable=g-import-not-at-top

  tasks = synthetic_affect.tasks()
  rng = np.random.default_rng(3)
  for task in tasks.values():
    plain = TaskSpec(task.name, task.kind, task.num_classes)
    b, c = 64, task.num_classes
    logits = rng.normal(size=(b, c)).astype(np.float32)
    labels = rng.integers(0, c, size=b) if task.kind == 'multiclass' else rng.integers(0, 2, size=(b, c))
    named, by_index = (finalize(t, stats_fn(t, logits, labels.astype(np.int32), np.ones(b))) for t in (task, plain))
    prefix = 'recall_' if task.kind == 'multiclass' else 'f1_'
    assert [k for k in named if k.startswith(prefix)] == [prefix + n for n in task.class_names]
    assert list(named.values()) == list(by_index.values()) and [k for k in by_index if k.startswith(prefix)] == [
        f'{prefix}{k}' for k in range(c)
    ]
  assert tasks['aus'].class_names[13] == 'AU23' and tasks['expression'].class_keys()[1] == 'happy'
  assert TaskSpec('x', 'multiclass', 2, ('t-shirt/top', 'ankle boot')).class_keys() == ('t-shirt_top', 'ankle_boot')
  with pytest.raises(ValueError, match=r"class_names: got \('a b', 'a_b'\), which name metrics \('a_b', 'a_b'\)"):
    TaskSpec('x', 'multiclass', 2, ('a b', 'a_b'))
  with pytest.raises(ValueError, match=r'class_names: got .*expected non-empty strings'):
    TaskSpec('x', 'multiclass', 2, ('a', ''))
