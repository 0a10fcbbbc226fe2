"""Bi-level (meta-learned) loss weightings with several upper-level objectives: MOML and FORUM.

Both learn task-weight logits ξ [T] (weights softmax(ξ), the authors' ``Model_h`` / ``UL_alpha``) through the train
step's meta path (``needs = 'meta'``, as Auto-Lambda: ``meta_step(state, inputs)`` with `base.MetaInputs`, then
`apply` only reads the weights it set). MOML (Ye et al., NeurIPS 2021) differentiates every task's validation loss
through a one-step look-ahead and combines the T hypergradients by MGDA; FORUM (Ye et al., ECAI 2024) replaces the
hypergradient by a value-function constraint, first order, and moves the weights and the model parameters together.
Their docstrings state the maths and every deviation from the authors' code (github.com/Baijiong-Lin/MOML and
github.com/Baijiong-Lin/FORUM, the latter also holding the authors' first-order MOML for multi-task learning).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtlmatch.weighting.base import (
    HIGHEST,
    HParam,
    MetaInputs,
    WeightingMethod,
    non_negative,
    positive,
    present_from_losses,
    present_from_sq_norms,
    safe_div,
)
from mtlmatch.weighting.gradient_methods import (
    EXACT_MAX_TASKS,
    FACE_RIDGE,
    face_masks,
    normalise_candidates,
    min_norm_weights,
    present_tasks,
)
from mtlmatch.weighting.jacobian import pullback_rows
from mtlmatch.weighting.loss_weighting import adam_step

# MOML: the uniform MGDA weights are kept when their squared norm is within this (relative to the largest squared
# norm of a normalised hypergradient) of the min-norm point's: far above float32 noise (~1e-7), far below any real gap.
_MOML_TIE = 1e-5


def present_softmax(logits: jax.Array, present: jax.Array) -> jax.Array:
  """softmax(ξ) over the present entries, 0 on the others (all 0 when none is present)."""
  probs = jax.nn.softmax(jnp.where(present, logits, -jnp.inf))
  return jnp.where(present & jnp.any(present), probs, 0.0)


def _adam_state(num_tasks: int, logits_init: float = 0.0) -> dict:
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  return {
      'logits': jnp.full((num_tasks,), logits_init, jnp.float32),
      'adam_mu': zeros,
      'adam_nu': zeros,
      'adam_count': jnp.zeros((), jnp.int32),
  }


def _tree_gram(rows) -> jax.Array:
  """⟨row_s, row_t⟩ [T, T] of a pytree whose leaves carry a leading row axis T (full float32 precision)."""
  total = 0.0
  for leaf in jax.tree.leaves(rows):
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    total = total + jnp.matmul(flat, flat.T, precision=HIGHEST)
  return total


@dataclasses.dataclass(frozen=True)
class MOML(WeightingMethod):
  """MOML (Ye, Lin, Yue, Guo, Xiao, Zhang, NeurIPS 2021, "Multi-Objective Meta Learning"), its multi-task learning
  instance (the authors' ``MTL/moml_office.py``): the task weights are the upper-level variable of a bi-level problem
  whose lower level trains the model on the weighted training loss and whose upper level has one objective per task,
  its validation loss. With logits ξ (state ``logits`` [T], init 0) and λ = T_p softmax(ξ) over the T_p present
  tasks:

    θ'(ξ) = θ − α Σ_t λ_t ∇L_t(θ; train),    h_t = ∂L_t(θ'(ξ); val) / ∂ξ    (t = 1..T: T hypergradients),

  one look-ahead step as the authors (α = ``lookahead_lr`` when > 0, else the optimizer's current learning rate, as
  Auto-Lambda here). θ' is linear in λ, so h_t = J_λ(ξ)ᵀ (−α J v_t) exactly, v_t = ∇L_t(θ'; val) (T backward passes
  on the validation batch), J v_t = [⟨∇L_s(θ), v_t⟩]_s the transpose of the training VJP (no Hessian, no second
  training forward pass). MGDA then combines them: γ = argmin_{γ ∈ Δ} ‖Σ_t γ_t h_t / n_t‖² (`min_norm_weights`; n_t
  per ``normalize``: 'l2' = ‖h_t‖, the authors' choice, 'none', 'loss' = L_t(θ'; val), 'loss+' = both) and ξ takes one
  Adam step (lr ``lr`` = 1e-3, as the authors) along Σ_t γ_t h_t (the authors back-propagate Σ_t γ_t L_t(val)). The
  model step of the same train step descends Σ_t λ_t ∇L_t with the new λ (encoder and heads).

  Deviations from the authors' code: λ = T_p softmax(ξ), ×T_p so that equal logits give the EW update (the authors
  train with softmax(ξ), sum 1) — the look-ahead uses the same λ, so α here is their step size / T; α follows the
  optimizer's rate unless fixed (theirs: 1e-4); the validation batches are ``config.data.validation_fraction``'s split
  (theirs: the datasets' validation split too), and the model step reuses the training batch of the look-ahead
  (theirs: a third batch). Absent tasks: a task without labels in the training batch gets λ = 0 (left out of the
  softmax, so its logit gets no gradient through λ); one without labels in the validation batch has h_t = 0 and is
  left out of MGDA. When the uniform γ is a min-norm point too (within 1e-5; e.g. T = 2, whose two hypergradients are
  always collinear — softmax's Jacobian has rank T − 1 — and, when they agree, every γ ∈ Δ is one), γ is uniform, so
  float32 noise never picks among ties. If no hypergradient is non-zero, ξ still takes Adam's step with a zero
  gradient. Cost per step:
  the training forward and backward, a validation forward and T backward passes at θ', T transposed products, and
  the model's backward pass. hparams: lr (1e-3), lookahead_lr (0 = the optimizer's rate), normalize ('l2').
  """

  name: ClassVar[str] = 'moml'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'meta'
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'lr': HParam(1e-3, 'float', **positive(), doc='Adam step size on the logits'),
      'lookahead_lr': HParam(
          0.0,
          'float',
          **non_negative(">= 0 (0: the optimizer's current learning rate)"),
          doc='α of the look-ahead step',
      ),
      'normalize': HParam('l2', ('l2', 'none', 'loss', 'loss+')),
  }

  def _init(self, num_tasks, hp):
    return _adam_state(num_tasks)

  def task_weights(self, logits: jax.Array, present: jax.Array) -> jax.Array:
    """λ = T_p softmax(ξ) over the present tasks (0 for the others)."""
    return jnp.sum(present).astype(jnp.float32) * present_softmax(logits, present)

  def _apply(self, state, hp, grads, losses, key):
    new = {k: state[k] for k in ('logits', 'adam_mu', 'adam_nu', 'adam_count')}
    return self.task_weights(state['logits'], present_from_losses(losses)), new

  def meta_step(self, state, inputs: MetaInputs):
    """``(new state, {'meta/val_loss', 'meta/lookahead_lr', 'meta/grad': Σ_t γ_t h_t [T]})``, see the class; jit."""
    hp = state['hparams']
    logits = state['logits']
    num_tasks = logits.shape[0]
    present = present_from_losses(inputs.task_losses)
    lambdas, lambdas_vjp = jax.vjp(lambda xi: self.task_weights(xi, present), logits)
    alpha = jnp.where(hp['lookahead_lr'] > 0, hp['lookahead_lr'], jnp.asarray(inputs.schedule_lr, jnp.float32))
    lookahead = jax.tree.map(lambda p, g: p - alpha * g, inputs.params, inputs.weighted_grad(lambdas))
    val, val_vjp = jax.vjp(inputs.val_losses, lookahead)
    eye = jnp.eye(num_tasks, dtype=jnp.float32)
    v_rows = pullback_rows(lambda c: val_vjp(c)[0], eye)  # v_t = ∇L_t(θ'; val), leaves [T, ...]
    transpose = jax.linear_transpose(inputs.weighted_grad, lambdas)
    jv = pullback_rows(lambda v: transpose(v)[0], v_rows)  # [T, T]: [t, s] = ⟨∇L_s(θ; train), v_t⟩
    hyper = jax.vmap(lambda row: lambdas_vjp(row)[0])(-alpha * jv)  # h_t = ∂L_t(θ'; val)/∂ξ, rows [T, T]
    g = jnp.matmul(hyper, hyper.T, precision=HIGHEST)
    found = present_tasks(g)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    loss_ok = present_from_losses(val) & (val > 0)
    safe_loss = jnp.where(loss_ok, val, 1.0)
    scales = jnp.stack([norms, jnp.ones_like(norms), safe_loss, safe_loss * norms])[hp['normalize']]
    scales = jnp.where(found & (scales > 0), scales, 1.0)
    g_hat = g / (scales[:, None] * scales[None, :])
    gamma = min_norm_weights(g_hat, found)
    # Ties: with T = 2 the hypergradients are collinear (softmax's Jacobian has rank T − 1), and when they agree every
    # γ ∈ Δ is a min-norm point; float32 noise would pick one. Take the uniform γ whenever it is a minimiser too.
    uniform = safe_div(found.astype(jnp.float32), jnp.sum(found).astype(jnp.float32), 0.0)
    tie = uniform @ g_hat @ uniform <= gamma @ g_hat @ gamma + _MOML_TIE * jnp.max(jnp.diagonal(g_hat))
    gamma = jnp.where(tie, uniform, gamma)
    meta_grad = jnp.where(jnp.any(found), gamma @ hyper, 0.0)
    new = adam_step(state, 'logits', meta_grad, hp['lr'])
    return new, {'meta/val_loss': jnp.sum(val), 'meta/lookahead_lr': alpha, 'meta/grad': meta_grad}


def _kkt_face_solves(quad: jax.Array, lin: jax.Array, eq: jax.Array, eq_rhs: jax.Array, present: jax.Array):
  """Stationary points of λᵀQλ + linᵀλ s.t. E λ = e on every face S ⊆ present (λ = 0 off S): the bordered KKT system
  [[2Q_SS, −E_Sᵀ], [E_S, 0]] [λ_S; m] = [−lin_S; e], solved for all faces at once (``quad`` [T, T], ``lin`` [T],
  ``eq`` [k, T], ``eq_rhs`` [k]). Bordered rather than through Q⁻¹: Q may be singular along the constraints' normals
  (FORUM's Â − bbᵀ/q annihilates the uniform direction when ∇q lies in the span of the task gradients). Returns
  (faces [F, T], valid [F], λ [F, T])."""
  num_tasks, k = quad.shape[0], eq.shape[0]
  m = jnp.asarray(face_masks(num_tasks))  # [F, T]
  top_left = m[:, :, None] * m[:, None, :] * (2.0 * quad) + (1 - m)[:, :, None] * jnp.eye(num_tasks)
  top_right = -(m[:, :, None] * eq.T[None])  # [F, T, k]
  bottom = m[:, None, :] * eq[None]  # [F, k, T]
  kkt = jnp.concatenate(
      [
          jnp.concatenate([top_left, top_right], axis=2),
          jnp.concatenate([bottom, jnp.zeros((m.shape[0], k, k), quad.dtype)], axis=2),
      ],
      axis=1,
  )
  rhs = jnp.concatenate([-m * lin[None], jnp.broadcast_to(eq_rhs, (m.shape[0], k))], axis=1)
  solution = jnp.linalg.solve(kkt, rhs[..., None])[..., 0]
  valid = jnp.all((m == 0) | present[None, :], axis=1)
  return m, valid, solution[:, :num_tasks] * m


def forum_weights(
    a_hat: jax.Array, b: jax.Array, q: jax.Array, rho: jax.Array | float, present: jax.Array
) -> jax.Array:
  """FORUM's weights λ ∈ Δ (the present tasks; T ≤ 8) of the authors' problem (their cvxpy program):

    min_{λ ∈ Δ, ν ≥ 0} ‖Σ_t λ_t ĝ_t + ν g_q‖² − ν ρ ‖g_q‖²   s.t.  ν ≥ Σ_t λ_t π_t,  π_t = ρ − ⟨ĝ_t, g_q⟩ / ‖g_q‖²,

  from its Gram matrix: ``a_hat`` = [⟨ĝ_s, ĝ_t⟩] [T, T], ``b`` = [⟨ĝ_t, g_q⟩] [T], ``q`` = ‖g_q‖². For a fixed λ the
  objective's unconstrained minimiser in ν is πᵀλ − ρ/2, below the bound, so ν = max(πᵀλ, 0) and the problem is the
  convex, piecewise quadratic min_{λ ∈ Δ} f(λ): f = λᵀÂλ where πᵀλ ≤ 0 and f = λᵀ(Â − bbᵀ/q)λ + ρ bᵀλ where πᵀλ ≥ 0
  (the same value on πᵀλ = 0). Exact: its minimiser is a stationary point of one of the two pieces, or of the first
  on the plane πᵀλ = 0, on some face of Δ; every such candidate of every face (bordered KKT systems, a 1e-6 ridge on
  the quadratic) that lies in Δ is scored with the exact f and the least wins.
  """
  num_tasks = a_hat.shape[0]
  eye = jnp.eye(num_tasks, dtype=a_hat.dtype)
  ones = jnp.ones((1, num_tasks), a_hat.dtype)
  zeros = jnp.zeros((num_tasks,), a_hat.dtype)
  pi = rho - safe_div(b, q, 0.0)
  quad = a_hat - safe_div(jnp.outer(b, b), q, 0.0)  # Â − bbᵀ/q (PSD, possibly singular)
  # piece 1 (ν = πᵀλ): λᵀQλ + ρbᵀλ; piece 2 (ν = 0): λᵀÂλ; the plane πᵀλ = 0: λᵀÂλ. Each with Σλ = 1.
  masks, valid, piece1 = _kkt_face_solves(quad + FACE_RIDGE * eye, rho * b, ones, jnp.ones((1,)), present)
  _, _, piece2 = _kkt_face_solves(a_hat + FACE_RIDGE * eye, zeros, ones, jnp.ones((1,)), present)
  plane_eq = jnp.concatenate([ones, pi[None]])
  _, _, plane = _kkt_face_solves(a_hat + FACE_RIDGE * eye, zeros, plane_eq, jnp.array([1.0, 0.0]), present)
  cands = jnp.concatenate([piece1, piece2, plane])
  faces = jnp.concatenate([masks, masks, masks])
  cands, ok = normalise_candidates(cands, jnp.concatenate([valid, valid, valid]), faces)
  nu = jnp.maximum(cands @ pi, 0.0)
  value = jnp.einsum('fi,ij,fj->f', cands, a_hat, cands) + 2.0 * nu * (cands @ b) + nu**2 * q - nu * rho * q
  best = cands[jnp.argmin(jnp.where(ok, value, jnp.inf))]
  return jnp.where(present & jnp.any(ok), best, 0.0)


@dataclasses.dataclass(frozen=True)
class FORUM(WeightingMethod):
  """FORUM (Ye, Lin, Cao, Zhang, Tsang, ECAI 2024, "A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level
  Optimization"), as the authors' multi-task code (``LibMTL/trainer.py``'s ``train_FORUM``). With logits α (state
  ``logits``), w = softmax(α) over the present tasks and all parameters ω (encoder and heads), the bi-level problem
  min_{α, ω} (L_1, …, L_T)(ω) s.t. ω ∈ argmin f(α, ·), f(α, ω) = Σ_t w_t L_t(ω), is rewritten with the value function
  as the constraint q(α, ω) = f(α, ω) − f(α, ω^K) ≤ 0, ω^K = K = ``inner_steps`` SGD steps (lr ``eta``) on f(α, ·)
  from ω. One step, first order only:

    g_t = ∇_ω L_t(ω), ĝ_t = g_t / ‖g_t‖ (α-part 0);  ∇q = (J_w(α)ᵀ (L(ω) − L(ω^K)),  Σ_t w_t g_t);
    λ̂ = `forum_weights` (the authors' QP, π_t = ρ − ⟨ĝ_t, ∇q⟩/‖∇q‖²);  λ̄ ← λ̄ + β_k (λ̂ − λ̄);  ν = max(Σ_t λ̄_t π_t, 0);
    d = Σ_t λ̄_t ĝ_t + ν ∇q:  α takes one Adam step (lr ``lr`` = 1e-3) along d's α-part, ν J_w(α)ᵀ (L(ω) − L(ω^K)),
    and the model descends d's ω-part, Σ_t c_t g_t with c_t = λ̄_t/‖g_t‖ + ν w_t (state ``weights``, what `apply`
    returns: a loss weighting, every head included).

  ν is the least multiplier for which d decreases the constraint at rate ρ (⟨∇q, d⟩ ≥ ρ‖∇q‖²). β_k = (1 +
  ⌊k/``ema_window``⌋)^(−3/4): the authors' rate 1/(epoch + 1)^(3/4) with ``ema_window`` steps standing for an epoch
  (λ̄ = λ̂ for the first window). Scale: the authors' — the upper-level part has norm ≤ 1 (unit gradients, λ̄ ∈ Δ),
  not EW's T_p g.

  Deviations: the authors draw the upper-level batch (for g_t) and the lower-level batch (for f and the inner loop)
  as two halves of the training batch; here both are the training batch itself, so FORUM reads no validation split
  (``meta_uses_validation`` False; the rows g_t come from the step's one forward pass, T backward passes). The inner
  loop's first step reuses that pass; each further step is a forward and backward pass of the whole model, and
  L(ω^K) one more forward (train mode, BatchNorm's running statistics of those passes dropped; not split into
  microbatches under gradient accumulation). The QP is solved exactly in JAX (`forum_weights`; the authors call
  cvxpy), which limits FORUM to T ≤ 8 (checked at init). Absent tasks (L_t = 0 or a zero gradient) are left out of
  w, the QP and the update (c_t = 0), and keep their λ̄. hparams: rho (0.1), eta (0.1), inner_steps (5), lr (1e-3),
  ema_window (100).
  """

  name: ClassVar[str] = 'forum'
  kind: ClassVar[str] = 'loss_weighting'
  needs: ClassVar[str] = 'meta'
  meta_uses_validation: ClassVar[bool] = False
  HPARAMS: ClassVar[Mapping[str, HParam]] = {
      'rho': HParam(0.1, 'float', **positive(), doc='rate ρ of the constraint decrease'),
      'eta': HParam(0.1, 'float', **positive(), doc='SGD step size of the inner loop'),
      'inner_steps': HParam(5, 'int', check=lambda v: v >= 1, expected='>= 1', doc='inner SGD steps K'),
      'lr': HParam(1e-3, 'float', **positive(), doc='Adam step size on the logits'),
      'ema_window': HParam(100, 'int', check=lambda v: v >= 1, expected='>= 1', doc='steps per epoch of the λ EMA'),
  }

  def _init(self, num_tasks, hp):
    if num_tasks > EXACT_MAX_TASKS:
      raise ValueError(
          f'forum.init num_tasks: got {num_tasks}, expected <= {EXACT_MAX_TASKS} (the QP is solved exactly by '
          'enumerating its 2^T faces)'
      )
    return {
        **_adam_state(num_tasks),
        'lambda_ema': jnp.zeros((num_tasks,), jnp.float32),
        'weights': jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
    }

  def _apply(self, state, hp, grads, losses, key):
    new = {k: state[k] for k in ('logits', 'adam_mu', 'adam_nu', 'adam_count', 'lambda_ema', 'weights')}
    return jnp.where(present_from_losses(losses), state['weights'], 0.0), new

  def meta_step(self, state, inputs: MetaInputs):
    """``(new state, {'meta/nu', 'meta/constraint': q = f(α, ω) − f(α, ω^K), 'meta/grad': ∂/∂α [T]})``. Jittable."""
    hp = state['hparams']
    logits = state['logits']
    num_tasks = logits.shape[0]
    losses = inputs.task_losses
    rows = pullback_rows(inputs.weighted_grad, jnp.eye(num_tasks, dtype=jnp.float32))  # g_t, every parameter
    gram = _tree_gram(rows)
    present = present_from_losses(losses) & present_from_sq_norms(jnp.diagonal(gram))
    w, w_vjp = jax.vjp(lambda a: present_softmax(a, present), logits)

    def inner(_, omega):
      grad = jax.grad(lambda p: w @ inputs.train_losses(p))(omega)
      return jax.tree.map(lambda p, g: p - hp['eta'] * g, omega, grad)

    first = jax.tree.map(lambda p, g: p - hp['eta'] * g, inputs.params, inputs.weighted_grad(w))
    omega = jax.lax.fori_loop(0, hp['inner_steps'] - 1, inner, first)
    drop = jnp.where(present, losses - inputs.train_losses(omega), 0.0)  # L(ω) − L(ω^K)
    (q_alpha,) = w_vjp(drop)  # ∂_α f(α, ω) − ∂_α f(α, ω^K)

    inv_norm = jnp.where(present, jax.lax.rsqrt(jnp.where(present, jnp.diagonal(gram), 1.0)), 0.0)
    a_hat = gram * inv_norm[:, None] * inv_norm[None, :]
    gram_w = gram @ w
    b = gram_w * inv_norm  # ⟨ĝ_t, ∇q⟩ (ĝ_t has no α-part)
    q = w @ gram_w + q_alpha @ q_alpha  # ‖∇q‖²
    pi = hp['rho'] - safe_div(b, q, 0.0)
    lam = forum_weights(a_hat, b, q, hp['rho'], present)
    beta = jnp.power(1.0 + (state['step'] // hp['ema_window']).astype(jnp.float32), -0.75)
    ema = jnp.where(present, state['lambda_ema'] + beta * (lam - state['lambda_ema']), state['lambda_ema'])
    ema_present = jnp.where(present, ema, 0.0)
    nu = jnp.maximum(ema_present @ pi, 0.0)
    meta_grad = nu * q_alpha
    new = adam_step(state, 'logits', meta_grad, hp['lr'])
    new.update(lambda_ema=ema, weights=jnp.where(present, ema_present * inv_norm + nu * w, 0.0))
    return new, {'meta/nu': nu, 'meta/constraint': w @ drop, 'meta/grad': meta_grad}


__all__ = ['FORUM', 'MOML', 'forum_weights', 'present_softmax']
