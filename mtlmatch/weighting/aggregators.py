"""Projection and robust aggregators: UPGrad, DualProj, PCD, ConFIG, GradVac, GradDrop, Krum, trimmed mean, RGW.

UPGrad and DualProj (Quinton & Rey 2024, TorchJD), priority-constrained descent (PCD, this project's dual-cone
formulation), ConFIG (Liu et al. 2024), GradVac (Wang et al. 2021), GradDrop (Chen et al. 2020), TorchJD's robust
aggregators Krum and trimmed mean, and random gradient weighting (RGW, Lin et al. 2022). Same contract as
`gradient_methods`: T_p identical task gradients give T_p · g (the EW update; PCD: the primary task's gradient),
absent tasks (zero gradient row) get weight 0 and are left out of the combination. UPGrad, DualProj, PCD, ConFIG,
GradVac (whole model), Krum and RGW work on the Gram matrix G Gᵀ [T, T] (update = weights @ G); GradVac with
parameter groups works on one Gram matrix per group, GradDrop and the trimmed mean coordinate by coordinate on G
([T, P] work, ``linear = False``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtlmatch.weighting.base import HParam, WeightingMethod, combine, gram, non_negative, safe_div, to_int
from mtlmatch.weighting.gradient_methods import EXACT_MAX_TASKS, present_tasks, nonneg_qp


def _normalised_gram(g: jax.Array, present: jax.Array, reg: jax.Array | float) -> jax.Array:
  """TorchJD's normalise-then-regularise: G Gᵀ / tr(G Gᵀ) + reg·I over the present tasks (scale-free)."""
  both = present[:, None] & present[None, :]
  g = jnp.where(both, g, 0.0)
  return safe_div(g, jnp.trace(g), 0.0) + reg * jnp.eye(g.shape[0])


# The exact (ridge-free) dual-cone projection is used for T <= EXACT_MAX_TASKS when the unit-diagonal Gram matrix of
# the present tasks has its smallest eigenvalue above this (not numerically singular in float32) ...
_EXACT_MIN_EIGENVALUE = 1e-6
# ... and the projection's cosine with every present task is at least −this (float32 rounding is ~1e-6).
_EXACT_CONFLICT_TOL = 1e-4


def _exact_is_valid(a_mat: jax.Array, constrained: jax.Array, v: jax.Array, floor: jax.Array | None) -> jax.Array:
  """Bool [K]: v [T, K] (solved with a_mat = G Gᵀ / tr, no ridge) is a projection to keep (see the constants).

  Over the ``constrained`` tasks: their Gram block is not singular and (⟨G_t, d⟩ − floor_t·tr) / (‖G_t‖ ‖d‖) ≥ −tol.
  """
  num_tasks = a_mat.shape[0]
  both = constrained[:, None] & constrained[None, :]
  diag = jnp.diagonal(a_mat)
  scale = jnp.where(constrained & (diag > 0), 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
  unit = jnp.where(both, a_mat * scale[:, None] * scale[None, :], jnp.eye(num_tasks))
  nonsingular = jnp.linalg.eigvalsh(unit)[0] > _EXACT_MIN_EIGENVALUE
  inner = a_mat @ v  # [T, K]: ⟨G_t, d_k⟩ / tr(G Gᵀ) for d_k = Gᵀ v_k
  sq_norm = jnp.sum(v * inner, axis=0)  # [K]: ‖d_k‖² / tr(G Gᵀ)
  slack = inner if floor is None else inner - floor[:, None]
  cosine = safe_div(slack, jnp.sqrt(jnp.maximum(diag[:, None] * sq_norm[None, :], 0.0)), 0.0)
  feasible = jnp.all(~constrained[:, None] | (cosine >= -_EXACT_CONFLICT_TOL), axis=0)
  return nonsingular & feasible & jnp.all(jnp.isfinite(v), axis=0)


def dual_cone_weights(
    g: jax.Array,
    present: jax.Array,
    u: jax.Array,
    reg: jax.Array | float = 1e-4,
    steps: jax.Array | int = 500,
    *,
    constrained: jax.Array | None = None,
    floor: jax.Array | None = None,
) -> jax.Array:
  """Coefficients v [T, K] of the projections of the combinations uᵀG (u [T, K]) onto the dual cone {d : G d ≥ 0}.

  The projection of Gᵀu is Gᵀv with v = argmin_{v ≥ u} vᵀ A v (A = the trace-normalised Gram matrix G Gᵀ / tr(G Gᵀ);
  the dual of min ‖d − Gᵀu‖² s.t. G d ≥ 0, Quinton & Rey 2024, Prop. 1), solved as v = u + s, s = ``nonneg_qp(A, A u)``.
  T ≤ 8: exact, without ridge, for each column whose solution is valid: the Gram matrix of the present tasks is not
  singular (its unit-diagonal form has smallest eigenvalue > 1e-6) and the projection's cosine with every present task
  is ≥ −1e-4 (in practice ~1e-6, float32 rounding). Otherwise, and for T > 8, A gets TorchJD's ridge ``reg``·I: that
  projection may conflict with task t: by KKT ⟨G_t, d⟩ ≥ −``reg``·v_t·tr(G Gᵀ), a cosine down to
  −``reg``·v_t·tr(G Gᵀ) / (‖G_t‖ ‖d‖) (large for a task whose gradient is much smaller than the others).

  Generalised (PCD): only the ``constrained`` tasks (default: the present ones) are constraints, each shifted to
  ⟨G_t, d⟩ ≥ ``floor``_t · tr(G Gᵀ) (floor [T] in the trace-normalised units of A; default 0): s = ``nonneg_qp(A,
  A u − floor)`` over the constrained coordinates (the dual of min ‖d − Gᵀu‖² s.t. those constraints).
  """
  u = u * present[:, None]
  constrained = present if constrained is None else constrained & present

  def solve(a_mat):
    b = a_mat @ u if floor is None else a_mat @ u - floor[:, None]
    return u + nonneg_qp(a_mat, b, constrained, steps)

  a_ridge = _normalised_gram(g, present, reg)
  v_ridge = solve(a_ridge)
  if g.shape[0] > EXACT_MAX_TASKS:
    return v_ridge
  a_exact = _normalised_gram(g, present, 0.0)
  v_exact = solve(a_exact)
  return jnp.where(_exact_is_valid(a_exact, constrained, v_exact, floor)[None, :], v_exact, v_ridge)


@dataclasses.dataclass(frozen=True)
class UPGrad(WeightingMethod):
  """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"; TorchJD's ``UPGrad``).

  Each task gradient is projected onto the dual cone of the rows, {d : G_s·d ≥ 0 ∀s}, and the projections are
  summed: update = Σ_t π(G_t) (TorchJD averages them with its default ``Mean`` preference; the sum puts the update on
  the EW scale, the projection being positively homogeneous). So the update never conflicts with any task
  (G_s·update ≥ 0, to float32 rounding for T ≤ 8 with a non-singular Gram matrix, else within the ridge's bound, see
  `dual_cone_weights`) and equals EW when no pair conflicts. Through the dual, π(G_t) = Gᵀ v_t with
  v_t = argmin_{v ≥ e_t} vᵀ A v, A = G Gᵀ / tr(G Gᵀ) (TorchJD's normalisation); weights = Σ_t v_t. Solver: exact face
  enumeration for T ≤ 8 (`nonneg_qp`; TorchJD calls quadprog), without ridge unless the Gram matrix is singular
  (`dual_cone_weights`); beyond, or for a singular Gram matrix, A + reg·I (TorchJD's ``reg_eps``) and for T > 8
  accelerated projected gradient (``steps``). Absent tasks are neither projected nor constraints.
  ``pref_vector`` p (TorchJD's ``pref_vector``: the weights of the Gramian's dual problem before projection):
  update = Σ_t p_t π(G_t), i.e. v_t from v ≥ p_t e_t (π is positively homogeneous); empty (the default) means
  p = 1, the sum above (TorchJD's default is the mean, p = 1/T). Non-negative, one value per task (checked at init).
  hparams: reg (1e-4; only where the exact solve is not used), steps (500, T > 8 only), pref_vector (()).
  """

  name: ClassVar[str] = 'upgrad'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      # The doc stays as README's "Every switch" block prints it (tests/test_cli.py); the class docstring says when
      # the ridge applies (T > 8 or a singular Gram matrix).
      'reg': HParam(1e-4, 'float', **non_negative(), doc='ridge on the trace-normalised Gram matrix'),
      'steps': HParam(500, 'int', check=lambda v: v >= 1, expected='>= 1', doc='projected-gradient steps (T > 8)'),
      'pref_vector': HParam(
          (),
          'floats',
          check=lambda v: all(x >= 0 for x in v) and (not v or any(v)),
          expected='>= 0, not all 0 (one per task; empty: all ones)',
          doc='weights before the projection',
      ),
  }
  PER_TASK_FLOATS: ClassVar[Mapping[str, tuple[float, str]]] = {'pref_vector': (1.0, 'all ones')}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    v = dual_cone_weights(g, present, jnp.diag(hp['pref_vector']), hp['reg'], hp['steps'])
    return jnp.where(present, jnp.sum(v * present[None, :], axis=1), 0.0), {}


@dataclasses.dataclass(frozen=True)
class DualProj(UPGrad):
  """DualProj (Quinton & Rey 2024; TorchJD's ``DualProj``): the sum of the task gradients projected once onto the dual
  cone {d : G_s·d ≥ 0 ∀s}: update = π(Σ_t G_t) = Gᵀv, v = argmin_{v ≥ 1} vᵀ A v (TorchJD projects the mean; the
  sum is its EW-scaled version). Equals EW when the sum already conflicts with no task. ``pref_vector`` p: the
  combination projected, update = π(Σ_t p_t G_t) (v ≥ p; empty: p = 1). Solver and hparams as UPGrad.
  """

  name: ClassVar[str] = 'dualproj'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    v = dual_cone_weights(g, present, hp['pref_vector'][:, None], hp['reg'], hp['steps'])
    return jnp.where(present, v[:, 0], 0.0), {}


@dataclasses.dataclass(frozen=True)
class PCD(WeightingMethod):
  """Priority-constrained descent (this project's formulation; no published method of that name was found): follow
  the primary task's gradient g_p (task ``primary``) as closely as possible while every other present task t keeps
  at least a fraction τ (``tau``) of the first-order progress its own gradient would make:

    d = argmin_d ‖d − g_p‖²  s.t.  ⟨d, G_t⟩ ≥ τ ‖G_t‖²  for every present t ≠ p.

  By KKT, d = g_p + Σ_{t≠p} μ_t G_t with μ ≥ 0 the solution of the dual box QP min_{μ ≥ 0} ½ μᵀAμ + μᵀ(A e_p − τ
  diag A) over the secondary tasks (A = G Gᵀ / tr(G Gᵀ)), and μ_t > 0 only where the constraint is tight: the
  solver of UPGrad / DualProj with the constraints shifted (`dual_cone_weights` with ``constrained`` and ``floor``;
  exact for T ≤ 8 without ridge when the secondary tasks' Gram block is not singular and the result is feasible, else
  ``reg``·I). update = d, weights = (1 for p, μ_t for the others): with no conflict (⟨g_p, G_t⟩ ≥ τ‖G_t‖² for every t)
  the update is g_p itself, so the scale is the primary task's gradient, not EW's. τ = 0 (default) is "do no harm":
  no secondary task's loss rises to first order and d is g_p projected onto their dual cone, so ⟨d, g_p⟩ = ‖d‖² ≥ 0.
  τ > 0 demands progress: the primary may then lose (⟨d, g_p⟩ < 0 when a secondary task opposes it), and when 0 lies
  in the convex hull of the secondary gradients the constraints cannot all hold (the dual is unbounded); the ridge
  solution is then returned. An absent primary (zero row) leaves d the least-norm point meeting the constraints (0
  for τ = 0); absent secondary tasks are no constraints. hparams: primary (0), tau (0.0), reg (1e-4), steps (500).
  """

  name: ClassVar[str] = 'pcd'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'primary': HParam(0, 'int', check=lambda v: v >= 0, expected='>= 0 (a task index)', doc='task followed'),
      'tau': HParam(0.0, 'float', **non_negative(), doc='progress kept by the other tasks'),
      'reg': HParam(1e-4, 'float', **non_negative(), doc='ridge on the trace-normalised Gram matrix'),
      'steps': HParam(500, 'int', check=lambda v: v >= 1, expected='>= 1', doc='projected-gradient steps (T > 8)'),
  }

  def _init(self, num_tasks, hp):
    if hp['primary'] >= num_tasks:
      raise ValueError(f"pcd hparam 'primary': got {hp['primary']}, expected a task index < num_tasks={num_tasks}")
    return {}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    num_tasks = g.shape[0]
    primary = jnp.arange(num_tasks) == hp['primary']
    floor = hp['tau'] * jnp.diagonal(_normalised_gram(g, present, 0.0))
    v = dual_cone_weights(
        g,
        present,
        primary.astype(jnp.float32)[:, None],
        hp['reg'],
        hp['steps'],
        constrained=~primary,
        floor=jnp.where(primary, 0.0, floor),
    )
    return jnp.where(present, v[:, 0], 0.0), {}


@dataclasses.dataclass(frozen=True)
class ConFIG(WeightingMethod):
  """ConFIG (Liu, Chu, Thuerey 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks";
  TorchJD's ``ConFIG``).

  The direction with equal cosine to every task gradient: d = U⁺ 1 with U the unit task gradients as rows (the
  least-norm d with u_t·d = 1 ∀t), rescaled to the summed projections: update = (Σ_t G_t·d̂) d̂, d̂ = d/‖d‖.
  In Gram space U⁺1 = Σ_t c_t u_t with c = C⁺1, C the cosine matrix (pseudo-inverse with relative cut-off
  ``rtol``); so weights_t = a_t (1ᵀ G Gᵀ a)/(aᵀ G Gᵀ a), a_t = c_t/‖G_t‖. Identical gradients give the EW update;
  whenever C is invertible every task gets the same positive cosine with the update. Absent tasks are left out.
  hparams: rtol (1e-5, the pseudo-inverse's cut-off relative to C's largest eigenvalue).
  """

  name: ClassVar[str] = 'config'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'rtol': HParam(1e-5, 'float', check=lambda v: 0 < v < 1, expected='in (0, 1)', doc='pseudo-inverse cut-off'),
  }

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    both = present[:, None] & present[None, :]
    scale = jnp.max(jnp.where(present, jnp.diagonal(g), 0.0))
    gs = safe_div(jnp.where(both, g, 0.0), scale, 0.0)  # scale-free: the weights below are invariant to it
    norms = jnp.where(present, jnp.sqrt(jnp.maximum(jnp.diagonal(gs), 0.0)), 1.0)
    cos = jnp.where(both, gs / (norms[:, None] * norms[None, :]), 0.0)
    c = jnp.linalg.pinv(cos, rtol=hp['rtol'], hermitian=True) @ present.astype(jnp.float32)
    a = jnp.where(present, c / norms, 0.0)
    ga = gs @ a
    weights = a * safe_div(jnp.sum(ga), a @ ga, 0.0)
    return jnp.where(present & jnp.all(jnp.isfinite(weights)), weights, 0.0), {}


def gradvac_coefficients(
    g: jax.Array, present: jax.Array, targets: jax.Array, beta: jax.Array | float, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """GradVac on the Gram matrix: returns (coefficients c [T, T] with g'_i = c_iᵀG, new targets [T, T]).

  For each i, g'_i starts at G_i and, for j ≠ i in a random order (a permutation per i from `key`), with
  ρ = cos(g'_i, G_j) and target φ = targets[i, j]: if ρ < φ, g'_i += ‖g'_i‖ (φ√(1−ρ²) − ρ√(1−φ²)) / (‖G_j‖√(1−φ²)) G_j
  (which makes cos(g'_i, G_j) = φ) and targets[i, j] ← (1 − β) φ + β ρ. Tracked as coefficients like `pcgrad_weights`.
  """
  num_tasks = g.shape[0]
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(jax.random.split(key, num_tasks))
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))

  def one(i, perm, row):
    def body(k, carry):
      coef, row = carry
      j = perm[k]
      ni = jnp.sqrt(jnp.maximum(coef @ g @ coef, 0.0))
      rho = jnp.clip(safe_div(coef @ g[:, j], ni * norms[j], 0.0), -1.0, 1.0)
      phi = row[j]
      act = (rho < phi) & (j != i) & present[j] & present[i]
      w = safe_div(
          ni * (phi * jnp.sqrt(1 - rho**2) - rho * jnp.sqrt(jnp.maximum(1 - phi**2, 0.0))),
          norms[j] * jnp.sqrt(jnp.maximum(1 - phi**2, 0.0)),
          0.0,
      )
      coef = coef + jnp.where(act, w, 0.0) * jax.nn.one_hot(j, num_tasks)
      row = row.at[j].set(jnp.where(act, (1 - beta) * phi + beta * rho, phi))
      return coef, row

    return jax.lax.fori_loop(0, num_tasks, body, (jax.nn.one_hot(i, num_tasks), row))

  coefs, new_targets = jax.vmap(one)(jnp.arange(num_tasks), perms, targets)
  return jnp.where(present[:, None], coefs, 0.0), new_targets


# GradVac's parameter granularities (LibMTL's ``GradVac_group_type`` 0, 1, 2).
GRADVAC_GROUPS = ('whole_model', 'all_layer', 'all_matrix')


def gradvac_group_starts(group_type: str, param_layout) -> tuple[int, ...]:
  """The first column of each parameter group of a gradient row, from `jacobian.param_layout` of the shared
  parameters: 'whole_model' one group (0,) (no layout needed); 'all_layer' one per module (consecutive leaves held by
  the same dict, LibMTL: every leaf module with parameters); 'all_matrix' one per parameter tensor. Leaves of size 0
  form no group."""
  if group_type not in GRADVAC_GROUPS:
    raise ValueError(f'gradvac group_type: got {group_type!r}, expected one of {GRADVAC_GROUPS}')
  if group_type == 'whole_model':
    return (0,)
  ok = isinstance(param_layout, (tuple, list)) and all(
      isinstance(e, (tuple, list))
      and len(e) == 2
      and isinstance(e[0], str)
      and to_int(e[1]) is not None
      and to_int(e[1]) >= 0
      for e in param_layout
  )
  if not ok or not any(to_int(e[1]) for e in param_layout):
    raise ValueError(
        f'gradvac.init param_layout: got {param_layout!r}, expected the ((module, size), ...) of the shared '
        f'parameters with a positive total (weighting.param_layout; group_type {group_type!r} needs it)'
    )
  starts, offset, last = [], 0, None
  for module, size in param_layout:
    size = to_int(size)
    if size and (group_type == 'all_matrix' or module != last or not starts):
      starts.append(offset)
    if size:
      last = module
    offset += size
  return tuple(starts)


def group_grams(grads: jax.Array, group_of: jax.Array, num_groups: int) -> jax.Array:
  """G^(k) G^(k)ᵀ [K, T, T] of the column groups (``group_of`` [P]: each column's group, sorted): one segment sum
  over the columns per task (T passes over [T, P]; never a [T, T, P] product)."""

  def row(g_i):  # [P] → ⟨G_i^(k), G_j^(k)⟩ for every k and j: [K, T]
    return jax.ops.segment_sum((g_i[None, :] * grads).T, group_of, num_groups, indices_are_sorted=True)

  return jnp.transpose(jax.lax.map(row, grads), (1, 0, 2))


@dataclasses.dataclass(frozen=True)
class GradVac(WeightingMethod):
  """Gradient Vaccine (Wang, Tsvetkov, Firat, Cao, ICLR 2021, "Gradient Vaccine: Investigating and Improving
  Multi-task Optimization in Massively Multilingual Models").

  PCGrad generalised to a positive similarity goal: for each pair (i, j) an EMA target φ_ij of cos(g_i, g_j) (state
  ``targets`` [T, T, K], init 0); whenever g'_i's cosine with G_j is below φ_ij, G_j is added to g'_i with the
  coefficient that lifts the cosine exactly to φ_ij (`gradvac_coefficients`); update = Σ_i g'_i. As LibMTL's code
  (the reference implementation; the paper has none): a fresh random order per task and step, and the target only
  moves, φ ← (1 − β) φ + β ρ, when the pair was adjusted. With φ = 0 the first steps are PCGrad's projection.

  ``group_type`` (LibMTL's granularities): 'whole_model' (default; K = 1, one cosine per pair over every shared
  parameter), 'all_layer' (one group per module: the parameters held by one dict of the parameter tree, LibMTL's
  leaf modules) or 'all_matrix' (one per parameter tensor). The rule then runs inside each group k on the columns of
  that group, with its own targets φ_ij^(k) and the same random order in every group (LibMTL loops over the groups
  inside the pair loop), and the update's group k is Σ_i g'^(k)_i. The groups come from the shared parameters'
  structure: ``init(..., param_layout=weighting.param_layout(shared_params))`` (the train step passes it) stores
  their first columns (state ``group_starts`` [K]). A task whose gradient is zero in a group neither adjusts nor is
  adjusted there (LibMTL moves that target toward 0). ``linear = False``: the update is not one weight per task once
  K > 1; weights report Σ_k c_t^(k) ‖G_t^(k)‖² / ‖G_t‖², each group's coefficient of G_t weighted by the share of
  ‖G_t‖² in it (K = 1: the coefficients themselves, update = weightsᵀG exactly as before the groups existed).
  Absent tasks neither adjust nor are adjusted, get weight 0, and their targets stay. hparams: beta (0.5),
  group_type ('whole_model').
  """

  name: ClassVar[str] = 'gradvac'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  linear: ClassVar[bool] = False
  uses_param_layout: ClassVar[bool] = True
  TASK_FREE_STATE: ClassVar[tuple[str, ...]] = ('group_starts',)
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'beta': HParam(0.5, 'float', check=lambda v: 0 <= v <= 1, expected='in [0, 1]', doc='EMA rate of the targets'),
      'group_type': HParam('whole_model', GRADVAC_GROUPS),
  }

  def _init_layout(self, num_tasks, hp, param_layout):
    starts = gradvac_group_starts(hp['group_type'], param_layout)
    return {
        'targets': jnp.zeros((num_tasks, num_tasks, len(starts)), jnp.float32),
        'group_starts': jnp.asarray(starts, jnp.int32),
    }

  def _apply_update(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    g = gram(grads)
    present = present_tasks(g)
    num_groups = state['targets'].shape[2]
    if num_groups == 1:  # the whole model: one Gram matrix, weights @ G
      coefs, targets = gradvac_coefficients(g, present, state['targets'][..., 0], hp['beta'], key)
      weights = jnp.where(present, jnp.sum(coefs, axis=0), 0.0)
      return combine(weights, grads), weights, {'targets': targets[..., None], 'group_starts': state['group_starts']}
    columns = jnp.arange(grads.shape[1])
    group_of = jnp.searchsorted(state['group_starts'], columns, side='right') - 1
    grams = group_grams(grads, group_of, num_groups)  # [K, T, T]

    def one_group(g_k, targets_k):
      coefs, new = gradvac_coefficients(g_k, present & present_tasks(g_k), targets_k, hp['beta'], key)
      return jnp.where(present, jnp.sum(coefs, axis=0), 0.0), new

    group_weights, targets = jax.vmap(one_group, in_axes=(0, 2), out_axes=(0, 2))(grams, state['targets'])  # [K, T]
    update = jnp.sum(jnp.take(group_weights, group_of, axis=0).T * grads, axis=0)
    shares = safe_div(jnp.diagonal(grams, axis1=1, axis2=2), jnp.diagonal(g)[None, :], 0.0)  # [K, T]
    weights = jnp.where(present, jnp.sum(group_weights * shares, axis=0), 0.0)
    return update, weights, {'targets': targets, 'group_starts': state['group_starts']}


def _kept_share(kept: jax.Array, grads: jax.Array) -> jax.Array:
  """Σ_p kept_tp G_tp² / ‖G_t‖² [T]: the share of each task's gradient (squared) that a coordinate-wise rule kept."""
  sq = jnp.square(grads)
  return safe_div(jnp.sum(kept * sq, axis=1), jnp.sum(sq, axis=1), 0.0)


@dataclasses.dataclass(frozen=True)
class GradDrop(WeightingMethod):
  """GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, NeurIPS 2020, "Just Pick a Sign: Optimizing
  Deep Multitask Models with Gradient Sign Dropout").

  Per coordinate p, the sign purity P_p = ½(1 + Σ_t G_tp / Σ_t ``|G_tp|``) and U_p ~ Uniform(0, 1) (from ``key``);
  task t keeps G_tp when (P_p > U_p and G_tp > 0) or (P_p < U_p and G_tp < 0):
  update_p = Σ_t (leak + (1 − leak) M_tp) G_tp. As TorchJD's ``GradDrop`` it acts on the gradients of the shared
  parameters (the paper and LibMTL apply it to the gradients w.r.t. a shared activation layer, summed over the batch
  after multiplying by the sign of the input). Without sign conflicts it is EW. ``linear = False``: the reported
  weights are the shares kept, leak + (1 − leak) Σ_p M_tp G_tp² / ‖G_t‖² (1: nothing dropped; 0 for absent tasks).
  hparams: leak (0.0, in [0, 1]).
  """

  name: ClassVar[str] = 'graddrop'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  linear: ClassVar[bool] = False
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'leak': HParam(0.0, 'float', check=lambda v: 0 <= v <= 1, expected='in [0, 1]', doc='share always kept'),
  }

  def _apply_update(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    present = present_tasks(gram(grads))
    purity = 0.5 * (1.0 + safe_div(jnp.sum(grads, axis=0), jnp.sum(jnp.abs(grads), axis=0), 0.0))
    u = jax.random.uniform(key, (grads.shape[1],))
    mask = ((purity > u)[None, :] & (grads > 0)) | ((purity < u)[None, :] & (grads < 0))
    keep = hp['leak'] + (1.0 - hp['leak']) * mask.astype(jnp.float32)
    update = jnp.sum(keep * grads, axis=0)
    weights = jnp.where(present, hp['leak'] + (1.0 - hp['leak']) * _kept_share(mask, grads), 0.0)
    return update, weights, {}


def _check_num_tasks(method: WeightingMethod, num_tasks: int, needed: int, what: str):
  if num_tasks < needed:
    raise ValueError(f'{method.name}.init num_tasks: got {num_tasks}, expected >= {needed} ({what})')


@dataclasses.dataclass(frozen=True)
class Krum(WeightingMethod):
  """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent"), as TorchJD's ``Krum`` aggregator.

  Each task's score is the sum of its Euclidean distances to its T − f − 2 nearest other task gradients
  (f = ``n_byzantine``; TorchJD uses distances, Krum's paper squared distances); the ``n_selected`` m tasks of least
  score are averaged: update = T_p · mean of the selected rows (×T_p: identical gradients give the EW update),
  weights T_p/m on them, 0 elsewhere. Distances come from the Gram matrix. Needs T ≥ f + 3 and T ≥ m (checked at
  init). Absent tasks are neither candidates nor neighbours; with T_p present tasks the neighbour count is
  clip(T_p − f − 2, 1, T_p − 1) and m is min(m, T_p). Ties go to the lower task index.
  hparams: n_byzantine (0; TorchJD requires it), n_selected (1).
  """

  name: ClassVar[str] = 'krum'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'n_byzantine': HParam(0, 'int', check=lambda v: v >= 0, expected='>= 0', doc='tolerated adversarial tasks f'),
      'n_selected': HParam(1, 'int', check=lambda v: v >= 1, expected='>= 1', doc='rows averaged m'),
  }

  def _init(self, num_tasks, hp):
    _check_num_tasks(self, num_tasks, hp['n_byzantine'] + 3, f'n_byzantine + 3 with n_byzantine={hp["n_byzantine"]}')
    _check_num_tasks(self, num_tasks, hp['n_selected'], f'n_selected={hp["n_selected"]}')
    return {}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    num_tasks = g.shape[0]
    n_present = jnp.sum(present)
    d = jnp.diagonal(g)
    dist = jnp.sqrt(jnp.maximum(d[:, None] + d[None, :] - 2 * g, 0.0))
    others = present[None, :] & ~jnp.eye(num_tasks, dtype=bool)
    nearest = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    k = jnp.clip(n_present - hp['n_byzantine'] - 2, 1, jnp.maximum(n_present - 1, 0))
    scores = jnp.sum(jnp.where(jnp.arange(num_tasks)[None, :] < k, nearest, 0.0), axis=1)
    scores = jnp.where(present, scores, jnp.inf)
    m = jnp.minimum(hp['n_selected'], n_present)
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    chosen = present & (rank < m)
    return jnp.where(chosen, safe_div(n_present.astype(jnp.float32), m.astype(jnp.float32), 0.0), 0.0), {}


# Up to this many rows, `stable_ranks` counts comparisons (T passes over [T, P]) instead of sorting.
_RANK_BY_COMPARISONS_MAX_TASKS = 16


def stable_ranks(values: jax.Array) -> jax.Array:
  """int32 [T, P]: the rank of each value in its column under a stable sort (ties by row), as the double argsort
  ``argsort(argsort(values, axis=0, stable=True), axis=0, stable=True)`` (NaNs last and equal to each other, −0 = +0).

  For T ≤ 16 without sorting: rank_t = Σ_s [v_s < v_t] + Σ_{s < t} [v_s = v_t], T elementwise passes over [T, P]
  (XLA:CPU sorts a short axis of a long array slowly: the double argsort of [8, 300k] took ~1 s on a loaded 2-core
  CPU, the comparisons ~16 ms); beyond, the double argsort.
  """
  num_tasks = values.shape[0]
  if num_tasks > _RANK_BY_COMPARISONS_MAX_TASKS:
    return jnp.argsort(jnp.argsort(values, axis=0, stable=True), axis=0, stable=True).astype(jnp.int32)
  nan = jnp.isnan(values)
  row = jnp.arange(num_tasks)[:, None]
  rank = jnp.zeros(values.shape, jnp.int32)
  for s in range(num_tasks):
    v_s, nan_s = values[s][None, :], nan[s][None, :]
    less = (v_s < values) | (~nan_s & nan)
    tie = ((v_s == values) | (nan_s & nan)) & (s < row)
    rank = rank + (less | tie).astype(jnp.int32)
  return rank


@dataclasses.dataclass(frozen=True)
class TrimmedMean(WeightingMethod):
  """Coordinate-wise trimmed mean (Yin, Chen, Kannan, Bartlett, ICML 2018, "Byzantine-Robust Distributed Learning"),
  as TorchJD's ``TrimmedMean``: per coordinate the ``trim_number`` k largest and k smallest task values are dropped
  and the rest averaged; update = T_p · that mean (×T_p: the EW scale). Needs T ≥ 2k + 1 (checked at init). Absent
  tasks take no part; with T_p present tasks k is min(k, ⌊(T_p − 1)/2⌋) (at least one value kept per coordinate).
  ``linear = False``: weights_t = T_p/(T_p − 2k) · Σ_p kept_tp G_tp² / ‖G_t‖² (the share of G_t kept, rescaled).
  hparams: trim_number (1).
  """

  name: ClassVar[str] = 'trimmed_mean'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  linear: ClassVar[bool] = False
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'trim_number': HParam(1, 'int', check=lambda v: v >= 0, expected='>= 0', doc='values dropped at each end'),
  }

  def _init(self, num_tasks, hp):
    _check_num_tasks(
        self, num_tasks, 2 * hp['trim_number'] + 1, f'2 * trim_number + 1, trim_number=' f'{hp["trim_number"]}'
    )
    return {}

  def _apply_update(self, state, hp, grads, losses, key):
    present = present_tasks(gram(grads))
    n_present = jnp.sum(present)
    k = jnp.minimum(hp['trim_number'], jnp.maximum(n_present - 1, 0) // 2)
    values = jnp.where(present[:, None], grads, jnp.inf)  # absent rows sort last
    rank = stable_ranks(values)
    kept = present[:, None] & (rank >= k) & (rank < n_present - k)
    scale = safe_div(n_present.astype(jnp.float32), (n_present - 2 * k).astype(jnp.float32), 0.0)
    # Σ_t as a product with ones: XLA:CPU's reduction over the short leading axis took ~45 ms for [8, 300k], the
    # product ~5 ms.
    update = scale * combine(jnp.ones((grads.shape[0],), grads.dtype), jnp.where(kept, grads, 0.0))
    weights = jnp.where(present, scale * _kept_share(kept, grads), 0.0)
    return update, weights, {}


@dataclasses.dataclass(frozen=True)
class RGW(WeightingMethod):
  """Random gradient weighting (Lin, Ye, Xu, Shi, Zhang, TMLR 2022, "Reasonable Effectiveness of Random Weighting: A
  Litmus Test for Multi-Task Learning"), RLW's twin on the gradients: the shared update is Σ_t w_t G_t with fresh
  random w = T_p · softmax(ε) over the present tasks, ε ~ N(0, I) from ``key`` (LibMTL's RGW: softmax weights; ×T_p for
  the EW scale). Unlike RLW (a loss weighting: every parameter, heads included, gets Σ_t w_t ∇L_t) the heads here get
  their own task's gradient unweighted, as for every gradient method. Absent tasks get weight 0.
  """

  name: ClassVar[str] = 'rgw'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'

  def _apply(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    present = present_tasks(gram(grads))
    eps = jax.random.normal(key, (grads.shape[0],))
    probs = jax.nn.softmax(jnp.where(present, eps, -jnp.inf))
    return jnp.where(present, jnp.sum(present) * probs, 0.0), {}


__all__ = [
    'GRADVAC_GROUPS',
    'ConFIG',
    'DualProj',
    'GradDrop',
    'GradVac',
    'Krum',
    'PCD',
    'RGW',
    'TrimmedMean',
    'UPGrad',
    'dual_cone_weights',
    'gradvac_coefficients',
    'gradvac_group_starts',
    'group_grams',
]
