"""The UTKFace recipe on generated JPEGs named as UTKFace's: the names parse into age, age group, gender and race,
malformed names follow the bad-file policy, the test split is a seeded fraction of the sorted names, and a tiny run
trains and evaluates all four tasks end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import train
from mtlmatch.data import utkface

# name, age, age_group, gender, race
NAMES = [
    ('0_0_0_20170110224238891.jpg', 0, 0, 0, 0),
    ('9_1_4_20170103200814791.jpg.chip.jpg', 9, 0, 1, 4),
    ('10_0_1_20170109.jpg', 10, 1, 0, 1),
    ('29_1_2_20170116.jpg.chip.jpg', 29, 2, 1, 2),
    ('30_0_3_20170117.jpg', 30, 3, 0, 3),
    ('45_1_0_20170117.jpg', 45, 4, 1, 0),
    ('59_0_1_20170117.jpg', 59, 5, 0, 1),
    ('60_1_2_20170117.jpg', 60, 6, 1, 2),
    ('116_0_4_20170120.jpg.chip.jpg', 116, 6, 0, 4),
]


def write_faces(folder, names, size=16, seed=0):
  """One random JPEG per name in ``folder``; returns the folder as a string."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in names:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return str(folder)


def generated_names(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f'{rng.integers(0, 117)}_{i % 2}_{i % 5}_2017011{i:09d}.jpg.chip.jpg' for i in range(n)]


def test_names_parse_into_age_bins_gender_and_race():
  for name, age, group, gender, race in NAMES:
    assert utkface.parse_name(f'/data/UTKFace/{name}') == {
        'age': age,
        'age_group': group,
        'gender': gender,
        'race': race,
    }, name
  tasks = {t.name: t for t in utkface.utkface_tasks()}
  assert tasks['age_group'].class_names == ('0-9', '10-19', '20-29', '30-39', '40-49', '50-59', '60-119')
  assert tasks['gender'].class_names == ('male', 'female')
  assert tasks['race'].class_names == ('White', 'Black', 'Asian', 'Indian', 'Others')
  assert tasks['age'].kind == 'regression' and tasks['age'].primary_metric == 'mae'
  assert not tasks['age'].higher_is_better('mae')


@pytest.mark.parametrize(
    'name, match',
    [
        ('12_3_0_20170109.jpg', r"got gender '3' in file name '12_3_0_20170109\.jpg', expected 0 \(male\) or 1"),
        ('abc.jpg', r"got file name 'abc\.jpg', expected \[age\]_\[gender\]_\[race\]_\[date&time\]\.jpg"),
        ('39_1_20170116174525125.jpg.chip.jpg', r"got file name '39_1_2017.*', expected \[age\]_\[gender\]"),
        ('25_0_5_20170109.jpg', r"got race '5' in file name .*, expected 0-4 \(White, Black, Asian, Indian, Others\)"),
        ('117_0_0_20170109.jpg', r"got age '117' in file name .*, expected an integer 0-116"),
        ('x_0_0_20170109.jpg', r"got age 'x' in file name"),
    ],
)
def test_a_malformed_name_says_which_field_and_what_was_expected(name, match):
  with pytest.raises(ValueError, match=match):
    utkface.parse_name(name)


def test_the_benchmark_reads_a_directory_and_splits_it_by_a_seeded_permutation(tmp_path):
  names = generated_names(20) + [n for n, *_ in NAMES]
  folder = write_faces(tmp_path / 'UTKFace', names)
  bench = data.get_benchmark('utkface', image_dir=folder, image_size=8, seed=3)
  assert list(bench.tasks) == ['age', 'age_group', 'gender', 'race']
  (train_source,), (test_source,) = bench.train_sources, bench.eval_sources
  assert (train_source.name, test_source.name) == ('utkface', 'utkface_test')
  assert test_source.split_size() == round(0.2 * len(names)) and train_source.split_size() == len(names) - 6
  files = {
      s.name: [os.path.basename(p) for p in s.reader.identify(s.split, np.arange(s.split_size()))['paths']]
      for s in (train_source, test_source)
  }
  assert sorted(files['utkface'] + files['utkface_test']) == sorted(names)
  again = data.get_benchmark('utkface', image_dir=folder, image_size=8, seed=3).eval_sources[0]
  other = data.get_benchmark('utkface', image_dir=folder, image_size=8, seed=4).eval_sources[0]
  assert again.reader.paths.tolist() == test_source.reader.paths.tolist() != other.reader.paths.tolist()
  # Every label is that of the file's name; age is float32 [N, 1].
  for source in (train_source, test_source):
    ex = data.load_examples(source, bench.tasks)
    assert ex.labels['age'].dtype == np.float32 and ex.labels['age'].shape == (source.split_size(), 1)
    for i, name in enumerate(files[source.name]):
      want = utkface.parse_name(name)
      got = {t: ex.labels[t][i] for t in bench.tasks}
      assert got['age'][0] == want['age'] and all(got[t] == want[t] for t in ('age_group', 'gender', 'race'))
  assert data.decode_rows(data.load_examples(test_source, bench.tasks).images).shape == (6, 8, 8, 3)
  no_test = data.get_benchmark('utkface', image_dir=folder, image_size=8, test_fraction=0)
  assert no_test.eval_sources == () and no_test.train_sources[0].split_size() == len(names)


def test_malformed_names_raise_naming_the_file_or_are_skipped_and_counted(tmp_path, caplog):
  bad = ['12_3_0_20170109.jpg', 'abc.jpg', '39_1_20170116174525125.jpg.chip.jpg', '25_0_5_x.jpg']
  folder = write_faces(tmp_path / 'UTKFace', generated_names(12) + bad)
  with pytest.raises(ValueError, match=r"UTKFace file .*/12_3_0_20170109\.jpg: got gender '3'.*on_bad_image='skip'.*"
                     r'\(4 such file\(s\)\)'):  # fmt: skip
    data.get_benchmark('utkface', image_dir=folder, image_size=8)
  with caplog.at_level('WARNING'):
    bench = data.get_benchmark('utkface', image_dir=folder, image_size=8, on_bad_image='skip')
  assert 'skipped 4 file(s) with malformed names' in caplog.text
  sources = bench.train_sources + bench.eval_sources
  assert sum(s.split_size() for s in sources) == 12
  assert sum(len(s.reader.skipped) for s in sources) == 4
  with pytest.raises(ValueError, match=r"utkface: got no files matching '.*/empty/\*\.jpg'"):
    data.get_benchmark('utkface', image_dir=str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match=r'utkface: got image_dir=None, expected the folder'):
    data.get_benchmark('utkface')


def test_the_config_refuses_dm_and_coann_and_monitors_all_four_tasks_with_nt():
  with pytest.raises(ValueError, match=r"config variant 'dm\+dgr': got 'dm', which configs/utkface.py does not offer"):
    config_lib.load_config(f'{REPO}/configs/utkface.py:dm+dgr')
  config = config_lib.load_config(f'{REPO}/configs/utkface.py:nt=/sweep,dgr')
  tasks = ('age', 'age_group', 'gender', 'race')
  assert dict(config.nt_reference) == {t: f'/sweep/st_{t}/seed_{{seed}}' for t in tasks}
  assert 'dgr' in config.objective.terms and config.encoder.name == 'resnet18'
  smoke = config_lib.load_config(f'{REPO}/configs/utkface.py:smoke')
  config_lib.set_keys(smoke, {'data.options.image_dir': '/data/UTKFace'})  # kept by smoke, settable
  assert smoke.data.options.image_dir == '/data/UTKFace'


def test_a_tiny_run_trains_and_evaluates_all_four_tasks(tmp_path):
  folder = write_faces(tmp_path / 'UTKFace', generated_names(48))
  config = config_lib.load_config(f'{REPO}/configs/utkface.py:mtl,encoder=mlp,smoke')
  config.data.options.image_dir = folder
  config.data.options.image_size = 16
  config.total_steps, config.checkpoint_every = 4, 4
  config.data.validation_fraction = 0.25
  workdir = tmp_path / 'work'
  results = train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'results.json') as f:
    written = json.load(f)
  assert results['step'] == written['step'] == 4
  metrics = written['metrics']
  assert set(metrics) == {'age', 'age_group', 'gender', 'race'}
  assert np.isfinite(metrics['age']['mae']) and metrics['age']['mae'] >= 0
  for task in ('age_group', 'gender', 'race'):
    assert 0 <= metrics[task]['accuracy'] <= 1


def test_the_config_states_the_age_tasks_options():
  config = config_lib.load_config(f'{REPO}/configs/utkface.py')
  (age,) = [t for t in utkface.utkface_tasks() if t.name == 'age']
  assert all(age.option(k) == v for k, v in config.task_options.age.items())
