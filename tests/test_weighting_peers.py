"""The methods and options of issue 28 that other libraries have: COSMOS and PBI (loss scalarisations), PCD (a
primary task followed under progress constraints), UPGrad / DualProj's preference vector and GradVac's parameter
groups — each against an independent numpy / scipy reference written here and the property it promises. MOML and
FORUM (meta steps) are in test_bilevel.py.

Sizes: T = 2-3 tasks, P ≤ 16 parameters; each method's `apply` is compiled once per shape (hparams live in the state).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtlmatch import step as step_lib
from mtlmatch import weighting as W

KEY = jax.random.key(28)
P = 16  # the shapes of test_weighting_zoo.py (T = 3, P = 16): the session's compilation cache serves both
RNG = np.random.default_rng(28)
RANDOM = RNG.normal(size=(3, P)).astype(np.float32)
LOSSES = np.array([0.6, 1.7, 1.1], np.float32)


@functools.lru_cache(maxsize=None)
def jitted(name):
  return jax.jit(W.METHODS[name].apply)


def run(name, grads, losses=LOSSES, key=KEY, layout=None, **hparams):
  """(update, weights, new state) of one `apply`, update and weights in float64."""
  state = W.init_state(W.get_method(name, **hparams), len(losses), grads.shape[1], param_layout=layout)
  update, weights, new = jitted(name)(state, jnp.asarray(grads, jnp.float32), jnp.asarray(losses, jnp.float32), key)
  return np.asarray(update, np.float64), np.asarray(weights, np.float64), new


def central_gradient(fn, x, h=1e-6):
  x = np.asarray(x, np.float64)
  return np.array([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in np.eye(len(x))])


# ---- COSMOS -----------------------------------------------------------------------------------------------------
def cosmos_objective(loss, ray, lamda):
  """T (rᵀL − λ cos(r, L)): the authors' loss, ×T."""
  cos = ray @ loss / (np.linalg.norm(ray) * np.linalg.norm(loss))
  return len(loss) * (ray @ loss - lamda * cos)


def test_cosmos_weights_are_the_gradient_of_the_penalised_scalarisation():
  ray = np.array([0.2, 0.5, 0.3])
  update, w, _ = run('cosmos', RANDOM, ray=(2.0, 5.0, 3.0), lamda=3.0)  # normalised to sum 1 at init
  np.testing.assert_allclose(w, central_gradient(lambda x: cosmos_objective(x, ray, 3.0), LOSSES), rtol=1e-4)
  np.testing.assert_allclose(update, w @ RANDOM, rtol=1e-5, atol=1e-6)
  # A small step along −w raises cos(r, L): the penalty pulls the loss vector toward the ray.
  cos = lambda x: ray @ x / (np.linalg.norm(ray) * np.linalg.norm(x))  # noqa: E731
  assert cos(LOSSES - 1e-3 * w) > cos(LOSSES)
  # λ = 0 is the linear scalarisation T r.
  _, w, _ = run('cosmos', RANDOM, ray=(2.0, 5.0, 3.0), lamda=0.0)
  np.testing.assert_allclose(w, 3 * ray, rtol=1e-6)


def test_cosmos_draws_a_dirichlet_ray_per_key_and_leaves_absent_tasks_out():
  draws = []
  for k in range(3):
    key = jax.random.key(k)
    _, w, state = run('cosmos', RANDOM, key=key, lamda=0.0, alpha=1.2)
    ray = np.asarray(jax.random.dirichlet(key, jnp.full((3,), 1.2)), np.float64)
    np.testing.assert_allclose(w, 3 * ray, rtol=1e-5)
    draws.append(w)
  assert np.all(state['hparams']['ray'] == 0)  # "sampled" is stored as the zero ray
  assert not np.allclose(draws[0], draws[1])
  # Task 1 absent (L = 0): r restricted to the present tasks and renormalised, cos over them, weight 0.
  losses = np.array([0.6, 0.0, 1.1], np.float32)
  _, w, _ = run('cosmos', RANDOM, losses=losses, ray=(0.2, 0.5, 0.3), lamda=2.0)
  sub = np.array([0.2, 0.3]) / 0.5
  want = central_gradient(lambda x: cosmos_objective(x, sub, 2.0), losses[[0, 2]])  # T_p = 2
  np.testing.assert_allclose(w[[0, 2]], want, rtol=1e-4)
  assert w[1] == 0.0
  with pytest.raises(ValueError, match=r"'ray': got 2 values .*expected num_tasks=3"):
    W.get_method('cosmos', ray=(1.0, 1.0)).init(3)
  with pytest.raises(ValueError, match=r"'ray'.*not all 0"):
    W.get_method('cosmos', ray=(0.0, 0.0, 0.0))


# ---- PBI --------------------------------------------------------------------------------------------------------
def pbi_objective(loss, pref, theta):
  unit = pref / np.linalg.norm(pref)
  d1 = loss @ unit
  d2 = np.linalg.norm(loss - d1 * unit)
  return len(loss) / unit.sum() * (d1 + theta * d2)


@pytest.mark.parametrize('pref', [(1.0, 1.0, 1.0), (0.2, 1.0, 3.0)])
def test_pbi_weights_are_the_gradient_of_d1_plus_theta_d2(pref):
  update, w, _ = run('pbi', RANDOM, preference=pref, theta=5.0)
  np.testing.assert_allclose(w, central_gradient(lambda x: pbi_objective(x, np.array(pref), 5.0), LOSSES), rtol=1e-4)
  np.testing.assert_allclose(update, w @ RANDOM, rtol=1e-5, atol=1e-5)


def test_pbi_on_the_ray_is_ew_and_absent_tasks_get_zero():
  _, w, _ = run('pbi', RANDOM, losses=np.full(3, 0.8, np.float32))  # L on the uniform ray: d2 = 0
  np.testing.assert_allclose(w, 1.0, rtol=1e-6)
  losses = np.array([0.6, 0.0, 1.1], np.float32)
  _, w, _ = run('pbi', RANDOM, losses=losses, preference=(1.0, 2.0, 3.0), theta=2.0)
  sub = np.array([1.0, 3.0])
  np.testing.assert_allclose(w[[0, 2]], central_gradient(lambda x: pbi_objective(x, sub, 2.0), losses[[0, 2]]), 1e-4)
  assert w[1] == 0.0


# ---- PCD --------------------------------------------------------------------------------------------------------
def pcd_reference(g, primary, tau):
  """argmin ‖d − g_p‖² s.t. ⟨d, g_t⟩ ≥ τ‖g_t‖² (t ≠ p), exactly, in float64, by enumerating the active sets.

  A strictly convex QP with few constraints: for each set S of tight constraints, d = g_p + Σ_{t∈S} μ_t g_t with
  ⟨d, g_t⟩ = τ‖g_t‖² on S (a linear system in μ); the optimum is the S whose μ ≥ 0 and whose d meets every other
  constraint (KKT). (scipy's SLSQP at a tight ftol stopped with "Positive directional derivative" on one scipy.)"""
  g = np.asarray(g, np.float64)
  others = [t for t in range(len(g)) if t != primary]
  best = None
  for size in range(len(others) + 1):
    for active in itertools.combinations(others, size):
      a = np.array(active, int)
      mu = np.zeros(0)
      if size:
        gram = g[a] @ g[a].T
        rhs = tau * np.sum(g[a] ** 2, axis=1) - g[a] @ g[primary]
        mu = np.linalg.solve(gram, rhs)
      d = g[primary] + (mu @ g[a] if size else 0.0)
      slack = np.array([d @ g[t] - tau * g[t] @ g[t] for t in others])
      if np.all(mu >= -1e-12) and np.all(slack >= -1e-9 * max(1.0, np.abs(g).max() ** 2)):
        if best is None or np.sum((d - g[primary]) ** 2) < np.sum((best - g[primary]) ** 2):
          best = d
  assert best is not None
  return best


def test_pcd_without_conflict_follows_the_primary_gradient():
  g = np.abs(RANDOM)  # every pair has a positive inner product
  update, w, _ = run('pcd', g)
  np.testing.assert_array_equal(w, [1.0, 0.0, 0.0])
  np.testing.assert_allclose(update, g[0], rtol=1e-6)


def test_pcd_orthogonal_gradients_meet_the_progress_constraints_with_equality():
  g = np.zeros((3, P), np.float32)
  g[0, 0], g[1, 1], g[2, 2] = 1.0, 2.0, 0.5
  update, w, _ = run('pcd', g, tau=0.4)
  np.testing.assert_allclose(w, [1.0, 0.4, 0.4], rtol=1e-4)  # ⟨d, g_t⟩ = μ_t‖g_t‖² = 0.4‖g_t‖²
  np.testing.assert_allclose(g @ update, [1.0, 0.4 * 4.0, 0.4 * 0.25], rtol=1e-4)
  _, w, _ = run('pcd', g, tau=0.0)  # no conflict, no demand: the primary alone
  np.testing.assert_allclose(w, [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize('tau, primary', [(0.0, 0), (0.3, 1)])
def test_pcd_matches_the_constrained_least_squares_and_its_kkt_conditions(tau, primary):
  g = RANDOM.astype(np.float64).copy()
  g[1] = -0.9 * g[0] + 0.2 * g[1]  # tasks 0 and 1 conflict
  g = g.astype(np.float32).astype(np.float64)
  update, w, _ = run('pcd', g.astype(np.float32), tau=tau, primary=primary)
  np.testing.assert_allclose(update, pcd_reference(g, primary, tau), atol=2e-4 * np.linalg.norm(update))
  others = [t for t in range(3) if t != primary]
  assert w[primary] == 1.0 and np.all(w[others] >= 0)  # d = g_p + Σ μ_t g_t, μ ≥ 0
  np.testing.assert_allclose(update, w @ g, rtol=1e-5, atol=1e-6)
  slack = g[others] @ update - tau * np.sum(g[others] ** 2, axis=1)
  scale = np.linalg.norm(g[others], axis=1) * np.linalg.norm(update)
  assert np.all(slack >= -1e-5 * scale)  # feasible
  np.testing.assert_allclose(w[others] * slack, 0.0, atol=1e-4 * scale.max())  # complementary slackness
  assert np.any(w[others] > 1e-3)  # the conflict made a constraint tight
  if tau == 0.0:
    assert update @ g[primary] >= -1e-6  # "do no harm" never turns against the primary either


def test_pcd_refuses_a_primary_outside_the_tasks():
  with pytest.raises(ValueError, match=r"'primary': got 3, expected a task index < num_tasks=3"):
    W.get_method('pcd', primary=3).init(3)


# ---- UPGrad / DualProj preference vector ------------------------------------------------------------------------
def nnls_projection(g, x):
  """argmin_d ‖d − x‖² s.t. G d ≥ 0 through its dual (scipy's nnls)."""
  mu, _ = optimize.nnls(g.T, -x)
  return x + g.T @ mu


def test_pref_vector_default_is_all_ones_and_weights_the_projections():
  g = RANDOM.copy()
  g[1] = -0.8 * g[0] + 0.3 * g[1]
  g64 = g.astype(np.float64)
  for name in ('upgrad', 'dualproj'):
    default_update, default_w, _ = run(name, g)
    ones_update, ones_w, _ = run(name, g, pref_vector=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(default_update, ones_update)  # the default is exactly p = 1: today's numbers
    np.testing.assert_array_equal(default_w, ones_w)
  pref = np.array([0.5, 2.0, 0.0])
  update, _, _ = run('upgrad', g, pref_vector=tuple(pref))
  ref = sum(p * nnls_projection(g64, g64[t]) for t, p in enumerate(pref))
  np.testing.assert_allclose(update, ref, atol=1e-4 * np.linalg.norm(ref))
  update, _, _ = run('dualproj', g, pref_vector=tuple(pref))
  ref = nnls_projection(g64, pref @ g64)
  np.testing.assert_allclose(update, ref, atol=1e-4 * np.linalg.norm(ref))
  assert np.all(g64 @ update >= -1e-5 * np.linalg.norm(g64, axis=1) * np.linalg.norm(update))
  with pytest.raises(ValueError, match=r"'pref_vector': got 2 values"):
    W.get_method('upgrad', pref_vector=(1.0, 2.0)).init(3)
  with pytest.raises(ValueError, match=r"'pref_vector': got \(1.0, -1.0, 1.0\)"):
    W.get_method('dualproj', pref_vector=(1.0, -1.0, 1.0))


# ---- GradVac parameter groups -----------------------------------------------------------------------------------
LAYOUT = (('Conv_0', 2), ('Conv_0', 3), ('Dense_0', 4), ('Dense_0', 0), ('Dense_0', 7))  # P = 16


def test_group_starts_from_the_tree():
  params = {'Conv_0': {'bias': jnp.zeros(2), 'kernel': jnp.zeros((1, 3))}, 'Dense_0': {'a': jnp.zeros(4),
            'b': jnp.zeros((0,)), 'kernel': jnp.zeros((7, 1))}}  # fmt: skip
  assert W.param_layout(params) == LAYOUT
  assert W.gradvac_group_starts('whole_model', None) == (0,)
  assert W.gradvac_group_starts('all_layer', LAYOUT) == (0, 5)
  assert W.gradvac_group_starts('all_matrix', LAYOUT) == (0, 2, 5, 9)  # the empty leaf is no group
  with pytest.raises(ValueError, match='param_layout: got None'):
    W.get_method('gradvac', group_type='all_layer').init(3)
  with pytest.raises(ValueError, match='param_layout: got a layout, expected None'):
    W.METHODS['ew'].init(3, param_layout=LAYOUT)
  # The train step hands GradVac its encoder's layout.
  state = step_lib.weighting_init(W.get_method('gradvac', group_type='all_matrix'), 3, {'encoder': params, 'heads': {}})
  np.testing.assert_array_equal(state['group_starts'], [0, 2, 5, 9])
  assert state['targets'].shape == (3, 3, 4)


def perms(key, n):
  return np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n)))


def gradvac_reference(g, targets, starts, key, beta=0.5):
  """LibMTL's loop in float64: for each i, j in a random order, each group k: the GradVac rule on that group."""
  bounds = list(zip(starts, list(starts[1:]) + [g.shape[1]]))
  new = g.copy()
  targets = targets.copy()
  coefs = np.zeros((len(bounds), len(g), len(g)))  # g'^(k)_i = Σ_j coefs[k, i, j] G^(k)_j
  coefs[:] = np.eye(len(g))
  for i, order in enumerate(perms(key, len(g))):
    for j in order:
      if j == i:
        continue
      for k, (lo, hi) in enumerate(bounds):
        gi, gj = new[i, lo:hi], g[j, lo:hi]
        rho = gi @ gj / (np.linalg.norm(gi) * np.linalg.norm(gj))
        phi = targets[i, j, k]
        if rho < phi:
          w = np.linalg.norm(gi) * (phi * np.sqrt(1 - rho**2) - rho * np.sqrt(1 - phi**2))
          w = w / (np.linalg.norm(gj) * np.sqrt(1 - phi**2))
          new[i, lo:hi] = gi + w * gj
          coefs[k, i, j] += w
          targets[i, j, k] = (1 - beta) * phi + beta * rho
  share = np.stack([np.sum(g[:, lo:hi] ** 2, axis=1) for lo, hi in bounds]) / np.sum(g**2, axis=1)  # [K, T]
  return new.sum(0), targets, np.sum(coefs.sum(axis=1) * share, axis=0)


def test_gradvac_groups_follow_libmtls_per_group_rule():
  # all_matrix: 4 groups (all_layer's cut is the same mechanism with other starts, test_group_starts_from_the_tree).
  starts = (0, 2, 5, 9)
  g = RANDOM.copy()
  g[1] = -0.7 * g[0] + 0.4 * g[1]
  method = W.get_method('gradvac', group_type='all_matrix')
  state = W.init_state(method, 3, P, param_layout=LAYOUT)
  targets = np.zeros((3, 3, len(starts)))
  for k in range(2):  # the second step starts from moved targets
    key = jax.random.fold_in(KEY, k)
    update, weights, state = jitted('gradvac')(state, jnp.asarray(g), jnp.asarray(LOSSES), key)
    ref, targets, ref_weights = gradvac_reference(g.astype(np.float64), targets, starts, key)
    np.testing.assert_allclose(update, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state['targets'], targets, atol=1e-5)
    # Weights: each group's coefficient of G_t, weighted by the task's share of ‖G_t‖² in the group.
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-4, atol=1e-6)
  assert np.any(targets < 0)
  # One group holding every column is the whole model, bit for bit.
  whole = run('gradvac', g, layout=None)
  single = run('gradvac', g, layout=(('Dense_0', P),), group_type='all_matrix')
  np.testing.assert_array_equal(whole[0], single[0])
  np.testing.assert_array_equal(whole[1], single[1])


def test_gradvac_groups_with_the_columns_sharded_equal_one_device_with_an_absent_task():
  g = RANDOM.copy()
  g[2] = 0.0  # task 2 absent
  mesh = jax.make_mesh((4,), ('p',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  method = W.get_method('gradvac', group_type='all_matrix')
  out = []
  for sharded in (False, True):
    state = W.init_state(method, 3, P, param_layout=LAYOUT)
    grads = jnp.asarray(g)
    if sharded:  # the columns spread over 4 devices, the state replicated
      state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
      grads = jax.device_put(grads, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'p')))
    update, weights, state = jitted('gradvac')(state, grads, jnp.asarray(LOSSES), KEY)
    out.append((np.asarray(update), np.asarray(weights), np.asarray(state['targets'])))
  for a, b in zip(*out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert out[0][1][2] == 0.0 and np.all(out[0][2][2] == 0) and np.all(out[0][2][:, 2] == 0)
