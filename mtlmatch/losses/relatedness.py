"""Task relatedness tables and the distributions they imply (docs/maths.md §2–§3; Kollias et al., AAAI 2024).

Task A is multiclass with C_A classes; task B is multiclass or multilabel with C_B labels. The relatedness table
``R[C_A, C_B]`` holds ``R[i, k] = p(b_k = 1 | a = i)`` (multilabel B) or ``p(b = k | a = i)`` (multiclass B, rows sum
to 1). Where it comes from:

* an expert table (``mtlmatch.priors.load_prior``), checked with :func:`validate_relatedness`;
* :func:`estimate_relatedness` from examples labelled for both tasks (hard labels or soft model predictions).

What it implies, for model probabilities ``p_A = softmax(z_A)`` and ``p_B``:

* :func:`implied_b`: ``q_B = p_A R`` (A → B);
* :func:`implied_a`: ``q_A`` from ``p_B`` by the ``bayes`` rule (virtual evidence, default) or the FaceBehaviorNet
  ``prototype`` rule, times a prior π_A (uniform, a vector, or per example).

Usage (2 expression classes, 2 AUs; -1 = missing. With smoothing α = 1 toward the AU marginals π = (2/4, 2/3),
R[0, 0] = (2 + 0.5) / (2 + 1) and R[0, 1] = (0 + 2/3) / (1 + 1): expression 0 was seen with AU 1 labelled once):

>>> import jax, numpy as np
>>> expression = np.array([0, 0, 1, 1])
>>> aus = np.array([[1, 0], [1, -1], [0, 1], [0, 1]])
>>> r = estimate_relatedness(expression, aus, num_classes_a=2, num_classes_b=2, b_kind='multilabel')
>>> np.round(r.astype(float), 4).tolist()
[[0.8333, 0.3333], [0.1667, 0.8889]]
>>> q_b = implied_b(jax.nn.softmax(np.array([[10.0, -10.0]])), r)      # A is sure of class 0: q_B = R[0]
>>> [round(float(v), 4) for v in q_b[0]]
[0.8333, 0.3333]

:func:`validate_relatedness` and :func:`estimate_relatedness` are numpy, eager-only (data preparation; not jittable).
:func:`implied_b` and :func:`implied_a` are jittable and vmappable with the keyword options bound statically; their
value checks on ``relatedness`` / probabilities run only when those arrays are concrete (not under ``jit``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.losses import _checks
from mtlmatch.losses._checks import MISSING
from mtlmatch.losses.classification import known_multiclass, known_multilabel

# ε of the `bayes` rule: R̃ = clip(R, ε, 1 − ε). It keeps log R̃ and log(1 − R̃) finite (|log ε| ≈ 9.2) where an
# expert table says "never" or "always", so one contradicting label lowers a class's odds by a factor 1e4 instead of
# ruling it out.
BAYES_EPS = 1e-4
# τ of the `prototype` rule: P_i = {k : R[i, k] ≥ τ}.
PROTOTYPE_TAU = 0.5
MODES = ('bayes', 'prototype')
_HI = jax.lax.Precision.HIGHEST  # the tables are tiny; keep full float32 on accelerators that default to bf16 passes


def validate_relatedness(
    relatedness, *, b_kind: str, num_classes_a: Optional[int] = None, num_classes_b: Optional[int] = None
) -> np.ndarray:
  """Checks a relatedness table and returns it as float32 numpy ``[C_A, C_B]``.

  Checks: 2-D and non-empty; ``C_A = num_classes_a`` and ``C_B = num_classes_b`` when given; finite; in [0, 1]; for
  ``b_kind='multiclass'`` every row sums to 1 within 1e-4. Raises one ``ValueError`` saying what is wrong.
  Eager only (numpy): call it where the table is built, not inside ``jit``.
  """
  b_kind = _checks.check_b_kind(b_kind)
  if isinstance(relatedness, jax.core.Tracer):
    raise ValueError(
        'relatedness: got a traced array, expected a concrete table (validate_relatedness runs outside ' 'jax.jit)'
    )
  r = np.asarray(relatedness)
  if not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)) or r.dtype == bool:
    raise ValueError(f'relatedness: got dtype {r.dtype}, expected a real-valued table')
  _checks.check_relatedness_shape(r.shape, num_classes_a=num_classes_a, num_classes_b=num_classes_b)
  message = _checks.relatedness_value_error(r, b_kind=b_kind)
  if message:
    raise ValueError(message)
  return r.astype(np.float32)


def _soft_counts(labels, *, num_classes: int, kind: str, arg: str) -> tuple[np.ndarray, np.ndarray]:
  """labels → (values [N, C] float64 with 0 where missing, present mask: [N] (multiclass) or [N, C] (multilabel))."""
  x = np.asarray(labels)
  if np.issubdtype(x.dtype, np.integer):
    if kind == 'multiclass':
      if x.ndim != 1:
        raise ValueError(
            f'{arg}: got integer array of shape {x.shape}, expected hard labels [N] (-1 = missing) or '
            f'float probabilities [N, {num_classes}]'
        )
      bad = (x < MISSING) | (x >= num_classes)
      if np.any(bad):
        raise ValueError(f'{arg}: got value {x[bad][0]}, expected values in [-1, {num_classes}) (-1 = missing)')
      present = x != MISSING
      values = np.zeros((x.shape[0], num_classes))
      values[np.nonzero(present)[0], x[present]] = 1.0
      return values, present
    if x.ndim != 2 or x.shape[1] != num_classes:
      raise ValueError(
          f'{arg}: got integer array of shape {x.shape}, expected hard labels [N, {num_classes}] in '
          f'{{-1, 0, 1}} or float probabilities [N, {num_classes}]'
      )
    bad = (x < MISSING) | (x > 1)
    if np.any(bad):
      raise ValueError(f'{arg}: got value {x[bad][0]}, expected values in {{-1, 0, 1}} (-1 = missing)')
    present = x != MISSING
    return np.where(present, x, 0).astype(np.float64), present
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'{arg}: got dtype {x.dtype}, expected int hard labels (-1 = missing) or float probabilities')
  if x.ndim != 2 or x.shape[1] != num_classes:
    raise ValueError(
        f'{arg}: got float array of shape {x.shape}, expected probabilities [N, {num_classes}] '
        '(NaN = missing)' + (' or int hard labels [N]' if kind == 'multiclass' else '')
    )
  x = x.astype(np.float64)
  nan = np.isnan(x)
  present = ~nan.any(-1) if kind == 'multiclass' else ~nan
  values = np.where(nan, 0.0, x)
  if not np.all(np.isfinite(values)) or np.any((values < 0) | (values > 1)):
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    raise ValueError(f'{arg}: got value {values[bad][0]}, expected probabilities in [0, 1] (NaN = missing)')
  if kind == 'multiclass':
    values[~present] = 0.0
    sums = values[present].sum(-1)
    if sums.size and np.any(np.abs(sums - 1) > _checks.ROW_SUM_TOL):
      raise ValueError(
          f'{arg}: got a probability row summing to {sums[np.argmax(np.abs(sums - 1))]:.6g}, expected '
          f'rows summing to 1 (tolerance {_checks.ROW_SUM_TOL}; a row with NaN = missing)'
      )
  return values, present


def estimate_relatedness(
    labels_a, labels_b, *, num_classes_a: int, num_classes_b: int, b_kind: str, smoothing: float = 1.0, prior=None
) -> np.ndarray:
  """Estimates ``R[C_A, C_B]`` from examples labelled for both tasks, with smoothing toward a prior (docs/maths.md §2).

  ``R[i, k] = (Σ_n m[n, k] a[n, i] b[n, k] + α π_k) / (Σ_n m[n, k] a[n, i] + α)``, where ``m[n, k] = 1`` when
  example n has its A label and its B label (entry k, for multilabel B) present, ``α = smoothing`` and ``π_k`` is
  ``prior[k]`` or, by default, the marginal frequency of B label k among those pairs,
  ``π_k = Σ_n m[n, k] b[n, k] / Σ_n m[n, k]``. A class never seen (zero denominator) gets ``R[i, :] = π``.

  Hard and soft inputs (told apart by dtype):

  * integer ``labels_a [N]``: hard labels, ``a[n, i] = [labels_a[n] = i]``, -1 = missing;
  * float ``labels_a [N, C_A]``: soft counts ``a[n, i] = p(a = i | x_n)`` (e.g. model predictions); a row containing
    NaN = missing; rows must sum to 1;
  * multiclass B: integer ``[N]`` (-1 missing) or float ``[N, C_B]`` probabilities (NaN row = missing), as for A;
  * multilabel B: integer ``[N, C_B]`` in {-1, 0, 1} (-1 = that entry missing) or float ``[N, C_B]`` with
    ``b[n, k] = p(b_k = 1 | x_n)`` in [0, 1] (NaN = that entry missing).

  With hard labels this is the smoothed frequency ``p̂(b_k | a = i)``; with soft labels each example adds its
  probability mass ``a[n, i]`` as a fractional count. For multiclass B the rows sum to 1 (when π does).
  When a multilabel entry k has no labelled pair at all and no ``prior`` is given, ``π_k`` falls back to 0.5 (no
  information). No labelled pair at all with no ``prior`` is an error.

  Numpy, eager (a data-preparation step; not jittable). Computes in float64, returns float32 numpy, validated with
  :func:`validate_relatedness`.

  Args:
    labels_a: task-A labels, see above.
    labels_b: task-B labels, see above; the same N.
    num_classes_a: C_A.
    num_classes_b: C_B.
    b_kind: 'multiclass' or 'multilabel' (task B).
    smoothing: α ≥ 0, the prior's weight in pseudo-examples.
    prior: optional π ``[C_B]`` in [0, 1] (summing to 1 for multiclass B).
  """
  b_kind = _checks.check_b_kind(b_kind)
  for arg, value, lo in (('num_classes_a', num_classes_a, 1), ('num_classes_b', num_classes_b, 1)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
      raise ValueError(f'{arg}: got {value!r}, expected an int >= {lo}')
  if (
      not isinstance(smoothing, (int, float, np.number))
      or isinstance(smoothing, bool)
      or not (np.isfinite(smoothing) and smoothing >= 0)
  ):
    raise ValueError(f'smoothing: got {smoothing!r}, expected a finite number >= 0')
  a, present_a = _soft_counts(labels_a, num_classes=num_classes_a, kind='multiclass', arg='labels_a')
  b, present_b = _soft_counts(labels_b, num_classes=num_classes_b, kind=b_kind, arg='labels_b')
  if a.shape[0] != b.shape[0]:
    raise ValueError(f'labels_b: got {b.shape[0]} examples, expected {a.shape[0]} (the number in labels_a)')
  if prior is not None:
    prior = np.asarray(prior, np.float64)
    if prior.shape != (num_classes_b,):
      raise ValueError(f'prior: got shape {prior.shape}, expected ({num_classes_b},) (one value per B label)')
    if not np.all(np.isfinite(prior)) or np.any((prior < 0) | (prior > 1)):
      raise ValueError(f'prior: got values in [{prior.min()}, {prior.max()}], expected probabilities in [0, 1]')
    if b_kind == 'multiclass' and abs(prior.sum() - 1) > _checks.ROW_SUM_TOL:
      raise ValueError(
          f'prior: got values summing to {prior.sum():.6g}, expected a distribution over the '
          f'{num_classes_b} B classes summing to 1'
      )

  # m[n, k]: the pair (a_n, b_nk) is labelled; broadcast to [N, C_B] for both kinds of B.
  m = (present_a[:, None] & (present_b[:, None] if b_kind == 'multiclass' else present_b)).astype(np.float64)
  m = np.broadcast_to(m, b.shape)
  pairs = m.sum(0)  # [C_B]
  if prior is None:
    if not np.any(pairs > 0):
      raise ValueError(
          'labels_a, labels_b: got no example labelled for both tasks, expected at least one (or pass ' 'prior=)'
      )
    prior = np.where(pairs > 0, (m * b).sum(0) / np.maximum(pairs, 1), 0.5)
  numerator = a.T @ (m * b) + smoothing * prior  # [C_A, C_B]
  denominator = a.T @ m + smoothing
  safe = denominator > 0
  r = np.where(safe, numerator / np.where(safe, denominator, 1.0), prior)
  r = np.clip(r, 0.0, 1.0)  # rounding only: each entry is a convex combination of values in [0, 1]
  return validate_relatedness(r, b_kind=b_kind, num_classes_a=num_classes_a, num_classes_b=num_classes_b)


def implied_b_from_probs(probs_a: jax.Array, relatedness: jax.Array) -> jax.Array:
  """``p_A R`` without checks (for the loss modules)."""
  return jnp.einsum('...i,ik->...k', probs_a, relatedness, precision=_HI)


def implied_b(probs_a, relatedness) -> jax.Array:
  """A → B: ``q_B = p_A R``, the B distribution implied by A's class probabilities.

  Multilabel B: ``q_B[k] = Σ_i p_A(i) p(b_k = 1 | a = i)`` (marginal probability of label k); multiclass B: the
  mixture of R's rows, a distribution over B's classes.

  Args:
    probs_a: ``[B, C_A]`` class probabilities of task A (rows summing to 1).
    relatedness: ``[C_A, C_B]``.

  Returns:
    ``q_B [B, C_B]``.
  """
  probs_a = _checks.float_array(probs_a, 'probs_a')
  r = _checks.relatedness(
      relatedness, b_kind=None, num_classes_a=probs_a.shape[-1], num_classes_b=None, dtype=probs_a.dtype
  )
  _checks.check_probabilities(probs_a, kind='multiclass', arg='probs_a')
  return implied_b_from_probs(probs_a, r)


def _bayes_scores(
    probs_b: jax.Array,
    logp_b: Optional[jax.Array],
    r: jax.Array,
    *,
    b_kind: str,
    entry_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Virtual-evidence log-likelihoods ``log P(p_B | a = i)`` [..., C_A] (up to a constant in i).

  Multilabel: ``Σ_k log(p_k R̃_ik + (1 − p_k)(1 − R̃_ik))`` — the chance that an A = i example would produce B's
  soft observation, entry by entry; ``entry_mask [..., C_B]`` keeps just the labelled entries (an unobserved b_k sums
  out of the likelihood). Each factor lies in [ε, 1 − ε], so the log is finite. Multiclass:
  ``log Σ_k p_k R̃_ik``, as a logsumexp of ``log p_k + log R̃_ik`` (``logp_b``, or ``log max(p, tiny)`` if None).
  On hard labels (p one-hot or in {0, 1}) both are the exact log-likelihoods; at p = 0.5 (multilabel) every class
  scores the same, so the rule adds no information.
  """
  rt = jnp.clip(r, BAYES_EPS, 1 - BAYES_EPS)
  if b_kind == 'multiclass':
    if logp_b is None:
      logp_b = jnp.log(jnp.maximum(probs_b, jnp.finfo(probs_b.dtype).tiny))
    return jax.nn.logsumexp(logp_b[..., None, :] + jnp.log(rt), axis=-1)
  factors = jnp.log((1 - rt) + probs_b[..., None, :] * (2 * rt - 1))  # [..., C_A, C_B]
  if entry_mask is not None:
    factors = factors * entry_mask[..., None, :]
  return jnp.sum(factors, axis=-1)


def _prototype_scores(logp_b: jax.Array, log1mp_b: jax.Array, r: jax.Array) -> jax.Array:
  """``mean_{k ∈ P_i} log p_Bk``, or ``mean_k log(1 − p_Bk)`` where ``P_i = {k : R_ik ≥ τ}`` is empty: [..., C_A]."""
  member = (r >= PROTOTYPE_TAU).astype(logp_b.dtype)  # [C_A, C_B]
  size = member.sum(-1)
  proto = jnp.einsum('...k,ik->...i', logp_b, member, precision=_HI) / jnp.maximum(size, 1)
  empty = jnp.mean(log1mp_b, axis=-1, keepdims=True)
  return jnp.where(size > 0, proto, empty)


def log_prior_a(prior, num_classes_a: int, dtype) -> Optional[jax.Array]:
  """log π_A ``[C_A]`` or ``[..., C_A]`` (checked), or None for the uniform prior (a constant that softmax removes)."""
  if prior is None:
    return None
  prior = _checks.float_array(prior, 'prior', min_ndim=1)
  if prior.shape[-1] != num_classes_a:
    raise ValueError(
        f'prior: got shape {prior.shape}, expected ({num_classes_a},) or [B, {num_classes_a}] (π_A '
        'over the task-A classes)'
    )
  _checks.check_probabilities(prior, kind='multiclass', arg='prior')
  # A zero prior is clipped to the smallest normal number, so q_A ≈ 0 there but log q_A stays finite.
  return jnp.log(jnp.maximum(prior.astype(dtype), jnp.finfo(dtype).tiny))


def log_implied_a(
    probs_b: jax.Array,
    logp_b: Optional[jax.Array],
    log1mp_b: Optional[jax.Array],
    r: jax.Array,
    *,
    b_kind: str,
    mode: str,
    log_prior: Optional[jax.Array] = None,
    entry_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """``log q_A [..., C_A]`` without checks (for the loss modules); ``logp_b``/``log1mp_b`` used by `prototype`."""
  if mode == 'bayes':
    scores = _bayes_scores(probs_b, logp_b, r, b_kind=b_kind, entry_mask=entry_mask)
  else:
    scores = _prototype_scores(logp_b, log1mp_b, r)
  if log_prior is not None:
    scores = scores + log_prior
  return jax.nn.log_softmax(scores, axis=-1)


def implied_a(probs_b, relatedness, *, b_kind: str, mode: str = 'bayes', prior=None) -> jax.Array:
  """B → A: the task-A distribution ``q_A`` implied by B's probabilities ``p_B``, computed in log space.

  * ``mode='bayes'`` (default), Pearl's *virtual evidence*: B's prediction is soft evidence, and the likelihood of
    A-class i is the chance that an A = i example would produce it:
    ``log q_A(i) = log π_A(i) + Σ_k log(p_Bk R̃_ik + (1 − p_Bk)(1 − R̃_ik))`` (multilabel B) or
    ``log π_A(i) + log Σ_k p_Bk R̃_ik`` (multiclass B), normalised by a softmax over i, with ``R̃ = clip(R, ε, 1 − ε)``,
    ``ε = BAYES_EPS = 1e-4``. On hard labels this is Bayes' rule (labels conditionally independent given a); with an
    uninformative ``p_B`` (0.5 everywhere) it returns π_A, never a confident class.
  * ``mode='prototype'`` (FaceBehaviorNet, arXiv 2105.03790): ``log q_A(i) ∝ log π_A(i) + mean_{k ∈ P_i} log p_Bk``
    with ``P_i = {k : R_ik ≥ τ}``, ``τ = 0.5``; a class with empty ``P_i`` (e.g. neutral) uses
    ``mean_k log(1 − p_Bk)``. FaceBehaviorNet has no prior (π_A uniform, the default).

  ``prior`` π_A: None (uniform), ``[C_A]`` or per example ``[B, C_A]`` probabilities — e.g. the model's own
  ``stop_gradient(p_A)``, so that B's evidence only re-weights A's prediction (see ``distribution_matching``).

  From probabilities the logs are ``log max(p, tiny)``; the loss functions compute them from logits instead
  (``log_sigmoid``/``log_softmax``), which is stable at any logit magnitude.

  Args:
    probs_b: ``[B, C_B]``: ``sigmoid`` outputs (multilabel) or a distribution per row (multiclass).
    relatedness: ``[C_A, C_B]``.
    b_kind: 'multiclass' or 'multilabel'.
    mode: 'bayes' or 'prototype'.
    prior: optional π_A, ``[C_A]`` or ``[B, C_A]``, rows summing to 1.

  Returns:
    ``q_A [B, C_A]``, rows summing to 1.

  >>> import numpy as np
  >>> r = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)   # 3 A classes, 2 B labels
  >>> np.round(np.asarray(implied_a(np.full((1, 2), 0.5), r, b_kind='multilabel')), 3)   # no evidence: π_A
  array([[0.333, 0.333, 0.333]], dtype=float32)
  >>> np.round(np.asarray(implied_a(np.array([[1.0, 0.0]]), r, b_kind='multilabel')), 3)  # hard b = (1, 0)
  array([[0.736, 0.036, 0.227]], dtype=float32)
  """
  b_kind = _checks.check_b_kind(b_kind)
  mode = _checks.check_choice(mode, MODES, 'mode')
  probs_b = _checks.float_array(probs_b, 'probs_b')
  r = _checks.relatedness(
      relatedness, b_kind=b_kind, num_classes_a=None, num_classes_b=probs_b.shape[-1], dtype=probs_b.dtype
  )
  _checks.check_probabilities(probs_b, kind=b_kind, arg='probs_b')
  log_prior = log_prior_a(prior, r.shape[0], probs_b.dtype)
  tiny = jnp.finfo(probs_b.dtype).tiny
  logp = jnp.log(jnp.clip(probs_b, tiny, 1.0))
  log1mp = jnp.log(jnp.clip(1 - probs_b, tiny, 1.0))
  return jnp.exp(log_implied_a(probs_b, logp, log1mp, r, b_kind=b_kind, mode=mode, log_prior=log_prior))


# ----------------------------------------------------------------------------------------------------------------
# Learned relatedness (docs/maths.md §8): soft counts of the model's predictions and the smoothed EM-style update.
# Both are jittable; the train step accumulates the counts over steps and re-estimates every few steps.


def relatedness_soft_counts(logits_a, logits_b, labels_a, labels_b, *, b_kind: str) -> tuple[jax.Array, jax.Array]:
  """Soft co-occurrence counts of one batch: ``(N [C_A, C_B], n [C_A])`` (docs/maths.md §8).

  ``q_A(i | x)`` = one-hot of A's label where the example has it, else ``softmax(z_A)``; ``q_B(k | x)`` = B's label
  where annotated (per entry for multilabel B: ``b_k ∈ {0, 1}``), else ``sigmoid(z_B)_k`` (multilabel) or
  ``softmax(z_B)_k`` (multiclass). ``N_ik = Σ_x q_A(i | x) q_B(k | x)`` and ``n_i = Σ_x q_A(i | x)``, summed over the
  batch (the global batch under ``jit``). Predictions enter as ``stop_gradient``: the counts are statistics, not a
  loss. For multiclass B, ``Σ_k N_ik = n_i``.

  Args:
    logits_a: ``[B, C_A]``.
    logits_b: ``[B, C_B]``.
    labels_a: int ``[B]`` (-1 = missing).
    labels_b: int ``[B]`` (multiclass) or ``[B, C_B]`` (multilabel), -1 = missing.
    b_kind: 'multiclass' or 'multilabel'.
  """
  b_kind = _checks.check_b_kind(b_kind)
  logits_a = jax.lax.stop_gradient(jnp.asarray(logits_a, jnp.float32))
  logits_b = jax.lax.stop_gradient(jnp.asarray(logits_b, jnp.float32))
  labels_a, labels_b = jnp.asarray(labels_a), jnp.asarray(labels_b)
  num_a, num_b = logits_a.shape[-1], logits_b.shape[-1]
  # An out-of-range label (only possible under jit) counts as missing: the prediction stands in for it.
  known_a = known_multiclass(labels_a, num_a)
  q_a = jnp.where(known_a[:, None], jax.nn.one_hot(labels_a, num_a, dtype=jnp.float32), jax.nn.softmax(logits_a))
  if b_kind == 'multiclass':
    known_b = known_multiclass(labels_b, num_b)
    q_b = jnp.where(known_b[:, None], jax.nn.one_hot(labels_b, num_b, dtype=jnp.float32), jax.nn.softmax(logits_b))
  else:
    q_b = jnp.where(known_multilabel(labels_b), labels_b.astype(jnp.float32), jax.nn.sigmoid(logits_b))
  return jnp.einsum('ni,nk->ik', q_a, q_b, precision=_HI), jnp.sum(q_a, axis=0)


def reestimate(table, joint, marginal, *, rate: float, alpha: float, b_kind: str, prior_b=None) -> jax.Array:
  """One smoothed re-estimation of ``R [C_A, C_B]`` from soft counts (docs/maths.md §8).

  ``R̂_ik = (N_ik + α π_k) / (n_i + α)`` — :func:`estimate_relatedness`'s smoothing, on soft counts — with ``π`` =
  ``prior_b [C_B]`` or, by default, the B marginal of the counts ``π_k = Σ_i N_ik / Σ_i n_i`` (0.5 per entry for
  multilabel B, ``1/C_B`` for multiclass B, when the counts are all 0); a class with no mass (``n_i + α = 0``) gets
  π. Then ``R ← (1 − ρ) R + ρ R̂`` with ``ρ = rate`` in (0, 1]. For multiclass B the rows of R̂ are distributions
  (renormalised against rounding), so the rows of R stay distributions. Jittable; ``rate``, ``alpha`` and ``b_kind``
  are Python values.

  Args:
    table: the current ``R [C_A, C_B]``.
    joint: ``N [C_A, C_B]`` (:func:`relatedness_soft_counts`, summed over batches).
    marginal: ``n [C_A]``.
    rate: ρ, the weight of the new estimate.
    alpha: α ≥ 0, the prior's weight in pseudo-examples.
    b_kind: 'multiclass' or 'multilabel'.
    prior_b: optional π ``[C_B]``.
  """
  b_kind = _checks.check_b_kind(b_kind)
  table = jnp.asarray(table, jnp.float32)
  joint, marginal = jnp.asarray(joint, jnp.float32), jnp.asarray(marginal, jnp.float32)
  if prior_b is None:
    total = jnp.sum(marginal)
    fallback = 0.5 if b_kind == 'multilabel' else 1.0 / table.shape[1]
    prior_b = jnp.where(total > 0, jnp.sum(joint, axis=0) / jnp.where(total > 0, total, 1.0), fallback)
  prior_b = jnp.asarray(prior_b, jnp.float32)
  denominator = (marginal + alpha)[:, None]
  estimate = jnp.where(
      denominator > 0, (joint + alpha * prior_b) / jnp.where(denominator > 0, denominator, 1.0), prior_b
  )
  if b_kind == 'multiclass':
    estimate = estimate / jnp.sum(estimate, axis=-1, keepdims=True)
  estimate = jnp.clip(estimate, 0.0, 1.0)  # rounding only: a convex combination of values in [0, 1]
  return (1.0 - rate) * table + rate * estimate
