"""Sources (where examples come from, which tasks they annotate) and benchmarks (tasks + sources).

A :class:`Source` is the one way to describe training or evaluation data: a ``name``, a ``reader`` that knows where
the examples are (a reader of ``mtlmatch.data.readers``: :class:`ArrayReader` for in-memory arrays,
:class:`TfdsReader` for prepared TFDS datasets — the project's own offline builders are TFDS builders read through it
— or ``files.FilesReader`` for a manifest of image files), the ``split`` to read, the ``tasks`` it annotates (every
other task of the benchmark is filled with ``-1``) and a mixing ``weight``.

A :class:`Benchmark` bundles ordered task specs, training sources (mixed), evaluation sources (one test set each) and
auxiliary sources (e.g. co-annotated subsets for estimating relatedness; never mixed into training)::

    tasks = [TaskSpec('digit', 'multiclass', 10), TaskSpec('parity', 'multiclass', 2)]
    a = array_source('digits', images_a, {'digit': y_a})                 # annotates 'digit' only
    b = array_source('parity', images_b, {'parity': y_b}, weight=0.5)     # annotates 'parity' only
    bench = make_benchmark('toy', tasks, [a, b], eval_sources=[array_source('test', x_t, {'digit': .., 'parity': ..})])
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from mtlmatch.data.readers import (
    ArrayReader,
    Examples,
    LazyImages,
    Reader,
    TfdsReader,
    as_uint8_images,
    host_slice,
    image_shape_of,
    resize_image,
)
from mtlmatch.tasks import MISSING, TaskSpec, bad_labels, missing_labels, validate_labels

DATA_DIR_ENV = 'MTLMATCH_DATA_DIR'


def default_data_dir(data_dir: Optional[str] = None) -> str:
  """``data_dir`` if given, else ``$MTLMATCH_DATA_DIR``, else TFDS's default ``~/tensorflow_datasets``."""
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def generate_once(make_builder: Callable[[], Any], download_config: Callable[[], Any] = lambda: None):
  """The prepared TFDS builder ``make_builder()``, generated into its data_dir (with the ``download_config()``,
  called only then) if it is not there yet.

  Safe when several processes generate the same dataset at once (the parallel runs of a sweep on a fresh machine):
  TFDS writes into a private folder and renames it into place, and the process whose rename loses gets a
  FileExistsError although the other's copy is complete; it then reads that copy."""
  builder = make_builder()
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(download_config=download_config())
  except FileExistsError:
    builder = make_builder()
    if not builder.is_prepared():
      raise
  return builder


# ----------------------------------------------------------------------------------------------------------------
# Sources.


def _check_weight(weight, *, arg: str) -> float:
  if (
      isinstance(weight, bool)
      or not isinstance(weight, (int, float, np.integer, np.floating))
      or not (math.isfinite(float(weight)) and float(weight) > 0)
  ):
    raise ValueError(f'{arg}: got {weight!r}, expected a finite number > 0')
  return float(weight)


# Stream tag of the hold-out draw, so it never shares a generator with the mixing schedule.
_HOLDOUT = 0x686F6C64


@dataclasses.dataclass(frozen=True)
class Holdout:
  """A deterministic part of a source's split: ``'validation'`` = a seeded random ``fraction`` of its examples,
  ``'train'`` = the rest. The draw depends only on ``(seed, key, N)`` (``key``: the source's name), never on the
  number of hosts or devices, so every host agrees on it and sources annotating different tasks get their own
  (disjoint per-task) validation sets."""

  fraction: float
  part: str
  seed: int
  key: str

  def __post_init__(self):
    if not (isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool) and 0 < self.fraction < 1):
      raise ValueError(f'validation fraction: got {self.fraction!r}, expected a number in (0, 1)')
    if self.part not in ('train', 'validation'):
      raise ValueError(f"Holdout.part: got {self.part!r}, expected 'train' or 'validation'")

  def mask(self, num_examples: int) -> np.ndarray:
    """bool ``[N]``: which positions of the split belong to this part. The validation part has
    ``clip(round(fraction · N), 1, N − 1)`` examples (N ≥ 2), so both parts are non-empty."""
    n_val = min(max(int(round(self.fraction * num_examples)), 1), num_examples - 1)
    rng = np.random.default_rng([int(self.seed), zlib.crc32(self.key.encode()), _HOLDOUT])
    validation = np.zeros(num_examples, bool)
    validation[rng.permutation(num_examples)[:n_val]] = True
    return validation if self.part == 'validation' else ~validation


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset (split) feeding the benchmark.

  ``tasks``: the tasks this source annotates — every other task of the benchmark is ``-1`` for its examples.
  ``weight``: its unnormalised share in the training mixture (``mixing='weights'``). ``reader``: where the examples
  come from (:class:`ArrayReader`, :class:`TfdsReader`); ``split``: which of the reader's splits. ``holdout``: only
  that part of the split (see :func:`with_validation`); None = all of it.
  """

  name: str
  reader: Reader
  tasks: tuple[str, ...]
  split: str = 'train'
  weight: float = 1.0
  holdout: Optional[Holdout] = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'Source.name: got {self.name!r}, expected a non-empty string')
    tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
    if not tasks:
      raise ValueError(f'Source({self.name!r}).tasks: got {self.tasks!r}, expected at least one annotated task')
    if not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
      raise ValueError(f'Source({self.name!r}).tasks: got {self.tasks!r}, expected unique task names')
    object.__setattr__(self, 'tasks', tasks)
    object.__setattr__(self, 'weight', _check_weight(self.weight, arg=f'Source({self.name!r}).weight'))
    for method in ('num_examples', 'image_shape', 'read'):
      if not callable(getattr(self.reader, method, None)):
        raise ValueError(
            f'Source({self.name!r}).reader: got {self.reader!r}, expected a reader with num_examples, '
            'image_shape and read (ArrayReader, TfdsReader)'
        )

  def split_size(self) -> int:
    """Examples in the reader's split (before any hold-out)."""
    return self.reader.num_examples(self.split)

  def part_mask(self) -> Optional[np.ndarray]:
    """bool ``[N]`` over the split's positions for a held-out part, or None for the whole split."""
    if self.holdout is None:
      return None
    n = self.split_size()
    if n < 2:
      raise ValueError(
          f'Source {self.name!r}: got {n} example(s) in split {self.split!r}, expected at least 2 to hold '
          'out a validation part (or set config.data.validation_fraction=0)'
      )
    return self.holdout.mask(n)

  def num_examples(self) -> int:
    mask = self.part_mask()
    return self.split_size() if mask is None else int(mask.sum())

  def max_host_examples(self, process_count: int) -> int:
    """The most examples any of ``process_count`` hosts holds (every host runs that many eval steps)."""
    n = self.split_size()
    mask = self.part_mask()
    slices = [host_slice(n, h, process_count) for h in range(process_count)]
    return max((stop - start) if mask is None else int(mask[start:stop].sum()) for start, stop in slices)

  def image_shape(self) -> tuple[int, int, int]:
    return self.reader.image_shape(self.split)

  def replace(self, **changes) -> 'Source':
    return dataclasses.replace(self, **changes)


def array_source(
    name: str,
    images,
    labels: Mapping[str, Any],
    *,
    tasks: Optional[Sequence[str]] = None,
    split: str = 'train',
    weight: float = 1.0,
) -> Source:
  """A source from in-memory arrays: images uint8 ``[N,H,W(,C)]`` (or float in [0, 1]); labels {task: labels}.

  Labels are ``[N]`` (multiclass) or ``[N, C]`` (multilabel). ``tasks`` defaults to the keys of ``labels``. An
  empty array is refused here (ValueError).

  Example (a source that annotates only the expression task; a benchmark of several such sources is built with
  :func:`make_benchmark`):

  >>> import numpy as np
  >>> images = np.zeros((10, 32, 32, 3), np.uint8)
  >>> source = array_source('faces', images, {'expression': np.arange(10) % 7})
  >>> source.tasks, source.reader.num_examples('train')
  (('expression',), 10)
  """
  reader = ArrayReader({split: (images, labels)}, description=name)
  if reader.num_examples(split) == 0:
    raise ValueError(f'array_source({name!r}) images: got 0 examples, expected at least one')
  return Source(name, reader, tuple(labels) if tasks is None else tuple(tasks), split, weight)


def tfds_source(
    name: str,
    dataset: str,
    *,
    tasks: Sequence[str],
    labels_fn: Optional[Callable] = None,
    split: str = 'train',
    weight: float = 1.0,
    data_dir: Optional[str] = None,
    image_key: str = 'image',
    image_fn: Optional[Callable] = None,
    download: bool = False,
    builder_kwargs: Optional[Mapping[str, Any]] = None,
    indexed: Optional[bool] = None,
    image_size: Optional[Sequence[int]] = None,
) -> Source:
  """A source from a TFDS dataset: by name (``celeb_a``, ``fashion_mnist``, ... prepared in ``data_dir``) or by the
  directory of a prepared dataset (``.../name/config/version``, what ``python -m mtlmatch.data.prepare`` writes).

  ``labels_fn(example) -> {task: label}`` maps TFDS features to this project's tasks, e.g. for fashion_mnist
  ``lambda ex: {'item': ex['label']}``; for celeb_a attributes
  ``lambda ex: {'attrs': tf.stack([tf.cast(ex['attributes'][a], tf.int32) for a in NAMES])}``; None = the features
  named like the tasks (as prepared datasets store them). ``image_fn`` (TF, per example) can resize images;
  ``image_size=(H, W)`` resizes after it (:func:`resize_image`, e.g. for prepared images of mixed sizes). An
  ArrayRecord dataset is read by index (``indexed=None`` decides by file format; see :class:`TfdsReader`), any other
  loaded into memory. ``download=False`` (default) never touches the network: the dataset must already be prepared in
  ``data_dir`` (default: see :func:`default_data_dir`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if labels_fn is None:
    labels_fn = lambda example: {t: example[t] for t in tasks}
  if image_size is not None:
    size, first = tuple(image_size), image_fn or (lambda image: image)
    if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
      raise ValueError(f'tfds_source({name!r}) image_size: got {image_size!r}, expected (H, W) of ints > 0')
    image_fn = lambda image: resize_image(first(image), size)
  if os.path.isfile(os.path.join(os.fspath(dataset), 'dataset_info.json')):
    builder = tfds.builder_from_directory(os.fspath(dataset))
    description = builder.info.full_name
  else:
    data_dir = default_data_dir(data_dir)
    try:
      builder = tfds.builder(dataset, data_dir=data_dir, **dict(builder_kwargs or {}))
    except Exception as e:  # unknown name / config
      raise ValueError(
          f'tfds_source({name!r}) dataset: got {dataset!r}, expected a TFDS dataset name or the directory of a '
          f'prepared dataset ({e})'
      ) from e
    if download:
      builder.download_and_prepare()
    elif not builder.is_prepared():
      raise ValueError(
          f'tfds_source({name!r}) dataset: {dataset!r} is not prepared in data_dir={data_dir!r}; prepare '
          f'it once (`tfds build {dataset} --data_dir={data_dir}` where there is network) or pass '
          'download=True'
      )
    description = dataset
  reader = TfdsReader(
      builder, labels_fn=labels_fn, image_key=image_key, image_fn=image_fn, description=description, indexed=indexed
  )
  return Source(name, reader, tuple(tasks), split, weight)


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks.


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Ordered task specs and the sources that annotate them.

  ``train_sources`` are mixed for training (batch field ``source`` indexes them); ``eval_sources`` are test sets,
  each iterated once with every label it has; ``aux_sources`` (e.g. ``'coannotated'``) are for estimating relatedness
  before training and are never mixed in. ``validation_sources``: parts held out of the training sources for model
  selection (:func:`with_validation`). ``image_shape`` ``(H, W, C)`` is shared by every source.
  """

  name: str
  tasks: dict[str, TaskSpec]
  train_sources: tuple[Source, ...]
  eval_sources: tuple[Source, ...]
  aux_sources: dict[str, Source]
  image_shape: tuple[int, int, int]
  validation_sources: tuple[Source, ...] = ()

  def __post_init__(self):
    tasks = self.tasks
    if not isinstance(tasks, Mapping):
      tasks = {t.name: t for t in tasks} if all(isinstance(t, TaskSpec) for t in tasks) else None
    if not tasks or not all(isinstance(s, TaskSpec) and s.name == k for k, s in tasks.items()):
      raise ValueError(
          f'Benchmark({self.name!r}).tasks: got {self.tasks!r}, expected a non-empty {{name: TaskSpec}} '
          "with keys equal to the specs' names"
      )
    object.__setattr__(self, 'tasks', dict(tasks))
    object.__setattr__(self, 'train_sources', tuple(self.train_sources))
    object.__setattr__(self, 'eval_sources', tuple(self.eval_sources))
    object.__setattr__(self, 'aux_sources', dict(self.aux_sources or {}))
    object.__setattr__(self, 'validation_sources', tuple(self.validation_sources))
    if not self.train_sources:
      raise ValueError(f'Benchmark({self.name!r}).train_sources: got none, expected at least one Source')
    groups = (
        ('train_sources', self.train_sources),
        ('eval_sources', self.eval_sources),
        ('aux_sources', tuple(self.aux_sources.values())),
        ('validation_sources', self.validation_sources),
    )
    for group, sources in groups:
      names = [s.name for s in sources if isinstance(s, Source)]
      if len(names) != len(sources):
        raise ValueError(
            f'Benchmark({self.name!r}).{group}: got {[type(s).__name__ for s in sources]}, expected ' 'Source objects'
        )
      if len(set(names)) != len(names):
        raise ValueError(f'Benchmark({self.name!r}).{group}: got duplicate names {names}, expected unique names')
      for s in sources:
        unknown = [t for t in s.tasks if t not in self.tasks]
        if unknown:
          raise ValueError(
              f'Source {s.name!r} tasks: got unknown task names {unknown}, expected names from ' f'{list(self.tasks)}'
          )
    shape = tuple(self.image_shape) if isinstance(self.image_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
      raise ValueError(
          f'Benchmark({self.name!r}).image_shape: got {self.image_shape!r}, expected (H, W, C) of ' 'positive ints'
      )
    object.__setattr__(self, 'image_shape', tuple(int(d) for d in shape))


def make_benchmark(
    name: str,
    tasks,
    train_sources: Sequence[Source],
    *,
    eval_sources: Sequence[Source] = (),
    aux_sources: Optional[Mapping[str, Source]] = None,
    image_shape: Optional[Sequence[int]] = None,
) -> Benchmark:
  """A :class:`Benchmark` from user sources (``array_source`` / ``tfds_source``).

  ``tasks``: TaskSpecs (a sequence, in the order heads are built) or {name: TaskSpec}. ``image_shape`` defaults to
  the first training source's; every source must have that shape (checked here, one ValueError naming the source).
  """
  train_sources = tuple(train_sources)
  if not train_sources:
    raise ValueError(f'make_benchmark({name!r}) train_sources: got none, expected at least one Source')
  if image_shape is None and isinstance(train_sources[0], Source):
    image_shape = train_sources[0].image_shape()
  bench = Benchmark(
      name,
      tasks,
      train_sources,
      tuple(eval_sources),
      dict(aux_sources or {}),
      tuple(image_shape) if image_shape is not None else image_shape,
  )
  for s in bench.train_sources + bench.eval_sources + tuple(bench.aux_sources.values()):
    if tuple(s.image_shape()) != bench.image_shape:
      raise ValueError(
          f'Source {s.name!r} images: got shape {tuple(s.image_shape())}, expected {bench.image_shape} '
          'like the other sources (resize them, e.g. with tfds_source(image_fn=...))'
      )
  return bench


def with_validation(benchmark: Benchmark, fraction: float, *, seed: int) -> Benchmark:
  """Holds out a deterministic ``fraction`` of every training source for validation.

  Each training source ``s`` becomes its ``'train'`` part and ``benchmark.validation_sources`` gets its
  ``'validation'`` part (same name, same tasks): a seeded random ``fraction`` of the split (:class:`Holdout`). Sources
  annotating different tasks thus give per-task validation sets drawn from each task's own training data. ``fraction
  = 0`` returns the benchmark unchanged (no validation). A benchmark that already has validation sources is refused.
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
    raise ValueError(
        f'config.data.validation_fraction: got {fraction!r}, expected a number in [0, 1) (0 = no ' 'validation split)'
    )
  if fraction == 0:
    return benchmark
  if benchmark.validation_sources:
    raise ValueError(
        f'Benchmark({benchmark.name!r}) already has validation sources '
        f'{[s.name for s in benchmark.validation_sources]}, expected none before with_validation'
    )
  parts = {
      part: tuple(s.replace(holdout=Holdout(float(fraction), part, int(seed), s.name)) for s in benchmark.train_sources)
      for part in ('train', 'validation')
  }
  return dataclasses.replace(benchmark, train_sources=parts['train'], validation_sources=parts['validation'])


def load_examples(
    source: Source,
    tasks: Mapping[str, TaskSpec],
    *,
    image_shape: Optional[Sequence[int]] = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Examples:
  """A host's slice of ``source`` with labels for every task in ``tasks`` (the unannotated ones all ``-1``).

  Validates (one ValueError each): unknown task names, tasks the reader has no labels for, an empty source, labels
  outside their range (``mtlmatch.tasks.validate_labels``) and, if given, an ``image_shape`` mismatch.
  """
  unknown = [t for t in source.tasks if t not in tasks]
  if unknown:
    raise ValueError(
        f'Source {source.name!r} tasks: got unknown task names {unknown}, expected names from ' f'{list(tasks)}'
    )
  total = source.split_size()
  if total == 0:
    raise ValueError(f'Source {source.name!r}: got 0 examples in split {source.split!r}, expected at least one')
  if total < process_count:
    raise ValueError(
        f'Source {source.name!r}: got {total} examples for process_count={process_count} hosts, '
        'expected at least one example per host'
    )
  raw = source.reader.read(source.split, process_index, process_count)
  images = raw.images
  if not isinstance(images, LazyImages):
    images = as_uint8_images(images, where=f'source {source.name!r}')
  if image_shape is not None and image_shape_of(images) != tuple(image_shape):
    raise ValueError(
        f'Source {source.name!r} images: got shape {image_shape_of(images)}, expected '
        f'{tuple(image_shape)} like the other sources'
    )
  labels = {}
  for name, spec in tasks.items():
    if name in source.tasks:
      if name not in raw.labels:
        raise ValueError(
            f'Source {source.name!r} annotates task {name!r}, but its reader has labels only for '
            f'{sorted(raw.labels)}'
        )
      try:
        labels[name] = validate_labels(spec, raw.labels[name], where=f'source {source.name!r}')
      except ValueError as e:
        row = _first_bad_row(spec, raw.labels[name]) if isinstance(images, LazyImages) else None
        if row is None:
          raise
        raise ValueError(f'{e}; first at {images.describe(row)}') from None
    else:
      labels[name] = missing_labels(spec, len(images))
  mask = source.part_mask()  # a held-out part: selected after the checks, so errors describe the whole split
  if mask is None:
    return Examples(images, labels, raw.positions)
  keep = mask[raw.positions]
  if not keep.any():
    raise ValueError(
        f'Source {source.name!r} ({source.holdout.part} part): host {process_index} of {process_count} '
        'holds none of its examples, expected at least one per host (a larger source or validation '
        'fraction)'
    )
  return Examples(images[keep], {t: y[keep] for t, y in labels.items()}, raw.positions[keep])


def _first_bad_row(spec: TaskSpec, labels) -> Optional[int]:
  """The first row whose label breaks ``spec``'s conventions (``tasks.bad_labels``), for messages that name the row
  (None if none)."""
  y = np.asarray(labels)
  if y.ndim == 0 or not np.issubdtype(y.dtype, np.number):
    return None
  bad, _ = bad_labels(spec, y)
  bad = bad.reshape(len(y), -1).any(axis=1)
  return int(np.argmax(bad)) if bad.any() else None


def source_labels(source: Source, tasks: Mapping[str, TaskSpec]) -> dict[str, np.ndarray]:
  """All labels of a (small) source as numpy, {task: int32 ``[N]``/``[N, C]``}, ``-1`` where not annotated.

  For estimating relatedness before training, e.g. from ``benchmark.aux_sources['coannotated']``.
  """
  return dict(load_examples(source, tasks).labels)


__all__ = [
    'Benchmark',
    'generate_once',
    'Holdout',
    'MISSING',
    'Source',
    'array_source',
    'default_data_dir',
    'load_examples',
    'make_benchmark',
    'source_labels',
    'tfds_source',
    'with_validation',
]
