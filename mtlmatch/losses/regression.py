"""Regression losses with missing targets, and the concordance correlation coefficient (docs/maths.md §10).

A regression task has d ≥ 1 outputs; its targets are float ``[B, d]`` and a missing target is NaN, per output (an
Aff-Wild2 frame may carry valence but not arousal). Predictions are float ``[B, d]``. Every per-example loss returns
``(per_example [B], weight [B])`` like the classification losses: the mean of the entry losses over the example's
present outputs, and weight 1 where at least one output is present; reduce with ``masked_mean``. A missing entry's
value and gradient are exactly 0, so a NaN target never reaches a number.

The CCC is not a mean over examples but a function of the batch's moments. :func:`ccc_moments` gives each example's
contribution to them, ``[B, d, 6]`` = (m, m·x, m·y, m·x², m·y², m·x·y) with m = [target present], x the prediction
and y the target; ``masked_mean`` over the batch turns them into the batch's (weighted) raw moments, and
:func:`ccc_from_moments` into the CCC. So the CCC loss of the *global* batch is a function of global means: the same
on 1 or 8 devices, and under gradient accumulation (the step evaluates every loss on the whole batch's features).

    per_example, weight = mse(predictions, targets)              # targets [B, d], NaN = missing
    loss = masked_mean(per_example, weight)
    concordance = ccc(predictions, targets)                      # [d], population moments (Lin 1989)
    loss = ccc_loss(predictions, targets)                        # mean over outputs of 1 − CCC
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtlmatch.losses import _checks
from mtlmatch.losses.classification import masked_mean

# The CCC's denominator below this counts as 0 (constant predictions equal to constant targets): CCC is then taken as
# 0 in the loss and NaN in the metric.
CCC_EPS = 1e-12


def _pair(predictions, targets) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(predictions, targets with 0 where missing, present [B, d])`` after the shape checks."""
  predictions = _checks.float_array(predictions, 'predictions', min_ndim=2)
  targets = _checks.float_array(targets, 'targets', min_ndim=2)
  if targets.shape != predictions.shape:
    raise ValueError(
        f'targets: got shape {targets.shape}, expected {predictions.shape} (the shape of predictions [B, d]; a '
        'missing target is NaN)'
    )
  present = jnp.isfinite(targets)  # NaN: missing; ±inf: invalid (weighs 0, counted by invalid_target_count)
  return predictions, jnp.where(present, targets, 0.0).astype(predictions.dtype), present


def _per_example(entry_loss: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
  count = jnp.sum(present, axis=-1)
  total = jnp.sum(jnp.where(present, entry_loss, 0.0), axis=-1)
  return total / jnp.maximum(count, 1).astype(entry_loss.dtype), (count > 0).astype(entry_loss.dtype)


def mse(predictions, targets) -> tuple[jax.Array, jax.Array]:
  """Squared error ``(x − y)²`` averaged over each example's present outputs: ``(per_example [B], weight [B])``.

  >>> import jax.numpy as jnp
  >>> per_example, weight = mse(jnp.zeros((2, 2)), jnp.array([[1.0, jnp.nan], [jnp.nan, jnp.nan]]))
  >>> per_example.tolist(), weight.tolist()
  ([1.0, 0.0], [1.0, 0.0])
  """
  predictions, targets, present = _pair(predictions, targets)
  return _per_example(jnp.square(predictions - targets), present)


def l1(predictions, targets) -> tuple[jax.Array, jax.Array]:
  """Absolute error ``|x − y|`` averaged over each example's present outputs: ``(per_example [B], weight [B])``."""
  predictions, targets, present = _pair(predictions, targets)
  return _per_example(jnp.abs(jnp.where(present, predictions - targets, 0.0)), present)


def huber(predictions, targets, *, delta: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Huber loss per entry, ``½e²`` for ``|e| ≤ δ`` and ``δ(|e| − ½δ)`` beyond (e = x − y; optax's
  ``huber_loss``), averaged over each example's present outputs: ``(per_example [B], weight [B])``."""
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
    raise ValueError(f'huber delta: got {delta!r}, expected a number > 0')
  predictions, targets, present = _pair(predictions, targets)
  error = jnp.abs(jnp.where(present, predictions - targets, 0.0))
  quadratic = jnp.minimum(error, delta)
  return _per_example(0.5 * quadratic**2 + delta * (error - quadratic), present)


def ccc_moments(predictions, targets) -> tuple[jax.Array, jax.Array]:
  """Each example's contribution to the CCC's moments: ``(moments [B, d, 6], weight [B])``, the moments
  (m, m·x, m·y, m·x², m·y², m·x·y) per output with m = [target present], weight 1 where any output is present.

  ``masked_mean(moments, weight)`` (over the batch axis) gives the batch's moments up to one common factor, which
  :func:`ccc_from_moments` cancels."""
  predictions, targets, present = _pair(predictions, targets)
  m = present.astype(predictions.dtype)
  x, y = jnp.where(present, predictions, 0.0), targets
  moments = jnp.stack([m, x, y, x * x, y * y, x * y], axis=-1)
  return moments, jnp.any(present, axis=-1).astype(predictions.dtype)


def ccc_from_moments(moments) -> tuple[jax.Array, jax.Array]:
  """``(ccc [d], defined [d])`` from moments ``[d, 6]`` (:func:`ccc_moments`, summed or averaged over examples).

  With n = Σm and the population moments μ_x = Σmx/n, σ_x² = Σmx²/n − μ_x², σ_xy = Σmxy/n − μ_x μ_y,

      CCC = 2 σ_xy / (σ_x² + σ_y² + (μ_x − μ_y)²)        (Lin 1989).

  ``defined`` is False where an output has no present target or the denominator is 0 (then ``ccc`` is 0; its
  gradient is 0 there too)."""
  n, sx, sy, sxx, syy, sxy = (moments[..., k] for k in range(6))
  defined_n = n > 0
  n = jnp.where(defined_n, n, 1.0)
  mx, my = sx / n, sy / n
  var_x = jnp.maximum(sxx / n - mx * mx, 0.0)
  var_y = jnp.maximum(syy / n - my * my, 0.0)
  cov = sxy / n - mx * my
  denominator = var_x + var_y + jnp.square(mx - my)
  defined = defined_n & (denominator > CCC_EPS)
  return jnp.where(defined, 2 * cov / jnp.where(defined, denominator, 1.0), 0.0), defined


def ccc_loss_from_moments(moments) -> jax.Array:
  """The CCC loss from moments ``[d, 6]``: the mean over outputs with a present target of ``1 − CCC`` (an output
  whose denominator is 0 counts as CCC 0), 0 if no output has one."""
  concordance, _ = ccc_from_moments(moments)
  has_target = moments[..., 0] > 0
  return jnp.sum(jnp.where(has_target, 1.0 - concordance, 0.0)) / jnp.maximum(jnp.sum(has_target), 1)


def ccc(predictions, targets) -> jax.Array:
  """The concordance correlation coefficient of each output over its present (non-NaN) examples: ``[d]``, NaN where
  an output has no present target or its denominator is 0. Population moments (Lin 1989; docs/maths.md §10).

  >>> import jax.numpy as jnp
  >>> y = jnp.array([[0.1, -0.5], [0.4, jnp.nan], [-0.3, 0.5]])
  >>> [round(float(v), 4) for v in ccc(y, y)]                         # perfect agreement
  [1.0, 1.0]
  >>> [round(float(v), 4) for v in ccc(0.5 * y, y)]                   # shrunk towards 0
  [0.7914, 0.8]
  """
  moments, weight = ccc_moments(predictions, targets)
  concordance, defined = ccc_from_moments(masked_mean(moments, weight))
  return jnp.where(defined, concordance, jnp.nan)


def ccc_loss(predictions, targets) -> jax.Array:
  """``mean_j (1 − CCC_j)`` over the outputs with a present target: the CCC loss of one (global) batch, a scalar."""
  moments, weight = ccc_moments(predictions, targets)
  return ccc_loss_from_moments(masked_mean(moments, weight))


def invalid_target_count(targets) -> jax.Array:
  """int32: the target entries that are neither missing (NaN) nor finite (±inf). The losses give them weight 0,
  like a missing target; the train step counts them and the loop halts on them."""
  targets = _checks.float_array(targets, 'targets', min_ndim=1)
  return jnp.sum(jnp.isinf(targets), dtype=jnp.int32)
