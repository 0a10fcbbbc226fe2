"""Expert relatedness tables shipped as package data (docs/maths.md §2).

``load_prior('expressions_to_aus')`` returns a :class:`Prior` whose ``relatedness`` is ``R[C_A, C_B]`` with
``R[i, k] = p(b_k = 1 | a = i)``, plus the two tasks it relates (plain :class:`PriorTask` data: name, kind, class
names; a :class:`mtlmatch.tasks.TaskSpec` is built from them where a task is needed) and the citation. Each JSON file
states which entries are the paper's prototypical AUs (R = 1) and which are observational fractions.

Plain Python, numpy and JSON: a config file (configs/faces.py) reads :data:`FACE_AUS` without importing JAX or
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Sequence

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
