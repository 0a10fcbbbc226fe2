"""File-backed sources (a manifest of image files), their ArrayRecord preparation and the face recipe, on images the
tests write (PNG: lossless, so decoded pixels are compared exactly with the arrays they were written from)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch.data import faces
from mtlmatch.data import files as files_lib
from mtlmatch.data import fingerprint
from mtlmatch.data import prepare as prepare_lib
from mtlmatch.data import synthetic_affect
from mtlmatch.tasks import TaskSpec

SIZE = 8
TASKS = [TaskSpec('expression', 'multiclass', 8), TaskSpec('aus', 'multilabel', 3)]


def write_images(folder, n, *, seed=0, size=SIZE, fmt='png', sizes=None):
  """n images (uint8 [size, size, 3], or sizes[i]) as files img/<i>.<fmt>; returns their arrays."""
  os.makedirs(os.path.join(folder, 'img'), exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = []
  for i in range(n):
    shape = (sizes[i] if sizes else (size, size)) + (3,)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    encoded = tf.io.encode_png(a) if fmt == 'png' else tf.io.encode_jpeg(a, quality=95)
    with open(os.path.join(folder, 'img', f'{i}.{fmt}'), 'wb') as f:
      f.write(encoded.numpy())
    arrays.append(a)
  return arrays


def write_csv(path, header, rows):
  with open(path, 'w') as f:
    f.write(','.join(header) + '\n')
    for row in rows:
      f.write(','.join(str(v) for v in row) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def expression_files(tmp_path_factory):
  """20 PNGs with expression labels 0..7 and the missing codes '' and 9 (per-task missing)."""
  folder = tmp_path_factory.mktemp('expr')
  arrays = write_images(folder, 20)
  codes = [i % 8 if i % 5 else ('' if i % 10 else 9) for i in range(20)]
  manifest = write_csv(folder / 'train.csv', ['path', 'expression'], [(f'img/{i}.png', c) for i, c in enumerate(codes)])
  expected = np.array([c if c not in ('', 9) else -1 for c in codes], np.int32)
  return manifest, arrays, expected


def expression_source(manifest, **kwargs):
  kwargs = {'missing': {'expression': ('', 9)}, **kwargs}
  return data.files_source(
      'expressions',
      manifest,
      image_column='path',
      labels={'expression': 'expression'},
      image_size=(SIZE, SIZE),
      **kwargs,
  )


def test_files_source_reads_pixels_and_labels_as_written(expression_files):
  manifest, arrays, expected = expression_files
  source = expression_source(manifest)
  ex = data.load_examples(source, {t.name: t for t in TASKS})
  np.testing.assert_array_equal(ex.labels['expression'], expected)
  np.testing.assert_array_equal(ex.labels['aus'], -np.ones((20, 3)))
  assert isinstance(ex.images, data.LazyImages) and ex.images.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(data.decode_rows(ex.images), np.stack(arrays))
  # The training stream: every slot's pixels and labels are those of the row the schedule picked.
  bench = data.make_benchmark('files', TASKS, [source])
  batch = next(data.train_iterator(bench, global_batch_size=8, seed=0))
  pixels = np.rint((batch['image'] + 1) * 127.5).astype(np.uint8)
  for image, label in zip(pixels, batch['labels']['expression']):
    matches = [i for i, a in enumerate(arrays) if np.array_equal(a, image)]
    assert len(matches) == 1 and expected[matches[0]] == label


def test_multilabel_columns_split_column_json_lines_and_mixed_sizes(tmp_path):
  sizes = [(SIZE, SIZE), (13, 9), (SIZE, SIZE), (5, 21)]
  arrays = write_images(tmp_path, 4, sizes=sizes)
  rows = [
      {'file': f'img/{i}.png', 'AU1': [1, 0, 999, 1][i], 'AU2': [0, '', 1, 1][i], 'AU4': 1, 'split': 'ab'[i % 2]}
      for i in range(4)
  ]
  with open(tmp_path / 'aus.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  source = data.files_source(
      'aus', str(tmp_path / 'aus.jsonl'), image_column='file', labels={'aus': ['AU1', 'AU2', 'AU4']},
      image_size=(SIZE, SIZE), split='a', split_column='split',
  )  # fmt: skip
  assert source.split == 'a'
  ex = data.load_examples(source, {t.name: t for t in TASKS})
  np.testing.assert_array_equal(ex.labels['aus'], [[1, 0, 1], [-1, 1, 1]])  # rows 1 and 3; 999 and '' are missing
  images = data.decode_rows(ex.images)
  assert images.shape == (2, SIZE, SIZE, 3)  # row 3 (13 x 9) is resized, not refused
  np.testing.assert_array_equal(images[0], arrays[0])
  reference = tf.cast(tf.round(tf.image.resize(arrays[2], (SIZE, SIZE), antialias=True)), tf.uint8).numpy()
  np.testing.assert_array_equal(images[1], reference)


def test_split_names_the_split_and_split_column_selects_its_rows(tmp_path):
  write_images(tmp_path, 3)
  manifest = write_csv(
      tmp_path / 'm.csv',
      ['path', 'expression', 'part'],
      [('img/0.png', 1, 'x'), ('img/1.png', 2, 'y'), ('img/2.png', 3, 'x')],
  )
  named = expression_source(manifest, split='test')  # a name only: every row
  assert named.split == 'test' and named.reader.num_examples('test') == 3
  chosen = expression_source(manifest, split='x', split_column='part')
  assert chosen.split == 'x' and data.load_examples(chosen, {t.name: t for t in TASKS}).labels[
      'expression'
  ].tolist() == [1, 3]
  with pytest.raises(ValueError, match=r"m\.csv: got no rows with part == 'z'"):
    expression_source(manifest, split='z', split_column='part')
  with pytest.raises(ValueError, match=r"split_column of manifest .*m\.csv: got 'part' without a split"):
    expression_source(manifest, split_column='part')
  with pytest.raises(ValueError, match=r"columns \['group'\] are missing"):
    expression_source(manifest, split='x', split_column='group')
  # What split= meant before split_column (rows of the 'split' column): refused, never every row silently.
  old = write_csv(tmp_path / 'old.csv', ['path', 'expression', 'split'], [('img/0.png', 1, 'a'), ('img/1.png', 2, 'b')])
  with pytest.raises(ValueError, match=r"old\.csv: got split='a' and a 'split' column, but no split_column"):
    expression_source(old, split='a')


def test_prepared_arrayrecord_source_gives_the_batches_of_the_files_source(expression_files, tmp_path):
  manifest, _, expected = expression_files
  directory = prepare_lib.main(
      [
          f'--manifest={manifest}',
          f'--out={tmp_path}',
          '--name=expressions_train',
          '--image_column=path',
          '--label=expression=expression',
          '--missing=expression=,9',
          '--num_shards=3',
      ]
  )
  prepared = data.tfds_source('expressions', directory, tasks=['expression'], image_size=(SIZE, SIZE))
  assert prepared.reader.indexed
  files = expression_source(manifest)
  ex = data.load_examples(prepared, {t.name: t for t in TASKS})
  np.testing.assert_array_equal(ex.labels['expression'], expected)
  kwargs = dict(global_batch_size=8, seed=1, augment=True)
  a = data.train_iterator(data.make_benchmark('a', TASKS, [prepared]), **kwargs)
  b = data.train_iterator(data.make_benchmark('b', TASKS, [files]), **kwargs)
  for _ in range(4):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['labels']['expression'], y['labels']['expression'])
  with pytest.raises(ValueError, match='never overwritten'):
    prepare_lib.prepare(
        manifest, str(tmp_path), name='expressions_train', image_column='path', labels={'expression': 'expression'}
    )


def test_file_stream_resumes_exactly_and_hosts_split_the_global_batch(expression_files, tmp_path):
  manifest, _, _ = expression_files
  au_arrays = write_images(tmp_path, 6, seed=1)
  del au_arrays
  aus = write_csv(
      tmp_path / 'aus.csv', ['path', 'AU1', 'AU2', 'AU4'], [(f'img/{i}.png', 1, 0, i % 2) for i in range(6)]
  )
  sources = [
      expression_source(manifest),
      data.files_source(
          'aus', aus, image_column='path', labels={'aus': ['AU1', 'AU2', 'AU4']}, image_size=(SIZE, SIZE)
      ),
      data.array_source('memory', np.zeros((5, SIZE, SIZE, 3), np.uint8), {'expression': np.arange(5)}),
  ]  # two file sources and an in-memory one, mixed in every batch
  bench = data.make_benchmark('mixed', TASKS, sources)
  kwargs = dict(global_batch_size=12, seed=2)
  stream = [next(it) for it in [data.train_iterator(bench, **kwargs)] for _ in range(9)]
  resumed = data.train_iterator(bench, start_step=6, **kwargs)
  for t in range(6, 9):
    jax.tree.map(np.testing.assert_array_equal, next(resumed), stream[t])
  hosts = [data.train_iterator(bench, process_index=h, process_count=2, **kwargs) for h in range(2)]
  for t in range(3):
    joined = jax.tree.map(lambda *x: np.concatenate(x), *[next(h) for h in hosts])
    jax.tree.map(np.testing.assert_array_equal, joined, stream[t])
  # Eval over a file source: every row once, in order, padded.
  batches = list(data.eval_iterator(sources[1], bench.tasks, global_batch_size=4, image_shape=(SIZE, SIZE, 3)))
  assert [b['mask'].sum() for b in batches] == [4, 2]
  np.testing.assert_array_equal(batches[1]['image'][2:], -1.0)  # black padding


# ---------------------------------------------------------------------------------------------------------------
# Bad data: one ValueError naming the manifest, the row and the file, before training (or at the first batch that
# holds an undecodable file of an unprepared manifest); or, with on_bad_image='skip', a row left out and counted.


@pytest.fixture
def bad_folder(tmp_path):
  write_images(tmp_path, 4)
  with open(tmp_path / 'img' / 'broken.png', 'wb') as f:
    f.write(b'not an image at all')
  return tmp_path


def test_missing_file_is_refused_at_construction_or_skipped(bad_folder):
  manifest = write_csv(bad_folder / 'm.csv', ['path', 'expression'], [('img/0.png', 1), ('img/gone.png', 2)])
  with pytest.raises(ValueError, match=r'm\.csv row 2 \(file .*img/gone\.png\): the file does not exist'):
    expression_source(manifest)
  source = expression_source(manifest, on_bad_image='skip')
  assert source.reader.num_examples('train') == 1 and len(source.reader.skipped) == 1


def test_undecodable_file_fails_at_its_batch_naming_it_or_is_skipped(bad_folder, caplog):
  rows = [('img/0.png', 1), ('img/broken.png', 2), ('img/1.png', 3)]
  manifest = write_csv(bad_folder / 'm.csv', ['path', 'expression'], rows)
  bench = data.make_benchmark('bad', TASKS, [expression_source(manifest)])
  with pytest.raises(ValueError, match=r'm\.csv row 2 \(file .*broken\.png\).*expected a decodable image'):
    next(data.train_iterator(bench, global_batch_size=4, seed=0))
  with pytest.raises(ValueError, match=r'm\.csv row 2 \(file .*broken\.png\): the file does not decode'):
    prepare_lib.prepare(
        manifest, str(bad_folder / 'out'), name='bad', image_column='path', labels={'expression': 'expression'}
    )
  with caplog.at_level('WARNING'):
    skipping = expression_source(manifest, on_bad_image='skip')
  assert skipping.reader.num_examples('train') == 2 and 'skipped 1 bad image' in caplog.text
  bench = data.make_benchmark('skipping', TASKS, [skipping])
  labels = next(data.train_iterator(bench, global_batch_size=4, seed=0))['labels']['expression']
  assert set(labels.tolist()) <= {1, 3}  # never a hole: every slot is a good row


def test_corrupt_jpeg_in_a_small_manifest_is_named_by_the_fingerprint_or_skipped(bad_folder):
  # <= 256 rows: the fingerprint decodes every image before training (above that, only a sample), so it is where a
  # corrupt file is met first; it must name the manifest, the row and the file, and 'skip' must leave the row out.
  write_images(bad_folder, 3, fmt='jpg')
  whole = (bad_folder / 'img' / '0.jpg').read_bytes()
  (bad_folder / 'img' / 'cut.jpg').write_bytes(whole[: len(whole) // 2])  # a truncated JPEG: jpeg::Uncompress failed
  rows = [('img/0.jpg', 1), ('img/1.jpg', 2), ('img/cut.jpg', 3), ('img/2.jpg', 4)]
  manifest = write_csv(bad_folder / 'm.csv', ['path', 'expression'], rows)
  bench = data.make_benchmark('corrupt', TASKS, [expression_source(manifest)])
  with pytest.raises(ValueError, match=r'm\.csv row 3 \(file .*cut\.jpg\): .*expected a decodable image') as e:
    fingerprint.benchmark_fingerprint(bench)
  assert 'function_node' not in str(e.value)
  skipping = data.make_benchmark('corrupt', TASKS, [expression_source(manifest, on_bad_image='skip')])
  assert fingerprint.benchmark_fingerprint(skipping)['train/expressions']['examples'] == 3


@pytest.mark.parametrize(
    'header, rows, match',
    [
        (['path', 'expression'], [], r'm\.csv: got no rows'),
        (['path', 'emotion'], [('img/0.png', 1)], r"m\.csv: columns \['expression'\] are missing"),
        (
            ['path', 'expression'],
            [('img/0.png', 1), ('img/1.png', 'happy')],
            r"m\.csv row 2 \(file .*img/1\.png\).*'happy'",
        ),
        (['path', 'expression'], [('img/0.png', 1.5)], r'm\.csv row 1 .*expected an integer label'),
    ],
)
def test_bad_tables_are_refused_at_construction(bad_folder, header, rows, match):
  with pytest.raises(ValueError, match=match):
    expression_source(write_csv(bad_folder / 'm.csv', header, rows))


def test_label_out_of_range_is_refused_before_training_naming_the_row(bad_folder):
  manifest = write_csv(bad_folder / 'm.csv', ['path', 'expression'], [('img/0.png', 1), ('img/1.png', 12)])
  bench = data.make_benchmark('range', TASKS, [expression_source(manifest)])
  with pytest.raises(ValueError, match=r'got value 12, expected values in \[-1, 8\).*m\.csv row 2 \(file .*img/1\.png'):
    data.train_iterator(bench, global_batch_size=4, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# The face recipe's layout, on generated JPEGs (trained end to end, on two processes, in tests/test_multihost.py).


def face_manifests(folder) -> tuple[dict, list]:
  """Generated JPEGs (40 x 40) in the face recipe's layout: train and test manifests for expressions and AUs."""
  rng = np.random.default_rng(0)
  write_images(folder, 48, fmt='jpg', size=40)
  aus = faces.DEFAULT_AUS
  expression_rows = [(f'img/{i}.jpg', int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 10]))) for i in range(32)]
  au_rows = [(f'img/{i}.jpg', *[int(rng.choice([0, 1, 999])) for _ in aus]) for i in range(16, 48)]
  options = {
      'expression_manifest': write_csv(folder / 'expressions.csv', ['path', 'expression'], expression_rows[:24]),
      'expression_test_manifest': write_csv(folder / 'expr_test.csv', ['path', 'expression'], expression_rows[24:]),
      'au_manifest': write_csv(folder / 'aus.csv', ['path', *aus], au_rows[:24]),
      'au_test_manifest': write_csv(folder / 'au_test.csv', ['path', *aus], au_rows[24:]),
  }
  return options, expression_rows


def face_config(options):
  config = config_lib.load_config(f'{REPO}/configs/faces.py:dm+coann,encoder=cnn,smoke')  # the small encoder: CI
  for key, value in options.items():
    config.data.options[key] = value
  config.data.validation_fraction = 0.25
  return config


# ---------------------------------------------------------------------------------------------------------------
# Regression tasks: float columns, NaN = missing (never -1: a valid valence), float32 [N, d] labels.

VA = synthetic_affect.VA_TASK
AGE = TaskSpec('age', 'regression', 1, options={'loss': 'l1', 'metric': 'mae'})
FLOAT_TASKS = {t.name: t for t in [*TASKS, VA, AGE]}
VA_ROWS = [  # path, expression, valence, arousal, age
    ('img/0.png', 1, -1, 0.25, 30),
    ('img/1.png', 9, -2, -2, ''),
    ('img/2.png', 3, '', 'NA', 7.5),
    ('img/3.png', '', 0.5, -1.0, 'NA'),
]


def va_source(manifest, **kwargs):
  return data.files_source(
      'affectnet',
      manifest,
      image_column='path',
      labels={'expression': 'expression', 'va': ['valence', 'arousal'], 'age': 'age'},
      image_size=(SIZE, SIZE),
      regression=('va', 'age'),
      missing={'expression': ('', 9), 'va': faces.VA_MISSING},
      **kwargs,
  )


def test_regression_columns_are_float32_with_nan_missing_and_minus_one_a_valid_target(bad_folder):
  manifest = write_csv(bad_folder / 'va.csv', ['path', 'expression', 'valence', 'arousal', 'age'], VA_ROWS)
  source = va_source(manifest)
  assert source.tasks == ('expression', 'va', 'age')
  ex = data.load_examples(source, FLOAT_TASKS)
  nan = np.nan
  assert ex.labels['va'].dtype == np.float32 and ex.labels['age'].dtype == np.float32
  np.testing.assert_array_equal(ex.labels['va'], [[-1, 0.25], [nan, nan], [nan, nan], [0.5, -1]])
  np.testing.assert_array_equal(ex.labels['age'], [[30], [nan], [7.5], [nan]])  # one column: still [N, 1]
  np.testing.assert_array_equal(ex.labels['expression'], [1, -1, 3, -1])  # classification unchanged
  np.testing.assert_array_equal(ex.labels['aus'], -np.ones((4, 3)))
  # The training stream carries them as float32, NaN where missing.
  bench = data.make_benchmark('va', list(FLOAT_TASKS.values()), [source])
  batch = next(data.train_iterator(bench, global_batch_size=8, seed=0))
  assert batch['labels']['va'].dtype == np.float32 and batch['labels']['va'].shape == (8, 2)
  assert np.isnan(batch['labels']['va']).any() and np.nanmin(batch['labels']['va']) == -1


def test_a_regression_task_defaults_to_blank_and_na_as_missing(bad_folder):
  rows = [('img/0.png', -1, 999), ('img/1.png', '', 'NA'), ('img/2.png', 'nan', 0.5)]
  manifest = write_csv(bad_folder / 'm.csv', ['path', 'valence', 'arousal'], rows)
  reader = data.FilesReader(manifest, image_column='path', labels={'va': ['valence', 'arousal']}, regression=['va'])
  np.testing.assert_array_equal(reader.labels['va'], [[-1, 999], [np.nan, np.nan], [np.nan, 0.5]])
  assert files_lib.DEFAULT_REGRESSION_MISSING == ('', 'NA')


@pytest.mark.parametrize(
    'value, match',
    [
        ('high', r"va\.csv row 2 \(file .*img/1\.png\) column 'arousal': got 'high', expected a number"),
        ('inf', r"va\.csv row 2 \(file .*img/1\.png\) column 'arousal': got 'inf', expected a finite number"),
    ],
)
def test_a_non_numeric_target_is_refused_naming_the_row_and_column(bad_folder, value, match):
  rows = [('img/0.png', 1, 0.1, 0.2, 3), ('img/1.png', 2, 0.3, value, 4)]
  manifest = write_csv(bad_folder / 'va.csv', ['path', 'expression', 'valence', 'arousal', 'age'], rows)
  with pytest.raises(ValueError, match=match):
    va_source(manifest)


def test_a_target_out_of_the_task_range_is_refused_at_load_naming_the_row(bad_folder):
  rows = [('img/0.png', 1, 0.1, 0.2, 3), ('img/1.png', 2, 0.3, 0.4, 5), ('img/2.png', 2, 1.5, 0.0, 5)]
  manifest = write_csv(bad_folder / 'va.csv', ['path', 'expression', 'valence', 'arousal', 'age'], rows)
  source = va_source(manifest)  # the reader does not know the task's range; the benchmark does
  with pytest.raises(
      ValueError,
      match=r"task 'va'.*got value 1\.5, expected values in \[-1\.0, 1\.0\].*va\.csv row 3 \(file .*img/2\.png\)",
  ):
    data.load_examples(source, FLOAT_TASKS)


def test_regression_must_name_tasks_of_labels(bad_folder):
  manifest = write_csv(bad_folder / 'va.csv', ['path', 'valence'], [('img/0.png', 0.5)])
  for regression in (('nope',), 'va'):
    with pytest.raises(ValueError, match=r'regression of manifest .*va\.csv: got .*expected a sequence of task names'):
      data.files_source('s', manifest, image_column='path', labels={'va': ['valence']}, regression=regression)


def test_prepared_arrayrecord_keeps_float_targets_and_their_nans(bad_folder, tmp_path):
  manifest = write_csv(bad_folder / 'va.csv', ['path', 'expression', 'valence', 'arousal', 'age'], VA_ROWS)
  directory = prepare_lib.main(
      [
          f'--manifest={manifest}',
          f'--out={tmp_path}',
          '--name=affectnet_va',
          '--image_column=path',
          '--label=expression=expression',
          '--label=va=valence,arousal',
          '--label=age=age',
          '--regression=va',
          '--regression=age',
          '--missing=expression=,9',
          '--missing=va=,NA,-2',
      ]
  )
  prepared = data.tfds_source('affectnet', directory, tasks=['expression', 'va', 'age'], image_size=(SIZE, SIZE))
  got = data.load_examples(prepared, FLOAT_TASKS).labels
  want = data.load_examples(va_source(manifest), FLOAT_TASKS).labels
  for task in ('expression', 'va', 'age'):
    assert got[task].dtype == want[task].dtype
    np.testing.assert_array_equal(got[task], want[task])


def test_faces_with_va_columns_and_a_va_manifest_has_the_va_task_third(tmp_path):
  write_images(tmp_path, 12, fmt='jpg')
  aus = ('AU1', 'AU12')
  header = ['path', 'expression', 'valence', 'arousal']
  expressions = write_csv(
      tmp_path / 'affectnet.csv',
      header,
      [('img/0.jpg', 1, 0.72, 0.31), ('img/1.jpg', 9, -2, -2), ('img/2.jpg', 3, -1, 1), ('img/3.jpg', 0, '', 0.5)],
  )
  au_manifest = write_csv(tmp_path / 'aus.csv', ['path', *aus], [(f'img/{i}.jpg', i % 2, 1) for i in range(4, 8)])
  va_manifest = write_csv(
      tmp_path / 'affwild2.csv', ['path', 'v', 'a'], [(f'img/{i}.jpg', 0.1 * i - 1, -0.5) for i in range(8, 12)]
  )
  common = dict(expression_manifest=expressions, au_manifest=au_manifest, aus=aus, image_size=SIZE)
  plain = data.get_benchmark('faces', **common)
  assert list(plain.tasks) == ['expression', 'aus'] and [s.tasks for s in plain.train_sources] == [
      ('expression',),
      ('aus',),
  ]
  bench = data.get_benchmark(
      'faces', valence_column='valence', arousal_column='arousal', va_manifest=va_manifest, va_columns=('v', 'a'),
      **common,
  )  # fmt: skip
  assert list(bench.tasks) == ['expression', 'aus', 'va'] and bench.tasks['va'] == synthetic_affect.VA_TASK
  assert [s.tasks for s in bench.train_sources] == [('expression', 'va'), ('aus',), ('va',)]
  labels = {s.name: data.load_examples(s, bench.tasks).labels for s in bench.train_sources}
  nan = np.nan
  want = np.float32([[0.72, 0.31], [nan, nan], [-1, 1], [nan, 0.5]])  # -2 and '' missing, -1 a valid valence
  np.testing.assert_array_equal(labels['expressions']['va'], want)
  np.testing.assert_array_equal(labels['expressions']['expression'], [1, -1, 3, 0])
  np.testing.assert_allclose(labels['va']['va'], [[0.1 * i - 1, -0.5] for i in range(8, 12)], rtol=1e-6)
  assert np.isnan(labels['aus']['va']).all() and labels['aus']['va'].shape == (4, 2)
  with pytest.raises(ValueError, match=r"faces: got valence_column='valence', arousal_column=None, expected both"):
    data.get_benchmark('faces', valence_column='valence', **common)
  # The recipe's options: settable on the command line, also in a smoke run (where the data is is kept).
  config = config_lib.load_config(f'{REPO}/configs/faces.py:dm+coann,smoke')
  keys = {'data.options.valence_column': 'valence', 'data.options.arousal_column': 'arousal'}
  config_lib.set_keys(config, {**keys, 'data.options.va_manifest': va_manifest})
  assert config.data.options.valence_column == 'valence' and config.data.options.va_manifest == va_manifest


def test_the_fingerprint_tells_float_targets_apart(bad_folder):
  """A resumed run must notice a changed valence: float targets are hashed by their bits, not cast to int."""
  header = ['path', 'expression', 'valence', 'arousal', 'age']
  changed = [('img/0.png', 1, -1, 0.35, 30), *VA_ROWS[1:]]  # arousal 0.25 -> 0.35: alike once cast to int
  prints = []
  for name, rows in (('a.csv', VA_ROWS), ('b.csv', VA_ROWS), ('c.csv', changed)):
    source = va_source(write_csv(bad_folder / name, header, rows))
    bench = data.make_benchmark('va', list(FLOAT_TASKS.values()), [source])
    prints.append(fingerprint.benchmark_fingerprint(bench)['train/affectnet']['labels'])
  assert prints[0] == prints[1] and prints[0]['va'] != prints[2]['va'] and prints[0]['age'] == prints[2]['age']
