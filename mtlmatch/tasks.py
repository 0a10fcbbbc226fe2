"""Task specifications, task kinds and the label conventions every module shares (docs/maths.md §1).

A task has a name, a ``kind`` and a number of classes (outputs). A *kind* is one entry of :data:`KINDS`: a
:class:`TaskKind` that says what its labels look like, how its loss and its metrics are computed and what its head
outputs — everything the data layer, the objective, the evaluators and ``--mode=predict`` need to know about it, so a
new kind of task is one :func:`register_kind` call, not a branch in every module. The built-in kinds:

* ``multiclass``: labels are int32 ``[B]`` with values in ``[0, C)``; ``-1`` means missing. Loss: softmax
  cross-entropy; metrics: accuracy, macro F1, per-class recall; primary metric ``accuracy``.
* ``multilabel``: labels are int32 ``[B, C]`` with values in ``{0, 1}``; ``-1`` marks a missing entry (e.g. an AU a
  dataset does not annotate). Loss: masked sigmoid cross-entropy; metrics: per-label F1, mean F1 (primary).

A source that does not annotate a task fills it entirely with ``-1``.

Usage::

    expr = TaskSpec('expression', 'multiclass', 7)
    validate_labels(expr, np.array([0, 6, -1]))      # ok
    missing_labels(expr, 4)                          # array([-1, -1, -1, -1], dtype=int32)
    kind_of(expr).loss(logits, labels)               # (per-example loss [B], weight [B])
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from mtlmatch import losses
from mtlmatch import metrics as metrics_lib

MISSING = losses.MISSING


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """How one kind of task is learned and measured. Every function is pure; the jittable ones are marked.

  * ``label_shape(num_classes) -> tuple``: the shape of one example's label (``()`` or ``(C,)``), int32;
  * ``label_range``: ``(lo, hi)``, valid label values are ``MISSING`` and ``lo <= y < hi`` (``hi`` None: C);
  * ``min_classes``: the smallest number of classes (outputs) a task of this kind may have;
  * ``loss(outputs [B, C], labels) -> (per-example loss [B], weight [B])`` (jittable; weight 0 where missing);
  * ``statistics(task, outputs, labels, mask) -> {name: sums}`` (jittable, additive over examples and devices),
    ``zero_statistics(task)`` their identity, ``finalize(task, sums) -> {metric: float}`` on the host;
  * ``primary_metric``: the metric that model selection and the negative-transfer monitor read (higher is better);
  * ``predict(outputs) -> array``: what ``--mode=predict`` writes for the task (jittable);
  * ``invalid_labels(labels, num_classes) -> int32``: how many labels of a batch are neither missing nor valid
    (jittable): the loss gives them weight 0, the train step reports their count and the loop halts on it;
  * ``head_outputs(num_classes) -> int``: the width of the task's head (and of DGR's dummy heads).
  """

  name: str
  label_shape: Callable[[int], tuple[int, ...]]
  label_range: tuple[int, Optional[int]]
  min_classes: int
  loss: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  statistics: Callable[..., dict]
  zero_statistics: Callable[[Any], dict]
  finalize: Callable[[Any, Mapping], dict]
  primary_metric: str
  predict: Callable[[jax.Array], jax.Array]
  invalid_labels: Callable[[jax.Array, int], jax.Array]
  head_outputs: Callable[[int], int] = lambda num_classes: num_classes


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
  """Adds ``kind`` to :data:`KINDS` (a name already registered is refused); returns it."""
  if not isinstance(kind, TaskKind):
    raise ValueError(f'register_kind: got {type(kind).__name__}, expected a TaskKind')
  if kind.name in KINDS:
    raise ValueError(f'register_kind: got kind {kind.name!r}, which is already registered ({sorted(KINDS)})')
  KINDS[kind.name] = kind
  return kind


register_kind(
    TaskKind(
        'multiclass',
        label_shape=lambda num_classes: (),
        label_range=(0, None),
        min_classes=2,
        loss=losses.softmax_xent,
        statistics=metrics_lib.task_statistics,
        zero_statistics=metrics_lib.zero_statistics,
        finalize=metrics_lib.finalize,
        primary_metric='accuracy',
        predict=jax.nn.softmax,
        invalid_labels=functools.partial(losses.invalid_label_count, 'multiclass'),
    )
)
register_kind(
    TaskKind(
        'multilabel',
        label_shape=lambda num_classes: (num_classes,),
        label_range=(0, 2),
        min_classes=1,
        loss=losses.sigmoid_xent,
        statistics=metrics_lib.task_statistics,
        zero_statistics=metrics_lib.zero_statistics,
        finalize=metrics_lib.finalize,
        primary_metric='mean_f1',
        predict=jax.nn.sigmoid,
        invalid_labels=functools.partial(losses.invalid_label_count, 'multilabel'),
    )
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task: ``name``, ``kind`` (a key of :data:`KINDS`), ``num_classes`` C and optional ``class_names`` (C unique
  non-empty strings, e.g. the expressions or the AU names), which name the per-class metrics (``recall_happy``,
  ``f1_AU12``; :meth:`class_keys`)."""

  name: str
  kind: str
  num_classes: int
  class_names: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'TaskSpec.name: got {self.name!r}, expected a non-empty string')
    check_kind(self.kind, arg=f'TaskSpec({self.name!r}).kind')
    least = KINDS[self.kind].min_classes
    if (
        not isinstance(self.num_classes, (int, np.integer))
        or isinstance(self.num_classes, bool)
        or (self.num_classes < least)
    ):
      raise ValueError(f'TaskSpec({self.name!r}).num_classes: got {self.num_classes!r}, expected an int >= {least}')
    if self.class_names is not None:
      object.__setattr__(self, 'class_names', tuple(self.class_names))
      if len(self.class_names) != self.num_classes:
        raise ValueError(
            f'TaskSpec({self.name!r}).class_names: got {len(self.class_names)} names, expected '
            f'num_classes={self.num_classes}'
        )
      if not all(isinstance(c, str) and c.strip() for c in self.class_names):
        raise ValueError(f'TaskSpec({self.name!r}).class_names: got {self.class_names!r}, expected non-empty strings')
      keys = self.class_keys()
      if len(set(keys)) != len(keys):
        raise ValueError(
            f'TaskSpec({self.name!r}).class_names: got {self.class_names!r}, which name metrics {keys} with '
            'repeats, expected names that stay distinct as metric keys (letters, digits, _ . -)'
        )

  def class_keys(self) -> tuple[str, ...]:
    """How the per-class metrics name each class (``recall_<key>``, ``f1_<key>``): the class names made safe as
    results.json keys and TensorBoard tags (every run of characters other than letters, digits, ``_ . -`` becomes
    ``_``), or the indices ``'0' … 'C-1'`` for a task without class names.

    >>> TaskSpec('aus', 'multilabel', 2, ('AU12', 'AU 25')).class_keys()
    ('AU12', 'AU_25')
    >>> TaskSpec('t', 'multiclass', 2).class_keys()
    ('0', '1')
    """
    if self.class_names is None:
      return tuple(str(k) for k in range(self.num_classes))
    return tuple(re.sub(r'[^A-Za-z0-9_.-]+', '_', c.strip()) for c in self.class_names)

  def label_shape(self, batch_size: int) -> tuple[int, ...]:
    return (batch_size, *KINDS[self.kind].label_shape(self.num_classes))

  @property
  def primary_metric(self) -> str:
    """The metric model selection and the negative-transfer monitor read (higher is better)."""
    return KINDS[self.kind].primary_metric


def check_kind(kind: str, *, arg: str = 'kind') -> str:
  if kind not in KINDS:
    raise ValueError(f'{arg}: got {kind!r}, expected one of {tuple(KINDS)}')
  return kind


def kind_of(task: TaskSpec) -> TaskKind:
  """The :class:`TaskKind` of ``task``."""
  return KINDS[task.kind]


def missing_labels(task: TaskSpec, batch_size: int) -> np.ndarray:
  """All-missing labels for a task a source does not annotate."""
  return np.full(task.label_shape(batch_size), MISSING, dtype=np.int32)


def validate_labels(task: TaskSpec, labels, *, where: str = '') -> np.ndarray:
  """Checks labels of one task against its kind's conventions; returns them as int32 numpy. Raises one ValueError."""
  ctx = f' in {where}' if where else ''
  labels = np.asarray(labels)
  want = task.label_shape(labels.shape[0] if labels.ndim else 0)
  if labels.ndim == 0 or labels.shape != want:
    expected = '[B' + ''.join(f', {d}' for d in want[1:]) + ']'
    raise ValueError(
        f'labels of task {task.name!r}{ctx}: got shape {labels.shape}, expected {expected} ' f'({task.kind})'
    )
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(
          f'labels of task {task.name!r}{ctx}: got non-integer values (dtype {labels.dtype}), ' 'expected integers'
      )
  lo, hi = KINDS[task.kind].label_range
  hi = task.num_classes if hi is None else hi
  bad = ((labels < lo) & (labels != MISSING)) | (labels >= hi)
  if np.any(bad):
    value = labels[bad].flat[0]
    expected = f'[-1, {hi})' if (lo, hi) != (0, 2) else '{-1, 0, 1}'
    raise ValueError(
        f'labels of task {task.name!r}{ctx}: got value {value}, expected values in {expected} ' '(-1 = missing)'
    )
  return labels.astype(np.int32)


def tasks_by_name(tasks: Sequence[TaskSpec]) -> Mapping[str, TaskSpec]:
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f'tasks: got duplicate names {names}, expected unique names')
  return {t.name: t for t in tasks}
