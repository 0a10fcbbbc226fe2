"""Distribution matching and soft co-annotation between two related tasks (the maths: docs/maths.md).

Kollias, Sharmanska, Zafeiriou, "Distribution Matching for Multi-Task Learning of Classification Tasks: a Large-Scale
Study on Faces & Beyond", AAAI 2024 (arXiv 2401.01219), and FaceBehaviorNet (arXiv 2105.03790). Task A is multiclass
(``logits_a [B, C_A]``), task B multiclass or multilabel (``logits_b [B, C_B]``), tied by a relatedness table
``R [C_A, C_B]`` (see :mod:`mtlmatch.losses.relatedness`).

* :func:`distribution_matching`: on every example (labelled or not, unless masked), pull each task's prediction
  toward the distribution the other task's prediction implies, as a stopped target by default:
  ``L = H(q_B, p_B) + H(q_A, p_A)``.
* :func:`co_annotation`: on examples labelled for exactly one of the two tasks, a soft target for the other task
  from the label through R.

Both return ``(per_example [B], weight [B])``; reduce with ``masked_mean``. ``H(q, p)`` is categorical cross-entropy
for a multiclass task and binary cross-entropy averaged over the C_B entries for multilabel B, always computed from
logits (``log_softmax``/``log_sigmoid``), so values and gradients are finite at ``|logits| = 1e4``.

Usage (inside a jitted loss; bind the keyword options statically)::

    dm, w = distribution_matching(logits_expr, logits_au, r, b_kind='multilabel')
    ca, wc = co_annotation(logits_expr, logits_au, labels_expr, labels_au, r, b_kind='multilabel')
    loss = masked_mean(dm, w) + masked_mean(ca, wc)

Checks: shapes and option strings always; relatedness values (finite, in [0, 1], multiclass rows summing to 1) and
label ranges only when those arrays are concrete, i.e. not inside ``jax.jit`` / ``jax.vmap``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.losses import _checks
from mtlmatch.losses import relatedness as rel
from mtlmatch.losses.classification import known_multiclass, known_multilabel

DIRECTIONS = ('a_to_b', 'b_to_a', 'both')
DIVERGENCES = ('xent', 'kl')
# The prior π_A of the B → A targets: 'uniform', 'model' (= stop_gradient(p_A)), or a [C_A] probability vector.
PRIORS = ('uniform', 'model')
# The options that choose each loss (as opposed to its data); see check_options.
OPTIONS = ('direction', 'mode', 'stop_gradient_target', 'divergence', 'prior')
CO_ANNOTATION_OPTIONS = ('prior',)


def check_options(**options) -> None:
  """Static checks of the given :data:`OPTIONS` of :func:`distribution_matching` / :func:`co_annotation` (also used
  by configs, before anything runs): one ValueError naming the option, the value and what was expected."""
  choices = {'direction': DIRECTIONS, 'mode': rel.MODES, 'divergence': DIVERGENCES}
  for key, value in options.items():
    if key == 'stop_gradient_target':
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f'stop_gradient_target: got {value!r}, expected True or False (a Python bool: it changes '
            'the traced computation)'
        )
    elif key == 'prior':
      if isinstance(value, str):
        _checks.check_choice(value, PRIORS, key)
      elif np.ndim(value) != 1:
        raise ValueError(f'prior: got {value!r}, expected one of {PRIORS} or a [C_A] probability vector')
    else:
      _checks.check_choice(value, choices[key], key)


def _log_prior(prior, logp_a: jax.Array):
  """log π_A for the B → A targets: None (uniform), ``stop_gradient(log p_A)`` ('model') or a checked vector."""
  if isinstance(prior, str):
    return None if prior == 'uniform' else jax.lax.stop_gradient(logp_a)
  return rel.log_prior_a(prior, logp_a.shape[-1], logp_a.dtype)


def _log1m_softmax(logits: jax.Array) -> jax.Array:
  """``log(1 − softmax(z)_k) = logsumexp_{j ≠ k} z_j − logsumexp_j z_j``: finite even when p_k rounds to 1."""
  c = logits.shape[-1]
  others = ~jnp.eye(c, dtype=bool)
  lse_others = jax.nn.logsumexp(jnp.broadcast_to(logits[..., None, :], logits.shape + (c,)), axis=-1, where=others)
  return lse_others - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _b_probabilities(logits_b: jax.Array, *, b_kind: str, need_log1m: bool):
  """(p_B, log p_B, log(1 − p_B) or None) from logits, each [..., C_B]."""
  if b_kind == 'multilabel':
    return jax.nn.sigmoid(logits_b), jax.nn.log_sigmoid(logits_b), jax.nn.log_sigmoid(-logits_b)
  logp = jax.nn.log_softmax(logits_b, axis=-1)
  return jnp.exp(logp), logp, (_log1m_softmax(logits_b) if need_log1m else None)


def _xlogx(q: jax.Array) -> jax.Array:
  # q log q with 0 log 0 = 0; clipping inside the log keeps the gradient finite at q = 0 (it is log(tiny) there).
  return q * jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))


def _cross_entropy(target: jax.Array, logp: jax.Array, log1mp: Optional[jax.Array], *, kind: str) -> jax.Array:
  """H(q, p): categorical, or binary averaged over the entries (multilabel). [..., C] → [...]."""
  if kind == 'multilabel':
    return -jnp.mean(target * logp + (1 - target) * log1mp, axis=-1)
  return -jnp.sum(target * logp, axis=-1)


def _neg_entropy(target: jax.Array, log_target: Optional[jax.Array], *, kind: str) -> jax.Array:
  """−H(q): Σ q log q (categorical) or the mean over entries of q log q + (1 − q) log(1 − q) (multilabel)."""
  if kind == 'multilabel':
    return jnp.mean(_xlogx(target) + _xlogx(1 - target), axis=-1)
  if log_target is not None:
    return jnp.sum(target * log_target, axis=-1)
  return jnp.sum(_xlogx(target), axis=-1)


def _divergence(target, log_target, logp, log1mp, *, kind: str, divergence: str) -> jax.Array:
  loss = _cross_entropy(target, logp, log1mp, kind=kind)
  if divergence == 'kl':  # KL(q ‖ p) = H(q, p) − H(q)
    loss = loss + _neg_entropy(target, log_target, kind=kind)
  return loss


def _check_pair(logits_a, logits_b, relatedness, b_kind):
  logits_a = _checks.float_array(logits_a, 'logits_a')
  logits_b = _checks.float_array(logits_b, 'logits_b')
  _checks.check_leading(logits_b, logits_a.shape[:-1], arg='logits_b', other=f'logits_a {logits_a.shape}')
  dtype = jnp.result_type(logits_a.dtype, logits_b.dtype)
  r = _checks.relatedness(
      relatedness, b_kind=b_kind, num_classes_a=logits_a.shape[-1], num_classes_b=logits_b.shape[-1], dtype=dtype
  )
  return logits_a.astype(dtype), logits_b.astype(dtype), r


def distribution_matching(
    logits_a,
    logits_b,
    relatedness,
    *,
    b_kind: str,
    direction: str = 'a_to_b',
    mode: str = 'bayes',
    stop_gradient_target: bool = True,
    divergence: str = 'xent',
    prior='model',
    mask=None,
) -> tuple[jax.Array, jax.Array]:
  """Distribution-matching loss per example (Kollias et al. 2024; the maths in docs/maths.md).

  With ``p_A = softmax(z_A)``, ``p_B = sigmoid(z_B)`` (multilabel) or ``softmax(z_B)`` (multiclass),
  ``q_B = p_A R`` and ``q_A = implied_a(p_B, R, mode=mode, prior=π_A)``:

    ``L = H(q_B, p_B)`` [direction 'a_to_b', default] ``+ H(q_A, p_A)`` [direction 'b_to_a']; 'both' is the sum.

  The default direction was decided on validation scores (experiments/results/SUMMARY.md, "Defaults decided on
  validation data"): on the affect case study the B → A target added negative transfer on expressions, and A → B
  alone scored higher on validation (0.821 ± 0.007 vs 0.807 ± 0.009 for 'both', 3 seeds each; shopping within one
  std). ``mode`` and ``prior`` shape the B → A target only, so they matter with 'b_to_a' or 'both'.

  The implied distributions are *targets*: ``stop_gradient_target=True`` (default) treats q as a constant (soft
  targets, as in distillation), so each head is pulled toward what the other implies and the cross-entropy equals
  ``KL(q ‖ p)`` up to a constant. With ``False`` and ``divergence='xent'`` the term also minimises the entropy of q,
  ``H(q, p) = KL(q ‖ p) + H(q)``, which rewards confident agreement and can collapse every head onto the A classes
  whose implied targets have the lowest entropy; use ``divergence='kl'`` (no H(q) term) if you want gradient through
  the targets. ``divergence='kl'`` replaces each H(q, p) by ``KL(q ‖ p)`` (0 at agreement).

  ``prior`` π_A of the B → A target: ``'model'`` (default) = ``stop_gradient(p_A)``, so q_A is A's own prediction
  re-weighted by B's evidence and B only moves mass between A classes that B tells apart (a coarse B — many A
  classes sharing one B pattern — then cannot flatten a confident fine-grained A head); ``'uniform'``; or a ``[C_A]``
  probability vector.

  Args:
    logits_a: ``[B, C_A]`` (task A, multiclass).
    logits_b: ``[B, C_B]``.
    relatedness: ``[C_A, C_B]``.
    b_kind: 'multiclass' or 'multilabel' (task B).
    direction: 'a_to_b' (default), 'b_to_a' or 'both'.
    mode: rule for q_A, 'bayes' (virtual evidence) or 'prototype' (see ``implied_a``).
    stop_gradient_target: stop gradients through q_A and q_B.
    divergence: 'xent' or 'kl'.
    prior: 'model', 'uniform' or a ``[C_A]`` vector: π_A of q_A.
    mask: optional ``[B]`` (bool or float): per-example weight; None = every example counts.

  Returns:
    ``(per_example [B], weight [B])``, ``weight = mask`` (or ones); per_example is 0 where the weight is 0.

  >>> import numpy as np
  >>> r = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)     # A class 0 ↔ B label 0, A class 1 ↔ B label 1
  >>> za = np.array([[2.0, -2.0]], np.float32)                  # A says class 0
  >>> zb = np.array([[3.0, -3.0]], np.float32)                  # B agrees: label 0 on, label 1 off
  >>> agree, w = distribution_matching(za, zb, r, b_kind='multilabel', divergence='kl')
  >>> disagree, _ = distribution_matching(za, -zb, r, b_kind='multilabel', divergence='kl')
  >>> bool(agree[0] < disagree[0]), w.tolist()
  (True, [1.0])
  """
  b_kind = _checks.check_b_kind(b_kind)
  check_options(
      direction=direction, mode=mode, stop_gradient_target=stop_gradient_target, divergence=divergence, prior=prior
  )
  logits_a, logits_b, r = _check_pair(logits_a, logits_b, relatedness, b_kind)
  batch_shape = logits_a.shape[:-1]
  if mask is None:
    weight = jnp.ones(batch_shape, logits_a.dtype)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != batch_shape:
      raise ValueError(f'mask: got shape {mask.shape}, expected {batch_shape} (one weight per example)')
    weight = mask.astype(logits_a.dtype)
  target = jax.lax.stop_gradient if stop_gradient_target else (lambda x: x)

  logp_a = jax.nn.log_softmax(logits_a, axis=-1)
  p_a = jnp.exp(logp_a)
  p_b, logp_b, log1mp_b = _b_probabilities(logits_b, b_kind=b_kind, need_log1m=(mode == 'prototype'))
  loss = jnp.zeros(batch_shape, logits_a.dtype)
  if direction in ('a_to_b', 'both'):
    q_b = target(rel.implied_b_from_probs(p_a, r))
    loss = loss + _divergence(q_b, None, logp_b, log1mp_b, kind=b_kind, divergence=divergence)
  if direction in ('b_to_a', 'both'):
    log_q_a = target(
        rel.log_implied_a(p_b, logp_b, log1mp_b, r, b_kind=b_kind, mode=mode, log_prior=_log_prior(prior, logp_a))
    )
    loss = loss + _divergence(jnp.exp(log_q_a), log_q_a, logp_a, None, kind='multiclass', divergence=divergence)
  return jnp.where(weight != 0, loss, 0.0), weight


def co_annotation(
    logits_a, logits_b, labels_a, labels_b, relatedness, *, b_kind: str, prior='model'
) -> tuple[jax.Array, jax.Array]:
  """Soft co-annotation loss per example (Kollias et al. 2024; the maths in docs/maths.md).

  * A label i present, B missing: soft B target ``R[i, :]``, loss ``H(R[i, :], p_B)``.
  * B labels b present, A missing: soft A target ``q_A(b)`` by the `bayes` rule of ``implied_a`` with p_B replaced by
    b (ε = 1e-4): ``log q_A(i) = log π_A(i) + Σ_{k labelled} log P(b_k | a = i)`` (multilabel: only the labelled
    entries contribute — Bayes' rule for a partially observed label vector, since an unobserved b_k sums out of the
    likelihood) or ``log π_A(i) + log R̃_{i, b}`` (multiclass); loss ``H(q_A, p_A)``. A multilabel example counts as
    "B present" when at least one entry is labelled.
  * Both present, or neither: value 0, weight 0.

  ``prior`` π_A: ``'model'`` (default) = ``stop_gradient(p_A)``: b only rules A classes out and the model's own
  prediction ranks those left; ``'uniform'``: the label posterior, flat over every A class sharing b's pattern; or a
  ``[C_A]`` vector. No gradient flows through the targets.

  Args:
    logits_a: ``[B, C_A]``.
    logits_b: ``[B, C_B]``.
    labels_a: int ``[B]`` in [-1, C_A).
    labels_b: int ``[B]`` in [-1, C_B) (multiclass) or ``[B, C_B]`` in {-1, 0, 1} (multilabel).
    relatedness: ``[C_A, C_B]``.
    b_kind: 'multiclass' or 'multilabel'.
    prior: 'model', 'uniform' or a ``[C_A]`` vector: π_A of the B-only target.

  Returns:
    ``(per_example [B], weight [B])``.

  >>> import numpy as np
  >>> r = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)
  >>> logits_a, logits_b = np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)
  >>> labels_a = np.array([0, -1, -1])                       # example 0: A only; 1: B only; 2: neither
  >>> labels_b = np.array([[-1, -1], [1, 0], [-1, -1]])
  >>> per_example, weight = co_annotation(logits_a, logits_b, labels_a, labels_b, r, b_kind='multilabel')
  >>> weight.tolist()
  [1.0, 1.0, 0.0]
  """
  b_kind = _checks.check_b_kind(b_kind)
  check_options(prior=prior)
  logits_a, logits_b, r = _check_pair(logits_a, logits_b, relatedness, b_kind)
  labels_a = _checks.int_labels(labels_a, 'labels_a')
  labels_b = _checks.int_labels(labels_b, 'labels_b')
  _checks.check_labels(logits_a, labels_a, kind='multiclass', logits_arg='logits_a', labels_arg='labels_a')
  _checks.check_labels(logits_b, labels_b, kind=b_kind, logits_arg='logits_b', labels_arg='labels_b')
  dtype = logits_a.dtype

  has_a = known_multiclass(labels_a, logits_a.shape[-1])  # out of range (only possible under jit): as missing
  entry_b = known_multilabel(labels_b) if b_kind == 'multilabel' else known_multiclass(labels_b, logits_b.shape[-1])
  has_b = jnp.any(entry_b, axis=-1) if b_kind == 'multilabel' else entry_b
  a_only = has_a & ~has_b
  b_only = has_b & ~has_a

  # A known, B missing: H(R[a], p_B).
  _, logp_b, log1mp_b = _b_probabilities(logits_b, b_kind=b_kind, need_log1m=False)
  target_b = jnp.take(r, jnp.where(has_a, labels_a, 0), axis=0)
  loss_a_only = _cross_entropy(target_b, logp_b, log1mp_b, kind=b_kind)

  # B known, A missing: H(q_A(b), p_A).
  logp_a = jax.nn.log_softmax(logits_a, axis=-1)
  log_prior = _log_prior(prior, logp_a)
  if b_kind == 'multilabel':
    b = jnp.where(entry_b, labels_b, 0).astype(dtype)
    log_q_a = rel.log_implied_a(
        b, None, None, r, b_kind=b_kind, mode='bayes', log_prior=log_prior, entry_mask=entry_b.astype(dtype)
    )
  else:
    b = jax.nn.one_hot(jnp.where(entry_b, labels_b, 0), logits_b.shape[-1], dtype=dtype)
    log_q_a = rel.log_implied_a(b, None, None, r, b_kind=b_kind, mode='bayes', log_prior=log_prior)
  log_q_a = jax.lax.stop_gradient(log_q_a)
  loss_b_only = _cross_entropy(jnp.exp(log_q_a), logp_a, None, kind='multiclass')

  per_example = jnp.where(a_only, loss_a_only, jnp.where(b_only, loss_b_only, 0.0))
  return per_example, (a_only | b_only).astype(dtype)
