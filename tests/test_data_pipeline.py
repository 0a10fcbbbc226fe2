"""Training/eval pipelines on in-memory sources whose images encode their own identity.

Each image carries (source id, example index) in its first pixels, so the tests can tell exactly which example of
which source landed in each slot and compare against independent numpy references.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mtlmatch import data
from mtlmatch.tasks import TaskSpec

TASKS = [TaskSpec('a', 'multiclass', 3), TaskSpec('b', 'multilabel', 4), TaskSpec('c', 'multiclass', 2)]


def coded_images(source_id: int, n: int, shape=(4, 4, 1)) -> np.ndarray:
  """uint8 images whose pixels 0, 1, 2 hold (source id, index // 256, index % 256)."""
  images = np.full((n,) + shape, 7, np.uint8)
  flat = images.reshape(n, -1)
  flat[:, 0] = source_id
  flat[:, 1], flat[:, 2] = np.divmod(np.arange(n), 256)
  return images


def decode(image_batch) -> tuple[np.ndarray, np.ndarray]:
  """(source id, index) of each image of a normalised batch (x/127.5 − 1)."""
  pixels = np.rint((np.asarray(image_batch).reshape(len(image_batch), -1)[:, :3] + 1.0) * 127.5).astype(np.int64)
  return pixels[:, 0], pixels[:, 1] * 256 + pixels[:, 2]


def make_sources(sizes=(50, 300, 1000), weights=(1.0, 2.0, 5.0), seed=0):
  """Source 0 annotates 'a'; source 1 'b'; source 2 'a' and 'c'. Returns (sources, labels by source)."""
  rng = np.random.default_rng(seed)
  annotated = [('a',), ('b',), ('a', 'c')]
  sources, labels = [], []
  for s, (n, w, tasks) in enumerate(zip(sizes, weights, annotated, strict=True)):
    y = {'a': rng.integers(0, 3, n), 'b': rng.integers(0, 2, (n, 4)), 'c': rng.integers(0, 2, n)}
    y = {t: y[t] for t in tasks}
    labels.append(y)
    sources.append(data.array_source(f'src{s}', coded_images(s, n), y, weight=w))
  return sources, labels


def toy_benchmark(**kwargs):
  sources, labels = make_sources(**kwargs)
  test = data.array_source('test', coded_images(9, 37), {'a': np.arange(37) % 3, 'c': np.arange(37) % 2})
  return data.make_benchmark('toy', TASKS, sources, eval_sources=[test]), labels


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    np.testing.assert_array_equal(np.asarray(x['image']), np.asarray(y['image']))
    np.testing.assert_array_equal(np.asarray(x['source']), np.asarray(y['source']))
    for t in x['labels']:
      np.testing.assert_array_equal(np.asarray(x['labels'][t]), np.asarray(y['labels'][t]))


def test_mixing_proportions_and_missing_labels():
  bench, labels = toy_benchmark()
  batches = take(data.train_iterator(bench, global_batch_size=500, seed=3), 100)  # 50,000 examples
  b0 = batches[0]
  assert b0['image'].dtype == np.float32 and b0['image'].shape == (500, 4, 4, 1)
  assert b0['source'].dtype == np.int32 and b0['source'].shape == (500,)
  assert {t: (v.dtype, v.shape) for t, v in b0['labels'].items()} == {
      'a': (np.int32, (500,)),
      'b': (np.int32, (500, 4)),
      'c': (np.int32, (500,)),
  }
  source = np.concatenate([b['source'] for b in batches])
  np.testing.assert_allclose(np.bincount(source, minlength=3) / source.size, np.array([1, 2, 5]) / 8, atol=0.02)
  for b in batches:
    sid, idx = decode(b['image'])
    np.testing.assert_array_equal(sid, b['source'])  # 'source' names the source the image came from
    for s, annotated in enumerate(labels):
      rows = sid == s
      for task in 'abc':
        got = b['labels'][task][rows]
        if task in annotated:
          np.testing.assert_array_equal(got, annotated[task][idx[rows]])
        else:
          assert np.all(got == -1), (s, task)


def test_equal_share_per_task():
  bench, _ = toy_benchmark()
  # a is annotated by sources 0 and 2, b by 1, c by 2: p ∝ (1/6, 1/3, 1/6 + 1/3).
  expected = np.array([1 / 6, 1 / 3, 1 / 2])
  np.testing.assert_allclose(
      data.mixing_probabilities(bench.train_sources, bench.tasks, 'equal_per_task'), expected, rtol=1e-12
  )
  batches = take(data.train_iterator(bench, global_batch_size=500, seed=0, mixing='equal_per_task'), 100)
  source = np.concatenate([b['source'] for b in batches])
  np.testing.assert_allclose(np.bincount(source, minlength=3) / source.size, expected, atol=0.02)


def test_each_source_read_once_per_epoch():
  sizes = (10, 30, 50)
  bench, _ = toy_benchmark(sizes=sizes)
  seen = [np.zeros(n, np.int64) for n in sizes]
  for b in take(data.train_iterator(bench, global_batch_size=16, seed=1), 150):
    sid, idx = decode(b['image'])
    for s in range(3):
      np.add.at(seen[s], idx[sid == s], 1)
      # After every step each example has been read k or k+1 times: epochs are permutations (no repeats before
      # every example has been seen once more).
      assert seen[s].max() - seen[s].min() <= 1, (s, seen[s])
  assert all(c.min() >= 3 for c in seen)


def test_same_seed_same_batches_and_resume():
  bench, _ = toy_benchmark(sizes=(7, 20, 33))
  kwargs = dict(global_batch_size=24, seed=5, augment=True)
  run = take(data.train_iterator(bench, **kwargs), 80)
  assert_batches_equal(run, take(data.train_iterator(bench, **kwargs), 80))
  other = take(data.train_iterator(bench, **{**kwargs, 'seed': 6}), 3)
  assert not np.array_equal(other[0]['source'], run[0]['source'])
  for k in (1, 63, 64, 70):  # inside the first chunk of 64 steps, at and past its boundary
    resumed = take(data.train_iterator(bench, start_step=k, **kwargs), 80 - k)
    assert_batches_equal(resumed, run[k:])
  assert data.checkpoint_state(70) == {'step': 70}


def test_augment_flips_and_crops_deterministically():
  images = np.arange(8 * 8, dtype=np.uint8).reshape(1, 8, 8, 1).repeat(64, 0) + 100
  src = data.array_source('s', images, {'a': np.zeros(64, np.int64)})
  bench = data.make_benchmark('aug', TASKS, [src])
  batch = next(data.train_iterator(bench, global_batch_size=64, seed=0, augment=True))
  x = np.rint((batch['image'][..., 0] + 1) * 127.5).astype(np.int64)
  padded = np.pad(images[0, ..., 0].astype(np.int64), 1)  # pad = max(1, 8 // 8) = 1, black
  candidates = [
      np.fliplr(padded)[dy : dy + 8, dx : dx + 8] if flip else padded[dy : dy + 8, dx : dx + 8]
      for flip in (0, 1)
      for dy in range(3)
      for dx in range(3)
  ]
  seen = set()
  for img in x:  # each augmented image is one of the 18 flip/crop variants
    matches = [j for j, c in enumerate(candidates) if np.array_equal(img, c)]
    assert matches, img
    seen.update(matches)
  assert len(seen) > 6  # and the variants do vary across examples


def test_two_hosts_read_disjoint_slices_covering_the_source():
  """Eval (and fingerprint) slices: even, disjoint, covering."""
  bench, _ = toy_benchmark(sizes=(11, 30, 51))
  for source, n in zip(bench.train_sources, (11, 30, 51)):
    h0, h1 = (
        set(data.load_examples(source, bench.tasks, process_index=h, process_count=2).positions.tolist())
        for h in (0, 1)
    )
    assert not h0 & h1 and h0 | h1 == set(range(n))
    assert {len(h0), len(h1)} == {n // 2, n - n // 2}


@pytest.mark.parametrize('hosts', [2, 4])
def test_hosts_split_the_one_process_batch(hosts):
  """Training: host h makes slots [h·b, (h+1)·b) of the global batch, so the hosts' batches, concatenated in host
  order, are the one-process batch at every step (examples, labels and augmentations), whatever the number of
  hosts."""
  bench, _ = toy_benchmark(sizes=(11, 30, 51))
  kwargs = dict(global_batch_size=40, seed=3, start_step=5, augment=True)
  one = take(data.train_iterator(bench, **kwargs), 12)
  parts = [take(data.train_iterator(bench, **kwargs, process_index=h, process_count=hosts), 12) for h in range(hosts)]
  assert parts[0][0]['image'].shape[0] == 40 // hosts
  for t, batch in enumerate(one):
    joined = jax.tree.map(lambda *x: np.concatenate(x), *[p[t] for p in parts])
    assert_batches_equal([joined], [batch])


def eval_ids(batches):
  counts = collections.Counter()
  for b in batches:
    mask = np.asarray(b['mask'])
    sid, idx = decode(b['image'])
    for i in idx[mask == 1]:
      counts[int(i)] += 1
    assert np.all(np.asarray(b['labels']['a'])[mask == 0] == -1)
    assert np.all(np.asarray(b['labels']['b']) == -1)  # the test source does not annotate 'b'
    real = mask == 1
    np.testing.assert_array_equal(np.asarray(b['labels']['a'])[real], idx[real] % 3)
  return counts


def test_eval_covers_every_example_once_on_1_and_8_devices():
  bench, _ = toy_benchmark()
  test = bench.eval_sources[0]
  counts = eval_ids(data.eval_iterator(test, bench.tasks, global_batch_size=16))
  assert counts == {i: 1 for i in range(37)}
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batches = list(data.eval_iterator(test, bench.tasks, global_batch_size=16, sharding=sharding))
  assert len(batches) == 3
  assert isinstance(batches[0]['image'], jax.Array) and batches[0]['image'].shape == (16, 4, 4, 1)
  assert batches[0]['mask'].sharding.is_equivalent_to(sharding, 1)
  assert eval_ids(batches) == {i: 1 for i in range(37)}
  # Two simulated hosts: each yields the same number of batches; together they cover the set once.
  host_batches = [
      list(data.eval_iterator(test, bench.tasks, global_batch_size=8, process_index=h, process_count=2)) for h in (0, 1)
  ]
  assert len(host_batches[0]) == len(host_batches[1]) == data.num_eval_batches(37, 8, 2) == 5
  assert eval_ids(host_batches[0] + host_batches[1]) == {i: 1 for i in range(37)}


def test_sharded_train_batches_are_global_arrays():
  bench, _ = toy_benchmark()
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  sharded = take(data.train_iterator(bench, global_batch_size=32, seed=0, sharding=sharding), 3)
  local = take(data.train_iterator(bench, global_batch_size=32, seed=0), 3)
  assert isinstance(sharded[0]['labels']['b'], jax.Array) and sharded[0]['labels']['b'].shape == (32, 4)
  assert sharded[0]['image'].sharding.is_equivalent_to(sharding, 4)
  assert_batches_equal(sharded, local)
  with pytest.raises(ValueError, match='global_batch_size: got 20, expected a multiple of the 8 devices'):
    data.train_iterator(bench, global_batch_size=20, seed=0, sharding=sharding)


def test_source_labels_fill_missing_tasks():
  bench, labels = toy_benchmark()
  got = data.source_labels(bench.train_sources[2], bench.tasks)
  np.testing.assert_array_equal(got['a'], labels[2]['a'])
  np.testing.assert_array_equal(got['c'], labels[2]['c'])
  assert got['b'].shape == (1000, 4) and np.all(got['b'] == -1)


# ------------------------------------------------------------------------------------------------------------------
# Validation: each problem is one clear ValueError before training starts.


def test_unknown_task_names():
  src = data.array_source('s', coded_images(0, 5), {'z': np.zeros(5, np.int64)})
  with pytest.raises(ValueError, match=r"Source 's' tasks: got unknown task names \['z'\]"):
    data.make_benchmark('bad', TASKS, [src])


def test_source_without_tasks():
  with pytest.raises(ValueError, match='expected at least one annotated task'):
    data.array_source('s', coded_images(0, 5), {})


def test_empty_source():
  with pytest.raises(ValueError, match="array_source\\('s'\\) images: got 0 examples"):
    data.array_source('s', np.zeros((0, 4, 4, 1), np.uint8), {'a': np.zeros(0, np.int64)})
  reader = data.ArrayReader({'train': (np.zeros((0, 4, 4, 1), np.uint8), {'a': np.zeros(0, np.int64)})})
  bench = data.make_benchmark('bad', TASKS, [data.Source('empty', reader, ('a',))])
  with pytest.raises(ValueError, match="Source 'empty': got 0 examples in split 'train'"):
    data.train_iterator(bench, global_batch_size=4, seed=0)


@pytest.mark.parametrize('weight', [0.0, -1.0, float('nan'), float('inf')])
def test_bad_weights(weight):
  with pytest.raises(ValueError, match=r"Source\('s'\).weight: got .*expected a finite number > 0"):
    data.array_source('s', coded_images(0, 5), {'a': np.zeros(5, np.int64)}, weight=weight)


def test_labels_out_of_range():
  src = data.array_source('s', coded_images(0, 5), {'a': np.array([0, 1, 2, 3, -1])})
  bench = data.make_benchmark('bad', TASKS, [src])
  with pytest.raises(ValueError, match="labels of task 'a' in source 's': got value 3"):
    data.train_iterator(bench, global_batch_size=4, seed=0)
  bad_multilabel = data.array_source('m', coded_images(0, 5), {'b': np.full((5, 4), 2)})
  with pytest.raises(ValueError, match="labels of task 'b' in source 'm': got value 2"):
    data.source_labels(bad_multilabel, {t.name: t for t in TASKS})


def test_inconsistent_image_shapes():
  a = data.array_source('a', coded_images(0, 5), {'a': np.zeros(5, np.int64)})
  b = data.array_source('b', coded_images(1, 5, shape=(5, 4, 1)), {'c': np.zeros(5, np.int64)})
  with pytest.raises(ValueError, match=r"Source 'b' images: got shape \(5, 4, 1\), expected \(4, 4, 1\)"):
    data.make_benchmark('bad', TASKS, [a, b])


def test_bad_batch_and_mixing_arguments():
  bench, _ = toy_benchmark()
  with pytest.raises(ValueError, match='global_batch_size: got 9, expected a multiple of process_count=2'):
    data.train_iterator(bench, global_batch_size=9, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="mixing: got 'uniform'"):
    data.train_iterator(bench, global_batch_size=8, seed=0, mixing='uniform')
  with pytest.raises(ValueError, match='process_index: got 2'):
    data.train_iterator(bench, global_batch_size=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="augment: got 'rotate'"):
    data.train_iterator(bench, global_batch_size=8, seed=0, augment='rotate')
