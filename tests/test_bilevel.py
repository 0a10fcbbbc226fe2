"""MOML and FORUM (``weighting.bilevel``): their meta steps against independent references, and both in the train step.

* FORUM's QP (`forum_weights`) against scipy's SLSQP on the authors' own (λ, ν) program;
* MOML's meta step on a small smooth model against reverse mode through the look-ahead (grad of grad) and an MGDA
  solved by scipy, then PyTorch's Adam in numpy;
* FORUM's meta step on the same model against numpy: the inner SGD loop, ∇q, the QP, ν, the step's weights and the
  logits' Adam step; and the constraint-descent property ⟨∇q, d⟩ ≥ ρ‖∇q‖²;
* both in the real train step (the affect smoke config, a tiny CNN, batch 16): 1 device vs 8 devices after 2 steps,
  finite, the parameters and the logits moved; FORUM needs no validation split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from conftest import REPO, compile_fast as _compile
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import experiment as experiment_lib
from mtlmatch import weighting as W

RNG = np.random.default_rng(2028)


# ---- FORUM's QP -------------------------------------------------------------------------------------------------
def authors_qp(g_hat, g_q, rho):
  """The authors' program over x = (λ, ν) ≥ 0: min ‖Aᵀx‖² − ν ρ ‖g_q‖², Σλ = 1, ν ≥ Σ λ_t π_t (SLSQP, float64)."""
  num_tasks = len(g_hat)
  a = np.vstack([g_hat, g_q])
  gram = a @ a.T
  q = g_q @ g_q
  pi = rho - g_hat @ g_q / q

  def fun(x):
    return x @ gram @ x - x[-1] * rho * q

  cons = [
      {'type': 'eq', 'fun': lambda x: np.sum(x[:-1]) - 1.0},
      {'type': 'ineq', 'fun': lambda x: x[-1] - x[:-1] @ pi},
  ]
  best = None
  starts = [np.r_[np.eye(num_tasks)[t], 1.0] for t in range(num_tasks)] + [np.r_[np.full(num_tasks, 1 / num_tasks), 1]]
  for start in starts:
    res = optimize.minimize(
        fun, start, jac=lambda x: 2 * gram @ x - np.r_[np.zeros(num_tasks), rho * q], constraints=cons,
        bounds=[(0, None)] * (num_tasks + 1), method='SLSQP', options={'ftol': 1e-15, 'maxiter': 1000},
    )  # fmt: skip
    if res.success and (best is None or res.fun < best.fun):
      best = res
  return best.x[:-1], best.fun


@pytest.mark.parametrize('case', range(7))
def test_forum_weights_solve_the_authors_qp(case):
  rng = np.random.default_rng(case)
  num_tasks = 3  # one shape: one compile
  g = rng.normal(size=(num_tasks, 6))
  if case == 3:
    g[1] = -g[0] + 0.1 * g[1]  # a conflict
  if case == 6:
    g = np.abs(g)  # positively correlated tasks ...
  g_hat = g / np.linalg.norm(g, axis=1, keepdims=True)
  g_q = rng.normal(size=6) * [0.1, 1.0, 3.0, 1.0, 0.5, 2.0, 1.0][case]
  if case == 4:
    g_q = 5 * g_hat.sum(0)  # ∇q in the span of the task gradients: Â − bbᵀ/q is singular along 1
  if case == 6:
    g_q = 0.01 * g_hat.sum(0)  # ... and a small ∇q along them: every π_t < 0, so ν = 0 (the min-norm point)
  rho = 0.1
  lam = np.asarray(
      W.forum_weights(
          jnp.asarray(g_hat @ g_hat.T, jnp.float32),
          jnp.asarray(g_hat @ g_q, jnp.float32),
          jnp.float32(g_q @ g_q),
          rho,
          jnp.ones(num_tasks, bool),
      ),
      np.float64,
  )
  want, best = authors_qp(g_hat, g_q, rho)
  pi = rho - g_hat @ g_q / (g_q @ g_q)
  nu = max(lam @ pi, 0.0)
  x = np.r_[lam, nu]
  a = np.vstack([g_hat, g_q])
  value = x @ (a @ a.T) @ x - nu * rho * (g_q @ g_q)
  np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-5)
  assert np.all(lam >= 0)
  assert value <= best + 1e-5 * max(1.0, abs(best)), (value, best)
  np.testing.assert_allclose(lam, want, atol=2e-3)
  if case == 6:
    assert np.all(pi < 0) and nu == 0.0


def test_forum_weights_leave_absent_tasks_out():
  g_hat = np.eye(3)[:, :3]
  g_q = np.array([0.3, -0.2, 0.5])
  present = np.array([True, False, True])
  lam = np.asarray(
      W.forum_weights(
          jnp.asarray(g_hat @ g_hat.T * np.outer(present, present), jnp.float32),
          jnp.asarray(g_hat @ g_q * present, jnp.float32),
          jnp.float32(g_q @ g_q),
          0.1,
          jnp.asarray(present),
      )
  )
  want, _ = authors_qp(g_hat[[0, 2]], g_q, 0.1)
  assert lam[1] == 0.0
  np.testing.assert_allclose(lam[[0, 2]], want, atol=2e-3)


# ---- a small smooth model ---------------------------------------------------------------------------------------
T = 3
THETA = {'a': jnp.asarray(RNG.normal(size=(4,)) * 0.5, jnp.float32), 'b': jnp.asarray(RNG.normal(size=2), jnp.float32)}
MATS = [RNG.normal(size=(2, 6)) for _ in range(2 * T)]
TARGETS = [RNG.normal(size=(2,)) for _ in range(2 * T)]


def toy_losses(params, offset, mask=None):
  x = jnp.concatenate([params['a'], params['b']])
  out = [
      0.5 * jnp.sum((jnp.asarray(MATS[offset + t], jnp.float32) @ x - TARGETS[offset + t]) ** 2) + 0.05 * jnp.sum(x**4)
      for t in range(T)
  ]
  return jnp.stack(out) if mask is None else jnp.stack(out) * mask


def toy_inputs(mask=None, lr=0.1):
  train = functools.partial(toy_losses, offset=0, mask=mask)
  val = functools.partial(toy_losses, offset=T)
  return (
      W.MetaInputs(
          weighted_grad=lambda lam: jax.vjp(train, THETA)[1](lam)[0],
          params=THETA,
          task_losses=train(THETA),
          train_losses=train,
          val_losses=val,
          schedule_lr=jnp.float32(lr),
      ),
      train,
      val,
  )


def meta_step(method, state, inputs):
  """The jitted meta step (the inputs' functions are closed over: a jit argument must be arrays)."""
  return jax.jit(lambda s: method.meta_step(s, inputs))(state)


def adam_first_step(x, grad, lr):
  """PyTorch's Adam, first step, float64."""
  grad = np.asarray(grad, np.float64)
  m, v = 0.1 * grad, 0.001 * grad**2
  return np.asarray(x, np.float64) - lr * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)


def simplex_min_norm(vectors):
  """argmin_{γ ∈ Δ} ‖Σ γ_t v_t‖² (SLSQP, float64)."""
  n = len(vectors)
  gram = vectors @ vectors.T
  res = optimize.minimize(
      lambda x: x @ gram @ x, np.full(n, 1 / n), jac=lambda x: 2 * gram @ x, bounds=[(0, 1)] * n,
      constraints=[{'type': 'eq', 'fun': lambda x: x.sum() - 1}], method='SLSQP', options={'ftol': 1e-15},
  )  # fmt: skip
  return res.x


def test_moml_meta_step_matches_reverse_mode_through_the_look_ahead_and_mgda():
  inputs, train, val = toy_inputs()
  method = W.get_method('moml', lr=0.05, lookahead_lr=0.3)
  state = method.init(T)
  # The hparams are state and the mask of absent tasks an argument: one compile for every variant below.
  step = jax.jit(lambda s, mask: method.meta_step(s, toy_inputs(mask)[0]))
  new, metrics = step(state, jnp.ones(T))

  def val_of_logits(xi):  # grad of grad: an independent route to the hypergradients
    lam = T * jax.nn.softmax(xi)
    step = jax.grad(lambda p: lam @ train(p))(THETA)
    return val(jax.tree.map(lambda p, g: p - 0.3 * g, THETA, step))

  hyper = np.asarray(jax.jit(jax.jacrev(val_of_logits))(jnp.zeros(T)), np.float64)  # [T (val task), T (logit)]
  gamma = simplex_min_norm(hyper / np.linalg.norm(hyper, axis=1, keepdims=True))  # 'l2' normalisation
  meta_grad = gamma @ hyper
  np.testing.assert_allclose(metrics['meta/grad'], meta_grad, rtol=2e-3, atol=1e-6 * np.abs(meta_grad).max())
  np.testing.assert_allclose(metrics['meta/val_loss'], np.sum(val_of_logits(jnp.zeros(T))), rtol=1e-5)
  np.testing.assert_allclose(new['logits'], adam_first_step(np.zeros(T), metrics['meta/grad'], 0.05), rtol=1e-5)
  _, weights, _ = method.apply(new, jnp.zeros((T, 1)), inputs.task_losses)
  np.testing.assert_allclose(weights, T * jax.nn.softmax(new['logits']), rtol=1e-6)
  # 'none': the raw hypergradients in MGDA.
  _, metrics = step(W.get_method('moml', normalize='none', lookahead_lr=0.3).init(T), jnp.ones(T))
  np.testing.assert_allclose(metrics['meta/grad'], simplex_min_norm(hyper) @ hyper, rtol=2e-3, atol=1e-7)
  # A task absent from the training batch (loss 0): weight 0, left out of the softmax, nothing non-finite.
  mask = jnp.array([1.0, 0.0, 1.0])
  absent, _, _ = toy_inputs(mask=mask)
  new, metrics = step(state, mask)
  _, weights, _ = method.apply(new, jnp.zeros((T, 1)), absent.task_losses)
  assert weights[1] == 0 and np.isclose(float(jnp.sum(weights)), 2.0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((new, metrics)))


def forum_reference(rho, eta, steps):
  """FORUM's first meta step on the toy model in float64 (β = 1: λ̄ = λ̂), following the authors' train_FORUM."""
  train = functools.partial(toy_losses, offset=0)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in ('a', 'b')])  # noqa: E731
  w = np.full(T, 1 / T)
  jac = jax.jacrev(train)(THETA)
  g = np.stack([flat({k: jac[k][t] for k in jac}) for t in range(T)])  # ∇L_t, every parameter
  omega = THETA
  for _ in range(steps):
    grad = jax.grad(lambda p: jnp.asarray(w, jnp.float32) @ train(p))(omega)
    omega = jax.tree.map(lambda p, d: p - eta * d, omega, grad)
  drop = np.asarray(train(THETA), np.float64) - np.asarray(train(omega), np.float64)
  q_alpha = (np.diag(w) - np.outer(w, w)) @ drop  # J_softmaxᵀ (L(ω) − L(ω^K))
  g_q = np.r_[q_alpha, w @ g]
  norms = np.linalg.norm(g, axis=1)
  g_hat = np.hstack([np.zeros((T, T)), g / norms[:, None]])
  lam, _ = authors_qp(g_hat, g_q, rho)
  pi = rho - g_hat @ g_q / (g_q @ g_q)
  nu = max(lam @ pi, 0.0)
  d = lam @ g_hat + nu * g_q
  return {'lam': lam, 'nu': nu, 'c': lam / norms + nu * w, 'meta_grad': nu * q_alpha, 'd': d, 'g_q': g_q}


def test_forum_meta_step_matches_numpy_and_decreases_the_constraint():
  inputs, _, _ = toy_inputs()
  method = W.get_method('forum', rho=0.1, eta=0.05, inner_steps=3, lr=0.01)
  state = method.init(T)
  new, metrics = meta_step(method, state, inputs)
  ref = forum_reference(0.1, 0.05, 3)
  np.testing.assert_allclose(new['lambda_ema'], ref['lam'], atol=3e-3)
  np.testing.assert_allclose(metrics['meta/nu'], ref['nu'], rtol=1e-2, atol=1e-4)
  np.testing.assert_allclose(new['weights'], ref['c'], rtol=1e-2, atol=1e-4)
  np.testing.assert_allclose(metrics['meta/grad'], ref['meta_grad'], rtol=1e-2, atol=1e-6)
  np.testing.assert_allclose(new['logits'], adam_first_step(np.zeros(T), metrics['meta/grad'], 0.01), rtol=1e-5)
  assert float(metrics['meta/constraint']) > 0  # the inner loop lowered f: q = f(α, ω) − f(α, ω^K) > 0
  # ν makes d decrease the constraint at rate ρ: ⟨∇q, d⟩ ≥ ρ ‖∇q‖² (equality when ν > 0).
  assert ref['d'] @ ref['g_q'] >= 0.1 * ref['g_q'] @ ref['g_q'] * (1 - 1e-6)
  _, weights, _ = method.apply(new, jnp.zeros((T, 1)), inputs.task_losses)
  np.testing.assert_allclose(weights, new['weights'])
  with pytest.raises(ValueError, match=r'forum.init num_tasks: got 9, expected <= 8'):
    method.init(9)


# ---- in the train step ------------------------------------------------------------------------------------------
COMBINED = ('task/expression', 'task/aus')
# FORUM: ρ = 2 so that the constraint term is active here (ν > 0: the logits move); with ρ = 0.1 ν is 0 on this model.
HPARAMS = {'moml': {'lookahead_lr': 0.5, 'lr': 0.05}, 'forum': {'inner_steps': 2, 'lr': 0.05, 'rho': 2.0}}


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _config(method: str, tfds_dir: str, **overrides):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4,), 'features': 8}
  config.batch_size = 16
  config_lib.set_weighting(config, method, **HPARAMS[method])
  for key, value in overrides.items():
    config_lib.set_keys(config, {key: value})
  return config


@functools.cache
def _benchmark(tfds_dir: str):
  config = _config('moml', tfds_dir)
  return data.get_benchmark(config.data.name, data_dir=tfds_dir, seed=config.data.seed, **config.data.options)


@pytest.mark.parametrize('method', ['moml', 'forum'])
def test_meta_methods_train_and_one_device_equals_eight(method, tfds_dir):
  benchmark = _benchmark(tfds_dir)
  runs = {}
  for n in (1, 8):
    exp = experiment_lib.build_experiment(_config(method, tfds_dir), _mesh(n), benchmark=benchmark)
    if n == 1:
      initial = jax.device_get(_compile(jax.jit(exp.init_state).lower())())
      stream = exp.train_batches(0)
      batches = [jax.device_get(next(stream)) for _ in range(2)]
      assert ('validation' in batches[0]) == (method == 'moml')
    state = jax.device_put(jax.tree.map(np.array, initial), exp.replicated)
    step = _compile(exp.step_fn.lower(state, batches[0]))
    metrics = []
    for batch in batches:
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
    runs[n] = (jax.device_get(state), metrics)
  (s1, m1), (s8, m8) = runs[1], runs[8]
  for m in m1 + m8:
    assert bool(m['finite']) and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(m)), m
    assert {f'meta/grad/{n}' for n in COMBINED} <= set(m)
  for a, b in zip(jax.tree.leaves((s1.params, s1.weighting_state)), jax.tree.leaves((s8.params, s8.weighting_state))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  for a, b in zip(m1, m8):
    for key in a:
      if key.startswith(('loss', 'weight/', 'meta/')) or key == 'grad_norm':
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(s1.params)))
  assert not np.allclose(s1.weighting_state['logits'], 0.0)  # the meta step moved the logits
  if method == 'forum':
    assert all(m['meta/nu'] > 0 and m['meta/constraint'] > 0 for m in m1)
  final = s1.weighting_state
  want = final['weights'] if method == 'forum' else 2 * jax.nn.softmax(final['logits'])
  np.testing.assert_allclose([m1[-1][f'weight/{n}'] for n in COMBINED], want, rtol=1e-5)


def test_forum_needs_no_validation_split_and_moml_does(tfds_dir):
  benchmark = _benchmark(tfds_dir)
  assert W.needs_validation('moml') and W.needs_validation('auto_lambda') and not W.needs_validation('forum')
  exp = experiment_lib.build_experiment(
      _config('forum', tfds_dir, **{'data.validation_fraction': 0.0}), _mesh(1), benchmark=benchmark
  )
  assert 'validation' not in next(exp.train_batches(0))
  with pytest.raises(ValueError, match=r"weighting.name='moml' meta-learns its task weights on validation batches"):
    experiment_lib.build_experiment(
        _config('moml', tfds_dir, **{'data.validation_fraction': 0.0}), _mesh(1), benchmark=benchmark
    )
