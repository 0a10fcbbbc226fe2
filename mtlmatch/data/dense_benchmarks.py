"""Dense (per-pixel) benchmarks: the generated indoor scenes (no download) and LibMTL's NYUv2 / Cityscapes layout.

Tasks follow LibMTL's names: ``segmentation`` (kind ``segmentation``: C classes, −1 = ignore), ``depth`` (kind
``depth``: metres, 0 = invalid) and ``normal`` (kind ``normals``: unit vectors, 0 = invalid), every label at the
image's resolution (the task option ``size``; docs/maths.md §11).

Label protocols (``labels``), a data option for any dense benchmark, drawn from ``seed`` only:

* ``'full'``: every training image keeps every task;
* ``'one-label'``: each training image keeps one task, balanced (a seeded permutation of the images dealt to the
  tasks in turn) — the partially-labelled setting of MTPSL (CVPR'22) and JTR (CVPR'24): one source per task, the
  sources disjoint, as this library's non-overlapping datasets are;
* ``'random-label'``: each (image, task) label kept with probability ``label_probability``, independently.

Usage::

    bench = scenes_benchmark(num_train=800, num_test=200, labels='one-label')  # rendered once into the TFDS cache
    bench = nyuv2_benchmark(root='/data/nyuv2')                  # {root}/{train,val}/{image,label,depth,normal}/{i}.npy
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from mtlmatch.data import nyuv2_layout, scenes
from mtlmatch.data.readers import TfdsReader
from mtlmatch.data.sources import Benchmark, Source, array_source, make_benchmark
from mtlmatch.tasks import TaskSpec, missing_labels

LABEL_PROTOCOLS = ('full', 'one-label', 'random-label')
# The dataset's array key of each task (scenes.generate_scenes and nyuv2_layout.read_layout agree).
TASK_KEYS = {'segmentation': 'segmentation', 'depth': 'depth', 'normal': 'normal'}
NYUV2_CLASSES = 13


def dense_tasks(num_classes: int, size: Sequence[int], class_names=None, tasks=('segmentation', 'depth', 'normal')):
  """``{name: TaskSpec}`` of the dense tasks at label resolution ``size`` (H, W)."""
  kinds = {
      'segmentation': ('segmentation', num_classes, class_names),
      'depth': ('depth', 1, None),
      'normal': ('normals', 3, None),
  }
  unknown = sorted(set(tasks) - set(kinds))
  if unknown or not tasks:
    raise ValueError(f'tasks: got {list(tasks)!r}, expected some of {list(kinds)}')
  return {t: TaskSpec(t, kinds[t][0], kinds[t][1], kinds[t][2], options={'size': tuple(size)}) for t in tasks}


def _labels(arrays: Mapping[str, np.ndarray], tasks: Mapping[str, TaskSpec]) -> dict[str, np.ndarray]:
  return {t: np.asarray(arrays[TASK_KEYS[t]]) for t in tasks}


def check_protocol(protocol: str, probability: float = 0.5) -> None:
  """A ValueError unless ``protocol`` is one of :data:`LABEL_PROTOCOLS` (and, for ``'random-label'``, the
  ``probability`` is in (0, 1])."""
  if protocol not in LABEL_PROTOCOLS:
    raise ValueError(f'labels: got {protocol!r}, expected one of {LABEL_PROTOCOLS}')
  if protocol == 'random-label' and not 0 < probability <= 1:
    raise ValueError(f'label_probability: got {probability!r}, expected a number in (0, 1]')


def label_protocol(
    images: np.ndarray,
    labels: Mapping[str, np.ndarray],
    tasks: Mapping[str, TaskSpec],
    *,
    protocol: str,
    seed: int,
    probability: float = 0.5,
    name: str = 'train',
):
  """The training sources of ``images`` and their ``labels`` {task: [N, ...]} under ``protocol`` (module docstring).

  ``'full'`` and ``'random-label'``: one source ``name`` annotating every task (random-label: each dropped label
  becomes the task's missing value, so the image contributes nothing to that task); ``'one-label'``: one source
  ``<name>_<task>`` per task with its share of the images."""
  check_protocol(protocol, probability)
  n = len(images)
  rng = np.random.default_rng([int(seed), 0x6C61626C])
  if protocol == 'full':
    return (array_source(name, images, dict(labels), tasks=tuple(tasks)),)
  if protocol == 'random-label':
    kept = {}
    for t, spec in tasks.items():
      keep = rng.random(n) < probability
      kept[t] = np.where(keep.reshape((n,) + (1,) * (labels[t].ndim - 1)), labels[t], missing_labels(spec, n))
    return (array_source(name, images, kept, tasks=tuple(tasks)),)
  if n < len(tasks):
    raise ValueError(f'one-label: got {n} training images, expected at least one per task ({len(tasks)})')
  owner = np.empty(n, np.int64)
  owner[rng.permutation(n)] = np.arange(n) % len(tasks)
  return tuple(
      array_source(f'{name}_{t}', images[owner == k], {t: labels[t][owner == k]}, tasks=(t,))
      for k, t in enumerate(tasks)
  )


def scenes_benchmark(
    *,
    data_dir: Optional[str] = None,
    seed: int = 0,
    num_train: int = 1000,
    num_test: int = 200,
    height: int = 32,
    width: int = 32,
    labels: str = 'full',
    label_probability: float = 0.5,
    tasks: Sequence[str] = ('segmentation', 'depth', 'normal'),
) -> Benchmark:
  """The generated indoor scenes (:mod:`mtlmatch.data.scenes`: 6 classes, metric depth, normals, sensor holes),
  ``num_train`` training and ``num_test`` test images at ``height`` × ``width`` from ``seed``; ``labels``: the
  training label protocol.

  Like every generated dataset here, they are rendered once into the TFDS cache ``data_dir`` (None:
  ``$MTLMATCH_DATA_DIR`` or ``~/tensorflow_datasets``; :func:`mtlmatch.data.scenes.prepare`) and read from there
  afterwards: the arrays are ``scenes.generate_scenes(seed, split, n, height, width)`` bit for bit, so a run's
  numbers are those of the in-memory arrays. The training split is read into memory whole (the protocols pick any
  images); the test split is read per host."""
  specs = dense_tasks(len(scenes.CLASSES), (height, width), scenes.CLASSES, tuple(tasks))
  check_protocol(labels, label_probability)  # before rendering, which can take minutes at large sizes
  builder = scenes.prepare(data_dir, seed=seed, num_train=num_train, num_test=num_test, height=height, width=width)
  labels_fn = lambda example: {t: example[TASK_KEYS[t]] for t in specs}
  # A reader of its own for the training split, dropped here: its cache would keep a second copy of the arrays
  # beside the label protocol's sources.
  train = TfdsReader(builder, labels_fn=labels_fn, description='scenes').read('train', 0, 1)
  sources = label_protocol(
      train.images, dict(train.labels), specs, protocol=labels, seed=seed, probability=label_probability
  )
  reader = TfdsReader(builder, labels_fn=labels_fn, description='scenes')
  tests = (Source('test', reader, tuple(specs), 'test'),)
  return make_benchmark('scenes', specs, sources, eval_sources=tests, image_shape=(int(height), int(width), 3))


def nyuv2_benchmark(
    *,
    root: Optional[str] = None,
    data_dir: Optional[str] = None,
    seed: int = 0,
    num_classes: int = NYUV2_CLASSES,
    labels: str = 'full',
    label_probability: float = 0.5,
    tasks: Sequence[str] = ('segmentation', 'depth', 'normal'),
    dataset: str = 'nyuv2',
) -> Benchmark:
  """NYUv2 (13 classes) or Cityscapes (7 or 19 classes, ``tasks=('segmentation', 'depth')``) in the preprocessed
  layout of LibMTL, MTAN and Auto-Lambda, ``{root}/{train,val}/{image,label,depth,normal}/{i}.npy``
  (:mod:`mtlmatch.data.nyuv2_layout`; any image size): ``train`` trains (under the ``labels`` protocol), ``val`` is
  the test set, as in those codes; model selection uses the validation part held out of ``train``. ``dataset``
  names it ('nyuv2' or 'cityscapes')."""
  del data_dir
  name = dataset
  if not root:
    raise ValueError(f'{name}: got root={root!r}, expected the dataset folder (--config.data.options.root=...)')
  train = nyuv2_layout.read_layout(root, 'train', num_classes=num_classes)
  test = nyuv2_layout.read_layout(root, 'val', num_classes=num_classes)
  absent = [t for t in tasks if TASK_KEYS[t] not in train or TASK_KEYS[t] not in test]
  if absent:
    raise ValueError(f'{name} at {root!r}: got no files for tasks {absent}, expected folders {absent} in train and val')
  size = train['image'].shape[1:3]
  specs = dense_tasks(num_classes, size, None, tuple(tasks))
  sources = label_protocol(
      train['image'], _labels(train, specs), specs, protocol=labels, seed=seed, probability=label_probability
  )
  tests = (array_source('val', test['image'], _labels(test, specs), tasks=tuple(specs), split='test'),)
  return make_benchmark(name, specs, sources, eval_sources=tests, image_shape=tuple(train['image'].shape[1:]))
