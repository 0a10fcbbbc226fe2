"""The seams of the train loop, shown from outside the package: an encoder whose output is a pytree (two feature
arrays of different shapes), a head that reads what it needs of it, and a task kind registered here only (a binary
task with one output and its own loss and metrics), trained end to end from the real loop with EW (the losses
path), PCGrad (Jacobian rows w.r.t. the shared parameters), MGDA-UB (rows w.r.t. the shared features) and DGR
(dummy heads of the toy head's form, grad of a grad through the pytree)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import losses
from mtlmatch import models
from mtlmatch import tasks as tasks_lib
from mtlmatch import train


class TwoOutputEncoder(nn.Module):
  """images [B, H, W, C] → {'map': [B, H/2, W/2, width], 'pooled': [B, features]}."""

  width: int = 4
  features: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    fmap = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2))(x))
    return {'map': fmap, 'pooled': nn.tanh(nn.Dense(self.features)(fmap.mean(axis=(1, 2))))}


class MapAndPooledHead(nn.Module):
  """Reads both outputs: the pooled vector and the map's spatial mean, concatenated, to ``num_classes`` outputs."""

  num_classes: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes)(jnp.concatenate([features['pooled'], features['map'].mean(axis=(1, 2))], -1))


def _binary_loss(task, outputs, labels):
  """One logit per example: binary cross-entropy, weight 0 where the label is missing (-1)."""
  present = labels != tasks_lib.MISSING
  z = outputs[:, 0]
  y = jnp.where(present, labels, 0).astype(jnp.float32)
  per_example = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
  return jnp.where(present, per_example, 0.0), present.astype(jnp.float32)


def _binary_statistics(task, outputs, labels, mask=None):
  del task
  real = jnp.ones(labels.shape, bool) if mask is None else mask > 0
  counted = real & (labels != tasks_lib.MISSING)
  correct = counted & ((outputs[:, 0] > 0).astype(jnp.int32) == labels)
  return {'correct': jnp.sum(correct, dtype=jnp.int32), 'count': jnp.sum(counted, dtype=jnp.int32)}


BINARY = tasks_lib.TaskKind(
    'toy_binary',
    label_shape=lambda num_classes: (),
    label_range=(0, 2),
    min_classes=1,
    loss=_binary_loss,
    statistics=_binary_statistics,
    zero_statistics=lambda task: {'correct': np.zeros((), np.int64), 'count': np.zeros((), np.int64)},
    finalize=lambda task, s: {'accuracy': float(s['correct']) / max(int(s['count']), 1), 'count': int(s['count'])},
    primary_metric='accuracy',
    predict=jax.nn.sigmoid,
    invalid_labels=lambda labels, num_classes: jnp.sum((labels != tasks_lib.MISSING) & ((labels < 0) | (labels > 1))),
    head_outputs=lambda num_classes: 1,
)


@pytest.fixture
def toy_registry(monkeypatch):
  monkeypatch.setitem(tasks_lib.KINDS, BINARY.name, BINARY)
  monkeypatch.setitem(models.ENCODERS, 'two_output', TwoOutputEncoder)
  monkeypatch.setitem(models.HEADS, 'map_and_pooled', MapAndPooledHead)


def _benchmark():
  """A classification task on one source and the toy binary task on another (disjoint), labels learnable from the
  images' brightness."""
  rng = np.random.default_rng(0)
  task_specs = [tasks_lib.TaskSpec('digit', 'multiclass', 3), tasks_lib.TaskSpec('bright', 'toy_binary', 1)]

  def source(name, n, task, split='train'):
    level = rng.integers(0, 3, n)
    images = (rng.random((n, 8, 8, 1)) * 40 + level[:, None, None, None] * 90).astype(np.uint8)
    label = level if task == 'digit' else (level > 0).astype(np.int64)
    return data.array_source(name, images, {task: label}, split=split)

  train_sources = [source('digits', 64, 'digit'), source('brightness', 64, 'bright')]
  tests = [source('test_digits', 32, 'digit', 'test'), source('test_brightness', 32, 'bright', 'test')]
  return data.make_benchmark('toy_seams', task_specs, train_sources, eval_sources=tests)


def _config(method: str, *, dgr: bool):
  config = config_lib.base_config()
  config.encoder.name = 'two_output'
  config.encoder.kwargs = config_lib.encoder_kwargs('two_output')
  config.head.name = 'map_and_pooled'
  config_lib.set_weighting(config, method)
  config.total_steps, config.batch_size, config.eval_batch_size = 6, 16, 32
  config.log_every, config.checkpoint_every, config.optimizer.warmup_steps = 3, 6, 1
  config.optimizer.learning_rate = 1e-2
  config.data.validation_fraction = 0.0
  config.evals.validation.enabled = config.evals.selection.enabled = False
  if dgr:
    config.objective.terms.dgr = config_lib.dgr_term(weight=0.1)
  return config


@pytest.mark.parametrize('method, dgr', [('ew', True), ('pcgrad', True), ('mgda_ub', False)])
def test_pytree_encoder_and_a_task_kind_registered_outside_train_end_to_end(toy_registry, tmp_path, method, dgr):
  results = train.train_and_evaluate(_config(method, dgr=dgr), str(tmp_path), benchmark=_benchmark())
  assert results['step'] == 6
  assert set(results['metrics']) == {'digit', 'bright'}
  assert results['metrics']['bright']['count'] == 32 and 0.0 <= results['metrics']['bright']['accuracy'] <= 1.0
  assert results['metrics']['digit']['count'] == 32


def test_the_toy_kind_is_checked_at_the_data_boundary(toy_registry):
  spec = tasks_lib.TaskSpec('bright', 'toy_binary', 1)
  assert spec.primary_metric == 'accuracy' and tasks_lib.missing_labels(spec, 2).tolist() == [-1, -1]
  with pytest.raises(ValueError, match=r"labels of task 'bright': got value 2, expected values in \{-1, 0, 1\}"):
    tasks_lib.validate_labels(spec, np.array([0, 2]))
  with pytest.raises(ValueError, match=r"TaskSpec\('x'\).kind: got 'ordinal', expected one of"):
    tasks_lib.TaskSpec('x', 'ordinal', 1)


def test_the_rows_of_a_pytree_encoder_equal_per_task_grads(toy_registry):
  """PCGrad's input through the pytree: the step's per-task encoder rows equal jax.grad of each task loss alone."""
  from mtlmatch import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from mtlmatch import step as step_lib  # pylint: disable=g-import-not-at-top

  exp = experiment_lib.build_experiment(_config('ew', dgr=False), benchmark=_benchmark())
  state = exp.init_state()
  batch = next(exp.train_batches(0))
  features, _, pullback = step_lib.encoder_pass(exp.model, state.params, state.batch_stats, batch['image'])

  def task_loss(encoder_params, task):
    params = {**state.params, 'encoder': encoder_params}
    feats, _ = exp.model.encode({'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True)
    out = exp.model.apply_head(task, params['heads'][task], feats)
    spec = exp.benchmark.tasks[task]
    return losses.masked_mean(*tasks_lib.kind_of(spec).loss(spec, out, batch['labels'][task]))

  for task in exp.benchmark.tasks:
    d_features = jax.grad(
        lambda f: losses.masked_mean(
            *tasks_lib.kind_of(exp.benchmark.tasks[task]).loss(
                exp.benchmark.tasks[task],
                exp.model.apply_head(task, state.params['heads'][task], f),
                batch['labels'][task],
            )
        )
    )(features)
    row = pullback(jax.tree.map(lambda g: g[None], d_features), 'rows')
    expected = jax.grad(task_loss)(state.params['encoder'], task)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), row, expected)


def test_invalid_labels_are_counted_by_the_step_and_halt_the_loop(toy_registry):
  """A label out of its task's range (here from a custom stream: the data layer refuses them in sources) weighs 0 in
  the loss, is counted by its kind in the step's ``invalid_labels``, and the loop's check raises on it."""
  from mtlmatch import experiment as experiment_lib  # pylint: disable=g-import-not-at-top

  exp = experiment_lib.build_experiment(_config('ew', dgr=False), benchmark=_benchmark())
  batch = next(exp.train_batches(0))
  labels = {t: np.asarray(y).copy() for t, y in batch['labels'].items()}
  labels['digit'][np.flatnonzero(labels['digit'] >= 0)[0]] = 7  # 3 classes
  labels['bright'][np.flatnonzero(labels['bright'] >= 0)[:2]] = 5  # the toy kind's own rule
  bad = {**batch, 'labels': jax.device_put(labels, exp.data_sharding)}
  _, metrics = exp.step_fn(exp.init_state(), bad)
  assert int(metrics['invalid_labels']) == 3 and np.isfinite(float(metrics['loss']))
  with pytest.raises(ValueError, match=r'labels neither missing \(-1\) nor valid for their task reached the train'):
    train.check_labels(4, float(metrics['invalid_labels']))
  train.check_labels(4, 0.0)
