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
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlmatch import data as data_lib
from mtlmatch import metrics as metrics_lib
from mtlmatch import probe
from mtlmatch.tasks import TaskSpec, kind_of

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
# What evaluators see: a read-only view of the sources and the model's compiled prediction functions.


@dataclasses.dataclass(frozen=True)
class EvalView:
  """What an evaluator may read (never the whole experiment): the tasks, the sources of each split, the eval batch
  size and sharding, and two compiled functions of (params, batch_stats, batch) — ``statistics_fn``, the additive
  metric statistics of a batch (:func:`eval_step`), and ``features_fn``, the frozen shared features with the
  batch's labels and mask (``probe.probe_outputs``)."""

  tasks: Mapping[str, TaskSpec]
  benchmark: data_lib.Benchmark  # its sources, read only
  batch_size: int
  data_sharding: Any
  statistics_fn: Callable
  features_fn: Callable

  def sources(self, split: str) -> tuple:
    return tuple(getattr(self.benchmark, SPLITS[split][0]))


def eval_step(params, batch_stats, batch, *, model, tasks):
  """Additive metric statistics of one (padded) eval batch, each task's kind's ``statistics``; summed over the
  global batch."""
  outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  return {
      name: kind_of(task).statistics(task, outputs['logits'][name], batch['labels'][name], batch['mask'])
      for name, task in tasks.items()
  }


def make_view(benchmark: data_lib.Benchmark, model, *, batch_size: int, mesh) -> EvalView:
  """The :class:`EvalView` of a model on a benchmark, its functions jitted over ``mesh`` (batch on ``data``)."""
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  jit = lambda fn: jax.jit(  # noqa: E731
      fn, in_shardings=(replicated, replicated, data_sharding), out_shardings=replicated
  )
  return EvalView(
      benchmark.tasks,
      benchmark,
      batch_size,
      data_sharding,
      jit(functools.partial(eval_step, model=model, tasks=benchmark.tasks)),
      jit(functools.partial(probe.probe_outputs, model=model)),
  )


def classification_metrics(view: EvalView, state, split: str = 'test') -> dict:
  """``{'metrics': {task: metrics}, 'per_source': {source: {task: metrics}}}`` of ``state`` (its ``params`` and
  ``batch_stats``) on ``split`` (see :data:`SPLITS`), every example counted exactly once."""
  per_source, totals = {}, None
  for source in view.sources(split):
    stats = None
    for batch in data_lib.eval_iterator(
        source, view.tasks, global_batch_size=view.batch_size, sharding=view.data_sharding
    ):
      batch_stats = jax.device_get(view.statistics_fn(state.params, state.batch_stats, batch))
      stats = batch_stats if stats is None else metrics_lib.accumulate(stats, batch_stats)
    if stats is None:
      continue
    per_source[source.name] = {t: kind_of(view.tasks[t]).finalize(view.tasks[t], s) for t, s in stats.items()}
    totals = stats if totals is None else metrics_lib.accumulate(totals, stats)
  metrics = {t: kind_of(view.tasks[t]).finalize(view.tasks[t], s) for t, s in (totals or {}).items()}
  return {'metrics': metrics, 'per_source': per_source}


class At:
  """The model at one step as evaluators see it (``view`` and the state's ``params`` / ``batch_stats``, read only);
  each split's classification metrics are computed once."""

  def __init__(self, view: EvalView, state, step: int):
    self.view, self.state, self.step = view, state, step
    self._splits = {}

  def classification(self, split: str) -> dict:
    if split not in self._splits:
      self._splits[split] = classification_metrics(self.view, self.state, split)
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

  def __init__(self, name: str, entry: Mapping[str, Any], view: EvalView, config: ml_collections.ConfigDict):
    del view, config
    self.name = name
    self.every = entry['every']
    self.options = {k: entry[k] for k in self.OPTIONS}  # `entries` filled the defaults in

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

  def __init__(self, name, entry, view, config):
    super().__init__(name, entry, view, config)
    self.tasks = view.tasks
    self.patience = config.early_stopping_patience

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
  primary = {t: spec.primary_metric for t, spec in tasks.items()}
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
  """A linear probe of the frozen shared features per task (``probe.probe_sources``, ``probe.probe_metrics``)."""

  OPTIONS = {'train_examples': 2000, 'test_examples': 2000, 'c': 1.0, 'max_steps': 500, 'seed': 0}
  HELP = 'c: inverse L2 strength; max_steps: LBFGS'

  def __init__(self, name, entry, view, config):
    super().__init__(name, entry, view, config)
    o = self.options
    self.tasks = view.tasks
    self.sources = probe.probe_sources(
        view.benchmark, train_examples=o['train_examples'], test_examples=o['test_examples'], seed=o['seed']
    )
    self.batch_size, self.sharding = view.batch_size, view.data_sharding

  def run(self, at: At, record: Any) -> Report:
    del record
    fn = functools.partial(at.view.features_fn, at.state.params, at.state.batch_stats)
    metrics = {}
    for task, (train_source, test_source) in self.sources.items():
      kw = dict(batch_size=self.batch_size, sharding=self.sharding)
      train = probe.probe_features(fn, train_source, self.tasks[task], **kw)
      test = probe.probe_features(fn, test_source, self.tasks[task], **kw)
      metrics[task] = probe.probe_metrics(
          self.tasks[task], train, test, c=self.options['c'], max_steps=self.options['max_steps']
      )
    scalars = {f'{self.name}/{t}/{m}': v for t, ms in metrics.items() for m, v in ms.items() if np.ndim(v) == 0}
    return Report(scalars, {self.name: metrics})


EVALUATORS = {'classification': Classification, 'selection': Selection, 'linear_probe': LinearProbe}


# ---------------------------------------------------------------------------------------------------------------
# What the train loop calls.


def entries(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """Every ``config.evals`` entry with its common keys and its kind's options filled in (defaults) and ``every``
  resolved (``None`` becomes ``config.eval_every``)."""
  out = {}
  for name, entry in config.evals.items():
    entry = filled(entry)
    entry['every'] = config.eval_every if entry['every'] is None else entry['every']
    out[name] = entry
  return out


def filled(entry: Mapping[str, Any]) -> dict:
  """``entry`` over its defaults: the one table of them, :data:`COMMON_KEYS` and its kind's ``OPTIONS``."""
  return {**COMMON_KEYS, **EVALUATORS[entry['kind']].OPTIONS, **dict(entry)}


def build(config: ml_collections.ConfigDict, view: EvalView) -> dict[str, Evaluator]:
  """One evaluator per enabled ``config.evals`` entry (:func:`entries`), in config order."""
  return {
      name: EVALUATORS[entry['kind']](name, entry, view, config)
      for name, entry in entries(config).items()
      if entry['enabled']
  }


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


def records_from_meta(evaluators: Mapping[str, Evaluator], meta: Mapping) -> dict:
  """The evaluators' records saved in a checkpoint's metadata (``meta['evals']``), for the evaluators built now."""
  return {n: r for n, r in meta['evals'].items() if n in evaluators}


def validate(evals: Any) -> None:
  """Checks ``config.evals``: each entry a dict with a registered ``kind``, ``every`` None or an int >= 0, ``enabled``
  a bool, only its kind's options, a known ``split``."""
  if not isinstance(evals, (Mapping, ml_collections.ConfigDict)):
    raise ValueError(f'config.evals: got {evals!r}, expected a ConfigDict of named evaluator entries')
  for name, entry in evals.items():
    where = f'config.evals.{name}'
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f'{where}: got {entry!r}, expected an entry such as {{"kind": "classification", "every": 100}}')
    kind = entry['kind'] if 'kind' in entry else None
    if kind not in EVALUATORS:
      raise ValueError(f'{where}.kind: got {kind!r}, expected one of {sorted(EVALUATORS)}')
    allowed = {**COMMON_KEYS, **EVALUATORS[kind].OPTIONS}
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
      raise ValueError(f'{where}: got unknown keys {unknown} for kind {kind!r}, expected some of {sorted(allowed)}')
    entry = filled(entry)
    every = entry['every']
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
      raise ValueError(
          f'{where}.every: got {every!r}, expected an int >= 0 (steps; 0 = only at the end) or None '
          '(= config.eval_every)'
      )
    if not isinstance(entry['enabled'], bool):
      raise ValueError(f'{where}.enabled: got {entry["enabled"]!r}, expected True or False')
    if kind == 'classification' and entry['split'] not in SPLITS:
      raise ValueError(f'{where}.split: got {entry["split"]!r}, expected one of {sorted(SPLITS)}')
    if kind == 'linear_probe':
      for key in ('train_examples', 'test_examples', 'max_steps'):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
          raise ValueError(f'{where}.{key}: got {value!r}, expected an int >= 1')
      c = entry['c']
      if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        raise ValueError(f"{where}.c: got {c!r}, expected a number > 0 (inverse L2 strength, as scikit-learn's C)")
