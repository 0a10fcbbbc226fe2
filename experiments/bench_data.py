"""Throughput of the training input pipeline for each builder (examples/s, median of several timed runs).

  python experiments/bench_data.py                       # all builders; Fashion-MNIST ones need Debian's files
  python experiments/bench_data.py --builders=synthetic_affect,arrays --batch_size=256 --augment

For each builder: build the benchmark (generating/caching its TFDS data in ``--data_dir``, a temporary directory
by default), draw ``--warmup`` batches, then time ``--runs`` runs of ``--steps`` batches and print the median
examples/s (host-local numpy batches, what the train loop converts to device arrays). Also prints the time to the
first batch when resuming at ``--resume_step`` (re-deriving source positions from the mixing counts). Target on
the 2-core CPU: ≥ 20,000 32×32 examples/s. The builder ``tfds_by_name`` reads the prepared Fashion-MNIST dataset
through the generic ``tfds_source`` path; ``arrays`` is random in-memory numpy data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from mtlmatch import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.data import fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.tasks import TaskSpec  # pylint: disable=g-import-not-at-top,wrong-import-position

BUILDERS = ('synthetic_affect', 'shopping', 'multi_fashion', 'arrays', 'tfds_by_name')


def make(name: str, data_dir: str) -> data.Benchmark:
  if name in ('synthetic_affect', 'shopping', 'multi_fashion'):
    return data.get_benchmark(name, data_dir=data_dir)
  if name == 'arrays':
    rng = np.random.default_rng(0)
    tasks = [TaskSpec('a', 'multiclass', 10), TaskSpec('b', 'multilabel', 8)]
    sources = [
        data.array_source(
            'a', rng.integers(0, 256, (20000, 32, 32, 1), dtype=np.uint8), {'a': rng.integers(0, 10, 20000)}
        ),
        data.array_source(
            'b', rng.integers(0, 256, (5000, 32, 32, 1), dtype=np.uint8), {'b': rng.integers(0, 2, (5000, 8))}
        ),
    ]
    return data.make_benchmark('arrays', tasks, sources)
  if name == 'tfds_by_name':
    fashion_mnist.prepare_fashion_mnist(data_dir)
    source = data.tfds_source(
        'items', 'mtlmatch_fashion_mnist', tasks=['item'], data_dir=data_dir, labels_fn=lambda ex: {'item': ex['item']}
    )
    return data.make_benchmark('tfds_by_name', [TaskSpec('item', 'multiclass', 10)], [source])
  raise ValueError(f'builder: got {name!r}, expected one of {BUILDERS}')


def bench(benchmark, args) -> tuple[float, list[float], float]:
  kwargs = dict(global_batch_size=args.batch_size, seed=0, augment=args.augment)
  iterator = data.train_iterator(benchmark, **kwargs)
  for _ in range(args.warmup):
    next(iterator)
  rates = []
  for _ in range(args.runs):
    start = time.perf_counter()
    for _ in range(args.steps):
      next(iterator)
    rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
  start = time.perf_counter()
  next(data.train_iterator(benchmark, start_step=args.resume_step, **kwargs))
  return statistics.median(rates), rates, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--builders', default=','.join(BUILDERS))
  parser.add_argument('--data_dir', default=None, help='TFDS cache (default: a fresh temporary directory)')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--resume_step', type=int, default=100000)
  parser.add_argument('--augment', action='store_true')
  args = parser.parse_args(argv)
  tfds.disable_progress_bar()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='mtlmatch_bench_')
  print(
      f'cpus={os.cpu_count()} batch_size={args.batch_size} steps={args.steps} runs={args.runs} '
      f'augment={args.augment} data_dir={data_dir}'
  )
  for name in args.builders.split(','):
    start = time.perf_counter()
    try:
      benchmark = make(name, data_dir)
    except FileNotFoundError as e:
      print(f'{name:18s} skipped: {str(e).splitlines()[0][:100]}...')
      continue
    prepare = time.perf_counter() - start
    median, rates, resume = bench(benchmark, args)
    print(
        f'{name:18s} image={benchmark.image_shape} median {median:,.0f} examples/s '
        f'(runs: {", ".join(f"{r:,.0f}" for r in rates)}); build {prepare:.1f} s; first batch at step '
        f'{args.resume_step:,}: {resume:.2f} s'
    )


if __name__ == '__main__':
  main()
