"""Dense tasks through the library: the task kinds at the data boundary, the label protocols, the scenes and NYUv2
configs trained by the real loop (with DGR's dummy decoders and a gradient method, tasks absent from batches under
one-label, augmented), and ``--mode=predict``'s per-pixel outputs, from which the results' metrics are recomputed
exactly.

The losses and metrics against numpy are in tests/test_dense_maths.py, the networks in tests/test_dense_models.py.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import REPO, compile_fast, set_keys
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import experiment as experiment_lib
from mtlmatch import metrics as metrics_lib
from mtlmatch import modes
from mtlmatch import step as step_lib
from mtlmatch import tasks as tasks_lib
from mtlmatch import train
from mtlmatch.data import dense_benchmarks, nyuv2_layout, scenes


def test_dense_kinds_at_the_data_boundary():
  seg = tasks_lib.TaskSpec('segmentation', 'segmentation', 6, options={'size': (4, 5)})
  depth = tasks_lib.TaskSpec('depth', 'depth', 1, options={'size': (4, 5)})
  assert seg.label_shape(2) == (2, 4, 5) and depth.label_shape(2) == (2, 4, 5, 1)
  assert tasks_lib.missing_labels(seg, 1).min() == -1 and tasks_lib.missing_labels(depth, 1).max() == 0
  with pytest.raises(ValueError, match=r'got value 6, expected values in \[-1, 6\)'):
    tasks_lib.validate_labels(seg, np.full((1, 4, 5), 6))
  with pytest.raises(ValueError, match=r'got value -1.0, expected values in \[0.0, inf\]'):
    tasks_lib.validate_labels(depth, -np.ones((1, 4, 5, 1)))
  with pytest.raises(ValueError, match=r"options\['size'\]: got None, expected \(H, W\)"):
    tasks_lib.TaskSpec('depth', 'depth', 1)
  assert not depth.higher_is_better('abs_err') and seg.higher_is_better('miou')
  normal = tasks_lib.TaskSpec('normal', 'normals', 3, options={'size': (4, 5)})
  assert normal.primary_metric == 'within_22.5' and not normal.higher_is_better('median_angle')


def test_label_protocols_are_seeded_balanced_and_disjoint():
  data = scenes.generate_scenes(0, 'train', 30, 8, 8)
  specs = dense_benchmarks.dense_tasks(6, (8, 8))
  labels = {t: data[t] for t in specs}
  one = dense_benchmarks.label_protocol(data['image'], labels, specs, protocol='one-label', seed=3)
  assert [s.tasks for s in one] == [('segmentation',), ('depth',), ('normal',)]
  sizes = [s.split_size() for s in one]
  assert sizes == [10, 10, 10]
  again = dense_benchmarks.label_protocol(data['image'], labels, specs, protocol='one-label', seed=3)
  parts = [data_lib.load_examples(s, specs) for s in one]
  for a, b in zip(parts, [data_lib.load_examples(s, specs) for s in again]):
    np.testing.assert_array_equal(a.images, b.images)
  # Disjoint and complete: the three shares hold every image once; each carries only its own task's labels.
  rows = np.concatenate([p.images.reshape(len(p.images), -1) for p in parts])
  np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(data['image'].reshape(30, -1), axis=0))
  assert np.all(parts[0].labels['depth'] == 0) and np.all(parts[1].labels['segmentation'] == -1)
  (rand,) = dense_benchmarks.label_protocol(
      data['image'], labels, specs, protocol='random-label', seed=3, probability=0.5
  )
  kept = data_lib.load_examples(rand, specs).labels
  for t, spec in specs.items():  # per image and task: the original labels or none at all, about half kept
    same = np.all((kept[t] == data[t]).reshape(30, -1), axis=1)
    none = np.all((kept[t] == tasks_lib.missing_labels(spec, 30)).reshape(30, -1), axis=1)
    assert np.all(same | none) and 5 < same.sum() < 25, t
  with pytest.raises(ValueError, match=r"labels: got 'half', expected one of \('full', 'one-label', 'random-label'\)"):
    dense_benchmarks.label_protocol(data['image'], labels, specs, protocol='half', seed=0)


def _scenes(tfds_dir, variant='mtl', **overrides):
  config = config_lib.load_config(f'{REPO}/configs/scenes.py:{variant},smoke')
  config.data.data_dir = tfds_dir
  return set_keys(config, **overrides)


def test_scenes_train_and_predict_per_pixel_outputs_that_recompute_the_metrics(tfds_dir, tmp_path):
  config = _scenes(tfds_dir, 'mtl+dgr')
  results = train.train_and_evaluate(config, str(tmp_path))
  metrics = results['metrics']
  assert {'miou', 'pixel_accuracy'} <= set(metrics['segmentation']) and 'abs_err' in metrics['depth']
  assert {'mean_angle', 'median_angle', 'within_11.25'} <= set(metrics['normal'])
  assert all(np.isfinite(v) for t in metrics.values() for v in t.values() if not isinstance(v, int))
  (path,) = modes.predict(config, str(tmp_path), source='test')
  with np.load(path) as saved:
    assert saved['segmentation'].shape == (32, 16, 16, 6) and saved['labels/depth'].shape == (32, 16, 16, 1)
    exp = experiment_lib.build_experiment(config)
    for name, spec in exp.benchmark.tasks.items():
      kind = tasks_lib.kind_of(spec)
      outputs = np.log(saved[name]) if name == 'segmentation' else saved[name]  # softmax → logits (argmax kept)
      stats = jax.device_get(kind.statistics(spec, outputs, saved[f'labels/{name}']))
      again = kind.finalize(spec, metrics_lib.accumulate(kind.zero_statistics(spec), stats))
      for key, value in metrics[name].items():
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, key)


@pytest.mark.parametrize('method', [pytest.param('ew', marks=pytest.mark.slow), 'pcgrad'])  # ew: test-all
def test_one_label_trains_augmented_with_tasks_absent_from_batches(method, tfds_dir, tmp_path):
  # augment=True with dense tasks: LibMTL's scale-crop and flip of the image and its labels (the all-missing labels
  # of the tasks a source lacks included); their maths is in tests/test_dense_augmentation.py.
  overrides = {'data.options.labels': 'one-label', 'total_steps': 3, 'data.augment': True}
  config = _scenes(tfds_dir, 'mtl+dgr', **overrides)
  config_lib.set_weighting(config, method)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 3 and set(results['metrics']) == {'segmentation', 'depth', 'normal'}
  assert all(np.isfinite(v) for t in results['metrics'].values() for v in t.values() if not isinstance(v, int))


def test_nyuv2_config_trains_on_files_in_libmtl_layout(tmp_path):
  root = tmp_path / 'nyuv2'
  for split, n in (('train', 20), ('val', 8)):
    data = scenes.generate_scenes(1, split, n, 16, 16)
    data['segmentation'] = np.where(data['segmentation'] >= 0, data['segmentation'] % 13, -1)
    nyuv2_layout.write_layout(str(root), split, data)
  config = config_lib.load_config(f'{REPO}/configs/nyuv2.py:mtl,smoke')
  config.data.options.root = str(root)
  results = train.train_and_evaluate(set_keys(config, total_steps=2), str(tmp_path / 'run'))
  assert results['metrics']['segmentation']['count'] == 8 and 'mean_angle' in results['metrics']['normal']
  with pytest.raises(ValueError, match=r'got root=None, expected the dataset folder'):
    config.data.options.root = None
    train.train_and_evaluate(config, str(tmp_path / 'nothing'))


@pytest.mark.parametrize('jacobian', ['rows', 'vmap'])
def test_a_gradient_method_gives_each_dense_head_its_own_task_gradient(tfds_dir, jacobian):
  # A gradient method's head update is the sum of that head's rows, and a head only enters its own task's loss, so
  # head t receives ∇_{φ_t} L_t; the reference is jax.grad of L_t alone, one task at a time, at the same features.
  config = set_keys(_scenes(tfds_dir), batch_size=8, **{'weighting.jacobian': jacobian})
  config_lib.set_weighting(config, 'pcgrad')
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  exp = experiment_lib.build_experiment(config, mesh)
  state, batch = jax.jit(exp.init_state)(), next(exp.train_batches(0))
  names = exp.names

  def heads_and_reference(state, batch):
    features, _, pullback = step_lib.encoder_pass(exp.model, state.params, state.batch_stats, batch['image'])
    rows_fn = functools.partial(
        step_lib.loss_rows,
        batch=batch,
        dummy_rng=jax.random.PRNGKey(0),
        term_rng=jax.random.PRNGKey(1),
        state=state,
        model=exp.model,
        objective=exp.objective,
        names=names,
    )
    rows, rows_vjp, _ = jax.vjp(rows_fn, features, state.params['heads'], has_aux=True)
    lin = step_lib.Linearization(rows_vjp, pullback, features, len(names.combined), bool(names.additive))
    path = step_lib.rows_path(exp.method, state, lin, rows[:-1], jax.random.PRNGKey(2), jacobian=jacobian)
    reference = {}
    for i, name in enumerate(names.combined):
      task = name.removeprefix('task/')
      loss_t = lambda head, task=task, i=i: rows_fn(features, {**state.params['heads'], task: head})[0][i]
      reference[task] = jax.grad(loss_t)(state.params['heads'][task])
    return path.grads['heads'], reference

  got, reference = jax.device_get(compile_fast(jax.jit(heads_and_reference).lower(state, batch))(state, batch))
  assert set(got) == set(reference) == {'segmentation', 'depth', 'normal'}
  for task in reference:
    scale = max(np.abs(leaf).max() for leaf in jax.tree.leaves(reference[task]))
    assert scale > 0  # depth's L1 gradients are sums of ±1/N: float32 summation order shows at ~1e-5 of the scale
    for a, b in zip(jax.tree.leaves(got[task]), jax.tree.leaves(reference[task]), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=task)
