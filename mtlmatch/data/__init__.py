"""The data layer: sources that annotate different tasks, seeded mixing, per-host slices, padded eval, resume.

Interface used by the train loop::

    from mtlmatch import data
    bench = data.get_benchmark('synthetic_affect', data_dir=None, seed=0)   # or data.make_benchmark(...)
    batches = data.train_iterator(bench, global_batch_size=128, seed=0, start_step=step, sharding=sharding)
    for source in bench.eval_sources:
      for batch in data.eval_iterator(source, bench.tasks, global_batch_size=256, sharding=sharding): ...
    labels = data.source_labels(bench.aux_sources['coannotated'], bench.tasks)   # for estimating relatedness
    # a checkpoint needs only data.checkpoint_state(step) == {'step': step} to resume the stream exactly.

Modules: ``readers`` (where examples come from: arrays, TFDS, ArrayRecord; decoding), ``sources`` (Source,
Benchmark, validation), ``files`` (manifests of image files), ``prepare`` (a manifest written once as an ArrayRecord
TFDS dataset, read by index), ``pipeline`` (mixing schedule, train/eval iterators), ``sharding`` (hosts, devices,
global arrays), ``synthetic_affect``, ``fashion_mnist``, ``benchmarks``.
Importing this package hides every GPU from TensorFlow so that tf.data never takes accelerator memory from JAX, and
drops two TFDS warnings that every benchmark build repeats (``_quiet.TfdsNoise``).
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices (someone imported and used it first): leave it be
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.data import _quiet
from mtlmatch.data.benchmarks import BUILDERS, get_benchmark
from mtlmatch.data.files import FilesReader, files_source, read_manifest
from mtlmatch.data.pipeline import (
    MIXING,
    MixingSchedule,
    checkpoint_state,
    eval_iterator,
    mixing_probabilities,
    num_eval_batches,
    train_iterator,
)
from mtlmatch.data.sharding import prefetch_to_device, to_global
from mtlmatch.data.readers import ArrayReader, Examples, LazyImages, TfdsReader, decode_image, decode_rows, host_slice
from mtlmatch.data.sources import (
    Benchmark,
    Holdout,
    Source,
    array_source,
    default_data_dir,
    load_examples,
    make_benchmark,
    source_labels,
    tfds_source,
    with_validation,
)

_quiet.drop_tfds_noise()  # two TFDS warnings repeated at every benchmark built (see mtlmatch.data._quiet)

__all__ = [
    'ArrayReader',
    'BUILDERS',
    'Benchmark',
    'Examples',
    'FilesReader',
    'Holdout',
    'LazyImages',
    'MIXING',
    'MixingSchedule',
    'Source',
    'TfdsReader',
    'array_source',
    'checkpoint_state',
    'decode_image',
    'decode_rows',
    'default_data_dir',
    'eval_iterator',
    'files_source',
    'get_benchmark',
    'host_slice',
    'load_examples',
    'make_benchmark',
    'mixing_probabilities',
    'num_eval_batches',
    'prefetch_to_device',
    'read_manifest',
    'source_labels',
    'tfds_source',
    'to_global',
    'train_iterator',
    'with_validation',
]
