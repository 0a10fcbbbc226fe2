"""Evaluation metric maths: additive per-task statistics, their accumulation and the final metrics.

Metrics are computed from integer *sums* (counts of correct predictions, true/false positives, false negatives), so
they are exact whatever the number of devices, hosts or batches: ``task_statistics`` is jittable and, inside a
``jax.jit`` over a mesh with the batch sharded, sums over the global batch; ``accumulate`` adds statistics of
successive batches; ``finalize`` turns the totals into metrics on the host.

Conventions (docs/maths.md §1): multiclass labels ``[B]`` and multilabel labels ``[B, C]`` with ``-1`` = missing;
``mask [B]`` is 1 for real examples and 0 for padding (e.g. the last, padded eval batch). Missing labels and padded
examples contribute nothing. Predictions: multiclass ``argmax`` of the logits (ties → lowest index, as
``np.argmax``); multilabel ``logit > 0`` (i.e. sigmoid > 0.5).

Metric names (a contract with the train loop and reports):

* multiclass: ``accuracy``, ``macro_f1``, ``count``, ``mean_entropy``, ``recall_<k>`` for each class k (the
  diagonal of the row-normalised confusion matrix: a collapsed head shows as recalls near 0 but for a few classes);
* multilabel: ``mean_f1``, ``accuracy``, ``f1_<k>`` for each label k (0-based index), ``count``, ``mean_entropy``.

``mean_entropy`` is the mean over counted examples of the prediction's entropy (nats; multilabel: the mean over the
C labels of the binary entropy): near 0 means confident predictions. It is accumulated as a float sum, so it is
exact up to float rounding rather than bit-exact across device counts.

F1 of a class / label = 2·tp / (2·tp + fp + fn). A class with tp + fp + fn = 0 (never labelled and never predicted
among the evaluated entries) has an undefined F1 and is left out of the mean; this is what scikit-learn's
``f1_score(y_true, y_pred, average='macro')`` does for multiclass (it averages over the labels present in y_true or
y_pred), so ``macro_f1`` equals it exactly. Multilabel ``mean_f1`` applies the same rule per label, over that label's
labelled entries: a label with no labelled entries, or whose labelled entries are all negative and never predicted
positive, is left out (its ``f1_<k>`` is NaN); sklearn's ``zero_division`` would instead score such a label 0 (or 1).
A metric with nothing to average over (no evaluated examples) is NaN.

Usage (in the train loop ``task_statistics`` runs jitted per eval batch; here one batch counted twice). Two of the
three labelled examples are right; class 1 has F1 2·2 / (2·2 + 2) = 2/3 and class 2 (never predicted) F1 0, so
macro F1 = (1 + 2/3 + 0) / 3:

>>> import jax, numpy as np
>>> from mtlmatch.tasks import TaskSpec
>>> task = TaskSpec('expression', 'multiclass', 3)
>>> logits = np.array([[2, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2]], np.float32)
>>> labels = np.array([0, 1, 2, -1])                      # the last example has no label
>>> total = None
>>> for _ in range(2):
...   total = accumulate(total, jax.device_get(task_statistics(task, logits, labels)))
>>> metrics = finalize(task, total)
>>> {k: round(metrics[k], 4) for k in ('accuracy', 'macro_f1', 'count')}
{'accuracy': 0.6667, 'macro_f1': 0.5556, 'count': 6}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.losses import MISSING

if TYPE_CHECKING:  # mtlmatch.tasks builds its task kinds from these functions
  from mtlmatch.tasks import TaskSpec

MULTICLASS_KEYS = ('correct', 'count', 'tp', 'fp', 'fn', 'entropy')
MULTILABEL_KEYS = ('tp', 'fp', 'fn', 'correct_entries', 'labelled_entries', 'count', 'entropy')


def _check_shapes(task: TaskSpec, logits, labels, mask) -> None:
  c = task.num_classes
  if logits.ndim != 2 or logits.shape[1] != c:
    raise ValueError(f'logits of task {task.name!r}: got shape {logits.shape}, expected [B, {c}]')
  b = logits.shape[0]
  want = (b,) if task.kind == 'multiclass' else (b, c)
  if labels.shape != want:
    raise ValueError(f'labels of task {task.name!r}: got shape {labels.shape}, expected {list(want)} ({task.kind})')
  if mask is not None and mask.shape != (b,):
    raise ValueError(f'mask: got shape {mask.shape}, expected [{b}]')


def task_statistics(
    task: TaskSpec, logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None
) -> dict[str, jax.Array]:
  """Additive statistics of one batch for one task (int32 counts, a float32 entropy sum; jittable; shapes are checked,
  values are not).

  multiclass (logits [B, C], labels [B]): ``correct``, ``count`` (scalars: examples with a label and mask 1) and
  per-class ``tp``, ``fp``, ``fn`` [C].
  multilabel (logits [B, C], labels [B, C]): per-label ``tp``, ``fp``, ``fn``, ``correct_entries``,
  ``labelled_entries`` [C] over entries that are labelled and unmasked, and ``count`` (scalar: examples with at
  least one such entry).
  Both: ``entropy`` (float32 scalar), the summed prediction entropy of the counted examples.
  ``mask`` [B] (bool or 0/1; None = all ones) marks real examples; padding (0) contributes nothing.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  mask = None if mask is None else jnp.asarray(mask)
  _check_shapes(task, logits, labels, mask)
  real = jnp.ones(labels.shape[0], bool) if mask is None else mask > 0
  labels = labels.astype(jnp.int32)
  if task.kind == 'multiclass':
    valid = real & (labels != MISSING)
    pred = jnp.argmax(logits, axis=-1)
    # one_hot of -1 is an all-zero row, and invalid rows are zeroed anyway.
    p = jax.nn.one_hot(pred, task.num_classes, dtype=jnp.int32) * valid[:, None]
    y = jax.nn.one_hot(labels, task.num_classes, dtype=jnp.int32) * valid[:, None]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return {
        'entropy': jnp.sum(jnp.where(valid, entropy, 0.0)),
        'correct': jnp.sum(valid & (pred == labels), dtype=jnp.int32),
        'count': jnp.sum(valid, dtype=jnp.int32),
        'tp': jnp.sum(p * y, axis=0),
        'fp': jnp.sum(p * (1 - y), axis=0),
        'fn': jnp.sum((1 - p) * y, axis=0),
    }
  valid = real[:, None] & (labels != MISSING)
  pred = logits > 0
  pos = labels == 1
  z = logits.astype(jnp.float32)
  p_on, log_on, log_off = jax.nn.sigmoid(z), jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
  entropy = -jnp.mean(p_on * log_on + (1 - p_on) * log_off, axis=-1)
  return {
      'entropy': jnp.sum(jnp.where(jnp.any(valid, axis=1), entropy, 0.0)),
      'tp': jnp.sum(valid & pred & pos, axis=0, dtype=jnp.int32),
      'fp': jnp.sum(valid & pred & ~pos, axis=0, dtype=jnp.int32),
      'fn': jnp.sum(valid & ~pred & pos, axis=0, dtype=jnp.int32),
      'correct_entries': jnp.sum(valid & (pred == pos), axis=0, dtype=jnp.int32),
      'labelled_entries': jnp.sum(valid, axis=0, dtype=jnp.int32),
      'count': jnp.sum(jnp.any(valid, axis=1), dtype=jnp.int32),
  }


def tasks_statistics(
    tasks: Mapping[str, TaskSpec],
    logits: Mapping[str, jax.Array],
    labels: Mapping[str, jax.Array],
    mask: Optional[jax.Array] = None,
) -> dict[str, dict]:
  """``{task: task_statistics(tasks[task], logits[task], labels[task], mask)}`` for every task in ``tasks``."""
  missing = sorted(set(tasks) - set(logits)) or sorted(set(tasks) - set(labels))
  if missing:
    raise ValueError(f'logits/labels: got no entry for tasks {missing}, expected one per task in {sorted(tasks)}')
  return {name: task_statistics(spec, logits[name], labels[name], mask) for name, spec in tasks.items()}


def zero_statistics(task: TaskSpec) -> dict[str, np.ndarray]:
  """Statistics of an empty set (the identity of ``accumulate``)."""
  c = task.num_classes
  if task.kind == 'multiclass':
    shapes = {'correct': (), 'count': (), 'tp': (c,), 'fp': (c,), 'fn': (c,)}
  else:
    shapes = {k: (c,) for k in ('tp', 'fp', 'fn', 'correct_entries', 'labelled_entries')} | {'count': ()}
  return {k: np.zeros(s, np.int64) for k, s in shapes.items()} | {'entropy': np.zeros((), np.float64)}


def accumulate(a, b):
  """Element-wise sum of two statistics trees of the same structure (one task's dict, or a dict of tasks).
  ``a = None`` returns ``b``, so a running total can start empty."""
  if a is None:
    return b
  if jax.tree.structure(a) != jax.tree.structure(b):
    raise ValueError(
        f'accumulate: got statistics with structures {jax.tree.structure(a)} and '
        f'{jax.tree.structure(b)}, expected the same structure'
    )
  return jax.tree.map(lambda x, y: x + y, a, b)


def _f1(tp, fp, fn) -> np.ndarray:
  """Per-class F1 = 2tp / (2tp + fp + fn); NaN where tp + fp + fn = 0 (undefined)."""
  tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
  denom = 2 * tp + fp + fn
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def _mean_defined(values: np.ndarray) -> float:
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else float('nan')


def _ratio(num, den) -> float:
  num, den = float(np.sum(num)), float(np.sum(den))
  return num / den if den > 0 else float('nan')


def finalize(task: TaskSpec, stats: Mapping[str, jax.Array]) -> dict[str, float]:
  """Metrics of one task from its accumulated statistics (host-side; see the module docstring for the rules).

  multiclass: ``accuracy`` = correct / count, ``macro_f1`` = mean F1 over classes with tp + fp + fn > 0, ``count``,
  ``recall_<k>`` = tp / (tp + fn) (NaN for a class never labelled).
  multilabel: ``accuracy`` = Σ_k correct_entries / Σ_k labelled_entries, ``mean_f1`` = mean F1 over labels with
  tp + fp + fn > 0, ``f1_<k>`` per label (NaN when undefined), ``count``.
  ``<k>`` names the class: its name where the task has class names (``recall_happy``, ``f1_AU12``), else its index
  (``recall_0``); see :meth:`mtlmatch.tasks.TaskSpec.class_keys`.
  """
  keys = MULTICLASS_KEYS if task.kind == 'multiclass' else MULTILABEL_KEYS
  if not isinstance(stats, Mapping) or set(stats) != set(keys):
    got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
    raise ValueError(f'stats of task {task.name!r}: got keys {got}, expected {sorted(keys)} ({task.kind})')
  stats = {k: np.asarray(v) for k, v in stats.items()}
  f1 = _f1(stats['tp'], stats['fp'], stats['fn'])
  mean_entropy = _ratio(stats['entropy'], stats['count'])
  if task.kind == 'multiclass':
    names = task.class_keys()
    recall = {f'recall_{names[k]}': _ratio(tp, tp + fn) for k, (tp, fn) in enumerate(zip(stats['tp'], stats['fn']))}
    return {
        'accuracy': _ratio(stats['correct'], stats['count']),
        'macro_f1': _mean_defined(f1),
        'count': int(stats['count']),
        'mean_entropy': mean_entropy,
        **recall,
    }
  metrics = {
      'accuracy': _ratio(stats['correct_entries'], stats['labelled_entries']),
      'mean_f1': _mean_defined(f1),
      'count': int(stats['count']),
      'mean_entropy': mean_entropy,
  }
  metrics.update({f'f1_{key}': float(v) for key, v in zip(task.class_keys(), f1)})
  return metrics


REGRESSION_KEYS = ('count', 'n', 'abs_error', 'sq_error', 'x', 'y', 'xx', 'yy', 'xy')


def regression_statistics(
    task: TaskSpec, outputs: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None
) -> dict[str, jax.Array]:
  """Additive statistics of one batch for a regression task (outputs and targets ``[B, d]``, NaN = missing; jittable):
  per output, over the present targets of real examples, ``n`` (int32 counts) and the float32 sums ``abs_error``
  Σ|x − y|, ``sq_error`` Σ(x − y)², ``x``, ``y``, ``xx``, ``yy``, ``xy`` (x the prediction, y the target);
  ``count`` (scalar): examples with at least one present target."""
  outputs, targets = jnp.asarray(outputs, jnp.float32), jnp.asarray(targets, jnp.float32)
  d = task.num_classes
  if outputs.ndim != 2 or outputs.shape[1] != d:
    raise ValueError(f'outputs of task {task.name!r}: got shape {outputs.shape}, expected [B, {d}]')
  if targets.shape != outputs.shape:
    raise ValueError(f'targets of task {task.name!r}: got shape {targets.shape}, expected {list(outputs.shape)}')
  real = jnp.ones(outputs.shape[0], bool) if mask is None else jnp.asarray(mask) > 0
  present = real[:, None] & jnp.isfinite(targets)
  x, y = jnp.where(present, outputs, 0.0), jnp.where(present, targets, 0.0)
  error = x - y
  sums = {'abs_error': jnp.abs(error), 'sq_error': error * error, 'x': x, 'y': y, 'xx': x * x, 'yy': y * y}
  return {
      'count': jnp.sum(jnp.any(present, axis=1), dtype=jnp.int32),
      'n': jnp.sum(present, axis=0, dtype=jnp.int32),
      **{k: jnp.sum(v, axis=0) for k, v in sums.items()},
      'xy': jnp.sum(x * y, axis=0),
  }


def regression_zero_statistics(task: TaskSpec) -> dict[str, np.ndarray]:
  """Statistics of an empty set for a regression task (the identity of ``accumulate``)."""
  d = task.num_classes
  zeros = {k: np.zeros((d,), np.float64) for k in REGRESSION_KEYS if k not in ('count', 'n')}
  return {'count': np.zeros((), np.int64), 'n': np.zeros((d,), np.int64), **zeros}


def regression_finalize(task: TaskSpec, stats: Mapping[str, jax.Array]) -> dict[str, float]:
  """Metrics of a regression task from its accumulated statistics (float64 on the host), per output ``<k>``
  (:meth:`~mtlmatch.tasks.TaskSpec.class_keys`: ``valence``, ``arousal``) and their mean over the outputs where they
  are defined:

  * ``mae_<k>`` = Σ|x − y| / n, ``rmse_<k>`` = √(Σ(x − y)² / n);
  * ``pearson_<k>`` = σ_xy / (σ_x σ_y) and ``ccc_<k>`` = 2σ_xy / (σ_x² + σ_y² + (μ_x − μ_y)²) with population
    moments (μ_x = Σx / n, σ_x² = Σx² / n − μ_x², σ_xy = Σxy / n − μ_x μ_y; Lin 1989);
  * ``mae``, ``rmse``, ``pearson``, ``ccc``: the means over outputs; ``count``: examples with a present target.

  A metric with no present target (or a zero denominator) is NaN and left out of the mean. MAE and RMSE are
  lower-is-better (``TaskSpec.higher_is_better``)."""
  if not isinstance(stats, Mapping) or set(stats) != set(REGRESSION_KEYS):
    got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
    raise ValueError(f'stats of task {task.name!r}: got keys {got}, expected {sorted(REGRESSION_KEYS)} (regression)')
  s = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  n = s['n']
  with np.errstate(invalid='ignore', divide='ignore'):
    safe = np.where(n > 0, n, 1.0)
    mx, my = s['x'] / safe, s['y'] / safe
    var_x = np.maximum(s['xx'] / safe - mx * mx, 0.0)
    var_y = np.maximum(s['yy'] / safe - my * my, 0.0)
    cov = s['xy'] / safe - mx * my
    defined = n > 0
    per_output = {
        'mae': np.where(defined, s['abs_error'] / safe, np.nan),
        'rmse': np.where(defined, np.sqrt(s['sq_error'] / safe), np.nan),
        'pearson': np.where(defined & (var_x * var_y > 0), cov / np.sqrt(var_x * var_y), np.nan),
        'ccc': np.where(
            defined & (var_x + var_y + (mx - my) ** 2 > 0), 2 * cov / (var_x + var_y + (mx - my) ** 2), np.nan
        ),
    }
  metrics = {name: _mean_defined(values) for name, values in per_output.items()}
  metrics['count'] = int(s['count'])
  for name, values in per_output.items():
    metrics.update({f'{name}_{key}': float(v) for key, v in zip(task.class_keys(), values)})
  return metrics


def signed(task: TaskSpec, metric: str, value: float) -> float:
  """``value`` when higher is better for ``metric`` of ``task``, else ``-value``: larger is always better."""
  return value if task.higher_is_better(metric) else -value


def selection_score(tasks: Mapping[str, TaskSpec], metrics: Mapping[str, Mapping[str, float]]) -> float:
  """Mean over tasks of each task's primary metric (``TaskSpec.primary_metric``), signed so that larger is better
  (a lower-is-better metric such as MAE enters as −MAE; :func:`signed`). Tasks whose metric is NaN — no labelled
  example — are left out; NaN if none is defined. Used to pick the best-validation step. The metrics enter on their
  own scales: accuracy, F1 and CCC all lie in [0, 1] (CCC in [−1, 1]); a task scored by MAE in years would dominate
  the mean — give such a task ``metric='ccc'`` or select on one task."""
  values = [
      signed(spec, spec.primary_metric, metrics[t][spec.primary_metric]) for t, spec in tasks.items() if t in metrics
  ]
  return _mean_defined(np.asarray(values, np.float64)) if values else float('nan')


def delta_m(
    tasks: Mapping[str, TaskSpec],
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    *,
    which: Optional[Mapping[str, Sequence[str]]] = None,
) -> float:
  """Δm (%), the mean relative change against the single-task models (Maninis et al. 2019; LibMTL; Nash-MTL, FAMO):

      Δm = (1/K) Σ_{t, k} (−1)^{l_k} (M_{t,k} − M_{ST;t,k}) / M_{ST;t,k} × 100,

  over the K (task, metric) pairs, with ``l_k = 1`` when lower is better for metric k (MAE, RMSE) and 0 otherwise.
  ``metrics[t][k]`` is the model's, ``baselines[t][k]`` the single-task model's value; ``which`` {task: metrics}
  (default: each task's primary metric). Pairs where either value is missing or NaN, or the baseline is 0, are left
  out; NaN if none is left."""
  terms = []
  for t, spec in tasks.items():
    for k in (which or {}).get(t, (spec.primary_metric,)):
      value, base = metrics.get(t, {}).get(k, math.nan), baselines.get(t, {}).get(k, math.nan)
      if math.isfinite(value) and math.isfinite(base) and base != 0:
        terms.append(signed(spec, k, (value - base) / abs(base)))
  return 100.0 * float(np.mean(terms)) if terms else float('nan')


def finalize_tasks(tasks: Mapping[str, TaskSpec], stats: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
  """``{task: finalize(tasks[task], stats[task])}`` for every task in ``tasks``."""
  missing = sorted(set(tasks) - set(stats))
  if missing:
    raise ValueError(f'stats: got no entry for tasks {missing}, expected one per task in {sorted(tasks)}')
  return {name: finalize(spec, stats[name]) for name, spec in tasks.items()}
