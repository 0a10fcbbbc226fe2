"""The negative-transfer monitor (docs/maths.md §9): each task's validation metric against a single-task reference.

``config.nt_reference = {task: reference}`` turns it on; a reference is a number (the task's primary validation
metric, ``TaskSpec.primary_metric``: accuracy, mean F1, CCC or MAE) or the path of a single-task run's
``results.json`` (or its workdir; ``{seed}`` in the path is this run's ``config.seed``). A run's reference follows its
training: at step s it is the best validation value that run had reached by step s (its ``selection.history``), and
after its last evaluation its best-validation value ``selection.validation[task][metric]`` — never its test metrics —
so a task is not flagged merely for being early in training, as a fixed end-of-training number would flag it. At
every step where the train loop computed validation metrics (``config.evals``: the validation and selection
evaluators, every ``eval_every`` steps), :meth:`Monitor.update` counts, per task, the consecutive evaluations worse
than the reference by more than ``nt_margin`` (``value < reference − nt_margin``; for a lower-is-better metric such as
MAE ``value > reference + nt_margin``, and a run's reference is its running minimum). Each time that count reaches a
multiple of ``nt_patience`` it logs a warning naming the task and the terms feeding it (``objective.Term.feeds``: DM
by direction, co-annotation both tasks; DGR none) and, with ``nt_action='anneal'``, multiplies each such term's scale
by ``nt_anneal`` (once per evaluation however many of its tasks trigger). A scaled-down term whose monitored tasks are
all back within the margin of their reference is divided by ``nt_anneal`` (capped at 1) at each such evaluation: it
recovers as fast as it was cut, one step per evaluation instead of one per window.

The record is JSON (checkpoint metadata ``monitor``, ``results.json`` ``negative_transfer``); the scales also live in
the train state (``TrainState.term_scales``) because the jitted step reads them. Both are saved at the same step, so
a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Optional

from mtlmatch.tasks import TaskSpec

ACTIONS = ('warn', 'anneal')


@dataclasses.dataclass(frozen=True)
class Monitor:
  """What to compare and what to do; :meth:`update` is a pure function of (record, step, validation metrics)."""

  references: Mapping[str, float]  # task -> reference value of its primary validation metric (a run's: its best)
  metrics: Mapping[str, str]  # task -> the name of its primary metric
  feeds: Mapping[str, tuple[str, ...]]  # term -> the tasks it feeds
  margin: float
  patience: int
  action: str  # 'warn' | 'anneal'
  anneal: float  # the factor in (0, 1) per patience window below
  # task -> ((step, value), ...): a single-task run's validation curve (running best), for references read from a run
  curves: Mapping[str, tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=dict)
  # task -> whether its metric is higher-is-better (absent: True); for MAE or RMSE "worse" means above the reference
  higher: Mapping[str, bool] = dataclasses.field(default_factory=dict)

  def worse(self, task: str, value: float, reference: float) -> bool:
    """Whether ``value`` is worse than ``reference`` by more than the margin, in the metric's direction."""
    if self.higher.get(task, True):
      return value < reference - self.margin
    return value > reference + self.margin

  def reference_at(self, task: str, step: int) -> float:
    """The task's reference at ``step``: the number, or the best validation value the single-task run had reached
    by ``step`` (its first value before its first evaluation; its best-validation value after its last)."""
    curve = self.curves.get(task)
    if not curve or step > curve[-1][0]:
      return self.references[task]
    earlier = [v for s, v in curve if s <= step]
    best = max if self.higher.get(task, True) else min
    return best(earlier) if earlier else curve[0][1]

  @property
  def annealed_terms(self) -> tuple[str, ...]:
    """The terms with a scale — those feeding a monitored task, with ``action='anneal'`` (else none)."""
    if self.action != 'anneal':
      return ()
    return tuple(term for term, tasks in self.feeds.items() if set(tasks) & set(self.references))

  def initial_record(self) -> dict:
    return {
        'step': None,
        'references': dict(self.references),
        'below': {t: 0 for t in self.references},
        'gap': {t: None for t in self.references},
        'reference_now': {t: None for t in self.references},
        'scales': {term: 1.0 for term in self.annealed_terms},
        'events': [],
    }

  def update(self, record: Optional[dict], step: int, validation: Mapping[str, Mapping[str, float]]):
    """``(record after the evaluation at step, warning messages)``; ``validation``: ``{task: {metric: value}}``.

    A task without a finite value (no validation example) keeps its count. A step not after the record's last one
    (a resumed run evaluating again at the same step) changes nothing.
    """
    record = copy.deepcopy(record) if record else self.initial_record()
    if record['step'] is not None and step <= record['step']:
      return record, []
    record['step'] = step
    below, scales, messages, cut = record['below'], record['scales'], [], set()
    for task in self.references:
      value = validation.get(task, {}).get(self.metrics[task], math.nan)
      if not math.isfinite(value):
        continue
      reference = self.reference_at(task, step)
      record.setdefault('reference_now', {})[task] = reference
      record['gap'][task] = value - reference
      below[task] = below[task] + 1 if self.worse(task, value, reference) else 0
      if below[task] and below[task] % self.patience == 0:
        feeding = [term for term, tasks in self.feeds.items() if task in tasks]
        annealed = [term for term in feeding if term in scales]
        cut |= set(annealed)
        new = {term: scales[term] * self.anneal for term in annealed}
        what = (
            f'scaling {", ".join(f"{t!r} to {s:.4g}" for t, s in new.items())}'
            if annealed
            else f'terms feeding it: {feeding or "none"} (nt_action={self.action!r}: not changed)'
        )
        side = 'below' if self.higher.get(task, True) else 'above'
        sign = '-' if self.higher.get(task, True) else '+'
        messages.append(
            f'negative transfer on task {task!r} at step {step}: validation {self.metrics[task]} {value:.4f} is {side} '
            f'its single-task reference {reference:.4f} {sign} margin {self.margin:g} for {below[task]} evaluations; '
            + what
        )
        record['events'].append(
            {
                'step': step,
                'task': task,
                'value': value,
                'reference': reference,
                'evaluations_below': below[task],
                'action': 'anneal' if annealed else 'warn',
                'terms': annealed or feeding,
            }
        )
    for term in scales:
      if term in cut:
        scales[term] *= self.anneal
      elif scales[term] < 1 and all(below[t] == 0 for t in self.feeds[term] if t in below):
        scales[term] = min(1.0, scales[term] / self.anneal)
        record['events'].append({'step': step, 'action': 'recover', 'terms': [term], 'scale': scales[term]})
    return record, messages

  def scalars(self, record: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard: ``nt/scale/<term>``, ``nt/below/<task>`` (consecutive evaluations below), ``nt/gap/<task>``
    (validation value − reference)."""
    out = {f'nt/scale/{term}': s for term, s in record['scales'].items()}
    out.update({f'nt/below/{task}': n for task, n in record['below'].items()})
    out.update({f'nt/gap/{task}': g for task, g in record['gap'].items() if g is not None})
    return out


def reference_from_results(path: str, task: str, metric: str, *, where: str) -> tuple[float, tuple]:
  """``(best, curve)`` of a run's ``results.json`` (``path`` = the file or the run's workdir): the task's primary
  validation metric at the best-validation step, ``selection.validation[task][metric]``, and its validation curve
  ``((step, value), ...)`` from ``selection.history`` (empty if the file has none). Raises ValueError naming what is
  missing."""
  file = os.path.join(path, 'results.json') if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"{where}: got {path!r}, expected a number or a single-task run's results.json (or its workdir)")
  try:
    with open(file) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{where}: cannot read {file!r} ({e}); expected a results.json written by mtlmatch') from None
  value = ((results.get('selection') or {}).get('validation') or {}).get(task, {}).get(metric)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(
        f'{where}: {file!r} has no finite selection.validation.{task}.{metric} (got {value!r}); expected the '
        'results.json of a run that trained this task with a validation split (config.data.validation_fraction > 0)'
    )
  history = (results.get('selection') or {}).get('history') or []
  curve = tuple(
      (int(h['step']), float(h['validation'][task]))
      for h in history
      if isinstance(h.get('validation', {}).get(task), (int, float)) and math.isfinite(h['validation'][task])
  )
  return float(value), curve


def build(config, tasks: Mapping[str, TaskSpec], feeds: Mapping[str, tuple[str, ...]]) -> Optional[Monitor]:
  """The monitor of ``config`` (None when ``config.nt_reference`` is empty); ``feeds``: term → the tasks it feeds
  (``Objective.feeds``). References are resolved here, before training: an unknown task, or a results.json without
  the metric, raises ValueError."""
  given = dict(config.nt_reference)
  if not given:
    return None
  metrics, references, curves = {}, {}, {}
  for task, value in given.items():
    where = f'config.nt_reference.{task}'
    if task not in tasks:
      raise ValueError(f'config.nt_reference: got task {task!r}, expected some of the trained tasks {list(tasks)}')
    metrics[task] = tasks[task].primary_metric
    if isinstance(value, str):  # '{seed}' in a path: this run's seed (the same seed's single-task run)
      path = value.replace('{seed}', str(config.seed))
      references[task], curves[task] = reference_from_results(path, task, metrics[task], where=where)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      references[task] = float(value)
    else:
      raise ValueError(
          f'{where}: got {value!r}, expected the single-task {metrics[task]} (a number) or the path of a '
          "single-task run's results.json"
      )
  monitor = Monitor(
      references,
      metrics,
      {term: tuple(t) for term, t in feeds.items()},
      float(config.nt_margin),
      int(config.nt_patience),
      config.nt_action,
      float(config.nt_anneal),
      curves,
      {task: tasks[task].higher_is_better(metric) for task, metric in metrics.items()},
  )
  logging.info('Negative-transfer monitor: references %s, terms feeding them %s', references, dict(feeds))
  return monitor
