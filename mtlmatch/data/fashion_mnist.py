"""Fashion-MNIST read offline from Debian's IDX files, as TFDS builders: "shopping" tasks and Multi-Fashion.

Debian's ``dataset-fashion-mnist`` (MIT licence; ``apt-get install dataset-fashion-mnist``) puts the four IDX .gz
files under ``/usr/share/datasets/fashion-mnist/``; :data:`IDX_FILES` names them. Two TFDS builders read them from a
manual directory (``DownloadConfig(manual_dir=idx_dir)``), prepare once into ``data_dir`` and are then read like any
TFDS dataset (uint8 tensors, no PNG); both store ``index`` = the example's position in its IDX file.

* :class:`MtlmatchFashionMnist` — ``train`` (60k) / ``test`` (10k) with derived tasks: ``item`` (10-way, the
  original label), ``group`` (5-way: tops, bottoms, dresses, footwear, bags; :data:`ITEM_TO_GROUP`) and
  ``attributes`` (multilabel, :data:`ATTRIBUTE_NAMES`, a fixed function of the item: :data:`ITEM_ATTRIBUTES`).
  :func:`shopping_benchmark` annotates disjoint slices of ``train`` with different tasks: ``item`` on 1,000 images,
  ``group`` + ``attributes`` on another 50,000, and an optional co-annotated slice with all three.
* :class:`MtlmatchMultiFashion` — two items overlaid on 36×36 (one at the top-left, one at the bottom-right, pixel
  max), tasks ``left`` / ``right`` (10-way each), after MultiMNIST (Sabour et al. 2017; Sener & Koltun 2018).

Without the IDX files the error says how to get them; TFDS's own ``fashion_mnist`` (online) works through
``tfds_source('items', 'fashion_mnist', tasks=['item'], labels_fn=lambda ex: {'item': ex['label']})``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from mtlmatch.data._quiet import log_generation
from mtlmatch.data.readers import TfdsReader
from mtlmatch.data.sources import Benchmark, Source, default_data_dir, generate_once, make_benchmark
from mtlmatch.tasks import TaskSpec

DEBIAN_IDX_DIR = '/usr/share/datasets/fashion-mnist'
IDX_DIR_ENV = 'MTLMATCH_FASHION_MNIST_DIR'
IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
ITEM_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle boot')
GROUP_NAMES = ('tops', 'bottoms', 'dresses', 'footwear', 'bags')
ITEM_TO_GROUP = np.array([0, 1, 0, 2, 0, 3, 0, 3, 4, 3], np.int32)
ATTRIBUTE_NAMES = ('upper_body', 'lower_body', 'has_sleeves', 'long_sleeves', 'footwear', 'worn')
# One row per item, columns ATTRIBUTE_NAMES. A dress covers upper and lower body and is counted sleeveless; shirts,
# pullovers and coats in Fashion-MNIST are mostly long-sleeved; a bag is the only item not worn.
ITEM_ATTRIBUTES = np.array(
    [
        [1, 0, 1, 0, 0, 1],  # t-shirt/top
        [0, 1, 0, 0, 0, 1],  # trouser
        [1, 0, 1, 1, 0, 1],  # pullover
        [1, 1, 0, 0, 0, 1],  # dress
        [1, 0, 1, 1, 0, 1],  # coat
        [0, 0, 0, 0, 1, 1],  # sandal
        [1, 0, 1, 1, 0, 1],  # shirt
        [0, 0, 0, 0, 1, 1],  # sneaker
        [0, 0, 0, 0, 0, 0],  # bag
        [0, 0, 0, 0, 1, 1],  # ankle boot
    ],
    np.int32,
)
MULTI_SIZE = 36  # Multi-Fashion canvas; item 1 at [0:28, 0:28], item 2 at [8:36, 8:36]


def shopping_tasks() -> dict[str, TaskSpec]:
  return {
      'item': TaskSpec('item', 'multiclass', 10, ITEM_NAMES),
      'group': TaskSpec('group', 'multiclass', 5, GROUP_NAMES),
      'attributes': TaskSpec('attributes', 'multilabel', len(ATTRIBUTE_NAMES), ATTRIBUTE_NAMES),
  }


def multi_fashion_tasks() -> dict[str, TaskSpec]:
  return {
      'left': TaskSpec('left', 'multiclass', 10, ITEM_NAMES),
      'right': TaskSpec('right', 'multiclass', 10, ITEM_NAMES),
  }


def resolve_idx_dir(idx_dir: Optional[str] = None) -> str:
  """``idx_dir``, else ``$MTLMATCH_FASHION_MNIST_DIR``, else Debian's directory; raises if a file is missing."""
  idx_dir = os.fspath(idx_dir) if idx_dir is not None else os.environ.get(IDX_DIR_ENV) or DEBIAN_IDX_DIR
  missing = [f for files in IDX_FILES.values() for f in files if not os.path.isfile(os.path.join(idx_dir, f))]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found in idx_dir={idx_dir!r}: missing {missing}. Install them offline with '
        f'`apt-get install dataset-fashion-mnist` (files land in {DEBIAN_IDX_DIR}/), or pass idx_dir= (or set '
        f'${IDX_DIR_ENV}) to a directory holding {sorted(f for v in IDX_FILES.values() for f in v)}. With network, '
        "TFDS's own 'fashion_mnist' works too: tfds_source(..., 'fashion_mnist', labels_fn=lambda ex: "
        "{'item': ex['label']}, download=True)."
    )
  return idx_dir


def read_idx(path: str) -> np.ndarray:
  """An IDX file (gzipped or not) as a numpy array: magic ``0 0 dtype ndim``, big-endian int32 dims, raw data."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
    raise ValueError(f'IDX file {path!r}: got header {data[:4]!r}, expected 0x00 0x00 <dtype> <ndim>')
  ndim = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, '>i4', count=ndim, offset=4))
  array = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise ValueError(f'IDX file {path!r}: got {array.size} values, expected {dims} = {int(np.prod(dims))}')
  return array.reshape(dims)


def read_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 [N, 28, 28], items int32 [N])`` of ``train`` or ``test`` from the IDX files."""
  image_file, label_file = IDX_FILES[split]
  images = read_idx(os.path.join(idx_dir, image_file))
  items = read_idx(os.path.join(idx_dir, label_file)).astype(np.int32)
  if images.ndim != 3 or images.dtype != np.uint8 or items.shape != images.shape[:1]:
    raise ValueError(
        f'Fashion-MNIST {split} in {idx_dir!r}: got images {images.shape} {images.dtype} and labels '
        f'{items.shape}, expected uint8 [N, H, W] and [N]'
    )
  if items.size and (items.min() < 0 or items.max() >= len(ITEM_NAMES)):
    raise ValueError(f'Fashion-MNIST {split} labels: got values in [{items.min()}, {items.max()}], expected [0, 10)')
  return images, items


def _manual_download_config(idx_dir: str):
  return tfds.download.DownloadConfig(manual_dir=idx_dir, try_download_gcs=False)


class MtlmatchFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files with derived ``group`` and ``attributes`` tasks."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS 4.9.10 locates a packaged builder's code with `importlib_resources` (installed only on Python < 3.9);
  # these builders ship no checksum or metadata files, so declare no code path, as for a builder made in Colab.
  code_path = None
  _log_download_bytes = log_generation  # generated locally: no "Downloading ... Unknown size" line
  RELEASE_NOTES = {'1.0.0': 'item, group, attributes derived from the item; from Debian dataset-fashion-mnist.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'`apt-get install dataset-fashion-mnist`, then use manual_dir={DEBIAN_IDX_DIR} '
      f'(it must hold {sorted(f for v in IDX_FILES.values() for f in v)}).'
  )

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) with derived group and attribute tasks.',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding='bytes'),
                'item': tfds.features.Tensor(shape=(), dtype=np.int32),
                'group': tfds.features.Tensor(shape=(), dtype=np.int32),
                'attributes': tfds.features.Tensor(shape=(len(ATTRIBUTE_NAMES),), dtype=np.int32),
                'index': tfds.features.Tensor(shape=(), dtype=np.int64),
            }
        ),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        citation='H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST. arXiv:1708.07747, 2017.',
    )

  def _split_generators(self, dl_manager):
    idx_dir = resolve_idx_dir(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(idx_dir, split) for split in IDX_FILES}

  def _generate_examples(self, idx_dir, split):
    images, items = read_split(idx_dir, split)
    for i in range(len(items)):
      yield i, {
          'image': images[i, :, :, None],
          'item': items[i],
          'group': ITEM_TO_GROUP[items[i]],
          'attributes': ITEM_ATTRIBUTES[items[i]],
          'index': np.int64(i),
      }


def prepare_fashion_mnist(data_dir: Optional[str] = None, idx_dir: Optional[str] = None) -> MtlmatchFashionMnist:
  """The prepared builder: read from ``data_dir`` if already there, else generated from the IDX files once."""
  return generate_once(
      lambda: MtlmatchFashionMnist(data_dir=default_data_dir(data_dir)),
      lambda: _manual_download_config(resolve_idx_dir(idx_dir)),
  )


def _shopping_labels(example):
  return {'item': example['item'], 'group': example['group'], 'attributes': example['attributes']}


def _check_sizes(**sizes):
  for arg, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f'{arg}: got {v!r}, expected an int >= 0')


def _check_weights(weights, names):
  weights = dict(weights or {})
  if set(weights) - set(names):
    raise ValueError(
        f'weights: got unknown source names {sorted(set(weights) - set(names))}, expected names from ' f'{list(names)}'
    )
  return weights


def shopping_benchmark(
    *,
    data_dir: Optional[str] = None,
    seed: int = 0,
    idx_dir: Optional[str] = None,
    num_item: int = 1000,
    num_group: int = 50000,
    num_coannotated: int = 1000,
    weights: Optional[Mapping[str, float]] = None,
) -> Benchmark:
  """Fashion-MNIST "shopping": source ``item`` = ``train[:num_item]`` annotating ``item`` only; source
  ``group_attributes`` = the next ``num_group`` annotating ``group`` + ``attributes`` only; aux ``coannotated`` = the
  next ``num_coannotated`` with all three (omitted if 0); eval ``test`` (10k, all three).

  Slices are of TFDS's record order (a fixed pseudo-random order of the 60k), so they are disjoint; ``seed`` is
  accepted for a uniform interface and does not change them.
  """
  del seed  # the partition is fixed by the prepared dataset's deterministic record order
  _check_sizes(num_item=num_item, num_group=num_group, num_coannotated=num_coannotated)
  if num_item < 1 or num_group < 1:
    raise ValueError(f'num_item, num_group: got {num_item}, {num_group}, expected both >= 1')
  weights = _check_weights(weights, ('item', 'group_attributes'))
  builder = prepare_fashion_mnist(data_dir, idx_dir)
  available = builder.info.splits['train'].num_examples
  if num_item + num_group + num_coannotated > available:
    raise ValueError(
        f'num_item + num_group + num_coannotated: got {num_item} + {num_group} + {num_coannotated}, '
        f'expected at most the {available} training images (the slices are disjoint)'
    )
  reader = TfdsReader(builder, labels_fn=_shopping_labels, description='fashion_mnist')
  a, b = num_item, num_item + num_group
  train = (
      Source('item', reader, ('item',), f'train[:{a}]', weights.get('item', 1.0)),
      Source(
          'group_attributes', reader, ('group', 'attributes'), f'train[{a}:{b}]', weights.get('group_attributes', 1.0)
      ),
  )
  aux = {}
  if num_coannotated:
    aux['coannotated'] = Source(
        'coannotated', reader, ('item', 'group', 'attributes'), f'train[{b}:{b + num_coannotated}]'
    )
  return make_benchmark(
      'shopping',
      shopping_tasks(),
      train,
      eval_sources=(Source('test', reader, ('item', 'group', 'attributes'), 'test'),),
      aux_sources=aux,
      image_shape=(28, 28, 1),
  )


# ----------------------------------------------------------------------------------------------------------------
# Multi-Fashion.


@dataclasses.dataclass
class MultiFashionConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 60000
  num_test: int = 10000


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  """uint8 ``[N, 36, 36, 1]``: ``left`` [N, 28, 28] at the top-left, ``right`` at the bottom-right, pixel max."""
  n, h, w = left.shape
  canvas = np.zeros((n, MULTI_SIZE, MULTI_SIZE), np.uint8)
  canvas[:, :h, :w] = left
  canvas[:, MULTI_SIZE - h :, MULTI_SIZE - w :] = np.maximum(canvas[:, MULTI_SIZE - h :, MULTI_SIZE - w :], right)
  return canvas[..., None]


def multi_fashion_pairs(seed: int, split: str, n: int, num_source: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices ``(left [n], right [n])`` into the IDX split: two independent uniform draws, never the same image."""
  rng = np.random.default_rng([int(seed), {'train': 1, 'test': 2}[split]])
  left = rng.integers(0, num_source, n)
  right = (left + rng.integers(1, max(num_source, 2), n)) % num_source  # uniform over the other images
  return left, right


class MtlmatchMultiFashion(tfds.core.GeneratorBasedBuilder):
  """Multi-Fashion: pairs of Fashion-MNIST items overlaid on 36×36, labels ``left`` and ``right``."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS 4.9.10 locates a packaged builder's code with `importlib_resources` (installed only on Python < 3.9);
  # these builders ship no checksum or metadata files, so declare no code path, as for a builder made in Colab.
  code_path = None
  _log_download_bytes = log_generation  # generated locally: no "Downloading ... Unknown size" line
  RELEASE_NOTES = {'1.0.0': 'Pairs drawn from the same IDX split; item 1 top-left, item 2 bottom-right, max.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MtlmatchFashionMnist.MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Two Fashion-MNIST items per image (top-left, bottom-right), MultiMNIST-style.',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Tensor(shape=(MULTI_SIZE, MULTI_SIZE, 1), dtype=np.uint8, encoding='bytes'),
                'left': tfds.features.Tensor(shape=(), dtype=np.int32),
                'right': tfds.features.Tensor(shape=(), dtype=np.int32),
                'index': tfds.features.Tensor(shape=(), dtype=np.int64),
            }
        ),
        citation='S. Sabour, N. Frosst, G. Hinton. Dynamic routing between capsules. NeurIPS 2017 (MultiMNIST).',
    )

  def _split_generators(self, dl_manager):
    idx_dir = resolve_idx_dir(os.fspath(dl_manager.manual_dir))
    c = self.builder_config
    return {
        split: self._generate_examples(idx_dir, split, n)
        for split, n in (('train', c.num_train), ('test', c.num_test))
        if n > 0
    }

  def _generate_examples(self, idx_dir, split, n):
    images, items = read_split(idx_dir, split)
    left, right = multi_fashion_pairs(self.builder_config.seed, split, n, len(items))
    canvas = overlay(images[left], images[right])
    for i in range(n):
      yield i, {'image': canvas[i], 'left': items[left[i]], 'right': items[right[i]], 'index': np.int64(i)}


def prepare_multi_fashion(
    data_dir: Optional[str] = None,
    idx_dir: Optional[str] = None,
    *,
    seed: int = 0,
    num_train: int = 60000,
    num_test: int = 10000,
) -> MtlmatchMultiFashion:
  _check_sizes(seed=seed, num_train=num_train, num_test=num_test)
  if num_train < 1 or num_test < 1:
    raise ValueError(f'num_train, num_test: got {num_train}, {num_test}, expected both >= 1')
  config = MultiFashionConfig(
      name=f's{seed}_tr{num_train}_te{num_test}', seed=int(seed), num_train=int(num_train), num_test=int(num_test)
  )
  return generate_once(
      lambda: MtlmatchMultiFashion(config=config, data_dir=default_data_dir(data_dir)),
      lambda: _manual_download_config(resolve_idx_dir(idx_dir)),
  )


def multi_fashion_benchmark(
    *,
    data_dir: Optional[str] = None,
    seed: int = 0,
    idx_dir: Optional[str] = None,
    num_train: int = 60000,
    num_test: int = 10000,
    annotation: str = 'full',
    num_coannotated: Optional[int] = None,
    weights: Optional[Mapping[str, float]] = None,
) -> Benchmark:
  """Multi-Fashion with tasks ``left`` and ``right``.

  ``annotation='full'``: one train source ``both`` (the classic fully-labelled MultiMNIST setting); aux
  ``coannotated`` is its first ``num_coannotated`` images (a subset of the training data, for a like-for-like
  relatedness estimate). ``'disjoint'``: the first ``num_coannotated`` training images become aux ``coannotated``
  only; the rest is halved into ``left_only`` and ``right_only`` sources, each annotating one task. Eval ``test``
  has both labels. ``num_coannotated``: default ``min(1000, num_train // 2)``; 0 = no aux source.
  """
  if annotation not in ('full', 'disjoint'):
    raise ValueError(f"annotation: got {annotation!r}, expected 'full' or 'disjoint'")
  if num_coannotated is None:
    num_coannotated = min(1000, int(num_train) // 2)
  _check_sizes(num_coannotated=num_coannotated)
  builder = prepare_multi_fashion(data_dir, idx_dir, seed=seed, num_train=num_train, num_test=num_test)
  reader = TfdsReader(
      builder, labels_fn=lambda ex: {'left': ex['left'], 'right': ex['right']}, description='multi_fashion'
  )
  aux = {}
  if annotation == 'full':
    weights = _check_weights(weights, ('both',))
    train = (Source('both', reader, ('left', 'right'), 'train', weights.get('both', 1.0)),)
    if num_coannotated:
      if num_coannotated > num_train:
        raise ValueError(f'num_coannotated: got {num_coannotated}, expected at most num_train={num_train}')
      aux['coannotated'] = Source('coannotated', reader, ('left', 'right'), f'train[:{num_coannotated}]')
  else:
    weights = _check_weights(weights, ('left_only', 'right_only'))
    c = int(num_coannotated)
    if num_train - c < 2:
      raise ValueError(
          f'num_coannotated: got {c} of num_train={num_train}, expected at least 2 images left to split '
          'between left_only and right_only'
      )
    mid = c + (num_train - c) // 2
    train = (
        Source('left_only', reader, ('left',), f'train[{c}:{mid}]', weights.get('left_only', 1.0)),
        Source('right_only', reader, ('right',), f'train[{mid}:]', weights.get('right_only', 1.0)),
    )
    if c:
      aux['coannotated'] = Source('coannotated', reader, ('left', 'right'), f'train[:{c}]')
  return make_benchmark(
      'multi_fashion',
      multi_fashion_tasks(),
      train,
      eval_sources=(Source('test', reader, ('left', 'right'), 'test'),),
      aux_sources=aux,
      image_shape=(MULTI_SIZE, MULTI_SIZE, 1),
  )
