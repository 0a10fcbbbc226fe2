"""Gradient methods: combine the per-task gradients G ∈ R^{T×P} of the shared parameters into one update.

MGDA-UB (Sener & Koltun 2018), PCGrad (Yu et al. 2020), CAGrad (Liu et al. 2021), Nash-MTL (Navon et al. 2022),
IMTL-G (Liu et al. 2021) and Aligned-MTL (Senushkin et al. 2023). Every one works on the Gram matrix G Gᵀ [T, T]
and returns coefficients α with update = αᵀ G (so ``weights`` is exact, and the cost beyond G Gᵀ and αᵀ G is
O(T³), independent of P). Use them through `mtlmatch.weighting`::

    method = get_method('cagrad', c=0.4)
    state = method.init(num_tasks=3)
    update, weights, state = method.apply(state, grads, losses, key)   # grads [T, P] from task_jacobian

Scale: each update is scaled so that T_p identical task gradients g give T_p · g, the EW update (T_p = number of
present tasks); the docstrings say how. Absent tasks (zero gradient row: no labelled example in the batch) are left
out of every method (weight 0; the others are combined as if the absent task did not exist). If no task is present
the update is 0. Small solvers (T×T) run in float32 inside jit; see each docstring for their accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.weighting.base import (
    HIGHEST,
    HParam,
    WeightingMethod,
    gram,
    positive,
    present_from_losses,
    present_from_sq_norms,
    safe_div,
)

# Up to this many tasks the simplex problems of MGDA and CAGrad are solved exactly by enumerating the 2^T − 1 faces.
EXACT_MAX_TASKS = 8
# Ridge added inside the face solves, relative to each task's squared norm (A + ridge·diag A): makes every face
# system non-singular (identical or collinear gradients) and breaks ties toward uniform weights; it perturbs the
# objective by at most ridge·Σ_t α_t²‖g_t‖².
FACE_RIDGE = 1e-6
# A face solution with a coefficient below −tol is infeasible (float32 slack on exact zeros).
_FACE_TOL = 1e-4


def present_tasks(g: jax.Array) -> jax.Array:
  return present_from_sq_norms(jnp.diagonal(g))


def _scaled_gram(g: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(G Gᵀ / s, s) with s = the largest squared norm of a present task (1 if none): solutions are scale-free."""
  scale = jnp.max(jnp.where(present, jnp.diagonal(g), 0.0))
  scale = jnp.where(scale > 0, scale, 1.0)
  return g / scale, scale


def clip_weights_to_norm(weights: jax.Array, g: jax.Array, max_norm: jax.Array | float) -> jax.Array:
  """weights scaled so that ‖weightsᵀG‖ ≤ max_norm (‖·‖² = wᵀ(G Gᵀ)w); max_norm = 0 leaves them unchanged."""
  norm = jnp.sqrt(jnp.maximum(weights @ g @ weights, 0.0))
  scale = jnp.where((max_norm > 0) & (norm > max_norm), safe_div(max_norm, norm, 1.0), 1.0)
  return weights * scale


def face_masks(num_tasks: int) -> np.ndarray:
  """All non-empty subsets of range(T) as a float32 [2^T − 1, T] 0/1 array (static)."""
  idx = np.arange(1, 2**num_tasks)
  return ((idx[:, None] >> np.arange(num_tasks)) & 1).astype(np.float32)


def _face_solves(a_mat: jax.Array, rhs: jax.Array, present: jax.Array):
  """Solve A_SS x_S = b_S (x = 0 off S) for every face S ⊆ present tasks, for each rhs column.

  a_mat [T, T] (ridge added), rhs [T, K]. Returns masks [F, T], valid [F] (S ⊆ present), x [F, T, K].
  The systems are Jacobi-scaled (unit diagonal) first, so gradients whose norms differ by orders of magnitude
  keep float32 accuracy.
  """
  num_tasks = a_mat.shape[0]
  m = jnp.asarray(face_masks(num_tasks))
  eye = jnp.eye(num_tasks, dtype=a_mat.dtype)
  diag = jnp.diagonal(a_mat)
  s = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
  c = a_mat * s[:, None] * s[None, :]
  # Off-face rows become identity rows with zero right-hand side, so x_i = 0 there and one batched solve does all.
  k = m[:, :, None] * m[:, None, :] * c + (1 - m)[:, :, None] * eye
  b = m[:, :, None] * (s[:, None] * rhs)[None]
  x = jnp.linalg.solve(k, b) * s[None, :, None]
  valid = jnp.all((m == 0) | present[None, :], axis=1)
  return m, valid, x


def normalise_candidates(w: jax.Array, ok: jax.Array, m: jax.Array):
  """Keep feasible candidates (finite, ≥ −tol, positive sum), clip to ≥ 0 on their face and renormalise to Σ = 1."""
  tot = jnp.sum(w, axis=-1)
  ok = ok & jnp.isfinite(tot) & (tot > 0)
  w = w / jnp.where(ok, tot, 1.0)[..., None]
  ok = ok & jnp.all(w >= -_FACE_TOL, axis=-1) & jnp.all(jnp.isfinite(w), axis=-1)
  w = jnp.where(ok[..., None], jnp.clip(w, 0.0, None) * m, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  return w, ok


def min_norm_weights(g: jax.Array, present: jax.Array, fw_steps: jax.Array | int = 250) -> jax.Array:
  """argmin_{α ∈ Δ} ‖αᵀG‖² = αᵀ (G Gᵀ) α over the simplex of present tasks (α = 0 on absent ones; 0 if none).

  T ≤ 8: exact, by solving the KKT system of every face S ⊆ present (α_S ∝ (G Gᵀ)_SS⁻¹ 1) and keeping the feasible
  candidate of least norm (the optimum is the face optimum of its support). T > 8: Frank–Wolfe with exact line
  search for `fw_steps` steps (Sener & Koltun's MinNormSolver), started from the uniform point.
  """
  num_tasks = g.shape[0]
  gs, _ = _scaled_gram(g, present)
  n_present = jnp.sum(present)
  if num_tasks <= EXACT_MAX_TASKS:
    a_mat = gs + FACE_RIDGE * jnp.diag(jnp.diagonal(gs))
    m, valid, x = _face_solves(a_mat, jnp.ones((num_tasks, 1)), present)
    w, ok = normalise_candidates(x[..., 0], valid, m)
    obj = jnp.einsum('fi,ij,fj->f', w, a_mat, w)
    obj = jnp.where(ok, obj, jnp.inf)
    alpha = w[jnp.argmin(obj)]
  else:
    alpha0 = present / jnp.maximum(n_present, 1)

    def body(_, alpha):
      grad = gs @ alpha
      t = jnp.argmin(jnp.where(present, grad, jnp.inf))
      vv, vt, tt = alpha @ grad, grad[t], gs[t, t]
      gamma = jnp.clip(safe_div(vv - vt, vv - 2 * vt + tt, 0.0), 0.0, 1.0)
      return (1 - gamma) * alpha + gamma * jax.nn.one_hot(t, num_tasks)

    alpha = jax.lax.fori_loop(0, fw_steps, body, alpha0)
  return jnp.where(present & (n_present > 0), alpha, 0.0)


def nonneg_qp(a_mat: jax.Array, b: jax.Array, present: jax.Array, steps: jax.Array | int = 500) -> jax.Array:
  """argmin_{s ≥ 0} ½ sᵀ A s + bᵀ s over the present coordinates (s = 0 on absent ones), for each column of b.

  a_mat [T, T] positive definite on the present tasks; b [T, K]; returns s [T, K].
  T ≤ 8: exact. On a face S (the coordinates with s > 0) the optimum solves A_SS s_S = −b_S; of every feasible face
  candidate (s_S ≥ 0) and s = 0, the one that best meets the optimality (KKT) conditions wins: with r = A s + b,
  r_i = 0 where s_i > 0 and r_i ≥ 0 where s_i = 0, its worst violation measured as ``|r_i| / √A_ii`` (the
  objective itself cannot tell apart two faces whose optima differ below float32 rounding, while their r can differ
  by far more). T > 8: `steps` steps of accelerated projected gradient (FISTA, step 1/tr A) from s = 0.
  """
  num_tasks = a_mat.shape[0]
  pf = present.astype(a_mat.dtype)
  a_mat = jnp.where(present[:, None] & present[None, :], a_mat, jnp.eye(num_tasks))
  b = b * pf[:, None]

  if num_tasks <= EXACT_MAX_TASKS:
    m, valid, x = _face_solves(a_mat, -b, present)  # x [F, T, K]
    ok = valid[:, None] & jnp.all((x >= -_FACE_TOL) | (m[:, :, None] == 0), axis=1) & jnp.all(jnp.isfinite(x), axis=1)
    x = jnp.where(ok[:, None, :], jnp.clip(x, 0.0, None) * m[:, :, None], 0.0)
    x = jnp.concatenate([x, jnp.zeros_like(x[:1])])  # and the candidate s = 0
    ok = jnp.concatenate([ok, jnp.ones_like(ok[:1])])
    residual = jnp.einsum('ij,fjk->fik', a_mat, x, precision=HIGHEST) + b[None]  # r = A s + b [F + 1, T, K]
    violation = jnp.where(x > 0, jnp.abs(residual), jnp.maximum(-residual, 0.0))
    inv_scale = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(a_mat), 1e-30))
    score = jnp.max(violation * (inv_scale * pf)[None, :, None], axis=1)  # [F + 1, K]
    score = jnp.where(ok & jnp.isfinite(score), score, jnp.inf)
    best = jnp.argmin(score, axis=0)  # [K]
    s = jnp.take_along_axis(x, best[None, None, :], axis=0)[0]  # [T, K]
  else:
    lip = jnp.maximum(jnp.trace(a_mat), 1e-30)

    def body(k, carry):
      s, y = carry
      s_new = jnp.clip(y - (a_mat @ y + b) / lip, 0.0, None) * pf[:, None]
      return s_new, s_new + (k / (k + 3.0)) * (s_new - s)

    s, _ = jax.lax.fori_loop(0, steps, body, (jnp.zeros_like(b), jnp.zeros_like(b)))
  return s * pf[:, None]


def project_simplex(v: jax.Array, present: jax.Array) -> jax.Array:
  """Euclidean projection of v [T] onto the simplex of the present coordinates (0 on absent ones; 0 if none).

  The sort-based algorithm (Duchi et al. 2008): θ = (Σ_{i ≤ ρ} u_i − 1)/ρ with u the present values sorted
  decreasingly and ρ the largest i with u_i > (Σ_{j ≤ i} u_j − 1)/i; the projection is max(v − θ, 0).
  """
  num_tasks = v.shape[0]
  u = -jnp.sort(-jnp.where(present, v, -jnp.inf))
  finite = jnp.isfinite(u)
  css = jnp.cumsum(jnp.where(finite, u, 0.0))
  idx = jnp.arange(1, num_tasks + 1, dtype=v.dtype)
  cond = finite & (u - (css - 1.0) / idx > 0)
  rho = jnp.max(jnp.where(cond, jnp.arange(num_tasks), 0))
  theta = (css[rho] - 1.0) / (rho + 1.0)
  return jnp.where(present & jnp.any(present), jnp.maximum(v - theta, 0.0), 0.0)


def cagrad_weights(
    g: jax.Array, present: jax.Array, c: jax.Array | float, steps: jax.Array | int = 200
) -> tuple[jax.Array, jax.Array]:
  """CAGrad's dual: w* = argmin_{w ∈ Δ} g_wᵀ g0 + √φ ‖g_w‖ with g_w = wᵀG, g0 = mean of present rows, √φ = c‖g0‖.

  Returns (coefficients β with d = βᵀG = g0 + (√φ / ‖g_w*‖) g_w*, w*). If g_w* = 0 (0 is in the convex hull and the
  optimum), d = g0, which is then a primal optimum too.
  T ≤ 8: exact. On a face S the stationarity condition A w = (‖g_w‖/√φ)(λ1 − a) (A = G Gᵀ, a = A·mean) with
  Σ w = 1 gives w ∝ λ x − y, x = A_SS⁻¹ 1, y = A_SS⁻¹ a, λ a root of λ² 1ᵀx − 2λ 1ᵀy + aᵀy − φ = 0; every feasible
  candidate (and every vertex) is scored with the exact objective and the least wins.
  T > 8: `steps` steps of entropic mirror descent (step 1/√k on the max-normalised gradient), best iterate kept.
  """
  num_tasks = g.shape[0]
  gs, _ = _scaled_gram(g, present)
  pf = present.astype(jnp.float32)
  n_present = jnp.sum(pf)
  mean = pf / jnp.maximum(n_present, 1.0)
  a = gs @ mean
  g0_sq = jnp.maximum(mean @ a, 0.0)
  sqrt_phi = c * jnp.sqrt(g0_sq)

  def objective(w):
    return w @ a + sqrt_phi * jnp.sqrt(jnp.maximum(jnp.einsum('...i,ij,...j->...', w, gs, w), 0.0))

  if num_tasks <= EXACT_MAX_TASKS:
    a_mat = gs + FACE_RIDGE * jnp.diag(jnp.diagonal(gs))
    m, valid, xy = _face_solves(a_mat, jnp.stack([jnp.ones(num_tasks), a], axis=1), present)
    x, y = xy[..., 0], xy[..., 1]
    qa, qb = jnp.sum(x, -1), -2.0 * jnp.sum(y, -1)
    qc = jnp.sum(m * a * y, -1) - sqrt_phi**2
    disc = qb**2 - 4 * qa * qc
    root = jnp.sqrt(jnp.maximum(disc, 0.0))
    lam = jnp.stack([safe_div(-qb + root, 2 * qa), safe_div(-qb - root, 2 * qa)], axis=-1)  # [F, 2]
    cand = lam[..., None] * x[:, None, :] - y[:, None, :]  # [F, 2, T]
    ok = jnp.broadcast_to((valid & (disc >= 0))[:, None], cand.shape[:2])
    cand, ok = normalise_candidates(cand, ok, m[:, None, :])
    cand, ok = cand.reshape(-1, num_tasks), ok.reshape(-1)
    vertices = jnp.eye(num_tasks)
    cand = jnp.concatenate([cand, vertices])
    ok = jnp.concatenate([ok, present])
    obj = jnp.where(ok, objective(cand), jnp.inf)
    w = cand[jnp.argmin(obj)]
  else:
    w0 = mean

    def body(k, carry):
      w, best, best_obj = carry
      q = jnp.maximum(w @ gs @ w, 0.0)
      grad = a + sqrt_phi * safe_div(gs @ w, jnp.sqrt(q))
      grad = jnp.where(present, grad, 0.0)
      grad = safe_div(grad - jnp.min(jnp.where(present, grad, jnp.inf)), jnp.max(jnp.abs(grad)), 0.0)
      w = w * jnp.exp(-grad / jnp.sqrt(k + 1.0)) * pf
      w = w / jnp.maximum(jnp.sum(w), 1e-30)
      obj = objective(w)
      better = obj < best_obj
      return w, jnp.where(better, w, best), jnp.where(better, obj, best_obj)

    _, w, _ = jax.lax.fori_loop(0, steps, body, (w0, w0, objective(w0)))
  w = jnp.where(present & (n_present > 0), w, 0.0)
  gw_norm = jnp.sqrt(jnp.maximum(w @ gs @ w, 0.0))
  # ‖g_w‖ in the scaled Gram equals ‖g_w‖/√s and √φ scales the same way, so their ratio needs no rescaling.
  beta = mean + safe_div(sqrt_phi, gw_norm, 0.0) * w
  return beta, w


def pcgrad_weights(g: jax.Array, present: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad coefficients: g'_i = g_i, then for j in a random order (one permutation per i from `key`, j ≠ i):
  if g'_i·g_j < 0, g'_i ← g'_i − (g'_i·g_j / ‖g_j‖²) g_j. Returns α with Σ_i g'_i = αᵀG.

  Each g'_i is tracked as coefficients c_i over the original rows (g'_i = c_iᵀG), so g'_i·g_j = c_iᵀ(G Gᵀ)_{:,j}
  and nothing of size P is touched. Absent rows (zero) project nothing and are projected onto nothing.
  """
  num_tasks = g.shape[0]
  keys = jax.random.split(key, num_tasks)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)  # [T, T]
  diag = jnp.diagonal(g)

  def project_one(i, perm):
    def body(k, coef):
      j = perm[k]
      dot = coef @ g[:, j]
      conflict = (dot < 0) & (j != i) & present[j]
      return coef - jnp.where(conflict, safe_div(dot, diag[j]), 0.0) * jax.nn.one_hot(j, num_tasks)

    return jax.lax.fori_loop(0, num_tasks, body, jax.nn.one_hot(i, num_tasks))

  coefs = jax.vmap(project_one)(jnp.arange(num_tasks), perms)  # [T, T]
  coefs = jnp.where(present[:, None], coefs, 0.0)
  return jnp.where(present, jnp.sum(coefs, axis=0), 0.0)


def nash_weights(
    g: jax.Array, present: jax.Array, ridge: jax.Array | float = 1e-6, steps: jax.Array | int = 40
) -> jax.Array:
  """Nash-MTL bargaining weights: α > 0 with (M + ridge·diag M) α = 1/α, M = G Gᵀ / ‖G Gᵀ‖_F (present tasks; 0 else).

  Solved in the scale-free variable β_t = α_t √M_tt, for which the system reads (C + ridge·I) β = 1/β with C the
  cosine-similarity matrix of the gradients (float32 keeps ~ridge relative accuracy even when the gradient norms
  differ by orders of magnitude). It is the stationarity condition of the strictly convex, self-concordant
  φ(β) = ½ βᵀ(C + ridge·I)β − Σ log β_t, minimised by damped Newton (step 1/(1 + λ) while the Newton decrement
  λ > 1/4, full steps after; iterates stay positive) from β = 1. The ridge makes the problem solvable when some
  non-negative combination of the gradients is 0 (e.g. opposing gradients, where Nash-MTL has no solution): β is then
  large (≤ ridge^(−1/2)), but αᵀ(M + ridge·diag M)α = T_p keeps the update bounded: ‖αᵀG‖ ≤ √(T_p ‖G Gᵀ‖_F).
  """
  num_tasks = g.shape[0]
  fro = jnp.sqrt(jnp.sum(jnp.square(jnp.where(present[:, None] & present[None, :], g, 0.0))))
  m = safe_div(g, fro, 0.0)
  root = jnp.where(present, jnp.sqrt(jnp.maximum(jnp.diagonal(m), 0.0)), 1.0)
  cos = m / (root[:, None] * root[None, :])
  # Absent rows are zero: give them a unit diagonal so their β decouples; their α is zeroed at the end.
  cos = jnp.where(present[:, None] & present[None, :], cos, jnp.eye(num_tasks)) + ridge * jnp.eye(num_tasks)

  def body(_, beta):
    grad = cos @ beta - 1.0 / beta
    hess = cos + jnp.diag(1.0 / jnp.square(beta))
    step = jnp.linalg.solve(hess, grad)
    dec = jnp.sqrt(jnp.maximum(grad @ step, 0.0))
    t = jnp.where(dec > 0.25, 1.0 / (1.0 + dec), 1.0)
    new = beta - t * step
    return jnp.where(jnp.all(jnp.isfinite(new)) & jnp.all(new > 0), new, beta)

  beta = jax.lax.fori_loop(0, steps, body, jnp.ones(num_tasks))
  return jnp.where(present, beta / root, 0.0)


def fairgrad_weights(
    g: jax.Array,
    present: jax.Array,
    alpha: jax.Array | float,
    ridge: jax.Array | float = 1e-6,
    steps: jax.Array | int = 40,
) -> jax.Array:
  """FairGrad weights: x > 0 with (M + ridge·diag M) x = x^(−1/α) (elementwise), M = G Gᵀ / ‖G Gᵀ‖_F (present tasks).

  Solved in β_t = x_t √M_tt, where the system reads (C + ridge·I) β = c ⊙ β^(−1/α) with C the cosine matrix and
  c_t = M_tt^((1/α − 1)/2): the stationarity condition of the strictly convex φ(β) = ½ βᵀ(C + ridge·I)β − Σ c_t h(β_t),
  h(b) = log b (α = 1) or b^(1−1/α) / (1 − 1/α), minimised by damped Newton (step 1/(1 + λ) while the Newton
  decrement λ > 1/4, halved until φ decreases and β stays positive) from β = 1. α = 1 is `nash_weights`' system.
  """
  num_tasks = g.shape[0]
  both = present[:, None] & present[None, :]
  fro = jnp.sqrt(jnp.sum(jnp.square(jnp.where(both, g, 0.0))))
  m = safe_div(g, fro, 0.0)
  diag = jnp.where(present, jnp.maximum(jnp.diagonal(m), 0.0), 1.0)
  root = jnp.sqrt(diag)
  cos = jnp.where(both, m / (root[:, None] * root[None, :]), jnp.eye(num_tasks)) + ridge * jnp.eye(num_tasks)
  inv_a = 1.0 / alpha
  c = jnp.where(present, jnp.power(diag, 0.5 * (inv_a - 1.0)), 1.0)
  is_log = jnp.abs(inv_a - 1.0) < 1e-6

  def phi(beta):
    h = jnp.where(is_log, jnp.log(beta), jnp.power(beta, 1.0 - inv_a) / jnp.where(is_log, 1.0, 1.0 - inv_a))
    return 0.5 * beta @ cos @ beta - jnp.sum(c * h)

  def body(_, beta):
    grad = cos @ beta - c * jnp.power(beta, -inv_a)
    hess = cos + jnp.diag(c * inv_a * jnp.power(beta, -inv_a - 1.0))
    step = jnp.linalg.solve(hess, grad)
    dec = jnp.sqrt(jnp.maximum(grad @ step, 0.0))
    t0 = jnp.where(dec > 0.25, 1.0 / (1.0 + dec), 1.0)
    ts = t0 * 0.5 ** jnp.arange(12.0)
    cand = beta[None, :] - ts[:, None] * step[None, :]
    pos = jnp.all(cand > 0, axis=1)
    vals = jax.vmap(phi)(jnp.where(pos[:, None], cand, 1.0))
    ok = pos & jnp.isfinite(vals) & (vals <= phi(beta) + 1e-6 * jnp.abs(phi(beta)))
    first = jnp.argmax(ok)
    return jnp.where(ok[first], cand[first], beta)

  beta = jax.lax.fori_loop(0, steps, body, jnp.ones(num_tasks))
  return jnp.where(present & jnp.all(jnp.isfinite(beta)), beta / root, 0.0)


def imtl_weights(g: jax.Array, present: jax.Array) -> jax.Array:
  """IMTL-G coefficients α (Σ α = 1 over present tasks) with d = αᵀG having equal projections d·u_t on every unit
  task gradient u_t = g_t/‖g_t‖.

  Solves [A_{:,t}ᵀ α − λ = 0 (t present); α_t = 0 (t absent); 1ᵀα = 1] with A_st = g_s·u_t by least squares
  (pseudo-inverse: the minimum-norm α when the system is singular, e.g. identical gradients → uniform α). This is
  the paper's closed form α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹ written without singling out task 1.
  """
  num_tasks = g.shape[0]
  gs, _ = _scaled_gram(g, present)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gs), 0.0))
  a_mat = safe_div(gs, norms[None, :], 0.0)  # A_st = g_s·u_t (scaled)
  rows = jnp.where(present[:, None], a_mat.T, jnp.eye(num_tasks))
  lam_col = jnp.where(present, -1.0, 0.0)[:, None]
  k = jnp.concatenate(
      [
          jnp.concatenate([rows, lam_col], axis=1),
          jnp.concatenate([jnp.ones((1, num_tasks)), jnp.zeros((1, 1))], axis=1),
      ],
      axis=0,
  )
  rhs = jnp.zeros(num_tasks + 1).at[-1].set(1.0)
  sol = jnp.linalg.pinv(k, rtol=1e-5) @ rhs
  alpha = jnp.where(present & jnp.all(jnp.isfinite(sol)), sol[:num_tasks], 0.0)
  return alpha


def aligned_weights(
    g: jax.Array, present: jax.Array, scale_mode: jax.Array | int = 0, rtol: jax.Array | float = 1e-4
) -> jax.Array:
  """Aligned-MTL coefficients: α = W 1 with W = σ V_r Λ_r^(−1/2) V_rᵀ, where G Gᵀ = V Λ Vᵀ, r = its numerical rank
  and σ² = the min (scale_mode 0), median (1) or mean (2) of the r leading eigenvalues.

  The rank is read off the cosine-similarity matrix (eigenvalues above rtol·max), which does not depend on the task
  gradient norms: tasks whose norms differ by orders of magnitude keep their directions, while identical or
  collinear gradients (float32 noise ~1e-6 on those eigenvalues) are recognised as rank-deficient.
  The aligned task gradients G̃ = W G have orthogonal rows of equal norm σ (condition number 1); the update is their
  sum, Σ_t G̃_t = αᵀG (the authors' code). Zero rows (absent tasks) sit in the dropped null space, so α_t = 0.
  """
  num_tasks = g.shape[0]
  gs, _ = _scaled_gram(g, present)
  gs = jnp.where(present[:, None] & present[None, :], gs, 0.0)
  inv_root = jnp.where(present, 1.0 / jnp.sqrt(jnp.where(present, jnp.diagonal(gs), 1.0)), 0.0)
  lam_cos = jnp.linalg.eigvalsh(gs * inv_root[:, None] * inv_root[None, :])
  rank = jnp.sum(lam_cos > rtol * jnp.maximum(jnp.max(lam_cos), 1e-30))
  lam, vec = jnp.linalg.eigh(gs)  # ascending
  keep = (jnp.arange(num_tasks) >= num_tasks - rank) & (lam > 0)
  kept = jnp.where(keep, lam, jnp.nan)
  sigma_sq = jnp.stack([jnp.nanmin(kept), jnp.nanmedian(kept), jnp.nanmean(kept)])[scale_mode]
  sigma_sq = jnp.where(jnp.any(keep), sigma_sq, 0.0)
  scale = jnp.where(keep, jnp.sqrt(sigma_sq) / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  w_mat = (vec * scale[None, :]) @ vec.T
  return jnp.where(present, jnp.sum(w_mat, axis=0), 0.0)


# ---- methods ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MGDA(WeightingMethod):
  """MGDA-UB (Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as Multi-Objective Optimization").

  α* = argmin_{α ∈ Δ_T} ‖Σ_t α_t ĝ_t‖² (the min-norm point of the convex hull of the task gradients), with
  ĝ_t = G_t / n_t and n_t per ``normalize``: 'none' (1, default), 'l2' (‖G_t‖), 'loss' (L_t), 'loss+' (L_t ‖G_t‖).
  As in the authors' code the coefficients then weight the raw gradients: update = T_p · Σ_t α*_t G_t, weights =
  T_p α* (T_p = number of present tasks; ×T_p so identical gradients give the EW update, and the direction is the
  min-norm point, which is a common descent direction or 0 at a Pareto-stationary point).
  This is plain MGDA on the shared *parameters*; :class:`MGDAUB` (``'mgda_ub'``) is the authors' cheap bound that
  takes G with respect to the shared representation instead.
  Solver: exact face enumeration for T ≤ 8, Frank–Wolfe (``fw_steps``) beyond (`min_norm_weights`).
  Absent tasks are left out of the hull (otherwise their zero row would be the min-norm point and stop training).
  hparams: normalize ('none'), fw_steps (250).
  """

  name: ClassVar[str] = 'mgda'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'normalize': HParam('none', ('none', 'l2', 'loss', 'loss+')),
      'fw_steps': HParam(250, 'int', check=lambda v: v >= 1, expected='>= 1', doc='Frank-Wolfe steps (T > 8)'),
  }

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    loss_ok = present_from_losses(losses) & (losses > 0)
    safe_loss = jnp.where(loss_ok, losses, 1.0)
    scales = jnp.stack([jnp.ones_like(norms), norms, safe_loss, safe_loss * norms])[hp['normalize']]
    scales = jnp.where(present & (scales > 0), scales, 1.0)
    g_hat = g / (scales[:, None] * scales[None, :])
    alpha = min_norm_weights(g_hat, present, hp['fw_steps'])
    return jnp.sum(present) * alpha, {}


@dataclasses.dataclass(frozen=True)
class MGDAUB(MGDA):
  """MGDA-UB (Sener & Koltun, NeurIPS 2018, Section 3.3): MGDA's min-norm weights computed from the gradients of the
  task losses with respect to the shared *representation* Z (the encoder's output features, ``[B, D]`` per task,
  flattened) instead of the shared parameters — an upper bound whose min-norm point costs one backward pass through
  the heads only. The train loop then backpropagates ``Σ_t α_t ∇_Z L_t`` through the encoder once (the encoder's
  update is ``Σ_t α_t ∇_θ L_t``) and each head gets its own task's gradient, as in the paper.
  ``grads`` here are the feature-gradient rows; weights and scaling as :class:`MGDA` (T_p · α). hparams as MGDA.
  """

  name: ClassVar[str] = 'mgda_ub'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'feature_rows'


@dataclasses.dataclass(frozen=True)
class PCGrad(WeightingMethod):
  """PCGrad (Yu, Kumar, Gupta, Levine, Hausman, Finn, NeurIPS 2020, "Gradient Surgery for Multi-Task Learning").

  For each task i, g'_i starts at G_i and, for the other tasks j in a random order (a fresh permutation per i and per
  step, drawn from ``key``), whenever g'_i·G_j < 0 the conflicting component is removed:
  g'_i ← g'_i − (g'_i·G_j / ‖G_j‖²) G_j. update = Σ_i g'_i (the sum: with no conflict it is the EW update);
  weights α with update = αᵀG. Absent tasks (zero rows) neither project nor are projected; their weight is 0.
  """

  name: ClassVar[str] = 'pcgrad'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'

  def _apply(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    g = gram(grads)
    return pcgrad_weights(g, present_tasks(g), key), {}


@dataclasses.dataclass(frozen=True)
class CAGrad(WeightingMethod):
  """CAGrad (Liu, Liu, Jin, Stone, Liu, NeurIPS 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

  d = argmax_{‖d − g0‖ ≤ c‖g0‖} min_t G_t·d with g0 = the average gradient; through its dual,
  w* = argmin_{w ∈ Δ} g_wᵀg0 + c‖g0‖ ‖g_w‖ (g_w = wᵀG) and d = g0 + (c‖g0‖ / ‖g_w*‖) g_w* (`cagrad_weights`: exact
  for T ≤ 8, ``steps`` mirror-descent steps beyond). update = T_p · d / r with T_p the number of present tasks and
  r per ``rescale``: 'one_plus_c' (1 + c, default: identical gradients give exactly the EW update), 'one_plus_c2'
  (1 + c², the authors' default ``rescale=1``) or 'none' (1). With c = 0, update = T_p · g0 = the EW update.
  Absent tasks are left out of g0 and of the simplex.
  hparams: c (0.4), rescale ('one_plus_c'), steps (200, T > 8 only).
  """

  name: ClassVar[str] = 'cagrad'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'c': HParam(0.4, 'float', check=lambda v: 0 <= v < 1, expected='in [0, 1)', doc='radius of the ball'),
      'rescale': HParam('one_plus_c', ('one_plus_c', 'one_plus_c2', 'none')),
      'steps': HParam(200, 'int', check=lambda v: v >= 1, expected='>= 1', doc='mirror-descent steps (T > 8)'),
  }

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    c = hp['c']
    beta, _ = cagrad_weights(g, present, c, hp['steps'])
    rescale = jnp.stack([1.0 + c, 1.0 + c * c, jnp.ones_like(c)])[hp['rescale']]
    return jnp.sum(present) * beta / rescale, {}


@dataclasses.dataclass(frozen=True)
class NashMTL(WeightingMethod):
  """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, ICML 2022, "Multi-Task Learning as a
  Bargaining Game").

  The bargaining solution d = Σ_t α_t G_t with α > 0 solving (G Gᵀ) α = 1/α (elementwise); as in the authors' code
  the Gram matrix is first divided by its Frobenius norm, so T_p identical gradients give α = 1 (the EW update), and
  the update is Σ_t α_t G_t (weights = α). Solved by damped Newton on a convex potential with a small ridge
  (`nash_weights`; no cvxpy). Absent tasks get α = 0 and are left out of the system and of the normalisation.
  The authors' two options: ``update_every`` k re-solves α every k-th step only and reuses the last α in between
  (state ``alpha``; a task absent now gets 0 that step; here G is computed every step anyway, the train loop needs it
  for the update, so the saving is the small solve only), and ``max_norm`` > 0 rescales the update to norm ≤
  max_norm (the authors clip the shared gradient's norm to 1.0; 0, the default here, turns it off).
  hparams: ridge (1e-6, relative to each task's squared norm; the relative error it adds), steps (40 Newton steps),
  update_every (1), max_norm (0.0).
  """

  name: ClassVar[str] = 'nash_mtl'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'ridge': HParam(1e-6, 'float', **positive(), doc='relative ridge on the Gram matrix'),
      'steps': HParam(40, 'int', check=lambda v: v >= 1, expected='>= 1', doc='damped Newton steps'),
      'update_every': HParam(1, 'int', check=lambda v: v >= 1, expected='>= 1', doc='re-solve every k steps'),
      'max_norm': HParam(
          0.0, 'float', check=lambda v: v >= 0, expected='>= 0 (0: no clipping)', doc='largest update norm'
      ),
  }

  def _init(self, num_tasks, hp):
    return {'alpha': jnp.ones((num_tasks,), jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    solve = state['step'] % hp['update_every'] == 0
    alpha = jax.lax.cond(
        solve,
        lambda: nash_weights(g, present, hp['ridge'], hp['steps']),
        lambda: jnp.where(present, state['alpha'], 0.0),
    )
    return clip_weights_to_norm(alpha, g, hp['max_norm']), {'alpha': jnp.where(solve, alpha, state['alpha'])}


@dataclasses.dataclass(frozen=True)
class FairGrad(WeightingMethod):
  """FairGrad (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning").

  α-fair utility maximisation over the update: max_d Σ_t (G_t·d)^(1−α)/(1−α) (Σ_t log(G_t·d) for α = 1) in a ball;
  with d = Σ_t x_t G_t its optimality condition is (G Gᵀ) x = x^(−1/α) elementwise, x > 0. α = 1 is Nash-MTL's
  proportional fairness; α → ∞ approaches max-min fairness (MGDA-like). The authors solve the system with
  scipy's least_squares on the raw G Gᵀ; here the Gram matrix is first divided by its Frobenius norm (Nash-MTL's
  convention, so that T_p identical gradients give x = 1, the EW update; on the raw Gram the update's norm does not
  depend on the gradients' scale) and the system is solved by damped Newton on its convex potential
  (`fairgrad_weights`). update = Σ_t x_t G_t, weights = x. Absent tasks get x = 0 and are left out.
  hparams: alpha (1.0, > 0), ridge (1e-6), steps (40).
  """

  name: ClassVar[str] = 'fairgrad'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'alpha': HParam(1.0, 'float', **positive(), doc='fairness α'),
      'ridge': HParam(1e-6, 'float', **positive(), doc='relative ridge on the Gram matrix'),
      'steps': HParam(40, 'int', check=lambda v: v >= 1, expected='>= 1', doc='damped Newton steps'),
  }

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    return fairgrad_weights(g, present_tasks(g), hp['alpha'], hp['ridge'], hp['steps']), {}


@dataclasses.dataclass(frozen=True)
class IMTL(WeightingMethod):
  """IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, ICLR 2021, "Towards Impartial Multi-task Learning").

  The update d = Σ_t α_t G_t with Σ_t α_t = 1 whose projections onto every unit task gradient u_t = G_t/‖G_t‖ are
  equal (d·u_t = d·u_s), i.e. α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹ with D = [g_1 − g_t]_t, U = [u_1 − u_t]_t (`imtl_weights`,
  least-squares when singular). update = T_p · d (weights T_p α), so identical gradients give the EW update and
  orthogonal equal-norm ones too. α may be negative (the paper's closed form does not constrain it).
  Absent tasks are left out (α = 0, no equal-projection constraint).
  """

  name: ClassVar[str] = 'imtl'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    return jnp.sum(present) * imtl_weights(g, present), {}


@dataclasses.dataclass(frozen=True)
class AlignedMTL(WeightingMethod):
  """Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, CVPR 2023, "Independent Component Alignment for Multi-Task
  Learning").

  Aligns the task gradients to an orthogonal system of equal norms, G̃ = W G with W = σ V Λ^(−1/2) Vᵀ from the
  eigendecomposition G Gᵀ = V Λ Vᵀ restricted to its numerical rank (read off the cosine matrix's eigenvalues
  > rtol·max; the authors cut G Gᵀ's own eigenvalues at T·eps·λ_max, which in float32 drops tasks whose gradient
  norm is ~1000× smaller than the largest), σ² = the smallest (``scale_mode='min'``, default), median or mean
  ('rmse') kept eigenvalue; update = Σ_t G̃_t = αᵀG with α = W 1 (`aligned_weights`). Orthogonal equal-norm gradients
  and identical gradients both give the EW update; opposing equal-norm gradients give 0. Absent tasks lie in the dropped
  null space: α_t = 0.
  hparams: scale_mode ('min' | 'median' | 'rmse'), rtol (1e-4: directions whose independent part is below ~1% of
  a unit gradient count as collinear; float32 noise on those eigenvalues is ~1e-6).
  """

  name: ClassVar[str] = 'aligned_mtl'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'scale_mode': HParam('min', ('min', 'median', 'rmse')),
      'rtol': HParam(1e-4, 'float', check=lambda v: 0 < v < 1, expected='in (0, 1)', doc='relative rank cut-off'),
  }

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    return aligned_weights(g, present_tasks(g), hp['scale_mode'], hp['rtol']), {}
