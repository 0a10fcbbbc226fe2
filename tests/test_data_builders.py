"""Dataset builders: synthetic affect (prior statistics, caching), the generated scenes' cache, Fashion-MNIST from IDX
fixtures, Multi-Fashion, the generic TFDS path, and the registry. Every dataset is generated into a tmp data_dir;
nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtlmatch import data
from mtlmatch.data import dense_benchmarks, fingerprint, scenes
from mtlmatch.data import fashion_mnist as fm
from mtlmatch.data import synthetic_affect as sa
from mtlmatch.priors import load_prior
from mtlmatch.tasks import TaskSpec

# ---------------------------------------------------------------------------------------------------------------
# Synthetic affect.


def test_softened_prior_is_an_affine_map_of_the_expert_table():
  r = load_prior('expressions_to_aus').relatedness
  s = sa.softened_prior()
  assert s.shape == (7, 17) and s.dtype == np.float32
  np.testing.assert_allclose(s[r == 1], 0.9, rtol=1e-6)
  np.testing.assert_allclose(s[r == 0], 0.03, rtol=1e-6)
  happy, au6 = 1, list(load_prior('expressions_to_aus').task_b.class_names).index('AU6')
  np.testing.assert_allclose(s[happy, au6], 0.03 + 0.87 * 0.51, rtol=1e-6)
  with pytest.raises(ValueError, match='expected 0 <= low < high <= 1'):
    sa.softened_prior(high=0.5, low=0.6)


def test_empirical_au_rates_match_the_softened_prior():
  table = sa.softened_prior()
  labels = sa.generate_split(11, 'expressions', 70000, render=False)
  e, aus = labels['expression'], labels['aus']
  counts = np.bincount(e, minlength=7)
  assert counts.min() > 9000  # expressions are uniform
  empirical = np.stack([aus[e == i].mean(0) for i in range(7)])
  assert np.abs(empirical - table).max() < 0.03
  # The rendered split draws the same labels (labels come first from the same generator).
  small = sa.generate_split(11, 'aus', 300)
  small_labels = sa.generate_split(11, 'aus', 300, render=False)
  np.testing.assert_array_equal(small['aus'], small_labels['aus'])
  assert small['image'].shape == (300, 32, 32, 1) and small['image'].dtype == np.uint8
  np.testing.assert_array_equal(small['image'], sa.generate_split(11, 'aus', 300)['image'])  # deterministic
  assert not np.array_equal(small['image'], sa.generate_split(12, 'aus', 300)['image'])


def test_au_templates_show_in_the_pixels():
  # Least-squares regression of the pixels on the AU indicators recovers each AU's template, blurred by the random
  # ±2 px shift of the face and scaled by 255 · amplitude · E[intensity].
  n = 6000
  d = sa.generate_split(0, 'test', n)
  x = d['image'][..., 0].astype(np.float64).reshape(n, -1)
  design = np.concatenate([np.ones((n, 1)), d['aus']], axis=1)
  coef = np.linalg.lstsq(design, x, rcond=None)[0][1:]  # [17, 1024]
  shifts = range(-sa.MAX_SHIFT, sa.MAX_SHIFT + 1)
  blurred = np.mean([sa.au_templates(dy, dx) for dy in shifts for dx in shifts], axis=0).reshape(17, -1)
  expected = 255 * sa.AU_AMPLITUDE * np.mean(sa.INTENSITY_RANGE) * blurred
  for k in range(17):
    assert np.corrcoef(coef[k], expected[k])[0, 1] > 0.5, k  # over all 1024 pixels, most of them pure noise
    scale = coef[k] @ expected[k] / (expected[k] @ expected[k])
    assert 0.7 < scale < 1.3, (k, scale)


def test_synthetic_affect_benchmark_via_tfds(tmp_path):
  options = dict(num_expressions=200, num_aus=120, num_test=64, num_coannotated=40, coannotated_subsets=(10,))
  bench = data.get_benchmark('synthetic_affect', data_dir=str(tmp_path), seed=3, **options)
  assert list(bench.tasks) == ['expression', 'aus'] and bench.image_shape == (32, 32, 1)
  assert [(s.name, s.tasks, s.num_examples()) for s in bench.train_sources] == [
      ('expressions', ('expression',), 200),
      ('aus', ('aus',), 120),
  ]
  assert [(s.name, s.num_examples()) for s in bench.eval_sources] == [('test', 64)]
  assert sorted(bench.aux_sources) == ['coannotated', 'coannotated_10']
  # The TFDS copy holds the generator's output (TFDS reorders records; match them by content).
  ref = sa.generate_split(3, 'expressions', 200)
  ex = data.load_examples(bench.train_sources[0], bench.tasks)
  order = {img.tobytes(): i for i, img in enumerate(ref['image'])}
  idx = np.array([order[img.tobytes()] for img in ex.images])
  np.testing.assert_array_equal(np.sort(idx), np.arange(200))
  np.testing.assert_array_equal(ex.labels['expression'], ref['expression'][idx])
  assert np.all(ex.labels['aus'] == -1)  # the expressions source does not annotate AUs
  co = data.source_labels(bench.aux_sources['coannotated'], bench.tasks)
  co10 = data.source_labels(bench.aux_sources['coannotated_10'], bench.tasks)
  assert co['aus'].shape == (40, 17) and np.all(co['aus'] >= 0) and np.all(co['expression'] >= 0)
  np.testing.assert_array_equal(co10['aus'], co['aus'][:10])  # nested subset
  # Cached: a second call generates nothing new and gives the same data.
  again = data.get_benchmark('synthetic_affect', data_dir=str(tmp_path), seed=3, **options)
  np.testing.assert_array_equal(data.load_examples(again.train_sources[0], again.tasks).images, ex.images)
  batch = next(data.train_iterator(bench, global_batch_size=32, seed=0))
  assert batch['image'].shape == (32, 32, 32, 1)
  # The smoke options of configs/affect.py: no default subset larger than the co-annotated split.
  smoke = data.get_benchmark(
      'synthetic_affect', data_dir=str(tmp_path), num_expressions=64, num_aus=32, num_test=16, num_coannotated=24
  )
  assert sorted(smoke.aux_sources) == ['coannotated']
  with pytest.raises(ValueError, match=r"options of benchmark 'synthetic_affect': got unknown \['num_faces'\]"):
    data.get_benchmark('synthetic_affect', data_dir=str(tmp_path), num_faces=3)
  with pytest.raises(ValueError, match="benchmark name: got 'celeba'"):
    data.get_benchmark('celeba', data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Generated scenes (the TFDS cache of mtlmatch.data.scenes).

SCENES = dict(seed=2, num_train=5, num_test=3, height=16, width=16)
SCENE_KEYS = ('image', 'segmentation', 'depth', 'normal')


def test_scenes_cache_holds_generate_scenes_bit_for_bit_rendered_in_chunks(tmp_path, monkeypatch):
  sizes, render = [], scenes.render

  def counted(params, height, width):
    sizes.append(len(params['room']))
    return render(params, height, width)

  monkeypatch.setattr(scenes, 'render', counted)
  monkeypatch.setattr(scenes, '_CHUNK_RAYS', 2 * 16 * 16)  # chunks of 2 images, so records cross chunk boundaries
  builder = scenes.prepare(str(tmp_path), **SCENES)
  assert sizes == [2, 2, 1, 2, 1]  # train 5, test 3: never more than one chunk rendered at a time
  assert builder.info.full_name == 'mtlmatch_scenes/s2_tr5_te3_16x16/1.0.0'
  for split, n in (('train', 5), ('test', 3)):
    ref = scenes.generate_scenes(2, split, n, 16, 16)
    records = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    assert len(records) == n
    for key in SCENE_KEYS:
      stored = np.stack([r[key] for r in records])
      assert stored.dtype == ref[key].dtype and stored.shape == ref[key].shape, key
      assert stored.tobytes() == ref[key].tobytes(), (split, key)


def test_scenes_benchmark_reads_the_cache_once_rendered_with_the_in_memory_arrays(tmp_path, monkeypatch):
  options = dict(SCENES, labels='one-label')
  bench = data.get_benchmark('scenes', data_dir=str(tmp_path), **options)
  # The same data as sources built from generate_scenes in memory (the benchmark before the cache): equal
  # fingerprints, so a run's numbers and its workdir's resume check are unchanged.
  specs = bench.tasks
  train, test = (scenes.generate_scenes(2, split, n, 16, 16) for split, n in (('train', 5), ('test', 3)))
  in_memory = data.make_benchmark(
      'scenes',
      specs,
      dense_benchmarks.label_protocol(
          train['image'], {t: train[t] for t in specs}, specs, protocol='one-label', seed=2
      ),
      eval_sources=(data.array_source('test', test['image'], {t: test[t] for t in specs}, split='test'),),
      image_shape=(16, 16, 3),
  )
  assert fingerprint.benchmark_fingerprint(bench) == fingerprint.benchmark_fingerprint(in_memory)

  # Opened again: read from the cache, nothing rendered (a render would raise).
  def refuse(*args, **kwargs):
    raise AssertionError('rendered again')

  monkeypatch.setattr(scenes, 'render', refuse)
  again = data.get_benchmark('scenes', data_dir=str(tmp_path), **options)
  for a, b in zip(again.train_sources + again.eval_sources, bench.train_sources + bench.eval_sources):
    x, y = data.load_examples(a, specs), data.load_examples(b, specs)
    assert x.images.tobytes() == y.images.tobytes() and all(
        x.labels[t].tobytes() == y.labels[t].tobytes() for t in specs
    )
  with pytest.raises(ValueError, match=r"^labels: got 'half', expected one of"):  # refused before any rendering
    data.get_benchmark('scenes', data_dir=str(tmp_path), **dict(options, labels='half', seed=9))
  with pytest.raises(ValueError, match=r'^num_test: got 0, expected an int >= 1'):
    data.get_benchmark('scenes', data_dir=str(tmp_path), **dict(options, num_test=0))
  assert os.listdir(tmp_path / 'mtlmatch_scenes') == ['s2_tr5_te3_16x16']
  with pytest.raises(AssertionError, match='rendered again'):  # another size is another dataset: rendered
    data.get_benchmark('scenes', data_dir=str(tmp_path), **dict(options, width=24))


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from an IDX fixture.

GROUP = {
    0: 'tops',
    1: 'bottoms',
    2: 'tops',
    3: 'dresses',
    4: 'tops',
    5: 'footwear',
    6: 'tops',
    7: 'footwear',
    8: 'bags',
    9: 'footwear',
}
ATTRS = {  # item -> attribute names that hold (written independently of fashion_mnist.ITEM_ATTRIBUTES)
    0: {'upper_body', 'has_sleeves', 'worn'},
    1: {'lower_body', 'worn'},
    2: {'upper_body', 'has_sleeves', 'long_sleeves', 'worn'},
    3: {'upper_body', 'lower_body', 'worn'},
    4: {'upper_body', 'has_sleeves', 'long_sleeves', 'worn'},
    5: {'footwear', 'worn'},
    6: {'upper_body', 'has_sleeves', 'long_sleeves', 'worn'},
    7: {'footwear', 'worn'},
    8: set(),
    9: {'footwear', 'worn'},
}


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}i', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def fixture_split(n, offset):
  """Images whose pixel (0, 0) / (0, 1) hold the index; labels cycling through the 10 items."""
  images = np.zeros((n, 28, 28), np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.divmod(np.arange(n), 256)
  images[:, 10:18, 10:18] = 200  # something bright in the middle
  labels = (np.arange(n) * 7 + offset) % 10
  return images, labels


@pytest.fixture
def idx_dir(tmp_path):
  d = tmp_path / 'idx'
  d.mkdir()
  for split, n, offset in (('train', 40, 0), ('t10k', 12, 3)):
    images, labels = fixture_split(n, offset)
    write_idx(d / f'{split}-images-idx3-ubyte.gz', images)
    write_idx(d / f'{split}-labels-idx1-ubyte.gz', labels)
  return str(d)


def decode_index(images):
  return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 1, 0]


def test_read_idx_round_trip(idx_dir):
  images, labels = fm.read_split(idx_dir, 'train')
  ref_images, ref_labels = fixture_split(40, 0)
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)


def test_shopping_derived_labels_and_splits(idx_dir, tmp_path):
  bench = data.get_benchmark(
      'shopping', data_dir=str(tmp_path / 'tfds'), idx_dir=idx_dir, num_item=6, num_group=25, num_coannotated=5
  )
  assert list(bench.tasks) == ['item', 'group', 'attributes'] and bench.image_shape == (28, 28, 1)
  assert bench.tasks['attributes'].kind == 'multilabel'
  groups = list(bench.tasks['group'].class_names)
  attrs = list(bench.tasks['attributes'].class_names)
  _, train_items = fixture_split(40, 0)
  _, test_items = fixture_split(12, 3)
  sources = {s.name: s for s in bench.train_sources + bench.eval_sources + tuple(bench.aux_sources.values())}
  assert sorted(sources) == ['coannotated', 'group_attributes', 'item', 'test']
  annotated = {
      'item': {'item'},
      'group_attributes': {'group', 'attributes'},
      'coannotated': {'item', 'group', 'attributes'},
      'test': {'item', 'group', 'attributes'},
  }
  indices = {}
  for name, source in sources.items():
    ex = data.load_examples(source, bench.tasks)
    idx = decode_index(ex.images)
    indices[name] = set(idx.tolist())
    items = (test_items if name == 'test' else train_items)[idx]
    for task in ('item', 'group', 'attributes'):
      if task not in annotated[name]:
        assert np.all(ex.labels[task] == -1), (name, task)
    if 'item' in annotated[name]:
      np.testing.assert_array_equal(ex.labels['item'], items)
    if 'group' in annotated[name]:
      np.testing.assert_array_equal(ex.labels['group'], [groups.index(GROUP[i]) for i in items])
      expected = np.array([[a in ATTRS[i] for a in attrs] for i in items], np.int32)
      np.testing.assert_array_equal(ex.labels['attributes'], expected)
  assert [len(indices[n]) for n in ('item', 'group_attributes', 'coannotated', 'test')] == [6, 25, 5, 12]
  train_sets = [indices[n] for n in ('item', 'group_attributes', 'coannotated')]
  assert sum(len(s) for s in train_sets) == len(set().union(*train_sets))  # disjoint slices of train
  assert indices['test'] == set(range(12))
  # Two hosts on a sliced TFDS split (train[6:31]): tfds.even_splits agrees with host_slice; disjoint and covering.
  halves = [
      data.load_examples(sources['group_attributes'], bench.tasks, process_index=h, process_count=2) for h in (0, 1)
  ]
  assert [len(h) for h in halves] == [13, 12]
  assert set(decode_index(halves[0].images)) | set(decode_index(halves[1].images)) == indices['group_attributes']
  with pytest.raises(ValueError, match='expected at most the 40 training images'):
    data.get_benchmark('shopping', data_dir=str(tmp_path / 'tfds'), idx_dir=idx_dir, num_item=20, num_group=25)


def test_missing_idx_files_say_how_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data.get_benchmark('shopping', data_dir=str(tmp_path / 'tfds'), idx_dir=str(tmp_path))
  message = str(err.value)
  assert 'apt-get install dataset-fashion-mnist' in message and "'fashion_mnist'" in message
  assert 'train-images-idx3-ubyte.gz' in message


def test_multi_fashion_overlays_two_items(idx_dir, tmp_path):
  bench = data.get_benchmark(
      'multi_fashion',
      data_dir=str(tmp_path / 'tfds'),
      idx_dir=idx_dir,
      seed=1,
      num_train=30,
      num_test=8,
      annotation='disjoint',
      num_coannotated=6,
  )
  assert bench.image_shape == (36, 36, 1) and list(bench.tasks) == ['left', 'right']
  assert [(s.name, s.tasks, s.num_examples()) for s in bench.train_sources] == [
      ('left_only', ('left',), 12),
      ('right_only', ('right',), 12),
  ]
  assert bench.aux_sources['coannotated'].num_examples() == 6
  train_images, train_items = fixture_split(40, 0)
  builder = fm.prepare_multi_fashion(str(tmp_path / 'tfds'), idx_dir, seed=1, num_train=30, num_test=8)
  left, right = fm.multi_fashion_pairs(1, 'train', 30, 40)
  assert np.all(left != right)
  for ex in builder.as_dataset(split='train').as_numpy_iterator():
    i = ex['index']
    canvas = np.zeros((36, 36), np.uint8)
    canvas[:28, :28] = train_images[left[i]]
    canvas[8:, 8:] = np.maximum(canvas[8:, 8:], train_images[right[i]])
    np.testing.assert_array_equal(ex['image'][..., 0], canvas)
    assert (ex['left'], ex['right']) == (train_items[left[i]], train_items[right[i]])
  full = data.get_benchmark(
      'multi_fashion',
      data_dir=str(tmp_path / 'tfds'),
      idx_dir=idx_dir,
      seed=1,
      num_train=30,
      num_test=8,
      num_coannotated=6,
  )
  labels = data.source_labels(full.train_sources[0], full.tasks)
  assert labels['left'].shape == (30,) and np.all(labels['left'] >= 0) and np.all(labels['right'] >= 0)
  co = data.source_labels(full.aux_sources['coannotated'], full.tasks)
  np.testing.assert_array_equal(co['left'], labels['left'][:6])  # full mode: a subset of the training source


def test_generic_tfds_source_by_name(idx_dir, tmp_path):
  tfds_dir = str(tmp_path / 'tfds')
  fm.prepare_fashion_mnist(tfds_dir, idx_dir)
  src = data.tfds_source(
      'items',
      'mtlmatch_fashion_mnist',
      tasks=['item'],
      split='test',
      data_dir=tfds_dir,
      labels_fn=lambda ex: {'item': ex['item']},
  )
  bench = data.make_benchmark('user', [TaskSpec('item', 'multiclass', 10)], [src])
  assert bench.image_shape == (28, 28, 1)
  ex = data.load_examples(src, bench.tasks)
  np.testing.assert_array_equal(ex.labels['item'], fixture_split(12, 3)[1][decode_index(ex.images)])
  halves = [data.load_examples(src, bench.tasks, process_index=h, process_count=2) for h in (0, 1)]
  got = np.concatenate([decode_index(h.images) for h in halves])
  np.testing.assert_array_equal(np.sort(got), np.arange(12))  # two hosts: disjoint, covering
  with pytest.raises(ValueError, match="'mtlmatch_synthetic_affect' is not prepared"):
    data.tfds_source(
        'x',
        'mtlmatch_synthetic_affect',
        tasks=['expression'],
        data_dir=tfds_dir,
        labels_fn=lambda ex: {},
        builder_kwargs={'config': sa.make_config(num_expressions=5)},
    )


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('MTLMATCH_DATA_DIR', '/some/where')
  assert data.default_data_dir() == '/some/where'
  assert data.default_data_dir('/explicit') == '/explicit'
  monkeypatch.delenv('MTLMATCH_DATA_DIR')
  assert data.default_data_dir() == os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def test_a_dataset_generated_by_two_processes_at_once_is_read_by_the_one_whose_rename_lost():
  """TFDS renames its finished folder into place; the process that loses the race gets FileExistsError although the
  winner's copy is complete: generate_once reads that copy instead of failing the run."""
  from mtlmatch.data.sources import generate_once  # pylint: disable=g-import-not-at-top

  state = {'done': False, 'built': 0}

  class Builder:

    def is_prepared(self):
      return state['done']

    def download_and_prepare(self, download_config=None):
      state['done'] = True  # the other process finished first ...
      raise FileExistsError('Destination .../1.1.0 already exists.')  # ... so this one's rename fails

  def make():
    state['built'] += 1
    return Builder()

  assert generate_once(make).is_prepared() and state['built'] == 2
  state.update(done=False)

  class Broken(Builder):

    def download_and_prepare(self, download_config=None):
      raise FileExistsError('a real clash: nothing was prepared')

  with pytest.raises(FileExistsError, match='a real clash'):
    generate_once(Broken)
