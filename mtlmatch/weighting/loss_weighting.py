"""Loss-weighting methods: the update is Σ_t w_t G_t with weights from the losses (and, for GradNorm, gradient norms).

EW, UW (Kendall et al. 2018), DWA (Liu et al. 2019), RLW (Lin et al. 2022), GradNorm (Chen et al. 2018), FAMO
(Liu et al. 2023), TorchJD's Sum / Mean / Constant, GLS (Chennupati et al. 2019), IMTL-L (Liu et al. 2021), STCH
(Lin et al. 2024), GO4Align (Shen et al. 2024) and Auto-Lambda (Liu et al. 2022, weights meta-learned on a
validation batch). All follow the contract of `base.WeightingMethod`; use them through
`mtlmatch.weighting`::

    method = get_method('dwa', window=50)
    state = method.init(num_tasks=3)
    update, weights, state = method.apply(state, grads, losses, key)

Except GradNorm (and ExcessMTL, in `stochastic_methods`), their weights do not depend on ``grads``: a train loop may
skip the per-task Jacobian, call ``apply(state, jnp.zeros((T, 0)), losses, key)`` for the weights and differentiate Σ_t
w_t L_t (e.g. through one ``jax.vjp`` of the per-task losses with the weights as cotangent). Absent tasks (loss exactly
0: no labelled example in the batch) are handled as each docstring says; their gradient row is zero, so their weight
never moves the update.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtlmatch.weighting.base import (
    HParam,
    MetaInputs,
    WeightingMethod,
    non_negative,
    positive,
    present_from_losses,
    present_from_sq_norms,
    safe_div,
)

# UW's log-variances are kept in [-S, S] so exp(-s) stays finite in float32 whatever the losses do.
_UW_LOG_VAR_BOUND = 20.0
# Floor of a GradNorm weight before renormalisation (weights must stay positive).
_GRADNORM_MIN_WEIGHT = 1e-3
# FAMO's ε inside log(ℓ + ε) and 1/(ℓ + ε), as in the authors' code.
_FAMO_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class EW(WeightingMethod):
  """Equal weighting: w_t = 1, update = Σ_t G_t (the baseline every other method is scaled against).

  Absent tasks keep weight 1; their zero row adds nothing. State: only ``step``.
  """

  name: ClassVar[str] = 'ew'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'

  def _apply(self, state, hp, grads, losses, key):
    return jnp.ones_like(losses), {}


@dataclasses.dataclass(frozen=True)
class UW(WeightingMethod):
  """Uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses").

  Learned log-variances s_t (state ``log_var`` [T], init 0) define the objective Σ_t exp(−s_t) L_t + s_t; the task
  weights are w_t = exp(−s_t) (with the s of this step) and update = Σ_t w_t G_t. The method then takes its own SGD
  step on s with the given losses: s_t ← s_t − lr · (1 − exp(−s_t) L_t), whose fixed point is s_t = log L_t (a task
  with a larger loss gets a larger s and a smaller weight). s is clipped to [−20, 20].
  Absent tasks (L_t = 0) keep their s (the term would otherwise drive s to −∞ and the weight to +∞).
  hparams: lr (default 0.01).
  """

  name: ClassVar[str] = 'uw'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lr': HParam(0.01, 'float', **positive(), doc='SGD step size on the log-variances'),
  }

  def _init(self, num_tasks, hp):
    return {'log_var': jnp.zeros((num_tasks,), jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    s = state['log_var']
    weights = jnp.exp(-s)
    present = present_from_losses(losses)
    grad_s = jnp.where(present, 1.0 - weights * jnp.where(present, losses, 0.0), 0.0)
    s_new = jnp.clip(s - hp['lr'] * grad_s, -_UW_LOG_VAR_BOUND, _UW_LOG_VAR_BOUND)
    return weights, {'log_var': s_new}


@dataclasses.dataclass(frozen=True)
class DWA(WeightingMethod):
  """Dynamic weight average (Liu, Johns, Davison, CVPR 2019, "End-to-End Multi-Task Learning with Attention").

  w_t = T · exp(r_t / τ) / Σ_i exp(r_i / τ),  r_t = L̄_t(k−1) / L̄_t(k−2),
  where L̄(k) is the average loss of window k (``window`` consecutive `apply` calls stand for the paper's epochs) and
  τ = ``temperature`` (2 in the paper). Until two windows are complete, w = 1. Weights sum to T.
  Window averages count only the steps where the task was present (L_t ≠ 0); a task with no present step in one of
  the two windows gets r_t = 1. State: ``window_sum`` / ``window_count`` [T] of the open window, ``avg_last`` /
  ``avg_before`` [T] of the last two complete windows, ``windows_done`` (int32).
  hparams: temperature (2.0), window (100 steps).
  """

  name: ClassVar[str] = 'dwa'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'temperature': HParam(2.0, 'float', **positive(), doc='softmax temperature τ'),
      'window': HParam(100, 'int', check=lambda v: v >= 1, expected='>= 1', doc='steps per averaging window'),
  }

  def _init(self, num_tasks, hp):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {
        'window_sum': zeros,
        'window_count': zeros,
        'avg_last': zeros,
        'avg_before': zeros,
        'windows_done': jnp.zeros((), jnp.int32),
    }

  def _apply(self, state, hp, grads, losses, key):
    num_tasks = losses.shape[0]
    last, before = state['avg_last'], state['avg_before']
    ok = (last > 0) & (before > 0)
    ratio = jnp.where(ok, safe_div(last, before, 1.0), 1.0)
    dwa = num_tasks * jax.nn.softmax(ratio / hp['temperature'])
    weights = jnp.where(state['windows_done'] >= 2, dwa, jnp.ones_like(dwa))

    present = present_from_losses(losses)
    window_sum = state['window_sum'] + jnp.where(present, losses, 0.0)
    window_count = state['window_count'] + present.astype(jnp.float32)
    close = (state['step'] + 1) % hp['window'] == 0
    avg = safe_div(window_sum, window_count, 0.0)
    new = {
        'window_sum': jnp.where(close, 0.0, window_sum),
        'window_count': jnp.where(close, 0.0, window_count),
        'avg_last': jnp.where(close, avg, last),
        'avg_before': jnp.where(close, last, before),
        'windows_done': state['windows_done'] + close.astype(jnp.int32),
    }
    return weights, new


@dataclasses.dataclass(frozen=True)
class RLW(WeightingMethod):
  """Random loss weighting (Lin, Ye, Xu, Shi, Zhang, TMLR 2022, "Reasonable Effectiveness of Random Weighting").

  Fresh weights every step from ``key``: w = T · softmax(ε), ε ~ N(0, I_T) (``distribution='softmax'``, the
  paper's default), or w = T · Dirichlet(concentration · 1_T) (``'dirichlet'``). Weights are positive and sum to T
  (the paper's sum to 1; ×T keeps the update on the scale of EW, E[w_t] = 1). Same key → same weights.
  Absent tasks are weighted like the others (their zero row adds nothing). State: only ``step``.
  hparams: distribution ('softmax' | 'dirichlet'), concentration (1.0, Dirichlet only).
  """

  name: ClassVar[str] = 'rlw'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'distribution': HParam('softmax', ('softmax', 'dirichlet')),
      'concentration': HParam(1.0, 'float', **positive(), doc='Dirichlet concentration'),
  }

  def _apply(self, state, hp, grads, losses, key):
    key = self._require_key(key)
    num_tasks = losses.shape[0]
    probs = jax.lax.cond(
        hp['distribution'] == self.choice('distribution', 'dirichlet'),
        lambda k: jax.random.dirichlet(k, jnp.full((num_tasks,), hp['concentration'])),
        lambda k: jax.nn.softmax(jax.random.normal(k, (num_tasks,))),
        key,
    )
    return num_tasks * probs, {}


@dataclasses.dataclass(frozen=True)
class GradNorm(WeightingMethod):
  """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018, "GradNorm: Gradient Normalization for Adaptive Loss
  Balancing in Deep Multitask Networks").

  Learned weights w (state ``weights`` [T], init 1). With G^W_t = ‖w_t G_t‖ = w_t ‖G_t‖, Ḡ = mean_t G^W_t,
  L̃_t = L_t / L_t(0) (loss relative to the task's first present loss, state ``initial_losses``) and
  r_t = L̃_t / mean_i L̃_i, the weights minimise Σ_t ``|G^W_t − Ḡ r_t^α|`` with the target held constant:

    w_t ← w_t − lr · sign(w_t ‖G_t‖ − Ḡ r_t^α) ‖G_t‖,   then w ← T · w / Σ w  (w floored at 1e-3 first).

  A task that trains slower than the others (larger r_t) gets a larger target and its weight grows.
  The update uses the weights of this step: Σ_t w_t G_t.
  The paper measures ‖w_t ∇_W L_t‖ on the last shared layer W only. Here ‖G_t‖ is over whatever ``grads`` holds:
  a train loop may pass only the last shared layer's gradients (then use the returned weights on the full
  gradient, e.g. by differentiating Σ_t w_t L_t, rather than the returned update).
  Absent tasks (zero row or zero loss) are left out of Ḡ and of the mean of L̃, and their weight gets no step.
  hparams: alpha (1.5, restoring-force strength), lr (0.025).
  """

  name: ClassVar[str] = 'gradnorm'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'shared_rows'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'alpha': HParam(1.5, 'float', **non_negative(), doc='asymmetry α'),
      'lr': HParam(0.025, 'float', **positive(), doc='SGD step size on the weights'),
  }

  def _init(self, num_tasks, hp):
    return {'weights': jnp.ones((num_tasks,), jnp.float32), 'initial_losses': jnp.zeros((num_tasks,), jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    num_tasks = losses.shape[0]
    w = state['weights']
    norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=1))
    present = present_from_sq_norms(jnp.square(norms)) & present_from_losses(losses)
    l0 = state['initial_losses']
    l0 = jnp.where((l0 <= 0) & present, losses, l0)  # first present loss of each task
    n_present = jnp.sum(present)
    gw = w * norms
    g_mean = safe_div(jnp.sum(jnp.where(present, gw, 0.0)), n_present)
    rel = jnp.where(present, safe_div(losses, l0, 1.0), 0.0)
    rel_mean = safe_div(jnp.sum(rel), n_present, 1.0)
    r = jnp.where(present, safe_div(rel, rel_mean, 1.0), 1.0)
    target = jax.lax.stop_gradient(g_mean * jnp.power(jnp.maximum(r, 0.0), hp['alpha']))
    grad_w = jnp.where(present, jnp.sign(gw - target) * norms, 0.0)
    w_new = jnp.maximum(w - hp['lr'] * grad_w, _GRADNORM_MIN_WEIGHT)
    w_new = num_tasks * w_new / jnp.sum(w_new)
    return w, {'weights': w_new, 'initial_losses': l0}


@dataclasses.dataclass(frozen=True)
class FAMO(WeightingMethod):
  """FAMO (Liu, Liang, Chen, Liu, NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization").

  Task logits ξ (state ``logits`` [T], init 0), z = softmax(ξ). The update descends Σ_t z_t log L_t, i.e.

    w_t = T_p · (z_t / L_t) / Σ_{s present} (z_s / L_s),   update = Σ_t w_t G_t

  (the authors' c = Σ z/L normalisation, ×T_p = number of present tasks so that equal losses and logits give w = 1,
  the EW update). Logit step, from the change of the log losses δ_t = log L_t(prev) − log L_t(now):

    ξ ← Adam(ξ; ∇ = J_softmax(ξ)ᵀ δ + γ ξ)  (β = (0.9, 0.999), ε = 1e-8, L2 weight decay γ, as the authors' code),

  so a task whose loss fell faster than the others loses weight. The authors compute L(now) by a second forward pass
  on the same batch after the parameter step; with the (state, grads, losses) interface the step here uses the
  previous step's losses (state ``prev_losses``) and this step's (a one-step delay, no extra pass), then forms the
  weights with the updated logits. Losses are taken ≥ 0 with ε = 1e-8 added (min losses 0, as in the authors' code).
  Absent tasks (L_t = 0) get weight 0 and δ_t = 0 (also when absent in the previous step); the logits do not move
  on the first step. State also holds the Adam moments ``adam_mu``/``adam_nu`` [T] and ``adam_count``.
  hparams: lr (0.025), weight_decay (γ, 0.01).
  """

  name: ClassVar[str] = 'famo'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lr': HParam(0.025, 'float', **positive(), doc='Adam step size on the logits'),
      'weight_decay': HParam(0.01, 'float', **non_negative(), doc='γ, L2 penalty on the logits'),
  }

  def _init(self, num_tasks, hp):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {
        'logits': zeros,
        'prev_losses': zeros,
        'adam_mu': zeros,
        'adam_nu': zeros,
        'adam_count': jnp.zeros((), jnp.int32),
    }

  def _apply(self, state, hp, grads, losses, key):
    xi, prev = state['logits'], state['prev_losses']
    present = present_from_losses(losses) & (losses > 0)
    both = present & (prev > 0)
    log_now = jnp.log(jnp.where(present, losses, 1.0) + _FAMO_EPS)
    log_prev = jnp.log(jnp.where(both, prev, 1.0) + _FAMO_EPS)
    delta = jnp.where(both, log_prev - log_now, 0.0)
    z = jax.nn.softmax(xi)
    grad = z * (delta - jnp.dot(z, delta)) + hp['weight_decay'] * xi  # J_softmaxᵀ δ (J is symmetric) + γ ξ

    count = state['adam_count'] + 1
    mu = 0.9 * state['adam_mu'] + 0.1 * grad
    nu = 0.999 * state['adam_nu'] + 0.001 * jnp.square(grad)
    c = count.astype(jnp.float32)
    step = hp['lr'] * (mu / (1 - 0.9**c)) / (jnp.sqrt(nu / (1 - 0.999**c)) + 1e-8)
    move = jnp.any(both)
    xi_new = jnp.where(move, xi - step, xi)
    adam = {
        'adam_mu': jnp.where(move, mu, state['adam_mu']),
        'adam_nu': jnp.where(move, nu, state['adam_nu']),
        'adam_count': jnp.where(move, count, state['adam_count']),
    }

    n_present = jnp.sum(present)
    logit_w = jnp.where(present, xi_new - log_now, -jnp.inf)  # log(z_t / L_t) up to a constant
    probs = jnp.where(present, jax.nn.softmax(jnp.where(n_present > 0, logit_w, 0.0)), 0.0)
    weights = n_present.astype(jnp.float32) * probs
    new = {'logits': xi_new, 'prev_losses': jnp.where(present, losses, 0.0), **adam}
    return weights, new


# ---- trivial aggregations (TorchJD's Sum, Mean, Constant) ------------------------------------------------------------
def _present_losses(losses):
  return present_from_losses(losses)


@dataclasses.dataclass(frozen=True)
class Sum(WeightingMethod):
  """Sum (TorchJD's ``Sum``): w_t = 1 for present tasks, 0 for absent ones (L_t = 0). The update is EW's; only the
  reported weight of an absent task differs (EW reports 1). State: only ``step``.
  """

  name: ClassVar[str] = 'sum'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'

  def _apply(self, state, hp, grads, losses, key):
    return _present_losses(losses).astype(jnp.float32), {}


@dataclasses.dataclass(frozen=True)
class Mean(WeightingMethod):
  """Mean (TorchJD's ``Mean``) of the present tasks' gradients, on the EW scale: w_t = T / T_p for the T_p present
  tasks, 0 for absent ones. With every task present it is EW; when tasks are missing from a batch the update keeps
  its size (the mean of the present gradients × T) instead of shrinking like the sum. State: only ``step``.
  """

  name: ClassVar[str] = 'mean'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'

  def _apply(self, state, hp, grads, losses, key):
    present = _present_losses(losses)
    return jnp.where(present, safe_div(jnp.float32(losses.shape[0]), jnp.sum(present).astype(jnp.float32)), 0.0), {}


@dataclasses.dataclass(frozen=True)
class Constant(WeightingMethod):
  """Fixed task weights (TorchJD's ``Constant``; linear scalarisation): update = Σ_t c_t G_t with c = ``weights``
  (one float per task, checked at init; empty, the default, means all ones). Absent tasks get 0. State: ``step``.
  hparams: weights (()).
  """

  name: ClassVar[str] = 'constant'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'weights': HParam((), 'floats', doc='one weight per task (empty: all ones)'),
  }
  PER_TASK_FLOATS: ClassVar[Mapping[str, tuple[float, str]]] = {'weights': (1.0, 'all ones')}

  def _apply(self, state, hp, grads, losses, key):
    return jnp.where(_present_losses(losses), hp['weights'], 0.0), {}


# ---- loss transforms ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GLS(WeightingMethod):
  """Geometric loss strategy (Chennupati, Sistu, Yogamani, Rawashdeh, CVPR Workshops 2019, "MultiNet++: Multi-Stream
  Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning").

  Minimises the geometric mean of the losses, L_GLS = (Π_t L_t)^(1/T); ∂L_GLS/∂L_t = L_GLS / (T L_t). Here
  w_t = L_GLS / L_t over the T_p present tasks (T_p × LibMTL's weights, so equal losses give w = 1, the EW update);
  computed in log space. The geometric mean needs positive losses: tasks with L_t ≤ 0 (absent ones included) are left
  out (w = 0). State: only ``step``.
  """

  name: ClassVar[str] = 'gls'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'

  def _apply(self, state, hp, grads, losses, key):
    present = present_from_losses(losses) & (losses > 0)
    logs = jnp.log(jnp.where(present, losses, 1.0))
    mean_log = safe_div(jnp.sum(jnp.where(present, logs, 0.0)), jnp.sum(present).astype(jnp.float32), 0.0)
    return jnp.where(present, jnp.exp(mean_log - logs), 0.0), {}


@dataclasses.dataclass(frozen=True)
class IMTLL(WeightingMethod):
  """IMTL-L, the loss part of IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, ICLR 2021, "Towards Impartial
  Multi-task Learning").

  Learned scales s_t (state ``log_scale`` [T], init 0) and the objective Σ_t e^{s_t} L_t − s_t, whose minimum over s
  makes every scaled loss e^{s_t} L_t equal to 1. Weights w_t = e^{s_t} (with this step's s), then an SGD step on s:
  s_t ← s_t − lr (e^{s_t} L_t − 1) (LibMTL trains s with the model's optimizer; here, as UW, the method takes its own
  step), s clipped to [−20, 20]. Absent tasks (L_t = 0) keep their s and get weight 0. hparams: lr (0.01).
  """

  name: ClassVar[str] = 'imtl_l'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lr': HParam(0.01, 'float', **positive(), doc='SGD step size on the log-scales'),
  }

  def _init(self, num_tasks, hp):
    return {'log_scale': jnp.zeros((num_tasks,), jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    s = state['log_scale']
    weights = jnp.exp(s)
    present = present_from_losses(losses)
    grad_s = jnp.where(present, weights * jnp.where(present, losses, 0.0) - 1.0, 0.0)
    s_new = jnp.clip(s - hp['lr'] * grad_s, -_UW_LOG_VAR_BOUND, _UW_LOG_VAR_BOUND)
    return jnp.where(present, weights, 0.0), {'log_scale': s_new}


@dataclasses.dataclass(frozen=True)
class STCH(WeightingMethod):
  """Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Zhang, Zhang, ICML 2024, "Smooth Tchebycheff Scalarization
  for Multi-Objective Optimization"), as the authors' MTL code (in LibMTL).

  After a warm-up the objective is the smooth maximum of the log losses relative to a nadir point z:
  f = μ log Σ_t exp(log(L_t / z_t) / μ), so ∂f/∂L_t = softmax_t(log(L/z)/μ) / L_t: the worst task (relative to z)
  gets the most weight, more sharply as μ → 0. During the first ``warmup_steps`` steps the objective is Σ_t log L_t
  (∂/∂L_t = 1/L_t) and z accumulates the mean loss of each task over them (the authors: over the last warm-up
  epoch). Weights are normalised to sum to T_p (the authors' raw weights scale with 1/L; the normalisation keeps
  the EW scale and the ratios between tasks). Tasks with L_t ≤ 0 (absent ones included) get weight 0 and do not
  count toward z. State: ``loss_sum``, ``loss_count`` [T]. hparams: mu (1.0), warmup_steps (100).
  """

  name: ClassVar[str] = 'stch'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'mu': HParam(1.0, 'float', **positive(), doc='smoothing μ'),
      'warmup_steps': HParam(100, 'int', check=lambda v: v >= 1, expected='>= 1', doc='steps that set the nadir z'),
  }

  def _init(self, num_tasks, hp):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {'loss_sum': zeros, 'loss_count': zeros}

  def _apply(self, state, hp, grads, losses, key):
    present = present_from_losses(losses) & (losses > 0)
    safe = jnp.where(present, losses, 1.0)
    warm = state['step'] < hp['warmup_steps']
    nadir = safe_div(state['loss_sum'], state['loss_count'], 1.0)
    nadir = jnp.where(nadir > 0, nadir, 1.0)  # a task never present during the warm-up: z = 1
    rel = jnp.where(present, jnp.log(safe / nadir) / hp['mu'], -jnp.inf)
    soft = jnp.where(present, jax.nn.softmax(jnp.where(jnp.any(present), rel, 0.0)), 0.0)
    raw = jnp.where(warm, jnp.where(present, 1.0, 0.0), soft) / safe
    weights = jnp.sum(present) * safe_div(raw, jnp.sum(raw), 0.0)
    add = warm & present
    new = {
        'loss_sum': state['loss_sum'] + jnp.where(add, losses, 0.0),
        'loss_count': state['loss_count'] + add.astype(jnp.float32),
    }
    return jnp.where(present, weights, 0.0), new


def kmeans_1d(values: jax.Array, present: jax.Array, k: jax.Array | int, iters: jax.Array | int = 20) -> jax.Array:
  """Lloyd's k-means of the present scalars `values` [T] into min(k, T_p) groups; returns each value's group centre
  (0 for absent entries). Centres start at evenly spaced order statistics of the present values (deterministic)."""
  num_tasks = values.shape[0]
  n_present = jnp.sum(present)
  k = jnp.clip(k, 1, jnp.maximum(n_present, 1))
  ordered = jnp.sort(jnp.where(present, values, jnp.inf))
  slots = jnp.arange(num_tasks)
  pos = jnp.where(k > 1, slots * (n_present - 1) // jnp.maximum(k - 1, 1), 0)
  active = slots < k
  centres = jnp.where(active, ordered[jnp.clip(pos, 0, num_tasks - 1)], 0.0)
  centres = jnp.where(
      (k == 1) & (slots == 0), safe_div(jnp.sum(jnp.where(present, values, 0.0)), n_present, 0.0), centres
  )

  def assign(c):
    return jnp.argmin(jnp.where(active[None, :], jnp.abs(values[:, None] - c[None, :]), jnp.inf), axis=1)

  def body(_, c):
    member = (assign(c)[:, None] == slots[None, :]) & present[:, None]
    total = jnp.sum(jnp.where(member, values[:, None], 0.0), axis=0)
    count = jnp.sum(member, axis=0)
    return jnp.where(active & (count > 0), safe_div(total, count.astype(values.dtype), 0.0), c)

  centres = jax.lax.fori_loop(0, iters, body, centres)
  return jnp.where(present, centres[assign(centres)], 0.0)


@dataclasses.dataclass(frozen=True)
class GO4Align(WeightingMethod):
  """GO4Align (Shen, Wang, Cao, Zhen, Snoek, Tan, NeurIPS 2024, "GO4Align: Group Optimization for Multi-Task
  Alignment"), as the authors' code.

  Risk-guided indicators r_t = (Σ_s L_s / L_t) p_t with p ← p ⊙ exp(−η L), p ← p / Σ p (state ``probs`` [T], init
  1/T; η = ``step_size``), then dynamical group assignment: the r_t are clustered into ``num_groups`` groups
  (k-means in one dimension) and every task takes its group's mean indicator as its weight. The authors run
  kmeans_pytorch (random initialisation); here Lloyd's iterations (``kmeans_iters``) start from evenly spaced order
  statistics, so the grouping is deterministic. Equal losses and probabilities give w = 1 (EW). Absent tasks
  (L_t ≤ 0) are left out of Σ L, the p step, the clustering, and get weight 0.
  hparams: num_groups (2), step_size (1e-4), kmeans_iters (20).
  """

  name: ClassVar[str] = 'go4align'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'losses'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'num_groups': HParam(2, 'int', check=lambda v: v >= 1, expected='>= 1', doc='number of task groups'),
      'step_size': HParam(1e-4, 'float', **non_negative(), doc='η of the probability update'),
      'kmeans_iters': HParam(20, 'int', check=lambda v: v >= 1, expected='>= 1', doc="Lloyd's iterations"),
  }

  def _init(self, num_tasks, hp):
    return {'probs': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)}

  def _apply(self, state, hp, grads, losses, key):
    present = present_from_losses(losses) & (losses > 0)
    safe = jnp.where(present, losses, 1.0)
    p = state['probs'] * jnp.where(present, jnp.exp(-hp['step_size'] * safe), 1.0)
    p = p / jnp.sum(p)
    p_present = safe_div(jnp.where(present, p, 0.0), jnp.sum(jnp.where(present, p, 0.0)), 0.0)
    r = jnp.where(present, jnp.sum(jnp.where(present, losses, 0.0)) / safe * p_present, 0.0)
    return kmeans_1d(r, present, hp['num_groups'], hp['kmeans_iters']), {'probs': p}


# ---- meta-learned weights -----------------------------------------------------------------------------------------
# Adam's constants for λ: PyTorch's defaults, which the Auto-Lambda authors' optim.Adam uses.
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8


def adam_step(state, key: str, grad: jax.Array, lr: jax.Array) -> dict:
  """One Adam step (PyTorch's: β = (0.9, 0.999), ε = 1e-8, bias-corrected) on ``state[key]`` with gradient ``grad``,
  the moments in ``state['adam_mu']`` / ``state['adam_nu']`` and the count in ``state['adam_count']``: returns the
  state with those four entries updated (the meta-learned weights of Auto-Lambda, MOML and FORUM)."""
  count = state['adam_count'] + 1
  mu = _ADAM_B1 * state['adam_mu'] + (1 - _ADAM_B1) * grad
  nu = _ADAM_B2 * state['adam_nu'] + (1 - _ADAM_B2) * jnp.square(grad)
  c = count.astype(jnp.float32)
  step = lr * (mu / (1 - _ADAM_B1**c)) / (jnp.sqrt(nu / (1 - _ADAM_B2**c)) + _ADAM_EPS)
  return {**state, key: state[key] - step, 'adam_mu': mu, 'adam_nu': nu, 'adam_count': count}


@dataclasses.dataclass(frozen=True)
class AutoLambda(WeightingMethod):
  """Auto-Lambda (Liu, James, Davison, Johns, TMLR 2022, "Auto-Lambda: Disentangling Dynamic Task Relationships"),
  in the authors' "every task is primary" multi-task mode.

  Task weights λ ∈ R^T (state ``lambdas`` [T], init ``init`` = 0.1 for every loss) are meta-learned so that one SGD
  look-ahead step on the weighted training loss lowers the loss of the primary tasks on a validation batch:

    θ'(λ) = θ − α Σ_t λ_t ∇_θ L_t(θ; train batch),     L_val(λ) = Σ_{t primary} L_t(θ'(λ); validation batch),

  α = ``lookahead_lr`` when > 0, else the model optimizer's learning rate at this step (the authors pass their
  scheduler's current rate). θ' is linear in λ, so the meta-gradient is exact without any Hessian:

    ∂L_val/∂λ_t = −α ⟨∇_θ L_t(θ), v⟩,   v = ∇_θ' L_val(θ')   (meta_grad [T]),

  one Jacobian-vector product of the training loss vector at θ in the direction v. λ then takes one Adam step
  (β = (0.9, 0.999), ε = 1e-8, step size ``lr``; PyTorch's Adam, as the authors), unclipped and unprojected as in
  the authors' code (λ may leave [0, ∞)), and the model step of the same train step uses the new λ:
  update = Σ_t λ_t G_t, heads included.

  Split of the work: `apply` only reads λ (``weights`` = λ, 0 for absent tasks: L_t = 0, no labelled example in the
  batch), so the method also runs as a plain loss weighting with fixed λ when nobody calls `meta_update`;
  `meta_update(state, meta_grad)` is the Adam step, `meta_step` the whole meta step (look-ahead, validation loss,
  meta-gradient, Adam) that the train step (``mtlmatch/step.py``'s meta path) calls before `apply`.
  An absent task's meta-gradient is exactly 0 (zero gradient row); Adam still moves its λ by the decaying moment,
  as PyTorch's Adam would. State also holds the Adam moments ``adam_mu`` / ``adam_nu`` [T] and ``adam_count``.

  Deviations from the authors' code (``auto_lambda.py``): (1) the inner product is exact (the transpose of the
  training VJP applied to v, a forward-mode product that needs no second forward pass; ``jax.jvp`` itself cannot go
  through the CPU convolution's ``custom_vjp``) instead of their central finite difference of the training losses at
  θ ± εv, ε = 0.01/‖v‖ (two more forward passes, O(ε²) error);
  (2) the look-ahead is a plain gradient step θ − α Σ λ_t ∇L_t: the authors also add the SGD momentum buffer and
  the weight decay of their model optimizer; (3) the look-ahead uses no gradient clipping and no additive terms
  (DGR); (4) validation batches come from ``config.data.validation_fraction``'s held-out split (the authors' code
  draws them from a second shuffled pass over the training set, augmented like it; here they are augmented as
  ``config.data.augment`` says). With a learning-rate warm-up from 0 (the default schedules), α = 0 at step 0, so
  the first meta step leaves λ where it is.
  Scale: the update is Σ λ_t G_t with λ as learned, not normalised: with the default init 0.1 it starts at 0.1×
  EW's update (as the authors'; init = 1 starts on EW's scale).
  hparams: init (0.1), lr (1e-4, the authors' ``autol_lr`` default for dense tasks), lookahead_lr (0 = the
  optimizer's current learning rate).
  """

  name: ClassVar[str] = 'auto_lambda'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'meta'
  # The train step must hand `meta_update` a meta-gradient from a validation batch (batch['validation']).
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'init': HParam(0.1, 'float', doc='initial value of every λ_t'),
      'lr': HParam(1e-4, 'float', **positive(), doc='Adam step size on λ'),
      'lookahead_lr': HParam(
          0.0,
          'float',
          **non_negative(">= 0 (0: the optimizer's current learning rate)"),
          doc='α of the look-ahead step',
      ),
  }

  def _init(self, num_tasks, hp):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return {
        'lambdas': jnp.full((num_tasks,), hp['init'], jnp.float32),
        'adam_mu': zeros,
        'adam_nu': zeros,
        'adam_count': jnp.zeros((), jnp.int32),
    }

  def _apply(self, state, hp, grads, losses, key):
    return jnp.where(present_from_losses(losses), state['lambdas'], 0.0), {
        k: state[k] for k in ('lambdas', 'adam_mu', 'adam_nu', 'adam_count')
    }

  def lookahead_lr(self, state, schedule_lr: jax.Array) -> jax.Array:
    """α of the look-ahead: the ``lookahead_lr`` hparam when > 0, else ``schedule_lr`` (the optimizer's rate now)."""
    fixed = state['hparams']['lookahead_lr']
    return jnp.where(fixed > 0, fixed, jnp.asarray(schedule_lr, jnp.float32))

  def meta_update(self, state, meta_grad: jax.Array):
    """One Adam step on λ with the meta-gradient ``meta_grad`` [T] = ∂L_val/∂λ; returns the new state. Jittable."""
    meta_grad = jnp.asarray(meta_grad, jnp.float32)
    if meta_grad.shape != state['lambdas'].shape:
      raise ValueError(
          f'{self.name}.meta_update meta_grad: got shape {meta_grad.shape}, expected [T] = {state["lambdas"].shape}'
      )
    return adam_step(state, 'lambdas', meta_grad, state['hparams']['lr'])

  def meta_step(self, state, inputs: MetaInputs):
    """The meta step: ``(new state, {'meta/val_loss', 'meta/lookahead_lr', 'meta/grad': ∂L_val/∂λ [T]})``. Jittable.

    ``inputs`` (`base.MetaInputs`): g(λ) = ``inputs.weighted_grad(λ)`` = Σ_t λ_t ∇L_t(θ) (linear in λ: the train
    step's VJP of the training loss rows at θ = ``inputs.params``); the look-ahead θ' = θ − α g(λ) with α =
    :meth:`lookahead_lr`; L_val(θ') = Σ_t ``inputs.val_losses(θ')`` and v = ∇L_val(θ'); then ∂L_val/∂λ = −α J v, with
    J v = [⟨∇L_t(θ), v⟩]_t the transpose of the linear map λ ↦ g(λ) applied to v — a forward-mode product through the
    residuals of the training forward pass (no second forward pass; ``jax.jvp`` itself cannot differentiate the CPU
    convolution's ``custom_vjp``). Exact: no finite differences, no Hessian. Then :meth:`meta_update` (Adam on λ).
    """
    lambdas = state['lambdas']
    alpha = self.lookahead_lr(state, inputs.schedule_lr)
    lookahead = jax.tree.map(lambda p, g: p - alpha * g, inputs.params, inputs.weighted_grad(lambdas))
    loss, v = jax.value_and_grad(lambda p: jnp.sum(inputs.val_losses(p)))(lookahead)
    (jv,) = jax.linear_transpose(inputs.weighted_grad, lambdas)(v)
    meta_grad = -alpha * jv
    return self.meta_update(state, meta_grad), {
        'meta/val_loss': loss,
        'meta/lookahead_lr': alpha,
        'meta/grad': meta_grad,
    }
