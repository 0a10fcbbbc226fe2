"""Regression tasks: the losses and metrics against numpy references written here (NaN = missing, per output), the
CCC loss of the global batch on 1 and 8 devices, the metric directions in Δm, model selection and the monitor, the
checks at the boundary, the synthetic VA source, and regression composed with the rest of the library (weighting
paths, DGR's dummy heads, bf16, resume, eval/predict, init_from) through the real train loop.

Gradient accumulation with a CCC task is checked beside classification's in tests/test_grad_accum.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, set_keys
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import experiment as experiment_lib
from mtlmatch import losses
from mtlmatch import metrics as metrics_lib
from mtlmatch import modes
from mtlmatch import monitor as monitor_lib
from mtlmatch import models
from mtlmatch import objective as objective_lib
from mtlmatch import priors
from mtlmatch import tasks as tasks_lib
from mtlmatch import train
from mtlmatch.data import synthetic_affect

VA = synthetic_affect.VA_TASK


def _pairs(seed=0, n=40, d=2, missing=0.25):
  rng = np.random.default_rng(seed)
  y = rng.uniform(-1, 1, (n, d)).astype(np.float32)
  x = (0.6 * y + 0.3 * rng.standard_normal((n, d)) + 0.1).astype(np.float32)
  y[rng.random((n, d)) < missing] = np.nan
  y[0] = np.nan  # an example with no target at all
  return x, y


def _np_ccc(x, y):
  """Lin's CCC per column over the rows where y is not NaN, population moments, in float64."""
  out = []
  for j in range(x.shape[1]):
    keep = ~np.isnan(y[:, j])
    a, b = x[keep, j].astype(np.float64), y[keep, j].astype(np.float64)
    cov = np.mean((a - a.mean()) * (b - b.mean()))
    out.append(2 * cov / (a.var() + b.var() + (a.mean() - b.mean()) ** 2))
  return np.array(out)


def _np_per_example(entry, y):
  present = ~np.isnan(y)
  count = present.sum(1)
  per = np.where(present, entry, 0).sum(1) / np.maximum(count, 1)
  return per, (count > 0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Losses.


def test_mse_l1_huber_match_numpy_with_missing_targets():
  x, y = _pairs()
  e = x - np.nan_to_num(y)
  for fn, entry in (
      (losses.mse, e**2),
      (losses.l1, np.abs(e)),
      (lambda a, b: losses.huber(a, b, delta=0.3), np.where(np.abs(e) <= 0.3, 0.5 * e**2, 0.3 * (np.abs(e) - 0.15))),
  ):
    per, weight = fn(x, y)
    want_per, want_weight = _np_per_example(entry, y)
    np.testing.assert_allclose(per, want_per, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(weight, want_weight)
    assert weight[0] == 0 and per[0] == 0


def test_ccc_matches_numpy_with_nans_and_its_gradient_finite_differences():
  x, y = _pairs()
  np.testing.assert_allclose(losses.ccc(x, y), _np_ccc(x, y), rtol=1e-5)
  np.testing.assert_allclose(losses.ccc_loss(x, y), np.mean(1 - _np_ccc(x, y)), rtol=1e-5)
  assert float(losses.ccc(y[1:], y[1:])[0]) == pytest.approx(1.0, abs=1e-6)
  # d/dx of the CCC loss against central differences in float64 of the numpy reference, at a few entries.
  grad = np.asarray(jax.grad(lambda p: losses.ccc_loss(p, y))(jnp.asarray(x)))
  assert np.all(np.isfinite(grad)) and np.all(grad[np.isnan(y)] == 0)
  eps = 1e-3
  for i, j in [(1, 0), (5, 1), (17, 0)]:
    if np.isnan(y[i, j]):
      continue
    up, down = x.astype(np.float64).copy(), x.astype(np.float64).copy()
    up[i, j] += eps
    down[i, j] -= eps
    numeric = (np.mean(1 - _np_ccc(up, y)) - np.mean(1 - _np_ccc(down, y))) / (2 * eps)
    np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-3, atol=1e-6)


def test_ccc_loss_ignores_outputs_without_targets_and_stays_finite():
  x, y = _pairs()
  y[:, 1] = np.nan  # arousal never annotated in this batch: the loss is valence's alone, no NaN anywhere
  np.testing.assert_allclose(losses.ccc_loss(x, y), 1 - _np_ccc(x[:, :1], y[:, :1])[0], rtol=1e-5)
  assert np.isnan(np.asarray(losses.ccc(x, y))[1])
  assert float(losses.ccc_loss(x, np.full_like(y, np.nan))) == 0.0
  grad = jax.grad(lambda p: losses.ccc_loss(p, np.full_like(y, np.nan)))(jnp.asarray(x))
  assert np.all(np.asarray(grad) == 0)


def test_ccc_of_the_global_batch_is_the_same_on_one_and_eight_devices():
  """The task loss inside jit over a mesh, the batch sharded on 8 devices, equals the one-device value and numpy's
  global CCC, and so does its gradient — not a mean of per-device CCCs."""
  x, y = _pairs(n=64)
  loss = jax.jit(lambda p, t: objective_lib.task_loss(VA, p, t))
  grad = jax.jit(jax.grad(lambda p, t: objective_lib.task_loss(VA, p, t)))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)
  np.testing.assert_allclose(loss(xs, ys), loss(x, y), rtol=1e-6)
  np.testing.assert_allclose(loss(x, y), np.mean(1 - _np_ccc(x, y)), rtol=1e-5)
  np.testing.assert_allclose(grad(xs, ys), grad(x, y), rtol=1e-5, atol=1e-7)
  per_device = np.mean([np.mean(1 - _np_ccc(x[k::8], y[k::8])) for k in range(8)])
  assert abs(per_device - float(loss(x, y))) > 1e-3  # the check above can tell the two apart


def test_task_options_select_the_loss_and_are_checked():
  x, y = _pairs()
  for name, want in (('mse', losses.mse), ('l1', losses.l1)):
    spec = tasks_lib.TaskSpec('t', 'regression', 2, options={'loss': name})
    np.testing.assert_allclose(objective_lib.task_loss(spec, x, y), losses.masked_mean(*want(x, y)), rtol=1e-6)
  spec = tasks_lib.TaskSpec('t', 'regression', 2, options={'loss': 'huber', 'huber_delta': 0.5})
  np.testing.assert_allclose(
      objective_lib.task_loss(spec, x, y), losses.masked_mean(*losses.huber(x, y, delta=0.5)), rtol=1e-6
  )
  assert tasks_lib.TaskSpec('t', 'regression', 1).option('loss') == 'mse'
  assert hash(VA) == hash(tasks_lib.TaskSpec('va', 'regression', 2, ('valence', 'arousal'), options=dict(VA.options)))
  for options, message in (
      ({'loss': 'mae'}, r"\['loss'\]: got 'mae', expected one of \('mse', 'l1', 'huber', 'ccc'\)"),
      ({'bound': 'sigmoid'}, r"\['bound'\]: got 'sigmoid'"),
      ({'range': (1, -1)}, r"\['range'\]: got \(1, -1\), expected None or \(lo, hi\)"),
      ({'huber_delta': 0}, r"\['huber_delta'\]: got 0, expected a number > 0"),
      ({'scale': 2}, r"got unknown keys \['scale'\] for kind 'regression'"),
  ):
    with pytest.raises(ValueError, match=message):
      tasks_lib.TaskSpec('t', 'regression', 1, options=options)
  with pytest.raises(ValueError, match=r"got unknown keys \['loss'\] for kind 'multiclass'"):
    tasks_lib.TaskSpec('t', 'multiclass', 3, options={'loss': 'mse'})


def test_labels_at_the_data_boundary():
  assert np.isnan(tasks_lib.missing_labels(VA, 3)).all() and tasks_lib.missing_labels(VA, 3).dtype == np.float32
  ok = tasks_lib.validate_labels(VA, np.array([[-1.0, 1.0], [np.nan, 0.25]]))
  assert ok.dtype == np.float32 and np.isnan(ok[1, 0])
  with pytest.raises(ValueError, match=r"labels of task 'va': got value -2.0, expected values in \[-1.0, 1.0\]"):
    tasks_lib.validate_labels(VA, np.array([[-2.0, 0.0]]))
  with pytest.raises(ValueError, match=r'got value inf, expected finite values \(NaN = missing\)'):
    tasks_lib.validate_labels(tasks_lib.TaskSpec('age', 'regression', 1), np.array([[np.inf]]))
  with pytest.raises(ValueError, match=r'got shape \(2,\), expected \[B, 2\] \(regression\)'):
    tasks_lib.validate_labels(VA, np.zeros(2))
  # Inside jit an infinite target weighs 0 and is counted, like an out-of-range class.
  per, weight = jax.jit(losses.mse)(np.zeros((2, 2)), np.array([[np.inf, 1.0], [np.inf, np.nan]]))
  assert per.tolist() == [1.0, 0.0] and weight.tolist() == [1.0, 0.0]
  assert int(tasks_lib.kind_of(VA).invalid_labels(np.array([[np.inf, 1.0], [np.nan, -np.inf]]), 2)) == 2


# ---------------------------------------------------------------------------------------------------------------
# Metrics and their directions.


def test_metrics_accumulate_over_batches_and_match_numpy():
  x, y = _pairs(n=50)
  mask = np.ones(50, np.float32)
  mask[-5:] = 0  # padding
  total = None
  for lo in range(0, 50, 16):
    stats = metrics_lib.regression_statistics(VA, x[lo : lo + 16], y[lo : lo + 16], mask[lo : lo + 16])
    total = metrics_lib.accumulate(total, jax.device_get(stats))
  got = metrics_lib.regression_finalize(VA, total)
  xr, yr = x[:45], y[:45]
  for j, name in enumerate(('valence', 'arousal')):
    keep = ~np.isnan(yr[:, j])
    a, b = xr[keep, j].astype(np.float64), yr[keep, j].astype(np.float64)
    assert got[f'mae_{name}'] == pytest.approx(np.mean(np.abs(a - b)), rel=1e-5)
    assert got[f'rmse_{name}'] == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-5)
    assert got[f'pearson_{name}'] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-5)
    assert got[f'ccc_{name}'] == pytest.approx(_np_ccc(xr[:, j : j + 1], yr[:, j : j + 1])[0], rel=1e-5)
  assert got['ccc'] == pytest.approx((got['ccc_valence'] + got['ccc_arousal']) / 2)
  assert got['count'] == int(np.any(~np.isnan(yr), axis=1).sum())
  empty = metrics_lib.regression_finalize(VA, metrics_lib.regression_zero_statistics(VA))
  assert np.isnan(empty['ccc']) and empty['count'] == 0


def test_delta_m_of_a_hand_computed_mixed_table():
  """Four tasks, four kinds of metric, two lower-is-better: Δm = mean of the signed relative changes."""
  tasks = {
      'expr': tasks_lib.TaskSpec('expr', 'multiclass', 7),
      'aus': tasks_lib.TaskSpec('aus', 'multilabel', 3),
      'va': VA,
      'age': tasks_lib.TaskSpec('age', 'regression', 1, options={'metric': 'mae'}),
  }
  single = {'expr': {'accuracy': 0.80}, 'aus': {'mean_f1': 0.50}, 'va': {'ccc': 0.40}, 'age': {'mae': 5.0}}
  model = {'expr': {'accuracy': 0.84}, 'aus': {'mean_f1': 0.45}, 'va': {'ccc': 0.50}, 'age': {'mae': 6.0}}
  # (+0.04/0.80, −0.05/0.50, +0.10/0.40, −(6 − 5)/5) = (+5 %, −10 %, +25 %, −20 %): Δm = 0 %.
  assert metrics_lib.delta_m(tasks, model, single) == pytest.approx(0.0, abs=1e-9)
  model['age']['mae'] = 4.0  # lower MAE is better: +20 % instead of −20 %
  assert metrics_lib.delta_m(tasks, model, single) == pytest.approx(10.0)
  both = {'va': ('ccc', 'mae_valence')}
  two = metrics_lib.delta_m(
      {'va': VA}, {'va': {'ccc': 0.5, 'mae_valence': 0.3}}, {'va': {'ccc': 0.4, 'mae_valence': 0.2}}, which=both
  )
  assert two == pytest.approx((25.0 - 50.0) / 2)
  assert VA.higher_is_better('ccc') and not VA.higher_is_better('mae_arousal') and not VA.higher_is_better('rmse')


def test_selection_prefers_the_lower_mae_and_the_monitor_flags_a_higher_one():
  age = tasks_lib.TaskSpec('age', 'regression', 1, options={'metric': 'mae'})
  assert age.primary_metric == 'mae'
  assert metrics_lib.selection_score({'age': age}, {'age': {'mae': 3.0}}) > metrics_lib.selection_score(
      {'age': age}, {'age': {'mae': 4.0}}
  )
  config = config_lib.base_config()
  set_keys(config, nt_reference={'age': 5.0}, nt_margin=0.1, nt_patience=1)
  monitor = monitor_lib.build(config, {'age': age}, {})
  record, messages = monitor.update(None, 1, {'age': {'mae': 5.05}})  # worse, but within the margin
  assert record['below']['age'] == 0 and not messages
  record, messages = monitor.update(record, 2, {'age': {'mae': 5.5}})
  assert record['below']['age'] == 1 and 'is above its single-task reference 5.0000 + margin' in messages[0]
  curve = dataclasses.replace(monitor, references={'age': 2.0}, curves={'age': ((1, 4.0), (2, 3.0), (3, 3.5))})
  assert curve.reference_at('age', 3) == 3.0  # the running best of a MAE is its minimum


def test_task_options_from_the_config_reach_the_task(tfds_dir):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,va,smoke')
  config.data.data_dir = tfds_dir
  config.task_options.va.loss = 'mse'
  exp = experiment_lib.build_experiment(config)
  assert exp.benchmark.tasks['va'].option('loss') == 'mse' and exp.benchmark.tasks['va'].option('bound') == 'tanh'
  config.task_options.va.loss = 'l2'
  with pytest.raises(ValueError, match=r"TaskSpec\('va'\).options\['loss'\]: got 'l2'"):
    experiment_lib.build_experiment(config)
  config.task_options = {'age': {'loss': 'l1'}}
  with pytest.raises(ValueError, match=r"config.task_options: got tasks \['age'\], expected some of"):
    experiment_lib.build_experiment(config)


def test_dm_and_co_annotation_refuse_a_regression_task(tfds_dir):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:dm,va,smoke')
  config.data.data_dir = tfds_dir
  config.objective.terms.dm.task_b = 'va'
  with pytest.raises(ValueError, match=r"objective term 'dm': task_b='va' is a regression task, expected a "):
    experiment_lib.build_experiment(config)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic VA source.


def test_va_follows_the_circumplex_and_leaves_the_other_labels_and_images_unchanged():
  split = synthetic_affect.generate_split(0, 'va', 2000, render=False)
  classes = list(priors.load_prior('expressions_to_aus').task_a.class_names)
  mean = {c: split['va'][split['expression'] == classes.index(c)].mean(0) for c in classes}
  assert mean['happy'][0] > 0.5 and mean['sad'][0] < -0.4 and mean['sad'][1] < -0.3
  assert mean['angry'][0] < -0.3 and mean['angry'][1] > 0.5 and mean['fearful'][1] > 0.4
  assert mean['surprised'][1] > 0.5 and np.all(np.abs(mean['neutral']) < 0.05)
  assert split['va'].dtype == np.float32 and np.all(np.abs(split['va']) <= 1)
  # The expression, the AUs and the pixels come from the split's own stream, as before VA existed.
  rng = np.random.default_rng([0, synthetic_affect.SPLIT_IDS['test']])
  expression, aus = synthetic_affect.sample_labels(rng, 64, synthetic_affect.softened_prior())
  image = synthetic_affect.render_faces(rng, aus)
  test = synthetic_affect.generate_split(0, 'test', 64)
  np.testing.assert_array_equal(test['expression'], expression)
  np.testing.assert_array_equal(test['image'], image)


def test_the_va_token_adds_a_disjoint_source_and_the_task(tfds_dir):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,va,smoke')
  assert config.data.options.num_va == 128
  assert all(VA.option(k) == v for k, v in config.task_options.va.items())  # the config states the task's options
  bench = data_lib.get_benchmark(config.data.name, data_dir=tfds_dir, **config.data.options.to_dict())
  assert list(bench.tasks) == ['expression', 'aus', 'va'] and bench.tasks['va'] == VA
  assert [(s.name, s.tasks) for s in bench.train_sources][-1] == ('va', ('va',))
  labels = data_lib.source_labels(bench.train_sources[-1], bench.tasks)
  assert np.isnan(labels['va']).sum() == 0 and np.all(labels['expression'] == -1) and np.all(labels['aus'] == -1)
  assert bench.eval_sources[0].tasks == ('expression', 'aus', 'va')
  with pytest.raises(ValueError, match=r"config variant: got 'va', which configs/shopping.py does not offer"):
    config_lib.load_config(f'{REPO}/configs/shopping.py:mtl,va')
  with pytest.raises(ValueError, match=r"'va' after 'va', expected at most one data token"):
    config_lib.load_config(f'{REPO}/configs/affect.py:va,va')


# ---------------------------------------------------------------------------------------------------------------
# Composition through the real train loop.


def _config(tfds_dir, variant='mtl', **overrides):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:{variant},va,smoke')
  config.data.data_dir = tfds_dir
  return set_keys(config, **overrides)


def _bench(tfds_dir):
  config = _config(tfds_dir)
  return data_lib.get_benchmark(config.data.name, data_dir=tfds_dir, **config.data.options.to_dict())


def _check_va(metrics):
  assert {'ccc', 'mae', 'rmse', 'pearson', 'count'} <= set(metrics)
  assert {f'{m}_{o}' for m in ('ccc', 'mae', 'rmse') for o in ('valence', 'arousal')} <= set(metrics)
  assert metrics['count'] == 96 and 0 < metrics['mae'] < 2 and -1 <= metrics['ccc'] <= 1


def test_va_trains_and_evaluates_predicts_and_fine_tunes(tfds_dir, tmp_path):
  workdir, config = str(tmp_path / 'run'), _config(tfds_dir)
  results = train.train_and_evaluate(config, workdir)
  on_disk = json.loads((tmp_path / 'run' / 'results.json').read_text())
  _check_va(on_disk['metrics']['va'])
  assert set(on_disk['selection']['validation']['va']) >= {'ccc', 'mae'} and results['step'] == 6
  # --mode=eval recomputes the same test metrics from the checkpoint.
  again = modes.evaluate_checkpoint(config, workdir)
  assert again['metrics']['va']['ccc'] == pytest.approx(on_disk['metrics']['va']['ccc'], abs=1e-6)
  # --mode=predict writes the values (bounded by tanh) and the targets.
  (path,) = modes.predict(config, workdir, source='test')
  with np.load(path) as saved:
    assert saved['va'].shape == (96, 2) and saved['va'].dtype == np.float32 and np.all(np.abs(saved['va']) < 1)
    bench = _bench(tfds_dir)
    np.testing.assert_array_equal(saved['labels/va'], data_lib.source_labels(bench.eval_sources[0], bench.tasks)['va'])
    metrics = metrics_lib.regression_finalize(
        VA, jax.device_get(metrics_lib.regression_statistics(VA, saved['va'], saved['labels/va']))
    )
  assert metrics['ccc'] == pytest.approx(on_disk['metrics']['va']['ccc'], abs=1e-5)
  # init_from: the heads and encoder of this run start a new one.
  tuned = train.train_and_evaluate(_config(tfds_dir, init_from=workdir, total_steps=2), str(tmp_path / 'tuned'))
  assert tuned['step'] == 2 and 'va' in tuned['metrics']


# One method per gradient path (losses, shared rows, feature rows, meta); UW is a second 'losses' method, a whole-run
# duplicate kept for `make test-all`.
@pytest.mark.parametrize(
    'variant, method',
    [
        ('dgr', 'ew'),
        pytest.param('mtl', 'uw', marks=pytest.mark.slow),
        ('mtl', 'upgrad'),
        ('mtl', 'mgda_ub'),
        ('mtl', 'auto_lambda'),
    ],
)
def test_every_gradient_path_and_dgr_train_a_regression_task(variant, method, tfds_dir, tmp_path):
  config = _config(tfds_dir, variant, total_steps=3, checkpoint_every=3)
  config_lib.set_weighting(config, method)
  results = train.train_and_evaluate(config, str(tmp_path))
  _check_va(results['metrics']['va'])


def test_dgr_on_a_regression_task_is_the_norm_of_the_dummy_heads_gradient():
  """DGR's penalty for the CCC task equals ‖∇_φ L_CCC(φ; f)‖² computed here directly with jax.grad."""
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.standard_normal((32, 6)), jnp.float32)
  _, y = _pairs(n=32)
  head = models.build_task_head(VA, 'linear')
  dummies = losses.init_dummy_params(head, jax.random.key(1), features, num_dummies=2)
  got = losses.dummy_gradient_norm(
      features,
      y,
      dummies,
      head_apply=lambda p, f: head.apply({'params': p}, f),
      loss_fn=lambda out, t: tasks_lib.kind_of(VA).loss(VA, out, t),
      reduce=lambda means: tasks_lib.kind_of(VA).reduce(VA, means),
  )
  expected = []
  for k in range(2):
    phi = jax.tree.map(lambda p: p[k], dummies)
    g = jax.grad(lambda p: losses.ccc_loss(head.apply({'params': p}, features), y))(phi)
    expected.append(sum(float(jnp.sum(v * v)) for v in jax.tree.leaves(g)))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  assert np.all(np.abs(head.apply({'params': jax.tree.map(lambda p: p[0], dummies)}, 50 * features)) <= 1)


def test_bf16_and_resume_with_a_regression_task(tfds_dir, tmp_path):
  config = _config(tfds_dir, precision='bfloat16', checkpoint_every=100, **{'evals.test.every': 0})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at=3) == {'step': 3, 'interrupted': True}
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  _check_va(straight['metrics']['va'])
  assert resumed['metrics'] == straight['metrics']
