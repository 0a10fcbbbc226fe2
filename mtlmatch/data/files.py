"""File-backed sources: a manifest table (CSV or JSON lines) of image files and their labels, read by row.

A manifest has one row per image: a column with the image's path (relative to ``image_root``, by default the
manifest's folder; absolute paths and ``gs://`` URLs are kept) and label columns. ``labels`` maps each task to one
column (multiclass: the class index) or to a list of columns (multilabel: one 0/1 column per class, in class order).
Any value in ``missing`` (by default a blank, ``NA``, ``-1`` or ``999``) becomes ``-1``, "not annotated"; ``missing``
may also be ``{task: values}`` for codes that mean "no label" for one task only (e.g. AffectNet's 8–10).

The tasks named in ``regression`` have float targets (e.g. valence and arousal, or age): their values parse as
floats, their labels are float32 ``[N, d]`` with d the number of columns (a single column, given as a string, is
``[N, 1]``: a regression task's labels always have an output axis), and a missing code becomes NaN, not ``-1`` (a
valid valence). Their default missing codes are a blank and ``NA`` only (:data:`DEFAULT_REGRESSION_MISSING`; a
``NaN`` value is missing too); a number such as AffectNet's ``-2`` is added per task,
``missing={'va': ('', 'NA', -2)}``::

    path,expression                     path,AU1,AU2,AU4,...
    img/0001.jpg,3                      img/a.png,1,0,999,...

    files_source('expressions', 'affect/train.csv', image_column='path', labels={'expression': 'expression'},
                 image_size=(112, 112), missing={'expression': ('', 8, 9, 10)})
    files_source('affectnet', 'affect/train.csv', image_column='path',
                 labels={'expression': 'expression', 'va': ['valence', 'arousal']}, regression=('va',),
                 missing={'expression': ('', 8, 9, 10), 'va': ('', 'NA', -2)})

One manifest can hold several splits: ``split_column`` names a column that says each row's split, and only the rows
whose value there equals ``split`` are read (``split`` alone just names the source's split, ``'train'`` by default,
as in the other sources); see :func:`files_source`.

Only the paths and labels are held in memory; the pipeline reads, decodes (JPEG, PNG, BMP, GIF) and resizes each
image to ``image_size`` in its parallel map when a batch needs it (:class:`~mtlmatch.data.readers.LazyImages`).

Checks at construction, each one ``ValueError`` naming the manifest, the row (counted from 1 after the header) and the
file: an empty manifest, a missing column, a non-numeric or non-integer label (a non-numeric or infinite target of a
regression task), a missing image file. Labels out of their task's range (a regression task's ``range`` option) are
refused when the benchmark loads the source (it knows the tasks), also before training, naming the row. Decoding is the
one check that needs the pixels: ``python -m mtlmatch.data.prepare`` decodes every row once; an unprepared manifest with
an undecodable file fails, naming the row and file, in the data fingerprint before training (it decodes every row of a
source of <= 256 rows, a sample of a larger one) or at the first batch that holds it. ``on_bad_image='skip'`` instead
decodes every image at construction and leaves out the rows whose file is missing or undecodable, logging how many and
which (never a hole in a batch: the mixing schedule only sees the good rows).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from mtlmatch.data.readers import Examples, LazyImages, decode_image, host_slice
from mtlmatch.data.sources import Source
from mtlmatch.tasks import MISSING

DEFAULT_MISSING = ('', 'NA', -1, 999)
# A regression task's default missing codes: -1 (and 999) are valid targets (a valence, an age).
DEFAULT_REGRESSION_MISSING = ('', 'NA')
ON_BAD_IMAGE = ('raise', 'skip')


# ----------------------------------------------------------------------------------------------------------------
# Manifests.


def _absolute(path: str) -> str:
  """A local path made absolute (from the current directory); a URL (``gs://...``) as it is."""
  return path if '://' in path else os.path.abspath(path)


def read_manifest(manifest: str) -> tuple[list[str], list[dict]]:
  """``(columns, rows)`` of a CSV (header row first) or JSON-lines (``.jsonl`` / ``.json``: one object per line)
  table; every value as it was written (CSV: strings)."""
  try:
    with tf.io.gfile.GFile(os.fspath(manifest), 'r') as f:
      text = f.read()
  except tf.errors.NotFoundError as e:
    raise ValueError(f'manifest: got {manifest!r}, expected an existing CSV or JSON-lines file') from e
  if str(manifest).endswith(('.jsonl', '.json')):
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'manifest {manifest} line {i}: got {line[:80]!r}, expected one JSON object ({e})') from e
      if not isinstance(row, dict):
        raise ValueError(f'manifest {manifest} line {i}: got {type(row).__name__}, expected a JSON object')
      rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return columns, rows
  reader = csv.DictReader(io.StringIO(text))
  return list(reader.fieldnames or []), list(reader)


def _missing_sets(missing, tasks: Sequence[str], regression: Sequence[str] = ()) -> dict[str, tuple[set, set]]:
  """{task: (missing strings, missing numbers)} from a tuple for every task, a {task: tuple} mapping (the other
  tasks: their default) or None (every task its default: :data:`DEFAULT_MISSING`, or
  :data:`DEFAULT_REGRESSION_MISSING` for the tasks in ``regression``)."""
  default = lambda t: DEFAULT_REGRESSION_MISSING if t in regression else DEFAULT_MISSING

  def split(values, where):
    if isinstance(values, (str, int, float)) or not isinstance(values, (tuple, list, set)):
      raise ValueError(f'{where}: got {values!r}, expected a tuple of values that mean "not annotated"')
    strings = {str(v).strip() for v in values}
    numbers = set()
    for v in values:
      try:
        numbers.add(float(v))
      except (TypeError, ValueError):
        pass
    return strings, numbers

  if isinstance(missing, Mapping):
    unknown = sorted(set(missing) - set(tasks))
    if unknown:
      raise ValueError(f'missing: got values for unknown tasks {unknown}, expected some of {list(tasks)}')
    return {t: split(missing.get(t, default(t)), f'missing[{t!r}]') for t in tasks}
  if missing is None:
    return {t: split(default(t), 'missing') for t in tasks}
  both = split(missing, 'missing')
  return {t: both for t in tasks}


def _label_value(value: Any, missing: tuple[set, set], *, where: str) -> int:
  if value is None or str(value).strip() in missing[0]:
    return MISSING
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if number in missing[1]:
    return MISSING
  if not math.isfinite(number) or number != int(number):
    raise ValueError(f'{where}: got {value!r}, expected an integer label (or a missing-value code)')
  return int(number)


def _target_value(value: Any, missing: tuple[set, set], *, where: str) -> float:
  """A regression target: a finite float, or NaN for a missing code (or a NaN value)."""
  if value is None or str(value).strip() in missing[0]:
    return math.nan
  try:
    number = float(value) if not isinstance(value, bool) else None
  except (TypeError, ValueError):
    number = None
  if number is None:
    raise ValueError(
        f'{where}: got {value!r}, expected a number (a regression target) or a missing-value code {sorted(missing[0])}'
    )
  if number in missing[1] or math.isnan(number):
    return math.nan
  if not math.isfinite(number):
    raise ValueError(f'{where}: got {value!r}, expected a finite number (a regression target) or a missing-value code')
  return number


class FilesReader:
  """The rows of one manifest as a source's split: image paths (keys of :class:`LazyImages`) and labels (int32, or
  float32 ``[N, d]`` for the tasks in ``regression``).

  See the module docstring for the layout and the checks, and :func:`files_source` for ``split`` (the split's name)
  and ``split_column`` (the column whose value ``split`` selects rows); ``image_size`` ``(H, W)`` and ``channels``
  are what every image is decoded to. ``table``: ``(columns, rows)`` held in memory (e.g. parsed from file names,
  :mod:`mtlmatch.data.utkface`) instead of read from ``manifest``, which then only names them in messages.
  """

  def __init__(
      self,
      manifest: str,
      *,
      image_column: str,
      labels: Mapping[str, Union[str, Sequence[str]]],
      image_root: Optional[str] = None,
      image_size: Sequence[int] = (112, 112),
      channels: int = 3,
      missing=None,
      split: Optional[str] = None,
      split_column: Optional[str] = None,
      on_bad_image: str = 'raise',
      regression: Sequence[str] = (),
      table: Optional[tuple[Sequence[str], Sequence[Mapping[str, Any]]]] = None,
  ):
    # Resolved once, here: messages and the paths of predictions name the real files whatever the working directory.
    self.manifest = _absolute(os.fspath(manifest))
    self.name = os.path.basename(self.manifest)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in image_size)
    ):
      raise ValueError(f'image_size of manifest {self.manifest}: got {image_size!r}, expected (H, W) of ints > 0')
    if channels not in (1, 3):
      raise ValueError(f'channels of manifest {self.manifest}: got {channels!r}, expected 1 or 3')
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f'on_bad_image: got {on_bad_image!r}, expected one of {ON_BAD_IMAGE}')
    if not isinstance(labels, Mapping) or not labels:
      raise ValueError(
          f'labels of manifest {self.manifest}: got {labels!r}, expected {{task: column}} or {{task: [columns]}}'
      )
    if (
        not isinstance(regression, (tuple, list))
        or not all(isinstance(t, str) for t in regression)
        or set(regression) - set(labels)
    ):
      raise ValueError(
          f'regression of manifest {self.manifest}: got {regression!r}, expected a sequence of task names from '
          f'labels {list(labels)} (the tasks whose columns are float targets)'
      )
    self.regression = tuple(regression)
    self.shape = (int(image_size[0]), int(image_size[1]), int(channels))
    if split is not None and (not isinstance(split, str) or not split):
      raise ValueError(f'split of manifest {self.manifest}: got {split!r}, expected a split name (a non-empty string)')
    if split_column is not None and split is None:
      raise ValueError(
          f'split_column of manifest {self.manifest}: got {split_column!r} without a split, expected split=<the value '
          'of that column of the rows to keep>'
      )
    self.split = 'train' if split is None else split
    columns, rows = read_manifest(self.manifest) if table is None else (list(table[0]), list(table[1]))
    if not rows:
      raise ValueError(f'manifest {self.manifest}: got no rows, expected one row per image')
    if split is not None and split_column is None and 'split' in columns:
      # Before split_column, split= selected rows by the 'split' column: never read all rows silently instead.
      raise ValueError(
          f"manifest {self.manifest}: got split={split!r} and a 'split' column, but no split_column; expected "
          "split_column='split' to keep the rows of that split (split alone only names the source's split)"
      )
    label_columns = {t: [c] if isinstance(c, str) else list(c) for t, c in labels.items()}
    needed = (
        [image_column] + [c for cs in label_columns.values() for c in cs] + ([split_column] if split_column else [])
    )
    absent = [c for c in needed if c not in columns]
    if absent:
      raise ValueError(f'manifest {self.manifest}: columns {absent} are missing, expected them among {columns}')
    if any(not cs for cs in label_columns.values()):
      raise ValueError(f'labels of manifest {self.manifest}: got {labels!r}, expected at least one column per task')
    keep = lambda row: split_column is None or str(row.get(split_column, '')).strip() == split
    numbers = [i for i, row in enumerate(rows, 1) if keep(row)]
    if not numbers:
      raise ValueError(f'manifest {self.manifest}: got no rows with {split_column} == {split!r}, expected at least one')
    root = os.path.dirname(self.manifest) if image_root is None else _absolute(os.fspath(image_root))
    missing_sets = _missing_sets(missing, list(labels), self.regression)
    paths, values = [], {t: [] for t in labels}
    for i in numbers:
      row = rows[i - 1]
      name = str(row.get(image_column) or '').strip()
      if not name:
        raise ValueError(f'manifest {self.manifest} row {i}: column {image_column!r} is blank, expected a file')
      path = name if os.path.isabs(name) or '://' in name else os.path.join(root, name)
      where = self._where(i, path)
      for task, cs in label_columns.items():
        parse = _target_value if task in self.regression else _label_value
        y = [parse(row.get(c), missing_sets[task], where=f'{where} column {c!r}') for c in cs]
        values[task].append(y[0] if isinstance(labels[task], str) and task not in self.regression else y)
      paths.append(path)
    self.rows = np.asarray(numbers, np.int64)
    self.paths = np.asarray(paths, object)
    self.labels = {
        t: np.asarray(v, np.float32) if t in self.regression else np.asarray(v, np.int32) for t, v in values.items()
    }
    self._apply_bad_image_policy(on_bad_image)

  def _apply_bad_image_policy(self, on_bad_image: str) -> None:
    """Missing or undecodable images: 'raise' names the first (its row and file); 'skip' leaves them out, keeps the
    list in ``skipped`` and logs it."""
    bad = self._bad_rows(check_decoding=on_bad_image == 'skip')
    if bad and on_bad_image == 'raise':
      i, reason = bad[0]
      raise ValueError(
          f'{self.describe(i)}: {reason}, expected a readable image file (fix the manifest, or set '
          f"config.data.on_bad_image='skip' to leave such rows out; {len(bad)} such row(s))"
      )
    self.skipped = [(self.describe(i), reason) for i, reason in bad]
    if bad:
      keep = np.ones(len(self.paths), bool)
      keep[[i for i, _ in bad]] = False
      if not keep.any():
        raise ValueError(f'manifest {self.manifest}: every image is missing or undecodable, expected some good rows')
      self.rows, self.paths = self.rows[keep], self.paths[keep]
      self.labels = {t: y[keep] for t, y in self.labels.items()}
      shown = '; '.join(f'{w}: {r}' for w, r in self.skipped[:5])
      logging.warning(
          'manifest %s: skipped %d bad image(s) (on_bad_image=skip): %s%s',
          self.manifest,
          len(bad),
          shown,
          ' ...' if len(bad) > 5 else '',
      )

  def describe(self, i: int) -> str:
    """The ``i``-th kept row of the manifest, by row number and file, for messages."""
    return self._where(int(self.rows[i]), self.paths[i])

  def _where(self, row: int, path) -> str:
    return f'manifest {self.manifest} row {row} (file {path})'

  def _bad_rows(self, *, check_decoding: bool) -> list[tuple[int, str]]:
    """``[(i, reason)]`` of rows whose file is missing or (``check_decoding``) does not decode, in row order."""
    bad = [(i, 'the file does not exist') for i, p in enumerate(self.paths) if not tf.io.gfile.exists(p)]
    if not check_decoding:
      return bad
    missing = {i for i, _ in bad}
    candidates = np.array([i for i in range(len(self.paths)) if i not in missing], np.int64)
    return sorted(bad + [(int(i), 'the file does not decode as an image') for i in self.undecodable(candidates)])

  def undecodable(self, index: np.ndarray) -> np.ndarray:
    """The entries of ``index`` whose file fails to decode (one parallel tf.data pass; errors drop elements)."""
    if not len(index):
      return index
    paths = tf.data.Dataset.from_tensor_slices((index, list(self.paths[index])))
    decoded = paths.map(
        lambda i, p: (i, tf.reduce_max(self._decode(p))), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    good = {int(i) for i, _ in decoded.ignore_errors().as_numpy_iterator()}
    return np.array([i for i in index if int(i) not in good], np.int64)

  def _decode(self, path: tf.Tensor) -> tf.Tensor:
    return decode_image(tf.io.read_file(path), self.shape[:2], self.shape[2])

  def _check_split(self, split: str) -> None:
    if split != self.split:
      raise ValueError(f'split of manifest {self.manifest}: got {split!r}, expected {self.split!r}')

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return len(self.paths)

  def image_shape(self, split: str) -> tuple[int, int, int]:
    self._check_split(split)
    return self.shape

  def read(self, split: str, process_index: int, process_count: int) -> Examples:
    self._check_split(split)
    start, stop = host_slice(len(self.paths), process_index, process_count)
    images = LazyImages(
        keys=self.paths[start:stop],
        rows=self.rows[start:stop],
        shape=self.shape,
        fetch=lambda keys: keys,  # paths: read by tf.io.read_file in the decode, in parallel
        decode=self._decode,
        where=self._where,
    )
    labels = {t: y[start:stop] for t, y in self.labels.items()}
    return Examples(images, labels, np.arange(start, stop, dtype=np.int64))

  def identify(self, split: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """``rows``: each example's 0-based data row in the manifest (its header not counted); ``paths``: its file."""
    self._check_split(split)
    positions = np.asarray(positions, np.int64)
    return {'rows': self.rows[positions] - 1, 'paths': self.paths[positions].astype(str)}

  def __repr__(self):
    return f'FilesReader({self.manifest!r}, split={self.split!r}, rows={len(self.paths)})'


def files_source(
    name: str,
    manifest: str,
    *,
    image_column: str,
    labels: Mapping[str, Union[str, Sequence[str]]],
    image_root: Optional[str] = None,
    image_size: Sequence[int] = (112, 112),
    channels: int = 3,
    missing=None,
    split: Optional[str] = None,
    split_column: Optional[str] = None,
    weight: float = 1.0,
    on_bad_image: str = 'raise',
    regression: Sequence[str] = (),
) -> Source:
  """A source whose images are files listed in a manifest, read and decoded as batches need them.

  ``labels``: {task: column} (multiclass) or {task: [column per class]} (multilabel); the source annotates exactly those
  tasks. ``regression``: the tasks of ``labels`` whose columns are float targets (float32 ``[N, d]``, one output per
  column, ``[N, 1]`` for a single column; NaN = missing). ``split``: the name of the source's split (``Source.split``;
  default ``'train'``), as in ``array_source`` and ``tfds_source``. ``split_column``: a column that says which split
  each row belongs to; given, only the rows whose value there equals ``split`` are read (e.g. ``split='val',
  split_column='split'`` for one manifest that holds several splits); None (default): every row. A manifest with a
  column named ``split`` and a ``split`` but no ``split_column`` is refused (ValueError), so rows are never read that
  the caller meant to leave out. ``missing``: None (default) gives each task its default codes (:data:`DEFAULT_MISSING`,
  or :data:`DEFAULT_REGRESSION_MISSING` for a regression task), a tuple holds for every task, ``{task: codes}`` for
  those tasks (the others: their default). See the module docstring for ``missing``, ``on_bad_image`` and the checks.
  """
  reader = FilesReader(
      manifest,
      image_column=image_column,
      labels=labels,
      image_root=image_root,
      image_size=image_size,
      channels=channels,
      missing=missing,
      split=split,
      split_column=split_column,
      on_bad_image=on_bad_image,
      regression=regression,
  )
  return Source(name, reader, tuple(labels), reader.split, weight)


def bad_image_message(images: LazyImages, index: np.ndarray) -> Optional[str]:
  """``'<manifest row (file)>: <error>'`` for the first of ``images[index]`` that fails to fetch or decode, or None.

  The pipeline calls this when a batch fails in TF, to turn TF's message into one that names the row and file."""
  for i in index:
    try:
      images.decode(tf.constant(images.fetch(images.keys[[int(i)]])[0]))
    except (tf.errors.OpError, ValueError) as e:
      reason = str(getattr(e, 'message', e)).strip().splitlines()[0]
      reason = re.sub(r'^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$', '', reason)  # TF's node and op names
      return f'{images.describe(int(i))}: {reason}'
  return None


__all__ = [
    'DEFAULT_MISSING',
    'DEFAULT_REGRESSION_MISSING',
    'FilesReader',
    'bad_image_message',
    'decode_image',
    'files_source',
    'read_manifest',
]
