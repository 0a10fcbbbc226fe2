"""UTKFace (Zhang, Song & Qi, CVPR 2017): age, age group, gender and race of each face, from its file name
(``get_benchmark('utkface')``).

UTKFace's images are named ``[age]_[gender]_[race]_[date&time].jpg`` (the aligned and cropped set:
``[age]_[gender]_[race]_[date&time].jpg.chip.jpg``): age an integer 0–116, gender 0 (male) or 1 (female), race 0–4
(White, Black, Asian, Indian, Others). Every ``pattern`` match in ``image_dir`` (default ``*.jpg``, which matches
both forms) is one example, labelled for all four tasks (fully co-annotated):

* ``age``: regression, 1 output (float32 ``[N, 1]``), L1 loss, primary metric MAE (lower is better);
* ``age_group``: 7 classes, the bins [0, 10), [10, 20), [20, 30), [30, 40), [40, 50), [50, 60), [60, 120) of the DGR
  authors (names ``0-9`` … ``50-59``, ``60-119``; :data:`AGE_EDGES`);
* ``gender``: 2 classes (``male``, ``female``); ``race``: 5 classes (:data:`RACES`).

The split: UTKFace has none. The test source is ``test_fraction`` (0.2) of the sorted file names — the first
``clip(round(f · N), 1, N − 1)`` of a permutation of them seeded by ``seed`` (``config.data.seed``) — and training is
the rest, from which the library holds out ``config.data.validation_fraction`` for validation. A file's split depends
only on the list of matched names and the seed: leaving out a malformed or undecodable file moves no other file.

A malformed file name (a missing field, an age above 116 or not an integer, gender 3, race 5, …) follows the
bad-file policy ``on_bad_image``: ``'raise'`` (default) is one ValueError naming the first such file, what was
expected and how many there are; ``'skip'`` leaves them out, counts and logs them (``reader.skipped`` of the source
that would have held them, beside the undecodable images that ``'skip'`` also leaves out). The images are read,
decoded and resized to ``image_size`` as batches need them, through the same reader as a manifest
(:class:`mtlmatch.data.files.FilesReader`, its rows built from the names).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

from mtlmatch.data.files import FilesReader
from mtlmatch.data.sources import Benchmark, Source, make_benchmark
from mtlmatch.tasks import TaskSpec

MAX_AGE = 116
AGE_EDGES = (10, 20, 30, 40, 50, 60)  # the 7 bins [0, 10), ..., [50, 60), [60, 120)
AGE_GROUPS = ('0-9', '10-19', '20-29', '30-39', '40-49', '50-59', '60-119')
GENDERS = ('male', 'female')
RACES = ('White', 'Black', 'Asian', 'Indian', 'Others')
LAYOUT = '[age]_[gender]_[race]_[date&time].jpg (e.g. 25_1_3_20170119164829453.jpg.chip.jpg)'
_NAME = re.compile(r'^(?P<age>[^_]*)_(?P<gender>[^_]*)_(?P<race>[^_]*)_(?P<date>[^_.]+)\..+$')
_TEST = 0x75746B74  # stream tag of the test draw


def utkface_tasks() -> list[TaskSpec]:
  """``age`` (regression, L1, MAE), ``age_group`` (7 bins), ``gender`` (2) and ``race`` (5), in this order."""
  return [
      TaskSpec('age', 'regression', 1, ('age',), options={'loss': 'l1', 'metric': 'mae'}),
      TaskSpec('age_group', 'multiclass', len(AGE_GROUPS), AGE_GROUPS),
      TaskSpec('gender', 'multiclass', len(GENDERS), GENDERS),
      TaskSpec('race', 'multiclass', len(RACES), RACES),
  ]


def age_group(age: int) -> int:
  """The bin of ``age``: ``k`` with ``AGE_EDGES[k-1] <= age < AGE_EDGES[k]`` (0 below 10, 6 from 60 on)."""
  return int(np.searchsorted(AGE_EDGES, age, side='right'))


def parse_name(name: str) -> dict[str, int]:
  """``{'age', 'age_group', 'gender', 'race'}`` of one UTKFace file name (a path's last part is read); a malformed
  name raises one ValueError saying which field is wrong and what was expected."""
  base = os.path.basename(name)
  match = _NAME.match(base)
  if not match:
    raise ValueError(f'got file name {base!r}, expected {LAYOUT}')
  fields = match.groupdict()
  checks = (
      ('age', range(MAX_AGE + 1), f'an integer 0-{MAX_AGE}'),
      ('gender', range(len(GENDERS)), '0 (male) or 1 (female)'),
      ('race', range(len(RACES)), '0-4 (' + ', '.join(RACES) + ')'),
  )
  out = {}
  for field, valid, expected in checks:
    text = fields[field]
    if not text.isdigit() or int(text) not in valid:
      raise ValueError(f'got {field} {text!r} in file name {base!r}, expected {expected} ({LAYOUT})')
    out[field] = int(text)
  out['age_group'] = age_group(out['age'])
  return out


def split_mask(num_files: int, fraction: float, seed: int) -> np.ndarray:
  """bool ``[N]`` over the sorted names: the ``clip(round(fraction · N), 1, N − 1)`` test files of a permutation
  seeded by ``seed`` (none for ``fraction`` 0)."""
  mask = np.zeros(num_files, bool)
  if fraction == 0:
    return mask
  n_test = min(max(int(round(fraction * num_files)), 1), num_files - 1)
  mask[np.random.default_rng([int(seed), zlib.crc32(b'utkface'), _TEST]).permutation(num_files)[:n_test]] = True
  return mask


def utkface_benchmark(
    *,
    image_dir: Optional[str] = None,
    pattern: str = '*.jpg',
    test_fraction: float = 0.2,
    image_size: int = 112,
    on_bad_image: str = 'raise',
    data_dir: Optional[str] = None,
    seed: int = 0,
) -> Benchmark:
  """UTKFace from the images in ``image_dir`` that match ``pattern`` (see the module docstring). Sources:
  ``utkface`` (training) and ``utkface_test`` (``test_fraction`` of the files; none for 0).

  ``data_dir`` is unused (the names hold the labels; nothing is generated)."""
  del data_dir
  if not image_dir:
    raise ValueError(
        f"utkface: got image_dir={image_dir!r}, expected the folder of UTKFace's images (set "
        '--config.data.options.image_dir=...)'
    )
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
    raise ValueError(f'utkface: got test_fraction={test_fraction!r}, expected a number in [0, 1) (0 = no test set)')
  where = os.path.join(os.fspath(image_dir), pattern)
  paths = sorted(tf.io.gfile.glob(where))
  if not paths:
    raise ValueError(f'utkface: got no files matching {where!r}, expected UTKFace images named {LAYOUT}')
  if test_fraction and len(paths) < 2:
    raise ValueError(
        f'utkface: got {len(paths)} file matching {where!r}, expected at least 2 to hold out test_fraction='
        f'{test_fraction} (or test_fraction=0)'
    )
  rows = {'train': [], 'test': []}
  bad = {'train': [], 'test': []}
  for path, is_test in zip(paths, split_mask(len(paths), test_fraction, seed)):
    part = 'test' if is_test else 'train'
    try:
      rows[part].append({'path': path, **parse_name(path)})
    except ValueError as e:
      bad[part].append((f'UTKFace file {path}', str(e)))
  bad_names = bad['train'] + bad['test']
  if bad_names and on_bad_image == 'raise':
    first, reason = sorted(bad_names)[0]
    raise ValueError(
        f"{first}: {reason}; fix or remove it, or set config.data.on_bad_image='skip' to leave such files out "
        f'({len(bad_names)} such file(s))'
    )
  if bad_names:
    shown = '; '.join(f'{w}: {r}' for w, r in sorted(bad_names)[:5])
    logging.warning(
        'UTKFace %s: skipped %d file(s) with malformed names (on_bad_image=skip): %s%s',
        where,
        len(bad_names),
        shown,
        ' ...' if len(bad_names) > 5 else '',
    )
  columns = ['path', 'age', 'age_group', 'gender', 'race']
  labels = {t: t for t in columns[1:]}
  sources = {}
  for part, name in (('train', 'utkface'), ('test', 'utkface_test')):
    if part == 'test' and not test_fraction:
      continue
    if not rows[part]:
      raise ValueError(
          f'utkface: every file of the {part} split of {where!r} has a malformed name ({len(bad[part])} skipped), '
          'expected some files named ' + LAYOUT
      )
    reader = FilesReader(
        where,
        image_column='path',
        labels=labels,
        image_size=(int(image_size), int(image_size)),
        split=part,
        on_bad_image=on_bad_image,
        regression=('age',),
        table=(columns, rows[part]),
    )
    reader.skipped = bad[part] + reader.skipped
    sources[part] = Source(name, reader, tuple(labels), part)
  tests = [sources['test']] if 'test' in sources else []
  return make_benchmark('utkface', utkface_tasks(), [sources['train']], eval_sources=tests)
