"""Gradient methods with state across steps, built for stochastic gradients: MoCo, MoDo, SDMGrad, CR-MOGM, DB-MTL,
ExcessMTL.

MoCo (Fernando et al. 2023) and DB-MTL (Lin et al. 2023) track a moving average of every task gradient, and ExcessMTL
(He et al. 2024) an AdaGrad accumulator of squared gradients: their states hold [T, P] arrays, so `init` needs
``num_params`` = P (``needs_num_params``). MoDo (Chen et al. 2023), SDMGrad (Xiao et al. 2023) and CR-MOGM (Zhou et
al. 2022) keep only task weights [T] and take a few projected-gradient steps on them per step. Conventions follow
LibMTL's implementations (which follow the authors' code); the docstrings say where they differ. Scale: weights on the
simplex are multiplied by T_p (the number of present tasks), like MGDA here, so identical gradients give the EW update
wherever the method does not rescale the gradients itself. Absent tasks (zero gradient row) get weight 0, take no
part in the weight updates, and keep their tracked state.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtlmatch.weighting.base import (
    HIGHEST,
    HParam,
    WeightingMethod,
    gram,
    non_negative,
    positive,
    present_from_losses,
    safe_div,
)
from mtlmatch.weighting.gradient_methods import present_tasks, min_norm_weights, project_simplex

# LibMTL's ε in ‖g‖ + ε, log(L + ε) and AdaGrad's √(Σg² + ε).
_LOG_EPS = 1e-8
_ADAGRAD_EPS = 1e-7


def _decay(rate: jax.Array, sigma: jax.Array, step: jax.Array) -> jax.Array:
  """rate / k^σ with k = step + 1 (LibMTL's decaying step sizes)."""
  return rate / jnp.power((step + 1).astype(jnp.float32), sigma)


def _rates(name: str, default: float, doc: str) -> dict:
  return {
      name: HParam(default, 'float', **positive(), doc=doc),
      f'{name}_sigma': HParam(0.5, 'float', **non_negative(), doc=f'decay exponent of {name} (÷ k^σ)'),
  }


@dataclasses.dataclass(frozen=True)
class MoCo(WeightingMethod):
  """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, ICLR 2023, "Mitigating Gradient Bias in Multi-objective
  Learning: A Provably Convergent Approach").

  Tracks each task gradient, y_t ← y_t − β_k (y_t − ĝ_t), and the weights, λ ← softmax(λ − γ_k (Y Yᵀ + ρI) λ);
  update = T_p · λᵀY (state ``y`` [T, P], ``lambd`` [T]), β_k = β/k^σβ, γ_k = γ/k^σγ. As LibMTL's implementation
  (from the authors' code): ĝ_t = L_t G_t / ‖G_t‖ (each gradient rescaled to its loss) and λ's simplex step is a
  softmax (the paper projects onto the simplex). Identical gradients with equal losses L give T_p L g/‖g‖.
  ``linear = False`` (the update is built from y); weights = T_p λ. Absent tasks keep their y and are left out of the
  λ step (λ = 0 for them). hparams: beta (0.5), beta_sigma (0.5), gamma (0.1), gamma_sigma (0.5), rho (0.0).
  """

  name: ClassVar[str] = 'moco'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  linear: ClassVar[bool] = False
  needs_num_params: ClassVar[bool] = True
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      **_rates('beta', 0.5, 'tracking rate of y'),
      **_rates('gamma', 0.1, 'step size of λ'),
      'rho': HParam(0.0, 'float', **non_negative(), doc='ℓ2 regularisation of the λ step'),
  }

  def _init_tracked(self, num_tasks, num_params, hp):
    return {
        'y': jnp.zeros((num_tasks, num_params), jnp.float32),
        'lambd': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
    }

  def _apply_update(self, state, hp, grads, losses, key):
    present = present_tasks(gram(grads))
    pf = present.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=1))
    g_hat = grads * safe_div(losses, norms, 0.0)[:, None]
    beta = _decay(hp['beta'], hp['beta_sigma'], state['step'])
    y = jnp.where(present[:, None], state['y'] - beta * (state['y'] - g_hat), state['y'])
    yp = y * pf[:, None]
    yy = jnp.matmul(yp, yp.T, precision=HIGHEST) + hp['rho'] * jnp.eye(grads.shape[0])
    gamma = _decay(hp['gamma'], hp['gamma_sigma'], state['step'])
    lam = state['lambd'] * pf
    logits = lam - gamma * (yy @ lam)
    lam = jnp.where(present, jax.nn.softmax(jnp.where(present, logits, -jnp.inf)), 0.0)
    lam = jnp.where(jnp.any(present), lam, state['lambd'])
    n_present = jnp.sum(pf)
    update = n_present * jnp.matmul(jnp.where(present, lam, 0.0), yp, precision=HIGHEST)
    return update, jnp.where(present, n_present * lam, 0.0), {'y': y, 'lambd': lam}


@dataclasses.dataclass(frozen=True)
class MoDo(WeightingMethod):
  """MoDo (Chen, Fernando, Ying, Chen, NeurIPS 2023, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
  Generalization and Conflict-Avoidance").

  One projected-gradient step on MGDA's weights per step: λ ← Π_Δ(λ − γ (G₁G₂ᵀ λ + ρ λ)) (state ``lambd`` [T], init
  1/T), update = T_p · λᵀG₃. The paper (and LibMTL) use three independent batches for G₁, G₂, G₃ ("double
  sampling" keeps the λ step unbiased); with one batch per step here G₁ = G₂ = G₃ = G, i.e. stochastic MGDA with a
  single sample. Π_Δ is over the present tasks (`project_simplex`). hparams: gamma (0.001), rho (0.1).
  """

  name: ClassVar[str] = 'modo'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'gamma': HParam(0.001, 'float', **positive(), doc='step size of λ'),
      'rho': HParam(0.1, 'float', **non_negative(), doc='ℓ2 regularisation of the λ step'),
  }

  def _init(self, num_tasks, hp):
    return {'lambd': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    lam = state['lambd']
    lam = project_simplex(lam - hp['gamma'] * (g @ lam + hp['rho'] * lam), present)
    lam = jnp.where(jnp.any(present), lam, state['lambd'])
    return jnp.where(present, jnp.sum(present) * lam, 0.0), {'lambd': lam}


@dataclasses.dataclass(frozen=True)
class SDMGrad(WeightingMethod):
  """SDMGrad (Xiao, Ban, Ji, NeurIPS 2023, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
  Algorithms").

  d = (wᵀG + λ g0)/(1 + λ), g0 = the mean present gradient, with w ∈ Δ from ``niter`` steps of SGD with momentum
  0.5 and learning rate 5 on ½ wᵀ Ĝ w + λ wᵀ Ĝ 1/T_p, each followed by the projection onto the simplex, where
  Ĝ = G Gᵀ / s², s = the mean present gradient norm (state ``w`` [T], init 1/T, carried across steps; the momentum
  restarts every step) — the authors' code as in LibMTL. update = T_p · d. LibMTL draws G from three batches (ζ for d,
  ξ₁ ξ₂ for Ĝ); here one batch serves all three. With λ → ∞ it is EW. hparams: lamda (0.3), niter (20).
  """

  name: ClassVar[str] = 'sdmgrad'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lamda': HParam(0.3, 'float', **non_negative(), doc='pull λ toward the average gradient'),
      'niter': HParam(20, 'int', check=lambda v: v >= 1, expected='>= 1', doc='projected SGD steps on w'),
  }

  def _init(self, num_tasks, hp):
    return {'w': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    pf = present.astype(jnp.float32)
    n_present = jnp.sum(pf)
    scale = safe_div(jnp.sum(jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0)) * pf), n_present, 0.0)
    gg = safe_div(g, jnp.square(scale) + 1e-8, 0.0)
    gg_mean = safe_div(gg @ pf, n_present, 0.0)
    lamda = hp['lamda']

    def body(_, carry):
      w, buf = carry
      buf = 0.5 * buf + gg @ w + lamda * gg_mean
      return project_simplex(w - 5.0 * buf, present), buf

    w, _ = jax.lax.fori_loop(0, hp['niter'], body, (state['w'] * pf, jnp.zeros_like(pf)))
    w = jnp.where(jnp.any(present), w, state['w'])
    beta = (w + lamda * safe_div(pf, n_present, 0.0)) / (1.0 + lamda)
    return jnp.where(present, n_present * beta, 0.0), {'w': w}


@dataclasses.dataclass(frozen=True)
class CRMOGM(WeightingMethod):
  """CR-MOGM (Zhou, Zhang, Chen, Lan, Huang, NeurIPS 2022, "On the Convergence of Stochastic Multi-Objective Gradient
  Manipulation and Beyond").

  Correlation-reduced MGDA: the min-norm weights α̂ of this step (`min_norm_weights`, on the simplex) are smoothed
  across steps, λ ← m λ + (1 − m) α̂ (state ``lambd`` [T]; the first step takes λ = α̂), which reduces the
  correlation between the weights and the stochastic gradients that biases plain stochastic MGDA;
  update = T_p · λ̃ᵀG with λ̃ = λ restricted to the present tasks and renormalised. No public code of the authors
  was found: the base method is MGDA and m = ``momentum`` (0.9) is the weight kept from the past. hparams: momentum.
  """

  name: ClassVar[str] = 'cr_mogm'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'momentum': HParam(0.9, 'float', check=lambda v: 0 <= v < 1, expected='in [0, 1)', doc='EMA weight m'),
  }

  def _init(self, num_tasks, hp):
    return {'lambd': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    g = gram(grads)
    present = present_tasks(g)
    alpha = min_norm_weights(g, present)
    m = jnp.where(state['step'] == 0, 0.0, hp['momentum'])
    lam = jnp.where(present, m * state['lambd'] + (1 - m) * alpha, state['lambd'])
    used = jnp.where(present, lam, 0.0)
    used = safe_div(used, jnp.sum(used), 0.0)
    return jnp.sum(present) * used, {'lambd': lam}


@dataclasses.dataclass(frozen=True)
class DBMTL(WeightingMethod):
  """DB-MTL (Lin, Ye, Zhang, Kwok 2023, "Dual-Balancing for Multi-Task Learning"; LibMTL's ``DB_MTL``).

  Loss-scale balancing: each task's gradient is that of log(L_t + ε), ĝ_t = G_t / (L_t + ε). Gradient-magnitude
  balancing: an EMA b_t ← ĝ_t + β_k (b_t − ĝ_t), β_k = β/k^σ (state ``buffer`` [T, P]), then every task is scaled to the
  largest norm: update = Σ_t (max_s ‖b_s‖ / ‖b_t‖) b_t. ``linear = False``; weights = the balancing factors
  max_s ‖b_s‖/‖b_t‖. Identical gradients with equal losses L give T_p g/L (the log transform's scale, as the
  authors'). Heads get their own task's gradient (the train loop's rule for gradient methods; LibMTL gives them
  ∇log L_t). Absent tasks, and tasks with a non-positive loss (log undefined), are left out and keep their buffer.
  hparams: beta (0.9), beta_sigma (0.5).
  """

  name: ClassVar[str] = 'db_mtl'
  kind: ClassVar[str] = 'gradient'
  needs: ClassVar[str] = 'shared_rows'
  linear: ClassVar[bool] = False
  needs_num_params: ClassVar[bool] = True
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'beta': HParam(0.9, 'float', check=lambda v: 0 <= v <= 1, expected='in [0, 1]', doc='EMA rate'),
      'beta_sigma': HParam(0.5, 'float', **non_negative(), doc='decay exponent of beta (÷ k^σ)'),
  }

  def _init_tracked(self, num_tasks, num_params, hp):
    return {'buffer': jnp.zeros((num_tasks, num_params), jnp.float32)}

  def _apply_update(self, state, hp, grads, losses, key):
    present = present_tasks(gram(grads)) & present_from_losses(losses) & (losses > 0)
    g_log = grads / jnp.where(present, losses + _LOG_EPS, 1.0)[:, None]
    beta = _decay(hp['beta'], hp['beta_sigma'], state['step'])
    buf = jnp.where(present[:, None], g_log + beta * (state['buffer'] - g_log), state['buffer'])
    norms = jnp.sqrt(jnp.sum(jnp.square(buf), axis=1))
    top = jnp.max(jnp.where(present, norms, 0.0))
    alpha = jnp.where(present, safe_div(top, norms, 0.0), 0.0)
    update = jnp.matmul(alpha, buf, precision=HIGHEST)
    return update, alpha, {'buffer': buf}


@dataclasses.dataclass(frozen=True)
class ExcessMTL(WeightingMethod):
  """ExcessMTL (He, Zhou, Zhao, Ye, Zhang, Huang, Zhang, ICML 2024, "Robust Multi-Task Learning with Excess Risks";
  LibMTL's ``ExcessMTL``, from the authors' code).

  Weights by excess risk, estimated by a diagonal second-order (AdaGrad) model: with H_t = √(Σ_k G_t,k² + ε) the
  accumulated squared gradients (state ``grad_sum`` [T, P]), e_t = G_tᵀ diag(1/H_t) G_t, and the weights follow
  exponentiated gradient ascent on e relative to its first value: w_t ← w_t exp(η e_t / e_t(0)),
  w ← T w / Σ w (state ``weights``, ``initial`` [T]); update = Σ_t w_t G_t. The first step leaves w = 1, so it is
  EW. Here e_t(0) is each task's first *present* value (LibMTL: the first step's); absent tasks keep their weight,
  accumulator and e_t(0), and get weight 0 in the update. hparams: step_size (η, 0.01: LibMTL's robust_step_size).
  """

  name: ClassVar[str] = 'excess_mtl'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'shared_rows'
  needs_num_params: ClassVar[bool] = True
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'step_size': HParam(0.01, 'float', **positive(), doc='exponentiated-gradient step η'),
  }

  def _init_tracked(self, num_tasks, num_params, hp):
    return {
        'grad_sum': jnp.zeros((num_tasks, num_params), jnp.float32),
        'weights': jnp.ones((num_tasks,), jnp.float32),
        'initial': jnp.zeros((num_tasks,), jnp.float32),
    }

  def _apply(self, state, hp, grads, losses, key):
    num_tasks = grads.shape[0]
    present = present_tasks(gram(grads))
    sq = jnp.square(grads)
    grad_sum = jnp.where(present[:, None], state['grad_sum'] + sq, state['grad_sum'])
    excess = jnp.sum(sq / jnp.sqrt(grad_sum + _ADAGRAD_EPS), axis=1)
    first = present & (state['initial'] <= 0)
    initial = jnp.where(first, excess, state['initial'])
    move = present & ~first
    w = state['weights'] * jnp.exp(jnp.where(move, hp['step_size'] * safe_div(excess, initial, 0.0), 0.0))
    w = num_tasks * w / jnp.sum(w)
    new = {'grad_sum': grad_sum, 'weights': w, 'initial': initial}
    return jnp.where(present, w, 0.0), new


__all__ = ['CRMOGM', 'DBMTL', 'ExcessMTL', 'MoCo', 'MoDo', 'SDMGrad']
