"""Gradient methods of mtlmatch.weighting on cases with known answers (worked by hand in the comments) and against
independent numpy references (grids over the simplex / the CAGrad ball, optimality certificates, float64 algebra).

Every case goes through the jitted `apply` (one compile per method and shape); the T = 2 cases all use [2, 2].
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

from mtlmatch import weighting as W

KEY = jax.random.key(0)
ORTHOGONAL = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # unequal norms: the methods disagree here
OPPOSING = np.array([[1.0, 0.0], [-2.0, 0.0]], np.float32)
OPPOSING_EQUAL = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
IDENTICAL = np.array([[1.0, 2.0], [1.0, 2.0]], np.float32)
ZERO_ROW = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)  # task 1 has no labels in the batch


@functools.lru_cache(maxsize=None)
def jitted(name):
  return jax.jit(W.METHODS[name].apply)


def run(name, grads, losses=None, key=KEY, **hparams):
  grads = np.asarray(grads, np.float32)
  losses = np.ones(len(grads), np.float32) if losses is None else np.asarray(losses, np.float32)
  if not grads[1].any():
    losses = losses.copy()
    losses[1] = 0.0
  state = W.get_method(name, **hparams).init(len(grads))
  update, weights, _ = jitted(name)(state, grads, losses, key)
  update, weights = np.asarray(update, np.float64), np.asarray(weights, np.float64)
  assert np.all(np.isfinite(update)) and np.all(np.isfinite(weights))
  np.testing.assert_allclose(update, weights @ grads, rtol=1e-5, atol=1e-5)
  return update, weights


# The methods of this file (the others have their own tests in test_weighting_zoo.py).
METHODS = ('mgda', 'mgda_ub', 'pcgrad', 'cagrad', 'nash_mtl', 'imtl', 'aligned_mtl')


@pytest.mark.parametrize('name', METHODS)
def test_identical_gradients_give_the_ew_update(name):
  update, _ = run(name, IDENTICAL)
  np.testing.assert_allclose(update, IDENTICAL.sum(0), rtol=2e-3)


@pytest.mark.parametrize('name', METHODS)
def test_zero_row_is_left_out(name):
  update, weights = run(name, ZERO_ROW)
  assert weights[1] == 0.0
  np.testing.assert_allclose(update, ZERO_ROW[0], rtol=2e-3)  # one present task: its own gradient (EW)


# ---- MGDA ---------------------------------------------------------------------------------------------------------
def mgda_two_tasks(g1, g2):
  """Closed form for T = 2: α_1 = clip((g2 − g1)·g2 / ‖g1 − g2‖², 0, 1)."""
  diff = g1 - g2
  a = np.clip(-diff @ g2 / max(diff @ diff, 1e-30), 0.0, 1.0)
  return np.array([a, 1 - a])


def test_mgda_hand_cases():
  # Orthogonal (1,0), (0,2): α ∝ 1/‖g‖² = (0.8, 0.2), min-norm point (0.8, 0.4), ×T = 2.
  update, weights = run('mgda', ORTHOGONAL)
  np.testing.assert_allclose(weights, [1.6, 0.4], rtol=1e-4)
  np.testing.assert_allclose(update, [1.6, 0.8], rtol=1e-4)
  # Opposing (1,0), (−2,0): 0 = (2/3) g1 + (1/3) g2 is in the hull: Pareto stationary, update 0.
  update, weights = run('mgda', OPPOSING)
  np.testing.assert_allclose(weights, [4 / 3, 2 / 3], rtol=1e-3)
  np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-5)
  # normalize='l2' makes the orthogonal pair orthonormal: α = (1/2, 1/2) applied to the raw gradients = EW.
  update, _ = run('mgda', ORTHOGONAL, normalize='l2')
  np.testing.assert_allclose(update, ORTHOGONAL.sum(0), rtol=1e-4)
  # normalize='loss' with losses (1, 2): ĝ = (1,0), (0,1) → α = (½, ½) on the raw gradients.
  update, _ = run('mgda', ORTHOGONAL, losses=[1.0, 2.0], normalize='loss')
  np.testing.assert_allclose(update, ORTHOGONAL.sum(0), rtol=1e-4)
  # normalize='loss+' with losses (2, 1): ĝ = (½,0), (0,1) → α = (0.8, 0.2) → T α G = (1.6, 0.8).
  update, _ = run('mgda', ORTHOGONAL, losses=[2.0, 1.0], normalize='loss+')
  np.testing.assert_allclose(update, [1.6, 0.8], rtol=1e-4)


def test_mgda_ub_is_the_min_norm_rule_on_feature_gradients():
  # MGDA-UB's rows are gradients w.r.t. the shared features (the train loop supplies them); the rule is MGDA's,
  # checked on the two-task closed form, and the method says where its rows come from.
  from mtlmatch import weighting

  assert weighting.METHODS['mgda_ub'].needs == 'feature_rows' and weighting.METHODS['mgda'].needs == 'shared_rows'
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = rng.normal(size=(2, 5)).astype(np.float32)
    update, weights = run('mgda_ub', grads)
    np.testing.assert_allclose(weights / 2, mgda_two_tasks(*grads.astype(np.float64)), atol=1e-4)
    np.testing.assert_allclose(update, weights @ grads, rtol=1e-4, atol=1e-6)


def test_mgda_matches_the_two_task_closed_form():
  rng = np.random.default_rng(0)
  for _ in range(5):
    grads = rng.normal(size=(2, 2)).astype(np.float32)
    _, weights = run('mgda', grads)
    np.testing.assert_allclose(weights / 2, mgda_two_tasks(*grads.astype(np.float64)), atol=1e-4)


def test_mgda_is_the_min_norm_point_for_three_tasks():
  rng = np.random.default_rng(3)
  grid = np.array([(i, j, 200 - i - j) for i in range(201) for j in range(201 - i)], np.float64) / 200
  for trial in range(3):
    grads = rng.normal(size=(3, 3)).astype(np.float32) * np.array([[1.0], [0.5], [2.0]], np.float32)
    if trial == 1:
      grads[1] *= 0.01  # norms two orders of magnitude apart
    if trial == 2:
      grads[2] = -grads[0] - 0.3 * grads[1]  # a near-Pareto-stationary configuration
    update, weights = run('mgda', grads)
    alpha = weights / 3
    d = alpha @ grads.astype(np.float64)
    norms = np.sum((grid @ grads.astype(np.float64)) ** 2, axis=1)
    assert d @ d <= norms.min() + 1e-5
    np.testing.assert_allclose(alpha, grid[np.argmin(norms)], atol=0.02)
    # Optimality certificate of the min-norm point of a hull: ⟨d, g_t⟩ ≥ ‖d‖² for every vertex.
    assert np.all(grads @ d >= d @ d - 1e-4)


def test_mgda_frank_wolfe_beyond_eight_tasks():
  norms = np.linspace(0.5, 2.0, 9)
  grads = np.diag(norms).astype(np.float32)  # orthogonal: α ∝ 1/‖g_t‖²
  _, weights = run('mgda', grads)
  expected = (1 / norms**2) / np.sum(1 / norms**2)
  d, d_star = (weights / 9) @ grads, expected @ grads
  assert d @ d <= (d_star @ d_star) * (1 + 1e-3)
  np.testing.assert_allclose(weights / 9, expected, atol=0.02)
  grads[1] = 0.0  # an absent task is left out of the hull (else 0 would be the min-norm point)
  _, weights = run('mgda', grads)
  keep = np.arange(9) != 1
  expected = (1 / norms[keep] ** 2) / np.sum(1 / norms[keep] ** 2)
  assert weights[1] == 0.0
  np.testing.assert_allclose(weights[keep] / 8, expected, atol=0.02)


# ---- PCGrad -------------------------------------------------------------------------------------------------------
def pcgrad_reference(grads, orders):
  """Numpy PCGrad with a given visiting order per task."""
  out = []
  for i, order in enumerate(orders):
    g = grads[i].copy()
    for j in order:
      if j != i and g @ grads[j] < 0:
        g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
    out.append(g)
  return np.sum(out, axis=0)


def test_pcgrad_hand_cases():
  update, _ = run('pcgrad', ORTHOGONAL)  # no conflict: the sum
  np.testing.assert_allclose(update, ORTHOGONAL.sum(0), rtol=1e-6)
  # Opposing (1,0), (−2,0): each projection removes the whole gradient.
  update, _ = run('pcgrad', OPPOSING)
  np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-6)
  # (1,0), (−1,1): g1' = g1 + g2/2 = (.5,.5), g2' = g2 + g1 = (0,1); each is orthogonal to the other original.
  grads = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)
  update, weights = run('pcgrad', grads)
  np.testing.assert_allclose(update, [0.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(weights, [2.0, 1.5], rtol=1e-6)
  g1p, g2p = np.array([1.0, 0.5]) @ grads, np.array([1.0, 1.0]) @ grads
  assert g1p @ grads[1] == 0.0 and g2p @ grads[0] == 0.0


def test_pcgrad_random_order_from_the_key():
  grads = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -0.6]], np.float32)
  g64 = grads.astype(np.float64)
  possible = [pcgrad_reference(g64, orders) for orders in itertools.product(itertools.permutations(range(3)), repeat=3)]
  seen = []
  for k in range(8):
    update, _ = run('pcgrad', grads, key=jax.random.key(k))
    assert min(np.abs(update - p).max() for p in possible) < 1e-5
    seen.append(update)
  assert max(np.abs(s - seen[0]).max() for s in seen) > 1e-3  # the order matters here and changes with the key
  np.testing.assert_array_equal(run('pcgrad', grads, key=jax.random.key(3))[0], seen[3])


# ---- CAGrad -------------------------------------------------------------------------------------------------------
def cagrad_dual_min(grads, c, grid_n):
  """min over a grid on the simplex of F(w) = g_w·g0 + c‖g0‖‖g_w‖ (numpy, float64)."""
  grads = grads.astype(np.float64)
  T = len(grads)
  pts = [p for p in itertools.product(range(grid_n + 1), repeat=T - 1) if sum(p) <= grid_n]
  grid = np.array([list(p) + [grid_n - sum(p)] for p in pts], np.float64) / grid_n
  g0 = grads.mean(0)
  gw = grid @ grads
  return np.min(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1))


def test_cagrad_hand_cases():
  # Orthogonal equal norms: by symmetry w = (.5,.5), d = (1 + c) g0, rescaled by 1/(1 + c): T g0 = EW.
  update, _ = run('cagrad', np.eye(2, dtype=np.float32))
  np.testing.assert_allclose(update, [1.0, 1.0], rtol=1e-4)
  # Opposing equal norms: g0 = 0, the ball is the point 0.
  update, _ = run('cagrad', OPPOSING_EQUAL)
  np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-6)
  # c = 0: the average direction, ×T = the EW update, for any gradients.
  rng = np.random.default_rng(5)
  grads = rng.normal(size=(2, 2)).astype(np.float32)
  update, _ = run('cagrad', grads, c=0.0)
  np.testing.assert_allclose(update, grads.sum(0), rtol=1e-5)


@pytest.mark.parametrize('grads', [ORTHOGONAL, OPPOSING, np.array([[1.0, 0.0], [-0.5, 1.0]], np.float32)])
def test_cagrad_solves_its_primal_for_two_tasks(grads):
  c = 0.4
  update, _ = run('cagrad', grads, c=c)
  d = update * (1 + c) / 2  # undo the documented T/(1 + c) scaling
  g0 = grads.mean(0).astype(np.float64)
  radius = c * np.linalg.norm(g0)
  assert np.linalg.norm(d - g0) <= radius * (1 + 1e-4) + 1e-7
  # Dense polar grid over the ball: nothing beats d on min_i g_i·d.
  r, theta = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 2 * np.pi, 2001))
  pts = g0 + radius * np.stack([r * np.cos(theta), r * np.sin(theta)], -1).reshape(-1, 2)
  best = np.max(np.min(pts @ grads.T.astype(np.float64), axis=1))
  assert np.min(grads @ d) >= best - 1e-4


def test_cagrad_matches_its_dual_for_three_tasks():
  # Weak duality: min_i g_i·d ≤ F(w) for every feasible d and every w; equality certifies that d is optimal.
  rng = np.random.default_rng(7)
  c = 0.4
  for _ in range(2):
    grads = rng.normal(size=(3, 3)).astype(np.float32)
    update, _ = run('cagrad', grads, c=c)
    d = update * (1 + c) / 3
    g0 = grads.mean(0).astype(np.float64)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)
    primal = np.min(grads @ d)
    dual = cagrad_dual_min(grads, c, 300)
    assert primal <= dual + 1e-5
    np.testing.assert_allclose(primal, dual, atol=2e-3 * np.abs(grads).max() ** 2)


def test_cagrad_mirror_descent_beyond_eight_tasks():
  rng = np.random.default_rng(2)
  grads = (rng.normal(size=(9, 12)) + 0.5).astype(np.float32)
  c = 0.4
  update, weights = run('cagrad', grads, c=c)
  d = update * (1 + c) / 9
  g0 = grads.mean(0).astype(np.float64)
  assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)
  beta = weights * (1 + c) / 9
  w = (beta - 1 / 9) / np.sum(beta - 1 / 9)  # β = mean + λ w
  gw = w @ grads
  dual = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)
  primal = np.min(grads @ d)
  assert 0 <= dual - primal <= 2e-2 * abs(dual)  # small duality gap: near-optimal
  # An absent task in the fallback path: weight 0, the rest combined over T_p = 8 tasks.
  absent = grads.copy()
  absent[1] = 0.0
  update, weights = run('cagrad', absent, c=c)
  assert weights[1] == 0.0
  d = update * (1 + c) / 8
  g0 = np.delete(absent, 1, axis=0).mean(0).astype(np.float64)
  assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)


# ---- Nash-MTL -----------------------------------------------------------------------------------------------------
def test_nash_hand_cases():
  # M = diag(1, 4)/√17: α_t² M_tt = 1 → α = 17^¼ (1, ½); the update 17^¼ (1, 1) has equal projections.
  update, weights = run('nash_mtl', ORTHOGONAL)
  np.testing.assert_allclose(weights, 17**0.25 * np.array([1.0, 0.5]), rtol=1e-4)
  np.testing.assert_allclose(update, 17**0.25 * np.ones(2), rtol=1e-4)
  # Opposing: no bargaining solution (a positive combination is 0); the ridge keeps α finite, the update is ~0.
  for grads in (OPPOSING_EQUAL, OPPOSING):
    update, weights = run('nash_mtl', grads)
    assert np.all(weights > 0)
    assert np.linalg.norm(update) <= 0.05 * np.linalg.norm(grads)


def test_nash_solves_the_bargaining_system():
  rng = np.random.default_rng(11)
  for _ in range(3):
    grads = rng.normal(size=(3, 3)).astype(np.float32) * np.array([[1.0], [30.0], [0.03]], np.float32)
    _, alpha = run('nash_mtl', grads)
    gram = grads.astype(np.float64) @ grads.T.astype(np.float64)
    gram /= np.linalg.norm(gram)
    assert np.all(alpha > 0)
    np.testing.assert_allclose(gram @ alpha, 1 / alpha, rtol=1e-4)


# ---- IMTL-G -------------------------------------------------------------------------------------------------------
def test_imtl_hand_cases():
  # Orthogonal (1,0), (0,2): d = (α1, 2α2), d·u1 = α1 = d·u2 = 2α2 → α = (2/3, 1/3); ×T.
  update, weights = run('imtl', ORTHOGONAL)
  np.testing.assert_allclose(weights, [4 / 3, 2 / 3], rtol=1e-4)
  np.testing.assert_allclose(update, [4 / 3, 4 / 3], rtol=1e-4)
  # Opposing (1,0), (−2,0): d·u1 = α1 − 2α2 = −(d·u2) → both 0, α = (2/3, 1/3), d = 0.
  update, weights = run('imtl', OPPOSING)
  np.testing.assert_allclose(weights, [4 / 3, 2 / 3], rtol=1e-4)
  np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-5)
  update, _ = run('imtl', np.eye(2, dtype=np.float32))  # orthogonal equal norms: EW
  np.testing.assert_allclose(update, [1.0, 1.0], rtol=1e-5)


def test_imtl_equal_projections_on_unit_gradients():
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(3, 3)).astype(np.float32) * np.array([[1.0], [4.0], [0.2]], np.float32)
  update, weights = run('imtl', grads)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  proj = units @ update
  np.testing.assert_allclose(proj, proj[0], rtol=1e-3)
  assert proj[0] > 0
  np.testing.assert_allclose(weights.sum(), 3.0, rtol=1e-4)


# ---- Aligned-MTL --------------------------------------------------------------------------------------------------
def aligned_reference(grads):
  """Numpy float64 Aligned-MTL (scale 'min'): α = Σ_t rows of σ V Λ^(−½) Vᵀ."""
  gram = grads.astype(np.float64) @ grads.T.astype(np.float64)
  lam, vec = np.linalg.eigh(gram)
  keep = lam > 1e-8 * lam.max()
  lam, vec = lam[keep], vec[:, keep]
  w_mat = vec @ np.diag(np.sqrt(lam.min()) / np.sqrt(lam)) @ vec.T
  return w_mat.sum(0), w_mat


def test_aligned_hand_cases():
  update, _ = run('aligned_mtl', np.eye(2, dtype=np.float32) * 3)  # orthogonal equal norms: EW
  np.testing.assert_allclose(update, [3.0, 3.0], rtol=1e-5)
  # Orthogonal (1,0), (0,2): σ = 1, W = diag(1, 1/2): α = (1, 1/2), update (1, 1).
  update, weights = run('aligned_mtl', ORTHOGONAL)
  np.testing.assert_allclose(weights, [1.0, 0.5], rtol=1e-5)
  np.testing.assert_allclose(update, [1.0, 1.0], rtol=1e-5)
  update, _ = run('aligned_mtl', OPPOSING_EQUAL)  # rank 1 along g1 − g2: W = vvᵀ, α = 0
  np.testing.assert_allclose(update, [0.0, 0.0], atol=1e-6)
  # Norms 100× apart stay two directions: σ = 0.01, α = (0.01, 1), update 0.01 (1, 1).
  update, weights = run('aligned_mtl', np.diag([1.0, 0.01]).astype(np.float32))
  np.testing.assert_allclose(weights, [0.01, 1.0], rtol=1e-4)
  np.testing.assert_allclose(update, [0.01, 0.01], rtol=1e-4)


@pytest.mark.parametrize('scale_mode, sigma_sq', [('min', 1.0), ('median', 4.0), ('rmse', 14 / 3)])
def test_aligned_scale_modes(scale_mode, sigma_sq):
  # Orthogonal norms (1, 2, 3): Λ = (1, 4, 9), W = σ diag(1/n_t), update = σ (1, 1, 1).
  update, weights = run('aligned_mtl', np.diag([1.0, 2.0, 3.0]).astype(np.float32), scale_mode=scale_mode)
  np.testing.assert_allclose(update, np.sqrt(sigma_sq) * np.ones(3), rtol=1e-5)
  np.testing.assert_allclose(weights, np.sqrt(sigma_sq) / np.array([1.0, 2.0, 3.0]), rtol=1e-5)


def test_aligned_matches_a_float64_reference_and_aligns():
  rng = np.random.default_rng(8)
  grads = rng.normal(size=(3, 3)).astype(np.float32) * np.array([[1.0], [2.0], [0.5]], np.float32)
  _, weights = run('aligned_mtl', grads)
  alpha, w_mat = aligned_reference(grads)
  np.testing.assert_allclose(weights, alpha, rtol=1e-3, atol=1e-4)
  aligned = w_mat @ grads.astype(np.float64)
  gram = aligned @ aligned.T
  np.testing.assert_allclose(gram, gram[0, 0] * np.eye(3), atol=1e-8 * 0 + 1e-6 * gram[0, 0])
