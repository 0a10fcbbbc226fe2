"""Sources (where examples come from, which tasks they annotate) and benchmarks (tasks + sources).

A :class:`Source` is the one way to describe training or evaluation data: a ``name``, a ``reader`` that knows where
the examples are, the ``split`` to read, the ``tasks`` it annotates (every other task of the benchmark is filled
with ``-1``) and a mixing ``weight``. Two readers cover every builder:

* :class:`ArrayReader` — in-memory numpy arrays (``array_source``; Colab users, tests, generated data).
* :class:`TfdsReader` — any prepared TFDS dataset plus a small label-mapping function (``tfds_source``); the
  project's own offline builders (synthetic affect, Fashion-MNIST from Debian's IDX files, Multi-Fashion) are TFDS
  builders read through it.

Readers hand out a host's slice of a split as uint8 images ``[N, H, W, C]`` and int32 labels, loaded into memory
once and cached on the reader (the datasets here are small; a large TFDS dataset can be shrunk on the way in with
``image_fn``, e.g. a resize). Host slices are contiguous and even: host ``h`` of ``P`` gets
``[h·⌊N/P⌋ + min(h, N mod P), …)`` — the rule of ``tfds.even_splits`` — so hosts are disjoint and cover the split.

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
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import tensorflow as tf

from mtlmatch.tasks import MISSING, TaskSpec, missing_labels, validate_labels

DATA_DIR_ENV = 'MTLMATCH_DATA_DIR'


def default_data_dir(data_dir: Optional[str] = None) -> str:
  """``data_dir`` if given, else ``$MTLMATCH_DATA_DIR``, else TFDS's default ``~/tensorflow_datasets``."""
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


# ----------------------------------------------------------------------------------------------------------------
# Examples and host slices.


@dataclasses.dataclass(frozen=True)
class LazyImages:
  """Images fetched by row when a batch needs them, never held decoded: memory is the keys, not the pixels.

  ``keys`` [N]: what ``fetch`` turns into one string per row — file paths (read in TF) or record indices of an
  ArrayRecord dataset (read here, by index); ``rows`` int64 [N]: each image's row in its table, for messages;
  ``shape`` ``(H, W, C)``: what ``decode`` returns. ``fetch(keys [n]) -> object array [n] of bytes`` runs in Python;
  ``decode(string) -> uint8 [H, W, C]`` runs in TF, in the pipeline's parallel map (decode, then resize to H × W).
  ``where(row, key) -> str`` names a row in errors, e.g. ``"manifest faces.csv row 12 (file img/12.jpg)"``.
  """

  keys: np.ndarray
  rows: np.ndarray
  shape: tuple[int, int, int]
  fetch: Callable[[np.ndarray], np.ndarray]
  decode: Callable[[tf.Tensor], tf.Tensor]
  where: Callable[[int, Any], str]

  def __len__(self) -> int:
    return int(len(self.keys))

  def __getitem__(self, index) -> 'LazyImages':
    return dataclasses.replace(self, keys=self.keys[index], rows=self.rows[index])

  def describe(self, i: int) -> str:
    return self.where(int(self.rows[i]), self.keys[i])


def image_shape_of(images) -> tuple[int, ...]:
  """``(H, W, C)`` of an in-memory uint8 ``[N, H, W, C]`` array or of :class:`LazyImages`."""
  return tuple(images.shape) if isinstance(images, LazyImages) else tuple(images.shape[1:])


def decode_rows(images: LazyImages, index=None, *, batch_size: int = 256) -> np.ndarray:
  """uint8 ``[n, H, W, C]``: the images at ``index`` (default: all) fetched and decoded now, in order.

  For the few places that need pixels outside the training stream (linear probes, fingerprints)."""
  chosen = images if index is None else images[np.asarray(index)]
  if not len(chosen):
    return np.zeros((0,) + tuple(chosen.shape), np.uint8)
  strings = tf.data.Dataset.from_tensor_slices(list(chosen.fetch(chosen.keys)))
  decoded = strings.map(chosen.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
  return np.concatenate(list(decoded.as_numpy_iterator()))


@dataclasses.dataclass(frozen=True)
class Examples:
  """A host's slice of one split.

  ``images``: uint8 ``[N, H, W, C]`` in memory, or :class:`LazyImages` fetched by row (file-backed and ArrayRecord
  sources); ``labels`` {task: int32 ``[N]`` or ``[N, C]``}, always in memory; ``positions`` int64 ``[N]``: each
  example's position in the split's (deterministic) read order, so hosts' slices can be compared.
  """

  images: Any
  labels: Mapping[str, np.ndarray]
  positions: np.ndarray

  def __len__(self) -> int:
    return len(self.images) if isinstance(self.images, LazyImages) else int(self.images.shape[0])


def host_slice(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, stop)`` of host ``process_index``'s even, contiguous slice (first ``N mod P`` hosts get one more).

  The same rule as ``tfds.even_splits(split, n=P, drop_remainder=False)``; the largest slice has ``⌈N/P⌉`` examples.
  """
  check_process(process_index, process_count)
  base, extra = divmod(int(num_examples), process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def check_process(process_index: int, process_count: int) -> None:
  if not isinstance(process_count, (int, np.integer)) or isinstance(process_count, bool) or process_count < 1:
    raise ValueError(f'process_count: got {process_count!r}, expected an int >= 1')
  if (
      not isinstance(process_index, (int, np.integer))
      or isinstance(process_index, bool)
      or not (0 <= process_index < process_count)
  ):
    raise ValueError(f'process_index: got {process_index!r}, expected an int in [0, {process_count})')


def _as_uint8_images(images, *, where: str) -> np.ndarray:
  """uint8 ``[N, H, W, C]`` from uint8 (or float in [0, 1]) ``[N, H, W]`` / ``[N, H, W, C]`` arrays."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]  # grey images without a channel axis
  if images.ndim != 4:
    raise ValueError(f'images of {where}: got shape {images.shape}, expected [N, H, W] or [N, H, W, C]')
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    if images.size and not (np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1):
      raise ValueError(
          f'images of {where}: got float values in [{images.min()}, {images.max()}], expected uint8 '
          'or floats in [0, 1]'
      )
    return np.round(images * 255).astype(np.uint8)
  raise ValueError(f'images of {where}: got dtype {images.dtype}, expected uint8 (or float in [0, 1])')


# ----------------------------------------------------------------------------------------------------------------
# Decoding (file-backed and prepared sources).


def resize_image(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """uint8 ``[h, w, C]`` → uint8 ``[H, W, C]``: unchanged when already ``H × W``, else an antialiased bilinear
  resize (rounded). Aspect ratio is not kept: crop in the manifest's images if it matters."""
  height, width = int(size[0]), int(size[1])
  shape = tf.shape(image)

  def resize():
    resized = tf.image.resize(image, (height, width), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  image = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
  return tf.ensure_shape(image, (height, width, image.shape[-1]))


def decode_image(data: tf.Tensor, size: Sequence[int], channels: int) -> tf.Tensor:
  """Encoded image bytes (JPEG/PNG/BMP/GIF) → uint8 ``[H, W, channels]``, resized to ``size``."""
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  return resize_image(image, size)


# ----------------------------------------------------------------------------------------------------------------
# Readers.


class Reader(Protocol):
  """Where a source's examples come from. ``read`` returns the raw labels it has (any tasks); caching is its own."""

  def num_examples(self, split: str) -> int:
    ...

  def image_shape(self, split: str) -> tuple[int, int, int]:
    ...

  def read(self, split: str, process_index: int, process_count: int) -> Examples:
    ...


class ArrayReader:
  """In-memory splits: ``{split: (images uint8 [N,H,W(,C)], {task: labels [N] or [N, C]})}``."""

  def __init__(self, splits: Mapping[str, tuple[Any, Mapping[str, Any]]], description: str = 'arrays'):
    if not isinstance(splits, Mapping) or not splits:
      raise ValueError(
          f'ArrayReader splits: got {type(splits).__name__}, expected a non-empty ' '{split: (images, labels)} mapping'
      )
    self.description = description
    self._splits = {}
    for split, value in splits.items():
      if not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[1], Mapping):
        raise ValueError(
            f'ArrayReader split {split!r}: got {type(value).__name__}, expected (images, {{task: ' 'labels}})'
        )
      images = _as_uint8_images(value[0], where=f'{description}/{split}')
      labels = {}
      for task, y in value[1].items():
        y = np.asarray(y)
        if y.ndim == 0 or y.shape[0] != images.shape[0]:
          raise ValueError(
              f'labels {task!r} of {description}/{split}: got shape {y.shape}, expected a leading '
              f'axis of {images.shape[0]} (one label per image)'
          )
        labels[task] = y
      self._splits[split] = (images, labels)

  def __repr__(self):
    return f'ArrayReader({self.description!r}, splits={sorted(self._splits)})'

  def _get(self, split: str):
    if split not in self._splits:
      raise ValueError(f'split of {self.description}: got {split!r}, expected one of {sorted(self._splits)}')
    return self._splits[split]

  def num_examples(self, split: str) -> int:
    return int(self._get(split)[0].shape[0])

  def image_shape(self, split: str) -> tuple[int, int, int]:
    return tuple(int(d) for d in self._get(split)[0].shape[1:])

  def read(self, split: str, process_index: int, process_count: int) -> Examples:
    images, labels = self._get(split)
    start, stop = host_slice(images.shape[0], process_index, process_count)
    return Examples(
        images[start:stop], {t: y[start:stop] for t, y in labels.items()}, np.arange(start, stop, dtype=np.int64)
    )


def _to_labels_dict(value) -> dict:
  if not isinstance(value, Mapping):
    raise ValueError(f'labels_fn: returned {type(value).__name__}, expected a {{task: label tensor}} dict')
  return dict(value)


_LABEL_BLOCK = 1024  # records per block of the labels pass of an indexed TfdsReader


class TfdsReader:
  """A prepared TFDS dataset, mapped per example to ``image`` (uint8 ``[H,W,C]``) and ``{task: label}``.

  ``labels_fn(example) -> {task: int tensor}`` (scalar for multiclass, ``[C]`` for multilabel; ``-1`` = missing) and
  the optional ``image_fn(image) -> uint8 image`` (e.g. a resize) run in TF on each example as it is read.

  Two ways to read, chosen by the dataset's file format (``indexed=None``) or forced:

  * *in memory* (TFRecord, the small datasets of this project): a host's slice is read once with
    ``tfds.even_splits``, decoded and cached on this reader;
  * *by index* (ArrayRecord, e.g. what ``python -m mtlmatch.data.prepare`` writes): the labels are read once (one
    pass with the images left encoded) and the images stay on disk as :class:`LazyImages` whose keys are record
    indices; the pipeline fetches the records a batch needs (``builder.as_data_source``) and decodes them in its
    parallel map. Memory no longer grows with the dataset.
  """

  def __init__(
      self,
      builder,
      *,
      labels_fn: Callable[[Mapping[str, tf.Tensor]], Mapping[str, tf.Tensor]],
      image_key: str = 'image',
      image_fn: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
      description: Optional[str] = None,
      indexed: Optional[bool] = None,
  ):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if not isinstance(builder, tfds.core.DatasetBuilder):
      raise ValueError(f'TfdsReader builder: got {type(builder).__name__}, expected a tfds DatasetBuilder')
    if not callable(labels_fn):
      raise ValueError(f'TfdsReader labels_fn: got {labels_fn!r}, expected a callable example -> {{task: label}}')
    self.builder = builder
    self.labels_fn = labels_fn
    self.image_key = image_key
    self.image_fn = image_fn
    self.description = description or builder.info.full_name
    array_record = str(getattr(builder.info.file_format, 'value', builder.info.file_format)) == 'array_record'
    if indexed and not array_record:
      raise ValueError(
          f'TfdsReader({self.description!r}) indexed=True: the dataset is stored as {builder.info.file_format}, '
          "expected 'array_record' (prepare it with python -m mtlmatch.data.prepare, or leave indexed=None)"
      )
    self.indexed = array_record if indexed is None else bool(indexed)
    self._cache: dict[tuple[str, int, int], Examples] = {}
    self._sources: dict[str, Any] = {}

  def __repr__(self):
    return f'TfdsReader({self.description!r}, indexed={self.indexed})'

  def _check_split(self, split: str):
    try:
      return self.builder.info.splits[split]
    except Exception as e:  # TFDS raises KeyError/ValueError/AssertionError depending on the spec
      raise ValueError(
          f'split of {self.description}: got {split!r}, expected a split of '
          f'{sorted(self.builder.info.splits)} (TFDS slicing allowed, e.g. "train[:1000]")'
      ) from e

  def num_examples(self, split: str) -> int:
    return int(self._check_split(split).num_examples)

  def _image(self, image: tf.Tensor) -> tf.Tensor:
    if self.image_fn is not None:
      image = self.image_fn(image)
    if image.shape.rank == 2:
      image = image[..., None]
    return tf.cast(image, tf.uint8) if image.dtype != tf.uint8 else image

  def _labels(self, example) -> dict:
    return {t: tf.cast(y, tf.int32) for t, y in _to_labels_dict(self.labels_fn(example)).items()}

  def _mapped(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
    def fn(example):
      return {'image': self._image(example[self.image_key]), 'labels': self._labels(example)}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _decode_record(self, record: tf.Tensor, decoders=None) -> dict:
    return self.builder.info.features.deserialize_example(record, decoders=decoders)

  def image_shape(self, split: str) -> tuple[int, int, int]:
    self._check_split(split)
    if self.indexed:  # ArrayRecord has no as_dataset: trace the decoding of one record instead (nothing is read)
      spec = (
          tf.data.Dataset.from_tensors(tf.constant(b''))
          .map(lambda r: self._image(self._decode_record(r)[self.image_key]))
          .element_spec
      )
    else:
      spec = self._mapped(self.builder.as_dataset(split=split, shuffle_files=False)).element_spec['image']
    if not spec.shape.is_fully_defined() or spec.shape.rank != 3:
      raise ValueError(
          f'images of {self.description}/{split}: got shape {spec.shape}, expected a fixed [H, W, C] '
          '(pass image_fn to resize)'
      )
    return tuple(int(d) for d in spec.shape)

  def _host_dataset(self, split: str, process_index: int, process_count: int, **kwargs) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    host_split = split if process_count == 1 else tfds.even_splits(split, n=process_count)[process_index]
    return self.builder.as_dataset(split=host_split, shuffle_files=False, **kwargs)

  def _records(self, split: str):
    """Random access to the split's serialized records (one ArrayRecord data source per split, opened once)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(
          split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
      )
    return self._sources[split]

  def _lazy_images(self, split: str, positions: np.ndarray) -> LazyImages:
    records = self._records(split)

    def fetch(keys):
      out = np.empty(len(keys), object)
      out[:] = records.__getitems__([int(k) for k in keys])
      return out

    def decode(record):
      return tf.ensure_shape(self._image(self._decode_record(record)[self.image_key]), shape)

    shape = self.image_shape(split)
    where = lambda row, key: f'{self.description}/{split} record {row}'
    return LazyImages(positions, positions, shape, fetch, decode, where)

  def read(self, split: str, process_index: int, process_count: int) -> Examples:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    key = (split, process_index, process_count)
    if key in self._cache:
      return self._cache[key]
    n = self.num_examples(split)
    start, stop = host_slice(n, process_index, process_count)
    if self.indexed:
      # Labels only: the images stay encoded in this pass (no decoding), and on disk afterwards.
      image_feature = self.builder.info.features[self.image_key]
      skip = {self.image_key: tfds.decode.SkipDecoding()} if isinstance(image_feature, tfds.features.Image) else None
      records = self._records(split)
      chunks = []
      # Records read by index in blocks (a block's encoded images are the only pixels ever held here, so memory
      # stays bounded), their labels parsed in TF in parallel.
      parse = lambda r: self._labels(self._decode_record(r, skip))
      for lo in range(start, stop, _LABEL_BLOCK):
        block = records.__getitems__(list(range(lo, min(lo + _LABEL_BLOCK, stop))))
        parsed = tf.data.Dataset.from_tensor_slices(block).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        chunks += list(parsed.batch(_LABEL_BLOCK).as_numpy_iterator())
        del block, parsed
      labels = {t: np.concatenate([c[t] for c in chunks]) for t in chunks[0]} if chunks else {}
      count = len(next(iter(labels.values()))) if labels else 0
      images = self._lazy_images(split, np.arange(start, stop, dtype=np.int64))
    else:
      dataset = self._mapped(self._host_dataset(split, process_index, process_count)).batch(8192)
      chunks = list(dataset.as_numpy_iterator())
      if chunks:
        images = np.concatenate([c['image'] for c in chunks])
        labels = {t: np.concatenate([c['labels'][t] for c in chunks]) for t in chunks[0]['labels']}
      else:
        images, labels = np.zeros((0,) + self.image_shape(split), np.uint8), {}
      count = images.shape[0]
    if count != stop - start:
      raise ValueError(
          f'{self.description}/{split}: host {process_index}/{process_count} read {count} '
          f'examples, expected {stop - start} (TFDS metadata and files disagree?)'
      )
    self._cache[key] = Examples(images, labels, np.arange(start, stop, dtype=np.int64))
    return self._cache[key]


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
    images = _as_uint8_images(images, where=f'source {source.name!r}')
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
  """The first row whose label breaks ``spec``'s range, for messages that name the row (None if none)."""
  y = np.asarray(labels)
  if y.ndim == 0 or not np.issubdtype(y.dtype, np.number):
    return None
  hi = spec.num_classes if spec.kind == 'multiclass' else 2
  bad = ((y < MISSING) | (y >= hi) | (np.mod(y, 1) != 0)).reshape(len(y), -1).any(axis=1)
  return int(np.argmax(bad)) if bad.any() else None


def source_labels(source: Source, tasks: Mapping[str, TaskSpec]) -> dict[str, np.ndarray]:
  """All labels of a (small) source as numpy, {task: int32 ``[N]``/``[N, C]``}, ``-1`` where not annotated.

  For estimating relatedness before training, e.g. from ``benchmark.aux_sources['coannotated']``.
  """
  return dict(load_examples(source, tasks).labels)


__all__ = [
    'ArrayReader',
    'Benchmark',
    'Examples',
    'Holdout',
    'LazyImages',
    'MISSING',
    'Source',
    'TfdsReader',
    'array_source',
    'decode_rows',
    'default_data_dir',
    'host_slice',
    'image_shape_of',
    'load_examples',
    'make_benchmark',
    'source_labels',
    'tfds_source',
    'with_validation',
]
