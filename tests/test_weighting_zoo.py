"""The methods added from LibMTL / TorchJD (issue 14) against independent references written here: the authors'
update rules in numpy (float64), scipy for the projections and the FairGrad system, and the properties the papers
prove (UPGrad / DualProj updates in the dual cone, ConFIG's equal cosines, FairGrad's α = 1 and orthogonal closed
forms, MoCo's tracking on a fixed Jacobian). Last, every method on a 1-device and an 8-device mesh (the gradient
columns sharded) gives the same update, weight 0 to an absent task and nothing non-finite, and a zero update when no
task is present (the contract tests of test_weighting.py cover the methods that came before).

Every case goes through the jitted `apply` (one compile per method and shape: T = 3 tasks, P = 16 parameters).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtlmatch import weighting as W

KEY = jax.random.key(3)
P = 16
RNG = np.random.default_rng(14)
RANDOM = RNG.normal(size=(3, P)).astype(np.float32)
# Hand-made conflict: task 0 and 1 nearly opposite, task 2 orthogonal-ish and small.
CONFLICT = np.zeros((3, P), np.float32)
CONFLICT[0, :2] = [1.0, 0.0]
CONFLICT[1, :2] = [-1.0, 0.3]
CONFLICT[2, 1:3] = [0.2, 0.1]
ABSENT = RANDOM.copy()
ABSENT[1] = 0.0
LOSSES = np.array([0.7, 1.9, 1.2], np.float32)
# The methods of issue 14, then those of issue 28 (their maths in test_weighting_peers.py) for the contract test below.
NEW = (
    'sum',
    'mean',
    'constant',
    'gls',
    'imtl_l',
    'stch',
    'go4align',
    'excess_mtl',
    'fairgrad',
    'upgrad',
    'dualproj',
    'config',
    'gradvac',
    'graddrop',
    'krum',
    'trimmed_mean',
    'rgw',
    'moco',
    'modo',
    'sdmgrad',
    'cr_mogm',
    'db_mtl',
    'cosmos',
    'pbi',
    'pcd',
)


@functools.lru_cache(maxsize=None)
def jitted(name):
  return jax.jit(W.METHODS[name].apply)


def steps(name, grads_seq, losses_seq, keys=None, **hparams):
  """Runs apply on each (grads, losses); returns [(update, weights)] in float64 and the final state."""
  state = W.init_state(W.get_method(name, **hparams), len(losses_seq[0]), P)
  out = []
  for k, (g, loss) in enumerate(zip(grads_seq, losses_seq)):
    key = KEY if keys is None else keys[k]
    update, weights, state = jitted(name)(state, np.asarray(g, np.float32), np.asarray(loss, np.float32), key)
    out.append((np.asarray(update, np.float64), np.asarray(weights, np.float64)))
  return out, state


def one(name, grads, losses=LOSSES, **hparams):
  return steps(name, [grads], [losses], **hparams)[0][0]


def present_of(grads):
  return np.sum(np.square(np.asarray(grads, np.float64)), axis=1) > 1e-30


# ---- loss weightings ----------------------------------------------------------------------------------------------
def test_sum_mean_constant_gls():
  losses = np.array([0.5, 0.0, 2.0], np.float32)  # task 1 absent
  g = ABSENT
  _, w = one('sum', g, losses)
  np.testing.assert_array_equal(w, [1, 0, 1])
  _, w = one('mean', g, losses)
  np.testing.assert_allclose(w, [1.5, 0, 1.5], rtol=1e-6)
  update, w = one('constant', g, losses, weights=(0.2, 3.0, 0.5))
  np.testing.assert_allclose(w, [0.2, 0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(update, 0.2 * g[0] + 0.5 * g[2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='num_tasks=3'):
    W.get_method('constant', weights=(1.0, 2.0)).init(3)
  # GLS: w_t = (Π L)^(1/T_p) / L_t over the present tasks: √(0.5·2) / L = (2, 0, 0.5).
  _, w = one('gls', g, losses)
  np.testing.assert_allclose(w, [2.0, 0.0, 0.5], rtol=1e-5)


def test_imtl_l_scales_move_toward_inverse_losses():
  losses = [LOSSES] * 3
  outs, state = steps('imtl_l', [RANDOM] * 3, losses, lr=0.5)
  s = np.zeros(3)
  for (_, w), loss in zip(outs, losses):
    np.testing.assert_allclose(w, np.exp(s), rtol=1e-5)
    s = s - 0.5 * (np.exp(s) * loss - 1.0)
  np.testing.assert_allclose(state['log_scale'], s, rtol=1e-5)
  assert np.all(np.sign(s) == np.sign(-np.log(LOSSES)))  # toward e^s = 1/L


def test_stch_warmup_then_smooth_max_of_relative_log_losses():
  seq = [np.array([1.0, 2.0, 4.0]), np.array([3.0, 2.0, 2.0]), np.array([1.0, 4.0, 1.5])]
  outs, _ = steps('stch', [RANDOM] * 3, seq, mu=0.5, warmup_steps=2)
  for (_, w), loss in zip(outs[:2], seq[:2]):  # warm-up: ∝ 1/L, normalised to sum T
    np.testing.assert_allclose(w, 3 * (1 / loss) / np.sum(1 / loss), rtol=1e-5)
  nadir = (seq[0] + seq[1]) / 2
  rel = np.log(seq[2] / nadir) / 0.5
  soft = np.exp(rel - rel.max()) / np.sum(np.exp(rel - rel.max()))
  ref = soft / seq[2]
  np.testing.assert_allclose(outs[2][1], 3 * ref / ref.sum(), rtol=1e-5)
  assert np.argmax(outs[2][1]) == 1  # the task furthest above its nadir (4 vs 2) dominates


def kmeans_ref(r, k, iters=20):
  order = np.sort(r)
  n = len(r)
  centres = np.array([order[j * (n - 1) // (k - 1)] for j in range(k)]) if k > 1 else np.array([r.mean()])
  for _ in range(iters):
    assign = np.argmin(np.abs(r[:, None] - centres[None, :]), axis=1)
    centres = np.array([r[assign == j].mean() if np.any(assign == j) else centres[j] for j in range(k)])
  return centres[np.argmin(np.abs(r[:, None] - centres[None, :]), axis=1)]


@pytest.mark.parametrize('groups', [1, 2, 3])
def test_go4align_groups_risk_guided_indicators(groups):
  seq = [np.array([0.5, 2.0, 1.8]), np.array([0.4, 2.2, 1.5])]
  outs, _ = steps('go4align', [RANDOM] * 2, seq, num_groups=groups, step_size=0.3)
  p = np.full(3, 1 / 3)
  for (_, w), loss in zip(outs, seq):
    p = p * np.exp(-0.3 * loss)
    p /= p.sum()
    r = loss.sum() / loss * p
    np.testing.assert_allclose(w, kmeans_ref(r, groups), rtol=1e-5)
  assert len(set(np.round(outs[-1][1], 6))) == groups


def test_excess_mtl_follows_adagrad_excess_risks():
  gs = [RANDOM, RANDOM * np.array([[0.5], [2.0], [1.0]], np.float32), RANDOM[::-1].copy()]
  outs, _ = steps('excess_mtl', gs, [LOSSES] * 3, step_size=0.5)
  acc, lw, init = np.zeros((3, P)), np.ones(3), None
  for (update, w), g in zip(outs, gs):
    g = g.astype(np.float64)
    acc += g**2
    e = np.sum(g * g / np.sqrt(acc + 1e-7), axis=1)
    if init is None:
      init = e
    else:
      lw = lw * np.exp(0.5 * e / init)
      lw = 3 * lw / lw.sum()
    np.testing.assert_allclose(w, lw, rtol=1e-5)
    np.testing.assert_allclose(update, lw @ g, rtol=1e-5, atol=1e-5)


# ---- gradient methods with state ------------------------------------------------------------------------------------
def test_db_mtl_balances_log_loss_gradient_emas():
  gs = [RANDOM, CONFLICT, RANDOM * 2]
  outs, _ = steps('db_mtl', gs, [LOSSES] * 3)
  buf = np.zeros((3, P))
  for k, ((update, w), g) in enumerate(zip(outs, gs), start=1):
    gl = g.astype(np.float64) / (LOSSES[:, None].astype(np.float64) + 1e-8)
    buf = gl + 0.9 / k**0.5 * (buf - gl)
    n = np.linalg.norm(buf, axis=1)
    np.testing.assert_allclose(w, n.max() / n, rtol=1e-5)
    np.testing.assert_allclose(update, (n.max() / n) @ buf, rtol=1e-4, atol=1e-5)


def moco_ref(gs, losses, n, beta=0.5, gamma=0.1, rho=0.0):
  y, lam, out = np.zeros((3, P)), np.full(3, 1 / 3), []
  for k in range(1, n + 1):
    g = gs.astype(np.float64)
    gh = g / np.linalg.norm(g, axis=1, keepdims=True) * losses[:, None]
    y = y - beta / k**0.5 * (y - gh)
    z = lam - gamma / k**0.5 * (y @ y.T + rho * np.eye(3)) @ lam
    lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    out.append((3 * lam @ y, 3 * lam, y))
  return out


def test_moco_matches_its_update_and_tracks_a_fixed_jacobian():
  n = 60
  outs, state = steps('moco', [CONFLICT] * n, [LOSSES] * n, rho=0.1)
  ref = moco_ref(CONFLICT, LOSSES.astype(np.float64), n, rho=0.1)
  for (update, w), (u_ref, w_ref, _) in zip(outs, ref):
    np.testing.assert_allclose(w, w_ref, rtol=1e-4)
    np.testing.assert_allclose(update, u_ref, rtol=1e-4, atol=1e-6)
  # On a fixed Jacobian y converges to the rescaled gradients L_t G_t/‖G_t‖, and the direction settles.
  target = CONFLICT / np.linalg.norm(CONFLICT, axis=1, keepdims=True) * LOSSES[:, None]
  np.testing.assert_allclose(state['y'], target, atol=1e-3)
  assert np.linalg.norm(outs[-1][0] - outs[-2][0]) < 1e-3 * np.linalg.norm(outs[-1][0])


def simplex_ref(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1)[0][-1]
  return np.maximum(v - (css[rho] - 1) / (rho + 1), 0)


def test_modo_sdmgrad_cr_mogm_against_their_weight_updates():
  gs = [RANDOM, CONFLICT, RANDOM]
  a_seq = [g.astype(np.float64) @ g.T.astype(np.float64) for g in gs]
  outs, _ = steps('modo', gs, [LOSSES] * 3, gamma=0.05, rho=0.1)
  lam = np.full(3, 1 / 3)
  for (_, w), a in zip(outs, a_seq):
    lam = simplex_ref(lam - 0.05 * (a @ lam + 0.1 * lam))
    np.testing.assert_allclose(w, 3 * lam, rtol=1e-4, atol=1e-6)

  outs, _ = steps('sdmgrad', gs, [LOSSES] * 3, lamda=0.3, niter=20)
  w_state = np.full(3, 1 / 3)
  for (_, w), a in zip(outs, a_seq):
    gg = a / (np.mean(np.sqrt(np.diag(a))) ** 2 + 1e-8)
    buf = np.zeros(3)
    for _ in range(20):
      buf = 0.5 * buf + gg @ w_state + 0.3 * gg.mean(1)
      w_state = simplex_ref(w_state - 5.0 * buf)
    # lr 5 makes the authors' iteration oscillate: a float32 run of this same reference is ~7e-4 away too.
    np.testing.assert_allclose(w, 3 * (w_state + 0.3 / 3) / 1.3, atol=2e-3)

  outs, _ = steps('cr_mogm', gs, [LOSSES] * 3, momentum=0.8)
  lam = None
  for (_, w), a in zip(outs, a_seq):
    cons = {'type': 'eq', 'fun': lambda x: x.sum() - 1}
    best = optimize.minimize(
        lambda x, a=a: x @ a @ x,
        np.full(3, 1 / 3),
        bounds=[(0, 1)] * 3,
        constraints=cons,
        method='SLSQP',
        options={'ftol': 1e-14},
    ).x
    lam = best if lam is None else 0.8 * lam + 0.2 * best
    np.testing.assert_allclose(w, 3 * lam, atol=2e-3)


# ---- FairGrad, Nash options -----------------------------------------------------------------------------------------
def test_fairgrad_alpha_one_is_nash_and_orthogonal_closed_form():
  g64 = RANDOM.astype(np.float64)
  _, w = one('fairgrad', RANDOM, alpha=1.0)
  _, w_nash = one('nash_mtl', RANDOM)
  np.testing.assert_allclose(w, w_nash, rtol=1e-4)
  # Orthogonal gradients: M diagonal, so m_t x_t = x_t^(−1/α) → x_t = m_t^(−α/(1+α)) with m = ‖g‖²/‖GGᵀ‖_F.
  ortho = np.zeros((3, P), np.float32)
  ortho[0, 0], ortho[1, 1], ortho[2, 2] = 1.0, 3.0, 0.5
  m = np.array([1.0, 9.0, 0.25]) / np.sqrt(1 + 81 + 0.0625)
  for alpha in (0.5, 1.0, 3.0):
    _, w = one('fairgrad', ortho, alpha=alpha)
    np.testing.assert_allclose(w, m ** (-alpha / (1 + alpha)), rtol=1e-4)
  # Random gradients, α = 2: the system (M + ridge·diag M) x = x^(−1/α) (scipy's least_squares, the authors' solver).
  a = g64 @ g64.T
  a = a / np.linalg.norm(a) + 1e-6 * np.diag(np.diag(a / np.linalg.norm(a)))
  ref = optimize.least_squares(
      lambda x: a @ x - x**-0.5, np.ones(3), bounds=(1e-9, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15
  ).x
  _, w = one('fairgrad', RANDOM, alpha=2.0)
  np.testing.assert_allclose(w, ref, rtol=1e-4)


def test_nash_update_every_and_max_norm():
  outs, _ = steps('nash_mtl', [RANDOM, CONFLICT, RANDOM * 3], [LOSSES] * 3, update_every=2)
  _, w0 = one('nash_mtl', RANDOM)
  np.testing.assert_allclose(outs[1][1], w0, rtol=1e-6)  # step 1 reuses step 0's weights
  _, w2 = one('nash_mtl', RANDOM * 3)
  np.testing.assert_allclose(outs[2][1], w2, rtol=1e-5)  # step 2 solves again
  update, _ = one('nash_mtl', RANDOM, max_norm=0.5)
  np.testing.assert_allclose(np.linalg.norm(update), 0.5, rtol=1e-5)


# ---- projections and aggregators -------------------------------------------------------------------------------------
def dual_cone_projection(g, x):
  """argmin_d ‖d − x‖² s.t. G d ≥ 0 (scipy SLSQP in the primal)."""
  res = optimize.minimize(
      lambda d: np.sum((d - x) ** 2),
      x,
      jac=lambda d: 2 * (d - x),
      method='SLSQP',
      constraints={'type': 'ineq', 'fun': lambda d: g @ d, 'jac': lambda d: g},
      options={'ftol': 1e-15, 'maxiter': 500},
  )
  return res.x


@pytest.mark.parametrize('grads', [RANDOM, CONFLICT], ids=['random', 'conflict'])
def test_upgrad_and_dualproj_project_onto_the_dual_cone(grads):
  g = grads.astype(np.float64)
  update, _ = one('upgrad', grads, reg=1e-7)
  ref = sum(dual_cone_projection(g, g[i]) for i in range(3))
  np.testing.assert_allclose(update, ref, atol=2e-4 * np.linalg.norm(ref))
  assert np.all(g @ update >= -1e-5 * np.linalg.norm(g, axis=1) * np.linalg.norm(update))
  update, _ = one('dualproj', grads, reg=1e-7)
  ref = dual_cone_projection(g, g.sum(0))
  np.testing.assert_allclose(update, ref, atol=2e-4 * np.linalg.norm(ref))
  assert np.all(g @ update >= -1e-5 * np.linalg.norm(g, axis=1) * np.linalg.norm(update))


def nnls_projection(g, x):
  """argmin_d ‖d − x‖² s.t. G d ≥ 0 through its dual: d = x + Gᵀμ, μ = argmin_{μ ≥ 0} ‖Gᵀμ + x‖ (scipy's nnls)."""
  mu, _ = optimize.nnls(g.T, -x)
  return x + g.T @ mu


@pytest.mark.parametrize('num_tasks', [2, 4, 8])
def test_upgrad_and_dualproj_defaults_never_conflict_and_are_the_projection(num_tasks):
  # Default hparams (reg = 1e-4): for T ≤ 8 and a non-singular Gram matrix the projection is exact, so the update
  # conflicts with no task beyond float32 rounding (the ridge alone gave cosines down to −0.15 on these gradients,
  # whose norms spread over e^±2: the ridge on G Gᵀ / tr(G Gᵀ) weighs most on the small ones).
  rng = np.random.default_rng(num_tasks)
  for _ in range(8):
    g = rng.normal(size=(num_tasks, P)) * np.exp(rng.normal(size=(num_tasks, 1)))
    g[1] = -0.8 * g[0] + 0.3 * g[1]  # tasks 0 and 1 conflict
    g = g.astype(np.float32).astype(np.float64)
    norms = np.linalg.norm(g, axis=1)
    for name, targets in (('dualproj', [g.sum(0)]), ('upgrad', list(g))):
      update, _ = one(name, g, np.ones(num_tasks, np.float32))
      ref = sum(nnls_projection(g, x) for x in targets)
      np.testing.assert_allclose(update, ref, atol=1e-4 * np.linalg.norm(ref), err_msg=name)
      assert np.min(g @ update / (norms * np.linalg.norm(update))) >= -1e-5, name


def test_upgrad_and_dualproj_fall_back_to_the_ridge_on_a_singular_gram_matrix():
  g = np.zeros((4, P), np.float32)  # rank 2: rows 2 and 3 repeat rows 0 and 1
  g[0, :2], g[1, :2] = [1.0, 0.0], [-1.0, 0.3]
  g[2:] = g[:2]
  for name in ('dualproj', 'upgrad'):
    update, weights = one(name, g, np.ones(4, np.float32))
    assert np.all(np.isfinite(update)) and np.all(np.isfinite(weights))
    ref = nnls_projection(g.astype(np.float64), g.sum(0).astype(np.float64))
    if name == 'dualproj':
      np.testing.assert_allclose(update, ref, atol=1e-2 * np.linalg.norm(ref))
    assert np.all(g @ update >= -1e-2 * np.linalg.norm(g, axis=1) * np.linalg.norm(update))


def test_upgrad_without_conflict_is_ew():
  g = np.abs(RANDOM)  # all pairwise dot products positive
  update, _ = one('upgrad', g)
  np.testing.assert_allclose(update, g.sum(0), rtol=1e-4)


@pytest.mark.parametrize('grads', [RANDOM, CONFLICT], ids=['random', 'conflict'])
def test_config_equal_cosines_and_reference(grads):
  g = grads.astype(np.float64)
  update, _ = one('config', grads)
  units = g / np.linalg.norm(g, axis=1, keepdims=True)
  d = np.linalg.pinv(units) @ np.ones(3)
  d /= np.linalg.norm(d)
  np.testing.assert_allclose(update, np.sum(g @ d) * d, rtol=1e-4, atol=1e-6)
  cos = units @ update / np.linalg.norm(update)
  assert np.all(cos > 0)
  np.testing.assert_allclose(cos, cos.mean(), rtol=1e-4)


def perms(key, n):
  return np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n)))


def test_gradvac_matches_the_sequential_rule_and_updates_targets():
  g = CONFLICT.astype(np.float64)
  keys = [jax.random.fold_in(KEY, i) for i in range(2)]
  outs, state = steps('gradvac', [CONFLICT, CONFLICT], [LOSSES] * 2, keys=keys, beta=0.5)
  targets = np.zeros((3, 3))
  for (update, _), key in zip(outs, keys):
    new = g.copy()
    for i, order in enumerate(perms(key, 3)):
      for j in order:
        if j == i:
          continue
        gi = new[i]
        rho = gi @ g[j] / (np.linalg.norm(gi) * np.linalg.norm(g[j]))
        phi = targets[i, j]
        if rho < phi:
          w = (
              np.linalg.norm(gi)
              * (phi * np.sqrt(1 - rho**2) - rho * np.sqrt(1 - phi**2))
              / (np.linalg.norm(g[j]) * np.sqrt(1 - phi**2))
          )
          new[i] = gi + w * g[j]
          targets[i, j] = 0.5 * phi + 0.5 * rho
    np.testing.assert_allclose(update, new.sum(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state['targets'][..., 0], targets, atol=1e-5)
  assert np.any(targets < 0)  # the conflicting pair moved its target


def test_graddrop_keeps_one_sign_per_coordinate():
  update, w = one('graddrop', RANDOM)
  g = RANDOM.astype(np.float64)
  purity = 0.5 * (1 + g.sum(0) / np.abs(g).sum(0))
  u = np.asarray(jax.random.uniform(KEY, (P,)))
  mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
  np.testing.assert_allclose(update, np.sum(mask * g, axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w, np.sum(mask * g**2, 1) / np.sum(g**2, 1), rtol=1e-5)
  update, _ = one('graddrop', RANDOM, leak=1.0)  # leak 1: nothing dropped
  np.testing.assert_allclose(update, g.sum(0), rtol=1e-5, atol=1e-6)


def test_krum_and_trimmed_mean():
  g4 = np.concatenate([RANDOM, 10 * RANDOM[:1]]).astype(np.float32)  # 4 tasks, one far away
  g = g4.astype(np.float64)
  update, w = steps('krum', [g4], [np.ones(4)], n_byzantine=1, n_selected=2)[0][0]
  dist = np.linalg.norm(g[:, None] - g[None], axis=-1)
  scores = np.array([np.sort(np.delete(dist[i], i))[:1].sum() for i in range(4)])  # T − f − 2 = 1 neighbour
  chosen = np.argsort(scores, kind='stable')[:2]
  np.testing.assert_allclose(update, 4 * g[chosen].mean(0), rtol=1e-5, atol=1e-6)
  assert w[3] == 0  # the outlier is never chosen
  with pytest.raises(ValueError, match='n_byzantine'):
    W.get_method('krum', n_byzantine=1).init(3)

  update, _ = steps('trimmed_mean', [g4], [np.ones(4)], trim_number=1)[0][0]
  s = np.sort(g, axis=0)
  np.testing.assert_allclose(update, 4 * s[1:3].mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='trim_number'):
    W.get_method('trimmed_mean', trim_number=2).init(4)


@pytest.mark.parametrize('num_tasks', [1, 2, 3, 8, 17])
def test_stable_ranks_are_the_double_argsort_with_ties(num_tasks):
  from mtlmatch.weighting.aggregators import stable_ranks  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(num_tasks)
  v = rng.integers(-2, 3, size=(num_tasks, 300)).astype(np.float32)  # many ties
  for value in (np.nan, -np.nan, np.inf, -np.inf, -0.0):
    v[rng.random(v.shape) < 0.05] = value
  ref = np.argsort(np.argsort(v, axis=0, kind='stable'), axis=0, kind='stable')
  np.testing.assert_array_equal(jax.jit(stable_ranks)(v), ref)


@pytest.mark.parametrize('num_tasks', [3, 5, 8])
def test_trimmed_mean_with_ties_and_an_absent_task_matches_numpy(num_tasks):
  rng = np.random.default_rng(num_tasks)
  g = rng.integers(-2, 3, size=(num_tasks, P)).astype(np.float32)  # ties in every column
  g[0] = rng.normal(size=P)
  g[-1] = 0.0  # absent
  present = present_of(g)
  n = int(present.sum())
  for trim in range(0, (num_tasks - 1) // 2 + 1):
    update, w = steps('trimmed_mean', [g], [np.ones(num_tasks)], trim_number=trim)[0][0]
    k = min(trim, (n - 1) // 2)
    values = np.where(present[:, None], g.astype(np.float64), np.inf)
    rank = np.argsort(np.argsort(values, axis=0, kind='stable'), axis=0, kind='stable')
    kept = present[:, None] & (rank >= k) & (rank < n - k)
    np.testing.assert_allclose(update, n / (n - 2 * k) * np.sum(kept * g, axis=0), rtol=1e-6, atol=1e-6)
    sq = np.sum(g.astype(np.float64) ** 2, axis=1)
    share = np.where(present, np.sum(kept * g.astype(np.float64) ** 2, axis=1) / np.where(present, sq, 1), 0)
    np.testing.assert_allclose(w, n / (n - 2 * k) * share, rtol=1e-5, atol=1e-7)


def test_rgw_random_softmax_weights_on_present_tasks():
  _, w = one('rgw', ABSENT)
  eps = np.asarray(jax.random.normal(KEY, (3,)), np.float64)[[0, 2]]
  np.testing.assert_allclose(w[[0, 2]], 2 * np.exp(eps) / np.exp(eps).sum(), rtol=1e-5)
  assert w[1] == 0


# ---- every new method: absent task, finiteness, 1 device vs 8 -------------------------------------------------------
@pytest.mark.parametrize('name', NEW)
def test_one_device_equals_eight_with_an_absent_task(name):
  method = W.METHODS[name]
  losses = np.array([0.7, 0.0, 1.3], np.float32)
  mesh = jax.make_mesh((8,), ('p',), axis_types=(jax.sharding.AxisType.Auto,))
  cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'p'))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  results = []
  for sharded in (False, True):
    state = W.init_state(method, 3, P)
    grads = jnp.asarray(ABSENT)
    if sharded:
      state = jax.device_put(state, rep)
      grads = jax.device_put(grads, cols)
    for k in range(2):
      update, weights, state = jitted(name)(state, grads, losses, jax.random.fold_in(KEY, k))
    results.append((np.asarray(update), np.asarray(weights), jax.tree.map(np.asarray, state)))
  (u1, w1, s1), (u8, w8, _) = results
  assert np.all(np.isfinite(u1)) and np.all(np.isfinite(w1))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s1))
  assert w1[1] == 0.0
  np.testing.assert_allclose(u8, u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w8, w1, rtol=1e-5, atol=1e-6)
  # No task present (all gradients and losses 0): the update is 0 and nothing non-finite appears (same compile).
  update, weights, state = jitted(name)(W.init_state(method, 3, P), jnp.zeros((3, P)), jnp.zeros(3), KEY)
  assert np.all(np.asarray(update) == 0) and np.all(np.isfinite(weights))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
