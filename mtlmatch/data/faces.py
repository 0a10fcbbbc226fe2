"""Your own face datasets: expressions from one manifest, action units from another (``get_benchmark('faces')``).

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
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from mtlmatch import priors
from mtlmatch.data.files import files_source
from mtlmatch.data.sources import Benchmark, Source, make_benchmark, tfds_source
from mtlmatch.tasks import TaskSpec

PRIOR = 'expressions_to_aus'
DEFAULT_AUS = priors.FACE_AUS
EXPRESSION_MISSING = ('', 'NA', -1, 7, 8, 9, 10)
AU_MISSING = ('', 'NA', -1, 999)


def face_tasks(aus: Sequence[str] = DEFAULT_AUS) -> list[TaskSpec]:
  """The two tasks, named and ordered as the expert prior's classes (checked: every AU must be one of the prior's)."""
  prior = priors.load_prior(PRIOR)
  unknown = [a for a in aus if a not in prior.task_b.class_names]
  if not aus or unknown or len(set(aus)) != len(aus):
    raise ValueError(f'aus: got {list(aus)!r}, expected distinct AU names from {list(prior.task_b.class_names)}')
  return [
      TaskSpec('expression', 'multiclass', prior.task_a.num_classes, prior.task_a.class_names),
      TaskSpec('aus', 'multilabel', len(aus), tuple(aus)),
  ]


def _source(name, manifest, *, task, columns, missing, image_column, image_root, image_size, on_bad_image) -> Source:
  """A files source, or the prepared dataset at ``manifest`` if it is a directory of one."""
  size = (int(image_size), int(image_size))
  if os.path.isdir(os.fspath(manifest)):
    return tfds_source(name, os.fspath(manifest), tasks=[task], image_size=size)
  return files_source(
      name,
      manifest,
      image_column=image_column,
      labels={task: columns},
      image_root=image_root,
      image_size=size,
      missing=missing,
      on_bad_image=on_bad_image,
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
    image_root: Optional[str] = None,
    image_size: int = 112,
    on_bad_image: str = 'raise',
    data_dir: Optional[str] = None,
    seed: int = 0,
) -> Benchmark:
  """Expressions from ``expression_manifest``, AUs from ``au_manifest`` (see the module docstring).

  ``data_dir`` and ``seed`` are unused (the manifests say where the data is; nothing is generated)."""
  del data_dir, seed
  if not expression_manifest or not au_manifest:
    raise ValueError(
        'faces: got expression_manifest={!r}, au_manifest={!r}, expected both (set '
        '--config.data.options.expression_manifest=... and --config.data.options.au_manifest=...)'.format(
            expression_manifest, au_manifest
        )
    )
  common = dict(image_column=image_column, image_root=image_root, image_size=image_size, on_bad_image=on_bad_image)
  expression = dict(task='expression', columns=expression_column, missing=tuple(expression_missing), **common)
  au = dict(task='aus', columns=list(aus), missing=tuple(au_missing), **common)
  train = [_source('expressions', expression_manifest, **expression), _source('aus', au_manifest, **au)]
  tests = []
  if expression_test_manifest:
    tests.append(_source('test_expressions', expression_test_manifest, **expression))
  if au_test_manifest:
    tests.append(_source('test_aus', au_test_manifest, **au))
  return make_benchmark('faces', face_tasks(aus), train, eval_sources=tests)
