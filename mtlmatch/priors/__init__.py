"""Expert relatedness tables shipped as package data (docs/maths.md §2).

``load_prior('expressions_to_aus')`` returns a :class:`Prior` whose ``relatedness`` is ``R[C_A, C_B]`` with
``R[i, k] = p(b_k = 1 | a = i)``, plus the two tasks it relates (plain :class:`PriorTask` data: name, kind, class
names; a :class:`mtlmatch.tasks.TaskSpec` is built from them where a task is needed) and the citation. Each JSON file
states which entries are the paper's prototypical AUs (R = 1) and which are observational fractions.

Plain Python, numpy and JSON: a config file (configs/faces.py) reads :data:`FACE_AUS` without importing JAX or
TensorFlow.

:func:`relatedness_table` reads a table the user gives instead: a nested list, its JSON text (as the command line
passes it) or a ``.json`` / ``.csv`` file of one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from importlib import resources
from typing import Any, Optional, Sequence

import numpy as np

# The AUs that EmotioNet/DISFA-style AU tables annotate, in their column order: the default ``aus`` of the faces
# recipe (mtlmatch/data/faces.py, configs/faces.py); each is an AU of the prior ``expressions_to_aus``.
FACE_AUS = ('AU1', 'AU2', 'AU4', 'AU5', 'AU6', 'AU9', 'AU12', 'AU15', 'AU17', 'AU20', 'AU25', 'AU26')


@dataclasses.dataclass(frozen=True)
class PriorTask:
  """One task a prior relates, as its JSON states it: ``name``, ``kind`` ('multiclass' | 'multilabel') and the
  ``class_names`` in the table's order (``TaskSpec(t.name, t.kind, t.num_classes, t.class_names)`` makes the task)."""

  name: str
  kind: str
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Prior:
  name: str
  relatedness: np.ndarray  # float32 [C_A, C_B]
  task_a: PriorTask
  task_b: PriorTask
  citation: str
  provenance: str

  def restricted(self, classes_a: Sequence[str], classes_b: Sequence[str]) -> np.ndarray:
    """``R`` on the given classes, picked by name (e.g. the AUs a dataset annotates), float32 ``[len(a), len(b)]``.

    >>> load_prior('expressions_to_aus').restricted(['neutral', 'happy'], ['AU12', 'AU25']).tolist()
    [[0.0, 0.0], [1.0, 1.0]]
    """
    rows, cols = [], []
    for names, spec, out in ((classes_a, self.task_a, rows), (classes_b, self.task_b, cols)):
      unknown = [c for c in names if c not in spec.class_names]
      if unknown:
        raise ValueError(
            f'prior {self.name!r} task {spec.name!r}: got classes {unknown} it does not relate, expected names from '
            f'{list(spec.class_names)}'
        )
      out.extend(spec.class_names.index(c) for c in names)
    return self.relatedness[np.ix_(rows, cols)]


def available_priors() -> list[str]:
  return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith('.json'))


def load_prior(name: str) -> Prior:
  """Loads and validates the expert table ``name`` (see :func:`available_priors`)."""
  if name not in available_priors():
    raise ValueError(f'prior name: got {name!r}, expected one of {available_priors()}')
  spec = json.loads(resources.files(__name__).joinpath(f'{name}.json').read_text())
  classes_a, classes_b = spec['task_a']['classes'], spec['task_b']['classes']
  r = np.zeros((len(classes_a), len(classes_b)), np.float32)
  for table, value_of in (
      (spec['prototypical'], lambda entry, k: 1.0),
      (spec['observational'], lambda entry, k: entry[k]),
  ):
    if set(table) - set(classes_a):
      raise ValueError(
          f'prior {name!r}: unknown classes {sorted(set(table) - set(classes_a))}, ' f'expected names from {classes_a}'
      )
    for cls, entry in table.items():
      for k in entry:
        if k not in classes_b:
          raise ValueError(f'prior {name!r}: unknown label {k!r} for class {cls!r}, expected one of {classes_b}')
        if r[classes_a.index(cls), classes_b.index(k)] != 0:
          raise ValueError(f'prior {name!r}: label {k!r} listed twice for class {cls!r}')
        r[classes_a.index(cls), classes_b.index(k)] = value_of(entry, k)
  if not np.all((r >= 0) & (r <= 1)):
    raise ValueError(f'prior {name!r}: entries must lie in [0, 1], got min {r.min()} max {r.max()}')
  task_a = PriorTask(spec['task_a']['name'], spec['task_a']['kind'], tuple(classes_a))
  task_b = PriorTask(spec['task_b']['name'], spec['task_b']['kind'], tuple(classes_b))
  return Prior(name, r, task_a, task_b, spec['citation'], spec['provenance'])


# Relatedness specs that name a table rather than hold one (resolved by the train loop, not here).
NAMED_PREFIXES = ('prior:', 'estimate:', 'learned:')
TABLE_FILES = ('.json', '.csv')


def relatedness_table(spec: Any) -> Optional[np.ndarray]:
  """A relatedness table given by the user, as float32 ``[C_A, C_B]``; None when ``spec`` holds no table (a
  ``'prior:'``, ``'estimate:'`` or ``'learned:'`` name, or not a table at all).

  ``spec`` is a nested list / array, the JSON text of one (``'[[0.5, 0.5], ...]'``, how a command line gives it:
  ``--config.objective.terms.dm.relatedness='[[0.9,0.1],[0.2,0.8]]'``) or the path of a file holding one: ``.json``
  (a nested list) or ``.csv`` (one row of numbers per class of task A, no header). A relative path is resolved
  against the current directory. Every problem here (bad JSON or CSV, a missing file, a ragged table or not a 2-D
  one, a non-number) is one ValueError naming the spec; the table's shape and values are checked against the tasks
  by ``losses.validate_relatedness`` where the objective term is built.

  >>> relatedness_table('[[0.5, 0.5], [0.25, 0.75]]').tolist()
  [[0.5, 0.5], [0.25, 0.75]]
  >>> relatedness_table('prior:expressions_to_aus') is None
  True
  """
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith(NAMED_PREFIXES):
      return None
    if text.startswith('['):
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f'relatedness {spec!r}: got text that is not JSON ({e}), expected a nested list') from None
      where = 'relatedness (JSON text)'
    else:
      value, where = _read_table_file(text), f'relatedness file {text!r}'
  elif isinstance(spec, (list, tuple, np.ndarray)):
    value, where = spec, 'relatedness (nested list)'
  else:
    return None
  try:
    table = np.asarray(value, np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: got {_brief(value)}, expected a rectangular nested list of numbers ({e})') from None
  if table.ndim != 2 or not table.size:
    raise ValueError(f'{where}: got shape {table.shape}, expected a table [C_A, C_B] (a list of rows)')
  return table


def _read_table_file(path: str):
  if not path.endswith(TABLE_FILES):
    raise ValueError(
        f"relatedness: got {path!r}, expected 'prior:<name>' (one of {available_priors()}), 'estimate:<source>', "
        f"'learned:<init>', a nested list [C_A][C_B] (or its JSON text) or a {' or '.join(TABLE_FILES)} file of one"
    )
  if not os.path.isfile(path):
    raise ValueError(
        f'relatedness file {path!r}: no such file (looked for {os.path.abspath(path)}; a relative path is read from '
        'the current directory), expected a .json or .csv table'
    )
  with open(path, newline='') as f:
    if path.endswith('.json'):
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'relatedness file {path!r}: not valid JSON ({e}), expected a nested list') from None
    rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
  try:
    return [[float(cell) for cell in row] for row in rows]
  except ValueError as e:
    raise ValueError(f'relatedness file {path!r}: {e}, expected rows of numbers only (no header)') from None


def _brief(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'
