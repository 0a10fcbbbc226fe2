"""Evaluators: what the train loop measures, each named in ``config.evals`` and run at its own interval.

The seam (after big_vision's evaluators): ``config.evals.<name>`` is an entry with ``kind`` (a key of
:data:`EVALUATORS`), ``every`` (steps; ``None`` = ``config.eval_every``; ``0`` = only at the end), ``enabled`` and
the kind's options. :func:`build` makes one evaluator per enabled entry; after each step the train loop runs those
:func:`due` then, and at the end all of them (:func:`run`). The kinds:

* ``classification`` (option ``split``: ``'test'`` = the benchmark's eval sources, ``'validation'`` = the parts held
  out of the training sources): every task's metrics (``metrics_lib.finalize``) per source and over the sources
  together. TensorBoard ``eval/<task>/<metric>`` (test) or ``validation/<task>/<metric>``; ``results.json``
  ``metrics`` + ``per_source`` (test) or ``validation``.
* ``selection``: validation-based model selection — the best step by :func:`metrics_lib.selection_score`, the test
  metrics there, the history of both curves — and early stopping after ``config.early_stopping_patience``
  evaluations without a better score. ``results.json`` ``selection``. Its record lives in every checkpoint's
  metadata, so a resumed run continues it exactly.
* ``linear_probe`` (options ``train_examples``, ``test_examples``, ``c``, ``max_steps``, ``seed``): a logistic
  regression on the frozen shared features (:func:`fit_logistic`), trained on the training sources' labelled examples
  of each task and scored on the test sources. TensorBoard ``<name>/<task>/<metric>``; ``results.json`` ``<name>``.

Writing your own: subclass :class:`Evaluator`, list its options with their defaults in ``OPTIONS``, implement
``run(at, record) -> Report`` and register it, ``EVALUATORS['mine'] = Mine``; then ``config.evals.mine =
{'kind': 'mine', 'every': 100}``. ``at`` (:class:`At`) is the train state at one step, with the classification
metrics of each split computed at most once per step (the test and validation evaluators and the selection share
them). A :class:`Report` holds the TensorBoard scalars, the evaluator's part of ``results.json`` and its record:
JSON-able state handed back to the next ``run`` and saved in checkpoint metadata (``evals.<name>``); an evaluator
that can stop training says why in ``stop_reason(record)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtlmatch import data as data_lib
from mtlmatch import metrics as metrics_lib
from mtlmatch.tasks import MISSING, TaskSpec

# split -> (the Benchmark attribute with its sources, the TensorBoard prefix of its metrics)
SPLITS = {'test': ('eval_sources', 'eval'), 'validation': ('validation_sources', 'validation')}
COMMON_KEYS = {'kind': None, 'every': None, 'enabled': True}  # every entry's keys besides its kind's OPTIONS


@dataclasses.dataclass(frozen=True)
class Report:
  """What one evaluator measured at one step."""

  scalars: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # TensorBoard tag -> value
  results: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # its part of results.json (at the end)
  record: Any = None  # its new record (None: it keeps none)


# ---------------------------------------------------------------------------------------------------------------
# Classification metrics of a split: one jitted statistics step per eval batch, summed exactly.


def eval_step(params, batch_stats, batch, *, model, tasks):
  """Additive metric statistics of one (padded) eval batch; summed over the global batch."""
  outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  return {
      name: metrics_lib.task_statistics(task, outputs['logits'][name], batch['labels'][name], batch['mask'])
      for name, task in tasks.items()
  }


def classification_metrics(exp, state, split: str = 'test') -> dict:
  """``{'metrics': {task: metrics}, 'per_source': {source: {task: metrics}}}`` of ``state`` on ``split`` (see
  :data:`SPLITS`), every example counted exactly once. ``exp``: a ``train.Experiment``."""
  benchmark = exp.benchmark
  per_source, totals = {}, None
  for source in getattr(benchmark, SPLITS[split][0]):
    stats = None
    for batch in data_lib.eval_iterator(
        source, benchmark.tasks, global_batch_size=exp.config.eval_batch_size, sharding=exp.data_sharding
    ):
      batch_stats = jax.device_get(exp.eval_fn(state.params, state.batch_stats, batch))
      stats = batch_stats if stats is None else metrics_lib.accumulate(stats, batch_stats)
    if stats is None:
      continue
    per_source[source.name] = {t: metrics_lib.finalize(benchmark.tasks[t], s) for t, s in stats.items()}
    totals = stats if totals is None else metrics_lib.accumulate(totals, stats)
  metrics = {t: metrics_lib.finalize(benchmark.tasks[t], s) for t, s in (totals or {}).items()}
  return {'metrics': metrics, 'per_source': per_source}


class At:
  """The train state at one step as evaluators see it; each split's classification metrics are computed once."""

  def __init__(self, exp, state, step: int):
    self.exp, self.state, self.step = exp, state, step
    self._splits = {}

  def classification(self, split: str) -> dict:
    if split not in self._splits:
      self._splits[split] = classification_metrics(self.exp, self.state, split)
    return self._splits[split]

  def computed(self, split: str) -> bool:
    """Whether an evaluator already asked for ``split``'s metrics at this step (the negative-transfer monitor acts
    at the steps where validation metrics were computed)."""
    return split in self._splits


# ---------------------------------------------------------------------------------------------------------------
# The evaluators.


class Evaluator:
  """The interface. ``name``: its key in ``config.evals``; ``every``: its interval in steps (0 = only at the end);
  ``options``: its entry's values of ``OPTIONS`` (the kind's options with their defaults); ``HELP``: one line for
  ``--help``."""

  OPTIONS: Mapping[str, Any] = {}
  HELP = ''

  def __init__(self, name: str, entry: Mapping[str, Any], exp):
    del exp
    self.name = name
    self.every = entry['every']
    self.options = {k: entry.get(k, v) for k, v in self.OPTIONS.items()}

  def run(self, at: At, record: Any) -> Report:
    raise NotImplementedError

  def stop_reason(self, record: Any) -> Optional[str]:
    """Why training should stop now (None: it should not)."""
    del record
    return None


class Classification(Evaluator):
  """Per-task metrics on one split, per source and pooled (see the module docstring for tags and keys)."""

  OPTIONS = {'split': 'test'}
  HELP = "'test' = the eval sources, 'validation' = the parts held out of the training sources"

  def run(self, at: At, record: Any) -> Report:
    del record
    split = self.options['split']
    out = at.classification(split)
    prefix = SPLITS[split][1]
    scalars = {f'{prefix}/{t}/{m}': v for t, ms in out['metrics'].items() for m, v in ms.items() if np.ndim(v) == 0}
    results = dict(out) if split == 'test' else {'validation': out['metrics']}
    return Report(scalars, results)


class Selection(Evaluator):
  """Best-validation-step model selection and early stopping (``config.early_stopping_patience``).

  The record (JSON, in every checkpoint's metadata so resume continues it) keeps the best step by the validation
  score (:func:`metrics_lib.selection_score`: the mean over tasks of each task's primary metric), the validation and
  **test** metrics at that step (the test set is only recorded, never used to choose), the number of evaluations
  since the best, and the history of both curves. Without validation sources the score is NaN and the best step is
  the last one evaluated. A step already in the history (a run resumed after evaluating it) is not added again.
  """

  HELP = 'the best-validation step; stops after early_stopping_patience evaluations without a better score'

  def __init__(self, name, entry, exp):
    super().__init__(name, entry, exp)
    self.tasks = exp.benchmark.tasks
    self.patience = exp.config.get('early_stopping_patience', 0)

  def run(self, at: At, record: Optional[dict]) -> Report:
    if not (record and record['history'] and record['history'][-1]['step'] == at.step):
      record = select(self.tasks, record, at.step, at.classification('test'), at.classification('validation'))
    return Report(results={'selection': {k: v for k, v in record.items() if k != 'evals_since_best'}}, record=record)

  def stop_reason(self, record: Optional[dict]) -> Optional[str]:
    if not (self.patience and record and record['evals_since_best'] >= self.patience):
      return None
    return (
        f'no better validation score in the last {self.patience} evaluations (best {record["best_score"]:.4f} '
        f'at step {record["best_step"]})'
    )


def select(tasks: Mapping[str, TaskSpec], record: Optional[dict], step: int, test: dict, validation: dict) -> dict:
  """The selection record updated with the ``test`` and ``validation`` classification metrics at ``step``."""
  score = metrics_lib.selection_score(tasks, validation['metrics'])
  primary = {t: metrics_lib.PRIMARY_METRIC[spec.kind] for t, spec in tasks.items()}
  record = dict(
      record or {'metric': primary, 'best_step': None, 'best_score': None, 'evals_since_best': 0, 'history': []}
  )
  curve = lambda metrics: {t: metrics[t][m] for t, m in primary.items() if t in metrics}  # noqa: E731
  record['history'] = record['history'] + [
      {'step': step, 'score': score, 'validation': curve(validation['metrics']), 'test': curve(test['metrics'])}
  ]
  best = record['best_score']
  # Strictly better (the earliest of equal scores wins); without a validation score, the latest step.
  if not np.isfinite(score) or best is None or not np.isfinite(best) or score > best:
    record.update(
        best_step=step,
        best_score=score,
        evals_since_best=0,
        validation=validation['metrics'],
        metrics=test['metrics'],
        per_source=test['per_source'],
    )
  else:
    record['evals_since_best'] += 1
  return record


class LinearProbe(Evaluator):
  """A linear probe of the frozen shared features per task (:func:`probe_sources`, :func:`probe_metrics`)."""

  OPTIONS = {'train_examples': 2000, 'test_examples': 2000, 'c': 1.0, 'max_steps': 500, 'seed': 0}
  HELP = 'c: inverse L2 strength; max_steps: LBFGS'

  def __init__(self, name, entry, exp):
    super().__init__(name, entry, exp)
    o = self.options
    self.tasks = exp.benchmark.tasks
    self.sources = probe_sources(
        exp.benchmark, train_examples=o['train_examples'], test_examples=o['test_examples'], seed=o['seed']
    )
    self.batch_size, self.sharding = exp.config.eval_batch_size, exp.data_sharding
    self.outputs = jax.jit(
        functools.partial(probe_outputs, model=exp.model),
        in_shardings=(exp.replicated, exp.replicated, exp.data_sharding),
        out_shardings=exp.replicated,
    )

  def run(self, at: At, record: Any) -> Report:
    del record
    fn = functools.partial(self.outputs, at.state.params, at.state.batch_stats)
    metrics = {}
    for task, (train_source, test_source) in self.sources.items():
      train = probe_features(fn, train_source, self.tasks[task], batch_size=self.batch_size, sharding=self.sharding)
      test = probe_features(fn, test_source, self.tasks[task], batch_size=self.batch_size, sharding=self.sharding)
      metrics[task] = probe_metrics(
          self.tasks[task], train, test, c=self.options['c'], max_steps=self.options['max_steps']
      )
    scalars = {f'{self.name}/{t}/{m}': v for t, ms in metrics.items() for m, v in ms.items() if np.ndim(v) == 0}
    return Report(scalars, {self.name: metrics})


EVALUATORS = {'classification': Classification, 'selection': Selection, 'linear_probe': LinearProbe}


# ---------------------------------------------------------------------------------------------------------------
# What the train loop calls.


def build(config: ml_collections.ConfigDict, exp) -> dict[str, Evaluator]:
  """One evaluator per enabled ``config.evals`` entry, in config order; ``every=None`` becomes
  ``config.eval_every``."""
  out = {}
  for name, entry in config.get('evals', {}).items():
    entry = {**COMMON_KEYS, **dict(entry)}
    if entry['enabled']:
      entry['every'] = config.eval_every if entry['every'] is None else entry['every']
      out[name] = EVALUATORS[entry['kind']](name, entry, exp)
  return out


def due(evaluators: Mapping[str, Evaluator], step: int, total_steps: int) -> dict[str, Evaluator]:
  """The evaluators whose interval divides ``step``, before the last step (the end runs them all)."""
  return {n: e for n, e in evaluators.items() if e.every and step % e.every == 0 and step < total_steps}


def run(evaluators: Mapping[str, Evaluator], at: At, records: Mapping[str, Any]) -> tuple[dict, dict]:
  """Runs ``evaluators`` at one step: ``(reports by name, records updated)``."""
  reports = {name: ev.run(at, records.get(name)) for name, ev in evaluators.items()}
  return reports, {**records, **{n: r.record for n, r in reports.items() if r.record is not None}}


def stop_reason(evaluators: Mapping[str, Evaluator], records: Mapping[str, Any]) -> Optional[str]:
  """Why training should stop (the first evaluator that says so), or None."""
  reasons = [ev.stop_reason(records.get(name)) for name, ev in evaluators.items()]
  return next((r for r in reasons if r), None)


def records_from_meta(evaluators: Mapping[str, Evaluator], meta: Optional[Mapping]) -> dict:
  """The evaluators' records saved in a checkpoint's metadata (``meta['evals']``; a checkpoint from before the
  evaluators kept the selection record as ``meta['selection']``)."""
  meta = meta or {}
  if 'evals' in meta:
    return {n: r for n, r in (meta['evals'] or {}).items() if n in evaluators}
  legacy = meta.get('selection')
  return {n: legacy for n, e in evaluators.items() if isinstance(e, Selection) and legacy is not None}


def validate(evals: Any) -> None:
  """Checks ``config.evals``: each entry a dict with a registered ``kind``, ``every`` None or an int >= 0, ``enabled``
  a bool, only its kind's options, a known ``split``."""
  if not isinstance(evals, (Mapping, ml_collections.ConfigDict)):
    raise ValueError(f'config.evals: got {evals!r}, expected a ConfigDict of named evaluator entries')
  for name, entry in evals.items():
    where = f'config.evals.{name}'
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f'{where}: got {entry!r}, expected an entry such as {{"kind": "classification", "every": 100}}')
    kind = entry.get('kind')
    if kind not in EVALUATORS:
      raise ValueError(f'{where}.kind: got {kind!r}, expected one of {sorted(EVALUATORS)}')
    allowed = {**COMMON_KEYS, **EVALUATORS[kind].OPTIONS}
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
      raise ValueError(f'{where}: got unknown keys {unknown} for kind {kind!r}, expected some of {sorted(allowed)}')
    every = entry.get('every')
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
      raise ValueError(
          f'{where}.every: got {every!r}, expected an int >= 0 (steps; 0 = only at the end) or None '
          '(= config.eval_every)'
      )
    if not isinstance(entry.get('enabled', True), bool):
      raise ValueError(f'{where}.enabled: got {entry["enabled"]!r}, expected True or False')
    if kind == 'classification' and entry.get('split', 'test') not in SPLITS:
      raise ValueError(f'{where}.split: got {entry["split"]!r}, expected one of {sorted(SPLITS)}')
    if kind == 'linear_probe':
      for key in ('train_examples', 'test_examples', 'max_steps'):
        value = entry.get(key, LinearProbe.OPTIONS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
          raise ValueError(f'{where}.{key}: got {value!r}, expected an int >= 1')
      c = entry.get('c', LinearProbe.OPTIONS['c'])
      if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        raise ValueError(f"{where}.c: got {c!r}, expected a number > 0 (inverse L2 strength, as scikit-learn's C)")


# ---------------------------------------------------------------------------------------------------------------
# The linear probe: data, features and an L2-regularised logistic regression in JAX.


def _pixels(images, rows: np.ndarray) -> np.ndarray:
  """uint8 ``[n, H, W, C]`` of ``rows``: indexed in memory, or fetched and decoded for sources read by row."""
  if isinstance(images, data_lib.LazyImages):
    return data_lib.decode_rows(images, rows)
  return np.asarray(images)[rows]


def probe_sources(
    benchmark: data_lib.Benchmark, *, train_examples: int, test_examples: int, seed: int = 0
) -> dict[str, tuple[data_lib.Source, data_lib.Source]]:
  """``{task: (train source, test source)}``: up to ``train_examples`` labelled examples of each task from the
  training sources that annotate it and up to ``test_examples`` from the eval sources, a seeded draw kept in read
  order, as in-memory sources. Every host holds the same draw. A task without a labelled example in either part is
  left out."""
  rng = np.random.default_rng(seed)
  out = {}
  for task in benchmark.tasks:
    parts = []
    for part, sources, cap in (
        ('train', benchmark.train_sources, train_examples),
        ('test', benchmark.eval_sources, test_examples),
    ):
      stores, rows, labels = [], [], []  # per source: its images, the labelled rows, their labels
      for source in sources:
        if task in source.tasks:
          ex = data_lib.load_examples(source, benchmark.tasks, image_shape=benchmark.image_shape)
          y = np.asarray(ex.labels[task])
          keep = (y != MISSING) if y.ndim == 1 else (y != MISSING).any(axis=1)
          stores.append(ex.images)
          rows.append(np.flatnonzero(keep))
          labels.append(y[keep])
      n = sum(len(y) for y in labels)
      if not n:
        parts.append(None)
        continue
      idx = np.sort(rng.permutation(n)[:cap])
      owner = np.searchsorted(np.cumsum([len(r) for r in rows]), idx, side='right')  # which source each draw is from
      starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
      images = [
          _pixels(stores[s], rows[s][idx[owner == s] - starts[s]]) for s in range(len(stores)) if (owner == s).any()
      ]
      parts.append(
          data_lib.array_source(f'probe_{part}/{task}', np.concatenate(images), {task: np.concatenate(labels)[idx]})
      )
    if all(p is not None for p in parts):
      out[task] = tuple(parts)
  return out


def probe_outputs(params, batch_stats, batch, *, model):
  """The frozen shared features (eval mode) of an eval batch, with its labels and mask."""
  features, _ = model.encode({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  return {'features': features, 'labels': batch['labels'], 'mask': batch['mask']}


def probe_features(
    fn, source: data_lib.Source, task: TaskSpec, *, batch_size: int, sharding=None
) -> tuple[np.ndarray, np.ndarray]:
  """``(features [N, D], labels of task)`` of every example of ``source``; ``fn(batch)`` is :func:`probe_outputs`
  with the model's variables bound (jitted; with ``sharding``, replicated outputs)."""
  features, labels = [], []
  for batch in data_lib.eval_iterator(source, {task.name: task}, global_batch_size=batch_size, sharding=sharding):
    out = jax.device_get(fn(batch))
    real = np.asarray(out['mask']) > 0
    features.append(np.asarray(out['features'], np.float32).reshape(real.shape[0], -1)[real])
    labels.append(np.asarray(out['labels'][task.name])[real])
  return np.concatenate(features), np.concatenate(labels)


@dataclasses.dataclass(frozen=True)
class Logistic:
  """A fitted probe: ``logits = ((x − mean) / scale) @ w + b``."""

  mean: np.ndarray  # [D]
  scale: np.ndarray  # [D]
  w: np.ndarray  # [D, C]
  b: np.ndarray  # [C]; multiclass: −1e30 for a class absent from the training labels (never predicted)
  steps: int  # LBFGS iterations taken

  def logits(self, features) -> np.ndarray:
    return ((np.asarray(features, np.float32) - self.mean) / self.scale) @ self.w + self.b


@functools.partial(jax.jit, static_argnames=('multiclass', 'max_steps'))
def _fit(z, targets, weights, present, c, tol, *, multiclass: bool, max_steps: int):
  n = jnp.maximum(jnp.sum(jnp.any(weights > 0, axis=-1)), 1)

  def objective(params):
    logits = z @ params['w'] + params['b']
    if multiclass:
      logits = jnp.where(present, logits, -1e30)
      losses = -targets * jax.nn.log_softmax(logits)
    else:
      losses = optax.sigmoid_binary_cross_entropy(logits, targets)
    return (c * jnp.sum(weights * losses) + 0.5 * jnp.sum(params['w'] ** 2)) / n

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    return (count == 0) | ((count < max_steps) & (optax.tree.norm(optax.tree.get(state, 'grad')) >= tol))

  params = {
      'w': jnp.zeros((z.shape[1], targets.shape[1]), jnp.float32),
      'b': jnp.zeros((targets.shape[1],), jnp.float32),
  }
  params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
  return params, optax.tree.get(state, 'count')


def fit_logistic(
    features, labels, task: TaskSpec, *, c: float = 1.0, max_steps: int = 500, tol: float = 1e-6
) -> Logistic:
  """An L2-regularised logistic regression of ``labels`` (``-1`` = missing) on standardised ``features``.

  Minimises ``C · Σ_i loss_i + ½‖W‖²`` (the intercept is not penalised), as scikit-learn's ``LogisticRegression(C=c)``
  does: multinomial (softmax cross-entropy) for a multiclass task, one binary logistic regression per label for a
  multilabel task (over that label's labelled entries). Features are standardised with the training mean and
  standard deviation (a constant feature is only centred). Full batch, from zero, LBFGS until the gradient norm of
  the objective / N is below ``tol`` or ``max_steps`` iterations: deterministic.

  A constant (uninformative) feature leaves only the intercept, which then predicts the label frequencies:

  >>> import numpy as np
  >>> task = TaskSpec('t', 'multiclass', 3)
  >>> probe = fit_logistic(np.ones((8, 2)), np.array([0, 0, 0, 0, 0, 0, 1, 1]), task)
  >>> np.round(np.exp(probe.b[:2]) / np.exp(probe.b[:2]).sum(), 3)     # class 2 never seen: never predicted
  array([0.75, 0.25], dtype=float32)
  """
  x = np.asarray(features, np.float64)
  x = x.reshape(x.shape[0], -1)
  y = np.asarray(labels)
  mean, std = x.mean(0), x.std(0)
  scale = np.where(std > 0, std, 1.0)
  z = ((x - mean) / scale).astype(np.float32)
  if task.kind == 'multiclass':
    labelled = y != MISSING
    targets = np.eye(task.num_classes, dtype=np.float32)[np.where(labelled, y, 0)] * labelled[:, None]
    weights = np.broadcast_to(labelled[:, None], targets.shape).astype(np.float32)
    present = targets.sum(0) > 0
  else:
    targets, weights = (y == 1).astype(np.float32), (y != MISSING).astype(np.float32)
    present = np.ones(task.num_classes, bool)
  # Zero-padded to power-of-two sizes (at least 64 rows, 32 features, 32 classes) so that probes of similar sizes
  # share one compilation: padded rows have weight 0, padded features are 0 (their weights stay 0 under the
  # penalty), padded classes are absent (multiclass) or unweighted (multilabel).
  (n, d), k = z.shape, targets.shape[1]
  size = lambda m, least: max(least, 1 << (m - 1).bit_length())  # noqa: E731
  pad = lambda a, *shape: np.pad(a, [(0, s - m) for s, m in zip(shape, a.shape)])  # noqa: E731
  rows, cols, classes = size(n, 64), size(d, 32), size(k, 32)
  params, steps = _fit(
      pad(z, rows, cols),
      pad(targets, rows, classes),
      pad(weights, rows, classes),
      pad(present, classes),
      jnp.float32(c),
      jnp.float32(tol),
      multiclass=task.kind == 'multiclass',
      max_steps=int(max_steps),
  )
  w, b = np.asarray(params['w'])[:d, :k], np.asarray(params['b'])[:k]
  b = np.where(present, b, np.float32(-1e30)).astype(np.float32)
  return Logistic(mean.astype(np.float32), scale.astype(np.float32), w, b, int(steps))


def probe_metrics(task: TaskSpec, train: tuple, test: tuple, *, c: float = 1.0, max_steps: int = 500) -> dict:
  """The task's metrics (``metrics_lib.finalize``) of a probe fitted on ``train = (features, labels)`` and applied to
  ``test``; its score is ``metrics[metrics_lib.PRIMARY_METRIC[task.kind]]``. A multilabel label with one value only
  among the training labels is left out of the score (its test entries count as missing, ``f1_<k>`` NaN)."""
  probe = fit_logistic(*train, task, c=c, max_steps=max_steps)
  y_test = np.asarray(test[1])
  if task.kind == 'multilabel':
    y_train = np.asarray(train[1])
    both = np.array([{0, 1} <= set(y_train[:, k][y_train[:, k] != MISSING].tolist()) for k in range(task.num_classes)])
    y_test = np.where(both[None, :], y_test, MISSING)
  stats = metrics_lib.task_statistics(task, probe.logits(test[0]), y_test)
  return metrics_lib.finalize(task, jax.device_get(stats))
