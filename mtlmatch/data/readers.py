"""Readers: where a source's examples come from, and how they are held (in memory or fetched by row).

* :class:`ArrayReader` — in-memory numpy arrays (``mtlmatch.data.array_source``; Colab users, tests, generated data).
* :class:`TfdsReader` — any prepared TFDS dataset plus a small label-mapping function (``tfds_source``), read into
  memory (TFRecord) or by index (ArrayRecord, images left on disk as :class:`LazyImages`).
* ``mtlmatch.data.files.FilesReader`` (in ``files``) — a manifest of image files.

Readers hand out a host's slice of a split (:class:`Examples`) as uint8 images ``[N, H, W, C]`` (or
:class:`LazyImages`) and int32 labels. In memory they are loaded once and cached on the reader (the datasets here
are small; a large TFDS dataset can be shrunk on the way in with ``image_fn``, e.g. a resize). Host slices are
contiguous and even: host ``h`` of ``P`` gets ``[h·⌊N/P⌋ + min(h, N mod P), …)`` — the rule of ``tfds.even_splits``
— so hosts are disjoint and cover the split. Also here: image decoding and resizing, shared by file-backed and
prepared sources. Sources and benchmarks are in ``sources``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import tensorflow as tf

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


def as_uint8_images(images, *, where: str) -> np.ndarray:
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

  def identify(self, split: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``positions`` of the split's read order in the user's terms: ``rows`` (the index in the given
    arrays, the TFDS split or the manifest's data rows, 0-based) and, where there is one, ``paths``."""
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
      images = as_uint8_images(value[0], where=f'{description}/{split}')
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

  def identify(self, split: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """``rows``: the index of each example in the arrays given for ``split``."""
    self._get(split)
    return {'rows': np.asarray(positions, np.int64)}


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

  def identify(self, split: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """``rows``: each example's index in the TFDS split (its read order)."""
    self._check_split(split)
    return {'rows': np.asarray(positions, np.int64)}

  def _image(self, image: tf.Tensor) -> tf.Tensor:
    if self.image_fn is not None:
      image = self.image_fn(image)
    if image.shape.rank == 2:
      image = image[..., None]
    return tf.cast(image, tf.uint8) if image.dtype != tf.uint8 else image

  def _labels(self, example) -> dict:
    # Integer labels (classes, -1 = missing) as int32, float ones (regression targets, NaN = missing) as float32.
    return {
        t: tf.cast(y, tf.float32 if y.dtype.is_floating else tf.int32)
        for t, y in _to_labels_dict(self.labels_fn(example)).items()
    }

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


__all__ = [
    'ArrayReader',
    'Examples',
    'LazyImages',
    'Reader',
    'TfdsReader',
    'as_uint8_images',
    'check_process',
    'decode_image',
    'decode_rows',
    'host_slice',
    'image_shape_of',
    'resize_image',
]
