"""Auto-Lambda (``weighting.AutoLambda``) and its meta step in the train step.

* the meta-gradient the train step logs (``meta/grad/<loss>``) against L_val(θ − α Σ_t λ_t ∇L_t) written here from
  the model and the objective (reverse mode through the look-ahead, and central finite differences in λ);
* λ's Adam step against numpy (PyTorch's Adam formula), and the new λ is what the step's model update used;
* a task absent from the training batch (or from the validation batch) gets weight 0 and nothing is non-finite;
* 1 device vs 8 devices: the same λ, parameters and metrics after 2 steps;
* ``Experiment.train_batches(start_step=s)`` yields the uninterrupted stream's s-th validation batch;
* one ValueError when there is no validation split.

Cheapness: the affect smoke config with a tiny CNN (widths (4,), 8 features), batch 16; the step is compiled once
per mesh with the fast XLA:CPU options of test_weighting_in_train_step.py and shared by the tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, compile_fast as _compile
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import experiment as experiment_lib
from mtlmatch import weighting

COMBINED = ('task/expression', 'task/aus')
LOOKAHEAD_LR = 0.5  # fixed α (the smoke schedule's warm-up starts at 0, which would make the first meta step 0)
META_LR = 0.01


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _config(tfds_dir: str, **overrides):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4,), 'features': 8}
  config.batch_size = 16
  config_lib.set_weighting(config, 'auto_lambda', lookahead_lr=LOOKAHEAD_LR, lr=META_LR)
  for key, value in overrides.items():
    config_lib.set_keys(config, {key: value})
  return config


@functools.cache
def _setup(tfds_dir: str):
  """Benchmark, experiment on 1 device, its host initial state and 2 host batches (with their validation batches)."""
  config = _config(tfds_dir)
  benchmark = data.get_benchmark(config.data.name, data_dir=tfds_dir, seed=config.data.seed, **config.data.options)
  exp = experiment_lib.build_experiment(config, _mesh(1), benchmark=benchmark)
  initial = jax.device_get(_compile(jax.jit(exp.init_state).lower())())
  stream = exp.train_batches(0)
  batches = [jax.device_get(next(stream)) for _ in range(2)]
  for b in batches:
    for part in (b, b['validation']):
      assert (part['labels']['aus'] >= 0).any() and (part['labels']['expression'] >= 0).any()
  return benchmark, exp, initial, batches


@functools.cache
def _step(n: int, tfds_dir: str):
  benchmark, exp1, initial, batches = _setup(tfds_dir)
  exp = exp1 if n == 1 else experiment_lib.build_experiment(_config(tfds_dir), _mesh(n), benchmark=benchmark)
  state = jax.device_put(jax.tree.map(np.array, initial), exp.replicated)
  return exp, _compile(exp.step_fn.lower(state, batches[0]))


@functools.cache
def _run(n: int, tfds_dir: str):
  """Host state and metrics after each of the 2 steps on an n-device mesh."""
  exp, step = _step(n, tfds_dir)
  _, _, initial, batches = _setup(tfds_dir)
  state = jax.device_put(jax.tree.map(np.array, initial), exp.replicated)
  out = []
  for batch in batches:
    state, metrics = step(state, batch)
    out.append((jax.device_get(state), jax.device_get(metrics)))
  return out


def _reference_val_loss(exp, state, batch):
  """λ ↦ L_val(θ − α Σ_t λ_t ∇L_t(θ; train)), from the model and the objective (no train-step code)."""

  def task_losses(params, part):
    features, _ = exp.model.encode({'params': params, 'batch_stats': state.batch_stats}, part['image'], train=True)
    logits = {t: exp.model.apply_head(t, params['heads'][t], features) for t in exp.model.heads}
    named = exp.objective(
        {'features': features, 'logits': logits}, part['labels'], dummies={}, rng=jax.random.PRNGKey(0)
    )
    return jnp.stack([named[n] for n in COMBINED])

  def val_loss(lam):
    g = jax.grad(lambda p: jnp.dot(lam, task_losses(p, batch)))(state.params)
    lookahead = jax.tree.map(lambda p, d: p - LOOKAHEAD_LR * d, state.params, g)
    return jnp.sum(task_losses(lookahead, batch['validation']))  # every task primary

  return val_loss


def adam_reference(grads, lr, init):
  """PyTorch's Adam (β = 0.9, 0.999, ε = 1e-8) on λ, in float64: the λ after each step."""
  lam, m, v, out = np.asarray(init, np.float64), 0.0, 0.0, []
  for k, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g**2
    lam = lam - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
    out.append(lam)
  return out


def test_meta_gradient_matches_the_look_ahead_loss_and_finite_differences(tfds_dir):
  _, exp, initial, batches = _setup(tfds_dir)
  (_, metrics), _ = _run(1, tfds_dir)
  meta_grad = np.array([metrics[f'meta/grad/{n}'] for n in COMBINED])
  lam = jnp.full((2,), 0.1, jnp.float32)
  val_loss = _reference_val_loss(exp, initial, batches[0])
  loss, exact = jax.jit(jax.value_and_grad(val_loss))(lam)
  np.testing.assert_allclose(metrics['meta/val_loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['meta/lookahead_lr'], LOOKAHEAD_LR)
  # Reverse mode through the look-ahead (grad of grad): the same exact derivative by another route.
  np.testing.assert_allclose(meta_grad, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
  # Central finite differences in λ (float32 losses: h large enough that rounding stays far below the signal).
  h = 1e-2
  shifted = jax.jit(jax.vmap(val_loss))(jnp.concatenate([lam + h * jnp.eye(2), lam - h * jnp.eye(2)]))
  fd = (np.asarray(shifted[:2], np.float64) - np.asarray(shifted[2:], np.float64)) / (2 * h)
  assert np.abs(meta_grad).min() > 1e-3, meta_grad  # a signal, not rounding noise
  np.testing.assert_allclose(meta_grad, fd, rtol=1e-2)


def test_adam_step_on_lambda_matches_numpy_and_feeds_the_model_update(tfds_dir):
  # The method alone: Adam on λ against numpy, over steps with changing signs.
  method = weighting.get_method('auto_lambda', lr=0.05, init=0.3)
  state = method.init(3)
  grads = np.array([[0.5, -1.0, 0.0], [0.2, -0.1, 0.0], [-3.0, 0.4, 1e-3], [0.0, 0.0, 0.0]], np.float32)
  update = jax.jit(method.meta_update)
  for g, want in zip(grads, adam_reference(grads, 0.05, [0.3] * 3)):
    state = update(state, g)
    np.testing.assert_allclose(state['lambdas'], want, rtol=1e-5)
  assert int(state['adam_count']) == 4 and int(state['step']) == 0  # `step` counts `apply` calls only
  with pytest.raises(ValueError, match=r'meta_grad: got shape \(2,\), expected \[T\]'):
    method.meta_update(state, jnp.zeros(2))
  # In the train step: the new λ is the Adam step from the logged meta-gradients, and the step's weights are it.
  runs = _run(1, tfds_dir)
  meta_grads = [[m[f'meta/grad/{n}'] for n in COMBINED] for _, m in runs]
  for (state, metrics), want in zip(runs, adam_reference(meta_grads, META_LR, [0.1, 0.1])):
    np.testing.assert_allclose(state.weighting_state['lambdas'], want, rtol=1e-5)
    np.testing.assert_allclose([metrics[f'weight/{n}'] for n in COMBINED], want, rtol=1e-5)


def test_update_is_the_lambda_weighted_gradient(tfds_dir):
  """The step's gradient norm equals ‖Σ_t λ_t^new ∇L_t‖ (encoder and heads) from jax.grad of the weighted loss."""
  _, exp, initial, batches = _setup(tfds_dir)
  (state, metrics), _ = _run(1, tfds_dir)
  lam = jnp.asarray(state.weighting_state['lambdas'])

  def weighted(params):
    features, _ = exp.model.encode(
        {'params': params, 'batch_stats': initial.batch_stats}, batches[0]['image'], train=True
    )
    logits = {t: exp.model.apply_head(t, params['heads'][t], features) for t in exp.model.heads}
    named = exp.objective.task_losses(logits, batches[0]['labels'])
    return jnp.dot(lam, jnp.stack([named[n] for n in COMBINED]))

  grads = jax.jit(jax.grad(weighted))(initial.params)
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-4)


def test_absent_task_gets_weight_zero_and_nothing_is_nan(tfds_dir):
  exp, step = _step(8, tfds_dir)
  _, _, initial, batches = _setup(tfds_dir)
  no_aus = lambda part: {  # noqa: E731
      **part,
      'labels': {**part['labels'], 'aus': np.full_like(part['labels']['aus'], -1)},
  }
  cases = {
      'train': {**no_aus(batches[0]), 'validation': batches[0]['validation']},
      'validation': {**batches[0], 'validation': no_aus(batches[0]['validation'])},
      'both': {**no_aus(batches[0]), 'validation': no_aus(batches[0]['validation'])},
  }
  for case, batch in cases.items():
    state = jax.device_put(jax.tree.map(np.array, initial), exp.replicated)
    state, metrics = jax.device_get(step(state, batch))
    assert bool(metrics['finite']), (case, metrics)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(metrics)), case
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state.weighting_state)), case
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state.params)), case
    if case in ('train', 'both'):
      assert metrics['loss/task/aus'] == 0.0 and metrics['weight/task/aus'] == 0.0
      assert metrics['meta/grad/task/aus'] == 0.0  # zero gradient row: no meta-gradient either
      assert metrics['weight/task/expression'] > 0
    else:
      assert metrics['weight/task/aus'] > 0
  # `apply` alone: weight 0 for an absent task (zero loss), λ for the others; no task present gives a zero update.
  method = weighting.METHODS['auto_lambda']
  state = method.init(3, init=0.2)
  grads = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32).at[1].set(0.0)
  update, weights, new = jax.jit(method.apply)(state, grads, jnp.array([0.7, 0.0, 1.3]))
  np.testing.assert_allclose(weights, [0.2, 0.0, 0.2])
  np.testing.assert_allclose(update, 0.2 * (grads[0] + grads[2]), rtol=1e-6)
  assert int(new['step']) == 1 and np.all(new['lambdas'] == state['lambdas'])
  update, weights, _ = jax.jit(method.apply)(state, jnp.zeros((3, 5)), jnp.zeros(3))
  assert np.all(np.asarray(update) == 0) and np.all(np.asarray(weights) == 0)


def test_one_device_equals_eight(tfds_dir):
  one, eight = _run(1, tfds_dir), _run(8, tfds_dir)
  for (s1, m1), (s8, m8) in zip(one, eight, strict=True):
    np.testing.assert_allclose(s8.weighting_state['lambdas'], s1.weighting_state['lambdas'], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert set(m1) == set(m8)
    for key in m1:
      if key.startswith(('loss', 'weight/', 'meta/')) or key == 'grad_norm':
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert bool(m1['finite']) and bool(m8['finite'])
  initial = _setup(tfds_dir)[2]
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(one[-1][0].params)))
  assert not np.allclose(one[-1][0].weighting_state['lambdas'], 0.1)  # λ moved


def test_resumed_stream_yields_the_same_validation_batches(tfds_dir):
  _, exp, _, batches = _setup(tfds_dir)
  resumed = jax.device_get(next(exp.train_batches(1)))
  for part in (resumed, resumed['validation']):
    assert set(part) >= {'image', 'labels', 'source'}
  jax.tree.map(np.testing.assert_array_equal, resumed, batches[1])
  # Another stream than the training one: other examples (the validation split) under another seed.
  assert not np.array_equal(batches[0]['image'], batches[0]['validation']['image'])
  assert experiment_lib.validation_seed(exp.config.seed) != exp.config.seed
  assert experiment_lib.validation_seed(0) == experiment_lib.validation_seed(0) != experiment_lib.validation_seed(1)


def test_no_validation_split_is_one_clear_error(tfds_dir):
  benchmark = _setup(tfds_dir)[0]
  config = _config(tfds_dir, **{'data.validation_fraction': 0.0})
  with pytest.raises(
      ValueError,
      match=r"weighting.name='auto_lambda' .* config.data.validation_fraction=0.0 holds out no validation split: "
      r'expected config.data.validation_fraction in \(0, 1\)',
  ):
    experiment_lib.build_experiment(config, _mesh(1), benchmark=benchmark)


def test_batchnorm_keeps_the_training_batch_statistics(tfds_dir):
  """With BatchNorm (a one-block ResNet), the new running statistics are those of the training batch's forward at θ:
  the validation forward at θ' (train mode) normalises with its own batch statistics but leaves no trace."""
  benchmark, _, _, batches = _setup(tfds_dir)
  config = _config(tfds_dir)
  config_lib.set_encoder(config, 'resnet18', width=2, stage_sizes=(1,))
  exp = experiment_lib.build_experiment(config, _mesh(1), benchmark=benchmark)
  state = jax.device_get(_compile(jax.jit(exp.init_state).lower())())
  assert jax.tree.leaves(state.batch_stats)
  fresh = jax.device_put(jax.tree.map(np.array, state), exp.replicated)
  new, metrics = jax.device_get(_compile(exp.step_fn.lower(fresh, batches[0]))(fresh, batches[0]))
  assert bool(metrics['finite'])
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  _, want = jax.jit(functools.partial(exp.model.encode, train=True))(variables, batches[0]['image'])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), new.batch_stats, want)
  _, other = jax.jit(functools.partial(exp.model.encode, train=True))(variables, batches[0]['validation']['image'])
  assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(want)[0])
