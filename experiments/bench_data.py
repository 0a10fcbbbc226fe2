"""Throughput of the training input pipeline for each builder (examples/s, median of several timed runs).

  python experiments/bench_data.py                       # all builders; Fashion-MNIST ones need Debian's files
  python experiments/bench_data.py --builders=synthetic_affect,arrays --batch_size=256 --augment

For each builder: build the benchmark (generating/caching its TFDS data in ``--data_dir``, a temporary directory
by default), draw ``--warmup`` batches, then time ``--runs`` runs of ``--steps`` batches and print the median
examples/s (host-local numpy batches, what the train loop converts to device arrays). Also prints the time to the
first batch when resuming at ``--resume_step`` (re-deriving source positions from the mixing counts). Target on
the 2-core CPU: ≥ 20,000 32×32 examples/s. The builder ``tfds_by_name`` reads the prepared Fashion-MNIST dataset
through the generic ``tfds_source`` path; ``arrays`` is random in-memory numpy data.

Sources read by row (files, ArrayRecord), on generated face-like JPEGs (128 × 128 RGB, written once into
``--data_dir``; 20,000 of them take ~0.2 GB on disk and ~1 GB decoded)::

  python experiments/bench_data.py --files_mode=memory,throughput --sizes=1000,20000 --data_dir=/tmp/faces

``memory``: the peak RSS of the same short run (``--steps`` batches, each kind in a fresh process) on each dataset
size, for a manifest of files, its prepared ArrayRecord copy, and the same images decoded into memory (the old way).
Goal: the two peaks of a source read by row within 15 % of each other. ``throughput``: examples/s of mtlmatch's
indexed pipeline (ArrayRecord, and files) against a plain tf.data reader of the same data as TFRecord shards
(interleave → shuffle → map(decode) → batch; no exact resume), at 112 and 224 px, with 1 and 2 threads. Goal:
(a) ≥ 0.9 × (b).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from mtlmatch import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.data import fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
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


# ----------------------------------------------------------------------------------------------------------------
# Sources read by row: memory against dataset size, throughput against a plain tf.data reader (issue: real data).


def write_face_like_files(folder: str, n: int, size: int = 128, seed: int = 0) -> str:
  """``n`` JPEGs (``size`` × ``size`` RGB, smooth random images plus noise, ~5–10 kB each, like face crops) and
  a manifest ``train.csv`` (path, expression); returns the manifest. Existing files are reused."""
  manifest = os.path.join(folder, 'train.csv')
  if os.path.exists(manifest):
    return manifest
  os.makedirs(os.path.join(folder, 'img'), exist_ok=True)
  rng = np.random.default_rng(seed)
  lines = ['path,expression']
  for start in range(0, n, 256):
    k = min(256, n - start)
    low = tf.image.resize(rng.uniform(0, 255, (k, 8, 8, 3)).astype(np.float32), (size, size), method='bicubic')
    images = np.clip(low.numpy() + rng.normal(0, 6, (k, size, size, 3)), 0, 255).astype(np.uint8)
    for j, image in enumerate(images):
      name = f'img/{start + j}.jpg'
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(tf.io.encode_jpeg(image, quality=90).numpy())
      lines.append(f'{name},{rng.integers(0, 7)}')
  with open(manifest, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return manifest


def prepared_dir(folder: str, manifest: str) -> str:
  out = os.path.join(folder, 'tfds')
  found = [os.path.join(r) for r, _, fs in os.walk(out) if 'dataset_info.json' in fs]
  if found:
    return found[0]
  return prepare_lib.prepare(manifest, out, name='faces', image_column='path', labels={'expression': 'expression'})


def write_tfrecords(folder: str, manifest: str, shards: int = 8) -> list[str]:
  """The same images and labels as TFRecord shards (serialized tf.train.Example: image bytes, label)."""
  paths = [os.path.join(folder, f'tfrecord-{k:02d}') for k in range(shards)]
  if all(os.path.exists(p) for p in paths):
    return paths
  _, rows = data.read_manifest(manifest)
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  for i, row in enumerate(rows):
    with open(os.path.join(folder, row['path']), 'rb') as f:
      image = f.read()
    feature = {
        'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        'expression': tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row['expression'])])),
    }
    writers[i % shards].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  for w in writers:
    w.close()
  return paths


def reference_pipeline(paths: list[str], size: int, batch_size: int, threads: int) -> tf.data.Dataset:
  """A plain tf.data reader of the same data: interleave shards → shuffle → map(parse, decode, resize) → batch →
  normalise → prefetch. No exact resume (its shuffle buffer and interleave position are not a function of the step)."""
  spec = {'image': tf.io.FixedLenFeature([], tf.string), 'expression': tf.io.FixedLenFeature([], tf.int64)}

  def decode(record):
    example = tf.io.parse_single_example(record, spec)
    return data.decode_image(example['image'], (size, size), 3), tf.cast(example['expression'], tf.int32)

  dataset = tf.data.Dataset.from_tensor_slices(paths).repeat()
  dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=len(paths), num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.shuffle(4096, seed=0).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32) / 127.5 - 1.0, y), num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return dataset.prefetch(2).with_options(options)


def source_of(kind: str, folder: str, manifest: str, size: int) -> data.Source:
  if kind == 'files':
    return data.files_source(
        'faces', manifest, image_column='path', labels={'expression': 'expression'}, image_size=(size, size)
    )
  if kind == 'arrayrecord':
    return data.tfds_source('faces', prepared_dir(folder, manifest), tasks=['expression'], image_size=(size, size))
  if kind == 'memory':  # every image decoded into one in-memory array: what sources were before
    reader = data.files_source(
        'faces', manifest, image_column='path', labels={'expression': 'expression'}, image_size=(size, size)
    ).reader
    examples = reader.read('train', 0, 1)
    return data.array_source('faces', data.decode_rows(examples.images), {'expression': examples.labels['expression']})
  raise ValueError(f'kind: got {kind!r}, expected files, arrayrecord or memory')


def rate(iterator, batch_size: int, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def memory_child(args) -> None:
  """One short run in this (fresh) process; prints its peak RSS (MiB) as JSON."""
  source = source_of(args.kind, os.path.dirname(args.manifest), args.manifest, args.size)
  benchmark = data.make_benchmark('faces', [TaskSpec('expression', 'multiclass', 7)], [source])
  iterator = data.train_iterator(benchmark, global_batch_size=args.batch_size, seed=0, augment=True)
  for _ in range(args.steps):
    next(iterator)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({'kind': args.kind, 'manifest': args.manifest, 'peak_rss_mib': peak}))


def files_main(args) -> None:
  root = args.data_dir or tempfile.mkdtemp(prefix='mtlmatch_bench_files_')
  print(f'cpus={os.cpu_count()} data={root} batch_size={args.batch_size}')
  sizes = [int(n) for n in args.sizes.split(',')]
  folders = {}
  for n in sizes:
    folders[n] = os.path.join(root, f'n{n}')
    start = time.perf_counter()
    manifest = write_face_like_files(folders[n], n)
    prepared_dir(folders[n], manifest)
    write_tfrecords(folders[n], manifest)
    print(f'{n:,} images ready in {time.perf_counter() - start:.0f} s ({du(folders[n]) / 2**20:,.0f} MiB on disk)')
  if 'memory' in args.files_mode:
    print(
        '\nPeak RSS of the same short run (fresh process; {} batches of {} at 112 px, augment):'.format(
            args.steps, args.batch_size
        )
    )
    print('| source | ' + ' | '.join(f'{n:,} images' for n in sizes) + ' | ratio |')
    print('|---|' + '---|' * (len(sizes) + 1))
    for kind in ('files', 'arrayrecord', 'memory'):
      peaks = []
      for n in sizes:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    '--memory_child',
                    '--kind',
                    kind,
                    '--manifest',
                    os.path.join(folders[n], 'train.csv'),
                    '--size',
                    '112',
                    '--steps',
                    str(args.steps),
                    '--batch_size',
                    str(args.batch_size),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        peaks.append(json.loads(out)['peak_rss_mib'])
      print(f'| {kind} | ' + ' | '.join(f'{p:,.0f} MiB' for p in peaks) + f' | {peaks[-1] / peaks[0]:.2f} |')
  if 'throughput' in args.files_mode:
    n = sizes[-1]
    manifest = os.path.join(folders[n], 'train.csv')
    records = write_tfrecords(folders[n], manifest)
    print(f'\nThroughput on {n:,} images (examples/s, {args.steps} batches of {args.batch_size} after {args.warmup}):')
    print('| size | threads | mtlmatch ArrayRecord (a) | mtlmatch files | tf.data TFRecord (b) | (a)/(b) |')
    print('|---|---|---|---|---|---|')
    tasks = [TaskSpec('expression', 'multiclass', 7)]
    for size in [int(x) for x in args.pixels.split(',')]:
      for threads in [int(x) for x in args.threads.split(',')]:
        iterators = {
            kind: data.train_iterator(
                data.make_benchmark('faces', tasks, [source_of(kind, folders[n], manifest, size)]),
                global_batch_size=args.batch_size,
                seed=0,
                threads=threads,
            )
            for kind in ('arrayrecord', 'files')
        }
        iterators['ref'] = reference_pipeline(records, size, args.batch_size, threads).as_numpy_iterator()
        for it in iterators.values():
          rate(it, args.batch_size, 0, args.warmup)
        # Round robin over the pipelines, median of --runs: a busy neighbour on the machine slows all three alike.
        runs = {kind: [] for kind in iterators}
        for _ in range(args.runs):
          for kind, it in iterators.items():
            runs[kind].append(rate(it, args.batch_size, args.steps, 0))
        rates = {kind: statistics.median(r) for kind, r in runs.items()}
        print(
            f"| {size} | {threads} | {rates['arrayrecord']:,.0f} | {rates['files']:,.0f} | {rates['ref']:,.0f} | "
            f"{rates['arrayrecord'] / rates['ref']:.2f} |"
        )


def du(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


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
  parser.add_argument('--files_mode', default='', help="'memory', 'throughput' or both (comma): sources read by row")
  parser.add_argument('--sizes', default='1000,20000', help='dataset sizes (images) for --files_mode')
  parser.add_argument('--pixels', default='112,224', help='image sizes of --files_mode=throughput')
  parser.add_argument('--threads', default='1,2', help='tf.data thread counts of --files_mode=throughput')
  parser.add_argument('--memory_child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--kind', default='files', help=argparse.SUPPRESS)
  parser.add_argument('--manifest', default='', help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, default=112, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  tfds.disable_progress_bar()
  if args.memory_child:
    return memory_child(args)
  if args.files_mode:
    return files_main(args)
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
