"""Preference-based scalarisations of the losses: COSMOS (Ruchte & Grabocka 2021) and PBI (Zhang & Li 2007).

Each maps the loss vector L and a preference ray to one scalar J(L); the task weights are ∂J/∂L (a loss weighting:
the update is Σ_t w_t G_t, the heads get the same weights). Contract of `base.WeightingMethod`; maths in
docs/maths.md §6.1. Use them through `mtlmatch.weighting` (``get_method('pbi', theta=5.0)``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtlmatch.weighting.base import HParam, WeightingMethod, non_negative, positive, present_from_losses, safe_div

# PBI: a loss vector within this relative distance of the preference ray is on it (float32 rounds d2 to ~1e-7 ‖L‖).
_PBI_ON_RAY = 1e-6


def _preference_check(what: str) -> dict:
  return dict(
      check=lambda v: all(x >= 0 for x in v) and (not v or any(v)),
      expected=f'>= 0, not all 0 (one per task; empty: {what})',
  )


@dataclasses.dataclass(frozen=True)
class COSMOS(WeightingMethod):
  """COSMOS's loss (Ruchte & Grabocka, ICDM 2021, "Scalable Pareto Front Approximation for Deep Multi-Objective
  Learning"), weight-only: the scalarisation of the losses along a preference ray r ∈ Δ with a cosine penalty,

    J(L) = T_p (rᵀL − λ cos(r, L)),   w = ∂J/∂L = T_p (r − λ (r / (‖r‖ ‖L‖) − cos(r, L) L / ‖L‖²)),

  the authors' ``loss_total = Σ a_t L_t − lamda · cosine_similarity(L, a)`` (their code, ``cosmos.py``), ×T_p (the
  number of present tasks) so that equal losses and r = 1/T give w = 1 (EW). The penalty pulls the loss vector's
  direction toward r. r is drawn every step from Dirichlet(``alpha``·1) with ``key`` (the authors' ``alpha``; 1.2 their
  Multi-MNIST default) or fixed by ``ray`` (normalised to sum 1 at init). **Weight-only variant**: COSMOS also
  conditions the network on r (r is appended to the input, so that one network traces the whole Pareto front and
  any ray can be asked for at test time); the models here are not conditioned, so with a sampled r the network
  trains on a random mixture of rays (a randomised scalarisation), and with a fixed ``ray`` it targets that ray's
  trade-off. Weights may be negative (the penalty's gradient lowers the weight of a task whose loss is already large
  relative to r). Absent tasks (L_t = 0) are left out of r (the Dirichlet draw restricted to the present tasks and
  renormalised, itself a Dirichlet) and of cos, and get weight 0. ``key`` is required (also with a fixed ray).
  hparams: lamda (2.0, the authors' Multi-MNIST λ), alpha (1.2), ray (() = sampled).
  """

  name: ClassVar[str] = 'cosmos'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lamda': HParam(2.0, 'float', **non_negative(), doc='cosine-similarity penalty λ'),
      'alpha': HParam(1.2, 'float', **positive(), doc='Dirichlet concentration of the sampled ray'),
      'ray': HParam((), 'floats', **_preference_check('drawn every step'), doc='fixed preference ray'),
  }
  # An all-zero ray (what an empty one is stored as) means "draw r every step".
  PER_TASK_FLOATS: ClassVar[Mapping[str, tuple[float, str]]] = {'ray': (0.0, 'a ray drawn every step')}

  def init(self, num_tasks, num_params=None, **hparams):
    state = super().init(num_tasks, num_params, **hparams)
    ray = state['hparams']['ray']
    state['hparams'] = {**state['hparams'], 'ray': safe_div(ray, jnp.sum(ray), 0.0)}
    return state

  def _apply(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    num_tasks = losses.shape[0]
    present = present_from_losses(losses)
    drawn = jax.random.dirichlet(key, jnp.full((num_tasks,), hp['alpha']))
    ray = jnp.where(jnp.all(hp['ray'] == 0), drawn, hp['ray'])
    ray = jnp.where(present, ray, 0.0)
    ray = safe_div(ray, jnp.sum(ray), 0.0)
    loss = jnp.where(present, losses, 0.0)
    ray_norm, loss_norm = jnp.sqrt(jnp.sum(ray**2)), jnp.sqrt(jnp.sum(loss**2))
    cos = safe_div(ray @ loss, ray_norm * loss_norm, 0.0)
    d_cos = safe_div(ray, ray_norm * loss_norm, 0.0) - cos * safe_div(loss, loss_norm**2, 0.0)
    weights = jnp.sum(present) * (ray - hp['lamda'] * d_cos)
    return jnp.where(present, weights, 0.0), {}


@dataclasses.dataclass(frozen=True)
class PBI(WeightingMethod):
  """Penalty-based boundary intersection (Zhang & Li, IEEE TEC 2007, "MOEA/D: A Multiobjective Evolutionary Algorithm
  Based on Decomposition", §2.3) as a loss scalarisation: with the preference vector w and the ideal point z* = 0
  (losses are ≥ 0),

    d1 = ⟨L, w⟩ / ‖w‖,   d2 = ‖L − d1 w / ‖w‖‖,   g(L) = c (d1 + θ d2),

  d1 the progress along the ray w, d2 the distance from it. The weights are g's gradient,
  w_t = c (ŵ_t + θ (L − d1 ŵ)_t / d2) with ŵ = w / ‖w‖ (the θ term is 0 when L lies on the ray, d2 ≤ 1e-6 ‖L‖:
  its subgradient 0; below that d2 is float32 rounding), and c = T_p / Σ_t ŵ_t so that the d1 part sums to T_p
  (w = 1 and equal losses give EW). A task below the ray (L_t < d1 ŵ_t) gets a lower, possibly negative weight: PBI
  pulls the loss vector onto the ray, not only down. Absent tasks (L_t = 0) are left out of w and L and get weight 0.
  hparams: theta (5.0, MOEA/D's usual θ), preference (() = all ones).
  """

  name: ClassVar[str] = 'pbi'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'theta': HParam(5.0, 'float', **non_negative(), doc='penalty θ on the distance to the ray'),
      'preference': HParam((), 'floats', **_preference_check('all ones'), doc='preference vector w'),
  }
  PER_TASK_FLOATS: ClassVar[Mapping[str, tuple[float, str]]] = {'preference': (1.0, 'all ones')}

  def _apply(self, state, hp, grads, losses, key):
    present = present_from_losses(losses)
    pref = jnp.where(present, hp['preference'], 0.0)
    unit = safe_div(pref, jnp.sqrt(jnp.sum(pref**2)), 0.0)
    loss = jnp.where(present, losses, 0.0)
    d1 = loss @ unit
    off_ray = loss - d1 * unit
    d2 = jnp.sqrt(jnp.sum(off_ray**2))
    # On the ray d2's direction is float32 rounding of d1ŵ: take the subgradient 0 there.
    off = d2 > _PBI_ON_RAY * jnp.sqrt(jnp.sum(loss**2))
    grad = unit + hp['theta'] * jnp.where(off, safe_div(off_ray, d2, 0.0), 0.0)
    scale = safe_div(jnp.sum(present).astype(jnp.float32), jnp.sum(unit), 0.0)
    return jnp.where(present, scale * grad, 0.0), {}
