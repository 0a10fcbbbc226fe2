"""Your own face datasets: expressions from one manifest, action units from another (``get_benchmark('faces')``), and
optionally valence/arousal.

The layout is that of AffectNet-style expression tables and EmotioNet/DISFA-style AU tables (docs/howto/faces.md).
Each manifest is a CSV or JSON-lines file (:mod:`mtlmatch.data.files`), or the directory of the same manifest
prepared as an ArrayRecord dataset (``python -m mtlmatch.data.prepare``; read by index)::

    expressions.csv                     aus.csv
    path,expression                     path,AU1,AU2,AU4,AU5,AU6,AU9,AU12,AU15,AU17,AU20,AU25,AU26
    train/0001.jpg,1                    img/a.jpg,0,0,1,0,1,0,1,0,0,0,1,999
    train/0002.jpg,9                    ...

Tasks: ``expression`` (7 classes in the expert prior's order: neutral, happy, sad, surprised, fearful, disgusted,
angry — AffectNet's codes 0–6) and ``aus`` (multilabel over the ``aus`` columns, in that order; every name must be an
AU of the prior, so the prior ``expressions_to_aus`` is restricted to them by name). AffectNet's 7 (contempt, which
the prior has no row for), 8–10 ("none", "uncertain", "no face"), a blank and ``-1`` are "not annotated" by default
(``expression_missing``); for AUs a blank, ``-1`` and ``999`` (``au_missing``). Test manifests are optional (no test
set: model selection still uses the validation part held out of the training manifests).

Valence/arousal (optional; none given: exactly the two tasks above): the regression task ``va``
(:data:`mtlmatch.data.synthetic_affect.VA_TASK`: 2 outputs ``valence``, ``arousal`` in [−1, 1], CCC loss, tanh-bounded
head), read from the expression manifests' columns ``valence_column`` and ``arousal_column`` (AffectNet's tables:
``path,expression,valence,arousal``; the expression sources then annotate both tasks) and/or from a third manifest
``va_manifest`` (+ ``va_test_manifest``; e.g. Aff-Wild2 frames) with the columns ``va_columns``. A blank, ``NA`` and
AffectNet's ``-2`` are "not annotated" by default (``va_missing``; NaN in the labels), ``-1`` is a valid valence; a
value outside [−1, 1] is refused before training, naming the row::

    affectnet.csv                       affwild2.csv (va_manifest)
    path,expression,valence,arousal     path,valence,arousal
    train/0001.jpg,1,0.72,0.31          frames/v1/00001.jpg,-0.12,0.40
    train/0002.jpg,9,-2,-2              ...
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from mtlmatch import priors
from mtlmatch.data.files import files_source
from mtlmatch.data.sources import Benchmark, Source, make_benchmark, tfds_source
from mtlmatch.data.synthetic_affect import VA_TASK
from mtlmatch.tasks import TaskSpec

PRIOR = 'expressions_to_aus'
DEFAULT_AUS = priors.FACE_AUS
EXPRESSION_MISSING = ('', 'NA', -1, 7, 8, 9, 10)
AU_MISSING = ('', 'NA', -1, 999)
VA_MISSING = ('', 'NA', -2)  # AffectNet's -2: no valence/arousal; -1 is a valid value
VA_COLUMNS = ('valence', 'arousal')


def face_tasks(aus: Sequence[str] = DEFAULT_AUS, *, va: bool = False) -> list[TaskSpec]:
  """The two tasks, named and ordered as the expert prior's classes (checked: every AU must be one of the prior's),
  and with ``va`` the regression task :data:`~mtlmatch.data.synthetic_affect.VA_TASK` third."""
  prior = priors.load_prior(PRIOR)
  unknown = [a for a in aus if a not in prior.task_b.class_names]
  if not aus or unknown or len(set(aus)) != len(aus):
    raise ValueError(f'aus: got {list(aus)!r}, expected distinct AU names from {list(prior.task_b.class_names)}')
  return [
      TaskSpec('expression', 'multiclass', prior.task_a.num_classes, prior.task_a.class_names),
      TaskSpec('aus', 'multilabel', len(aus), tuple(aus)),
      *([VA_TASK] if va else []),
  ]


def _source(name, manifest, *, labels, missing, image_column, image_root, image_size, on_bad_image) -> Source:
  """A files source annotating ``labels`` {task: column(s)} (``va``: float targets), or the prepared dataset at
  ``manifest`` if it is a directory of one (prepared with the same labels, ``--regression=va``)."""
  size = (int(image_size), int(image_size))
  if os.path.isdir(os.fspath(manifest)):
    return tfds_source(name, os.fspath(manifest), tasks=list(labels), image_size=size)
  return files_source(
      name,
      manifest,
      image_column=image_column,
      labels=labels,
      image_root=image_root,
      image_size=size,
      missing={t: missing[t] for t in labels},
      on_bad_image=on_bad_image,
      regression=tuple(t for t in labels if t == VA_TASK.name),
  )


def faces_benchmark(
    *,
    expression_manifest: str,
    au_manifest: str,
    expression_test_manifest: Optional[str] = None,
    au_test_manifest: Optional[str] = None,
    aus: Sequence[str] = DEFAULT_AUS,
    image_column: str = 'path',
    expression_column: str = 'expression',
    expression_missing: Sequence = EXPRESSION_MISSING,
    au_missing: Sequence = AU_MISSING,
    valence_column: Optional[str] = None,
    arousal_column: Optional[str] = None,
    va_manifest: Optional[str] = None,
    va_test_manifest: Optional[str] = None,
    va_columns: Sequence[str] = VA_COLUMNS,
    va_missing: Sequence = VA_MISSING,
    image_root: Optional[str] = None,
    image_size: int = 112,
    on_bad_image: str = 'raise',
    data_dir: Optional[str] = None,
    seed: int = 0,
) -> Benchmark:
  """Expressions from ``expression_manifest``, AUs from ``au_manifest``, and valence/arousal from the expression
  manifests' ``valence_column``/``arousal_column`` and/or ``va_manifest`` (see the module docstring).

  ``data_dir`` and ``seed`` are unused (the manifests say where the data is; nothing is generated)."""
  del data_dir, seed
  if not expression_manifest or not au_manifest:
    raise ValueError(
        'faces: got expression_manifest={!r}, au_manifest={!r}, expected both (set '
        '--config.data.options.expression_manifest=... and --config.data.options.au_manifest=...)'.format(
            expression_manifest, au_manifest
        )
    )
  if bool(valence_column) != bool(arousal_column):
    raise ValueError(
        f'faces: got valence_column={valence_column!r}, arousal_column={arousal_column!r}, expected both (the '
        "expression manifests' valence and arousal columns, e.g. 'valence' and 'arousal') or neither"
    )
  if va_test_manifest and not va_manifest:
    raise ValueError(f'faces: got va_test_manifest={va_test_manifest!r} without va_manifest, expected both or neither')
  va_columns = [va_columns] if isinstance(va_columns, str) else list(va_columns)
  if len(va_columns) != 2 or not all(isinstance(c, str) and c for c in va_columns):
    raise ValueError(
        f'faces: got va_columns={va_columns!r}, expected the two columns of va_manifest (valence, arousal)'
    )
  missing = {'expression': tuple(expression_missing), 'aus': tuple(au_missing), 'va': tuple(va_missing)}
  common = dict(image_column=image_column, image_root=image_root, image_size=image_size, on_bad_image=on_bad_image)
  common['missing'] = missing
  expression = {'expression': expression_column}
  if valence_column:
    expression['va'] = [valence_column, arousal_column]
  au = {'aus': list(aus)}
  va = {'va': va_columns}
  train = [
      _source('expressions', expression_manifest, labels=expression, **common),
      _source('aus', au_manifest, labels=au, **common),
  ]
  if va_manifest:
    train.append(_source('va', va_manifest, labels=va, **common))
  tests = []
  if expression_test_manifest:
    tests.append(_source('test_expressions', expression_test_manifest, labels=expression, **common))
  if au_test_manifest:
    tests.append(_source('test_aus', au_test_manifest, labels=au, **common))
  if va_test_manifest:
    tests.append(_source('test_va', va_test_manifest, labels=va, **common))
  with_va = bool(valence_column or va_manifest)
  return make_benchmark('faces', face_tasks(aus, va=with_va), train, eval_sources=tests)
