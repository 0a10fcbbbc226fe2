"""Task specifications and the label conventions every module shares (docs/maths.md §1).

A task is a classification problem with a name, a `kind` and a number of classes:

* ``multiclass``: labels are int32 ``[B]`` with values in ``[0, C)``; ``-1`` means missing.
* ``multilabel``: labels are int32 ``[B, C]`` with values in ``{0, 1}``; ``-1`` marks a missing entry (e.g. an AU a
  dataset does not annotate). A source that does not annotate a task fills it entirely with ``-1``.

Usage::

    expr = TaskSpec('expression', 'multiclass', 7)
    validate_labels(expr, np.array([0, 6, -1]))      # ok
    missing_labels(expr, 4)                          # array([-1, -1, -1, -1], dtype=int32)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence

import numpy as np

KINDS = ('multiclass', 'multilabel')
MISSING = -1


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One classification task: ``name``, ``kind`` in {'multiclass', 'multilabel'}, ``num_classes`` C and optional
  ``class_names`` (C unique non-empty strings, e.g. the expressions or the AU names), which name the per-class
  metrics (``recall_happy``, ``f1_AU12``; :meth:`class_keys`)."""

  name: str
  kind: str
  num_classes: int
  class_names: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'TaskSpec.name: got {self.name!r}, expected a non-empty string')
    check_kind(self.kind, arg=f'TaskSpec({self.name!r}).kind')
    if (
        not isinstance(self.num_classes, (int, np.integer))
        or isinstance(self.num_classes, bool)
        or (self.num_classes < (2 if self.kind == 'multiclass' else 1))
    ):
      raise ValueError(
          f'TaskSpec({self.name!r}).num_classes: got {self.num_classes!r}, expected an int >= '
          f'{2 if self.kind == "multiclass" else 1}'
      )
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
    return (batch_size,) if self.kind == 'multiclass' else (batch_size, self.num_classes)


def check_kind(kind: str, *, arg: str = 'kind') -> str:
  if kind not in KINDS:
    raise ValueError(f'{arg}: got {kind!r}, expected one of {KINDS}')
  return kind


def missing_labels(task: TaskSpec, batch_size: int) -> np.ndarray:
  """All-missing labels for a task a source does not annotate."""
  return np.full(task.label_shape(batch_size), MISSING, dtype=np.int32)


def validate_labels(task: TaskSpec, labels, *, where: str = '') -> np.ndarray:
  """Checks labels of one task against the conventions; returns them as int32 numpy. Raises one ValueError."""
  ctx = f' in {where}' if where else ''
  labels = np.asarray(labels)
  if (
      labels.ndim == 0
      or (task.kind == 'multiclass' and labels.ndim != 1)
      or (task.kind == 'multilabel' and (labels.ndim != 2 or labels.shape[1] != task.num_classes))
  ):
    expected = '[B]' if task.kind == 'multiclass' else f'[B, {task.num_classes}]'
    raise ValueError(
        f'labels of task {task.name!r}{ctx}: got shape {labels.shape}, expected {expected} ' f'({task.kind})'
    )
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(
          f'labels of task {task.name!r}{ctx}: got non-integer values (dtype {labels.dtype}), ' 'expected integers'
      )
  hi = task.num_classes if task.kind == 'multiclass' else 2
  bad = (labels < MISSING) | (labels >= hi)
  if np.any(bad):
    value = labels[bad].flat[0]
    expected = f'[-1, {hi})' if task.kind == 'multiclass' else '{-1, 0, 1}'
    raise ValueError(
        f'labels of task {task.name!r}{ctx}: got value {value}, expected values in {expected} ' '(-1 = missing)'
    )
  return labels.astype(np.int32)


def tasks_by_name(tasks: Sequence[TaskSpec]) -> Mapping[str, TaskSpec]:
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f'tasks: got duplicate names {names}, expected unique names')
  return {t.name: t for t in tasks}
