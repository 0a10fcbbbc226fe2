"""Supervised classification losses with missing labels, and the one reduction rule (docs/maths.md §1).

Every loss returns ``(per_example, weight)``: per-example values ``[B]`` (optax style) and the weight ``[B]``, 1 where
the example has a label for the task and 0 where it does not. A missing example's value is exactly 0 and its gradient
is exactly 0 (no NaN can leak from it). Reduce over the **global** batch with :func:`masked_mean`, so the result does
not depend on how the batch is split over devices or hosts::

    per_example, weight = softmax_xent(logits, labels)        # labels [B] int, -1 = missing
    loss = masked_mean(per_example, weight)                    # Σ v·w / max(Σ w, 1)

Shapes: ``[B]`` in the docstrings stands for any leading batch shape (so the functions also work under ``jax.vmap``
over examples). Shape and dtype checks always run; label-range checks run only when ``labels`` is concrete (not a
tracer inside ``jit``/``vmap``).

Out-of-range labels (a multiclass label outside ``[-1, C)``, a multilabel entry outside ``{-1, 0, 1}``) raise one
ValueError on concrete arrays. Inside ``jit`` they cannot raise: there they weigh 0, like a missing label, so they
never become a number in the loss (no NaN, no silent ``log σ`` of label 2), and :func:`invalid_label_count` counts
them, so the train step can report the count in its metrics and the loop can stop on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtlmatch.losses import _checks
from mtlmatch.losses._checks import MISSING


def softmax_xent(logits, labels) -> tuple[jax.Array, jax.Array]:
  """Categorical cross-entropy with missing labels.

  ``per_example[b] = -log softmax(logits[b])[labels[b]]`` (computed with ``log_softmax``: finite for
  ``|logits| = 1e4``), 0 where ``labels[b] = -1``; ``weight[b] = [labels[b] != -1]``.

  Args:
    logits: float ``[B, C]``.
    labels: int ``[B]``, values in ``[-1, C)``; -1 = missing.

  Returns:
    ``(per_example [B], weight [B])`` in the logits' float dtype.

  Example (uniform logits over 4 classes cost log 4 = 1.3863; a missing label costs nothing and weighs 0):

  >>> import jax.numpy as jnp
  >>> per_example, weight = softmax_xent(jnp.zeros((2, 4)), jnp.array([1, -1]))
  >>> [round(float(v), 4) for v in per_example], weight.tolist()
  ([1.3863, 0.0], [1.0, 0.0])
  """
  logits = _checks.float_array(logits, 'logits')
  labels = _checks.int_labels(labels, 'labels')
  _checks.check_multiclass_labels(logits, labels, logits_arg='logits', labels_arg='labels')
  present = known_multiclass(labels, logits.shape[-1])  # out of range (only possible under jit): weight 0, counted
  safe = jnp.where(present, labels, 0)  # any valid index; its value is masked out below
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(present, nll, 0.0), present.astype(logits.dtype)


def sigmoid_xent(logits, labels) -> tuple[jax.Array, jax.Array]:
  """Binary cross-entropy per entry, averaged over each example's labelled entries (multilabel tasks).

  ``bce[b, k] = -(y log σ(z) + (1 - y) log σ(-z))`` via ``log_sigmoid``;
  ``per_example[b] = Σ_k m[b, k] bce[b, k] / max(Σ_k m[b, k], 1)`` with ``m = [labels != -1]``;
  ``weight[b] = [Σ_k m[b, k] ≥ 1]`` (the example has at least one labelled entry).

  Args:
    logits: float ``[B, C]``.
    labels: int ``[B, C]``, values in ``{-1, 0, 1}``; -1 = that entry is missing.

  Returns:
    ``(per_example [B], weight [B])``.

  Reference: big_vision ``utils.sigmoid_xent``, with the per-entry missing mask of AU datasets.

  Example (logit 0 costs log 2 = 0.6931 per labelled entry; the second example has none labelled):

  >>> import jax.numpy as jnp
  >>> per_example, weight = sigmoid_xent(jnp.zeros((2, 3)), jnp.array([[1, 0, -1], [-1, -1, -1]]))
  >>> [round(float(v), 4) for v in per_example], weight.tolist()
  ([0.6931, 0.0], [1.0, 0.0])
  """
  logits = _checks.float_array(logits, 'logits')
  labels = _checks.int_labels(labels, 'labels')
  _checks.check_multilabel_labels(logits, labels, logits_arg='logits', labels_arg='labels')
  present = known_multilabel(labels)  # out of range (only possible under jit): weight 0, counted
  y = jnp.where(present, labels, 0).astype(logits.dtype)
  bce = -(y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))
  count = jnp.sum(present, axis=-1)
  per_example = jnp.sum(jnp.where(present, bce, 0.0), axis=-1) / jnp.maximum(count, 1).astype(logits.dtype)
  return per_example, (count > 0).astype(logits.dtype)


def known_multiclass(labels, num_classes: int) -> jax.Array:
  """bool, the shape of ``labels``: where a multiclass label is a class in ``[0, num_classes)`` (not missing, not
  out of range). The one rule of which labels a loss uses."""
  return (labels >= 0) & (labels < num_classes)


def known_multilabel(labels) -> jax.Array:
  """bool, the shape of ``labels``: where a multilabel entry is 0 or 1 (not missing, not out of range)."""
  return (labels == 0) | (labels == 1)


def invalid_label_count(kind: str, labels, num_classes: int) -> jax.Array:
  """int32 scalar: how many labels (multiclass) or label entries (multilabel) are neither missing (-1) nor in range.

  Pure and jittable: the losses give such labels weight 0, and this count lets a jitted step report them (e.g. as
  ``metrics['invalid_labels']``) so the loop can halt instead of training on silently dropped labels.

  Args:
    kind: ``'multiclass'`` (labels ``[B]``, valid ``[0, num_classes)``) or ``'multilabel'`` (labels ``[B, C]``,
      valid ``{0, 1}``).
    labels: int labels; -1 = missing.
    num_classes: the task's number of classes (``C``).

  Example (label 9 of a 7-class task, and -2, are out of range; -1 is missing, not invalid):

  >>> import jax, jax.numpy as jnp
  >>> int(jax.jit(invalid_label_count, static_argnums=(0, 2))('multiclass', jnp.array([1, 9, -1, -2]), 7))
  2
  """
  kind = _checks.check_choice(kind, ('multiclass', 'multilabel'), 'kind')
  labels = _checks.int_labels(labels, 'labels')
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes: got {num_classes!r}, expected an int >= 1')
  known = known_multiclass(labels, num_classes) if kind == 'multiclass' else known_multilabel(labels)
  return jnp.sum(~known & (labels != MISSING), dtype=jnp.int32)


def masked_mean(values, weights) -> jax.Array:
  """``Σ v·w / max(Σ w, 1)``: the weighted mean over the examples that contribute, 0 if none do.

  ``weights`` has the shape of ``values`` (the mean is over all entries, a scalar) or of its leading axes (e.g.
  ``[B]`` for values ``[B, d, 6]``: the mean is over those axes, one per trailing entry, as the CCC's moments need).
  Entries with weight 0 are dropped by ``where`` before the product, so a non-finite value there cannot leak into
  the result or into the gradient with respect to ``values``.

  Args:
    values: float ``[B]`` (any shape ``[*W, *R]``).
    weights: float or bool ``[*W]``, the shape of ``values`` or of its leading axes.

  Returns:
    A scalar, or ``[*R]``.

  Example (the NaN has weight 0, so it never reaches the mean of 1 and 3):

  >>> import jax.numpy as jnp
  >>> float(masked_mean(jnp.array([1.0, 3.0, jnp.nan]), jnp.array([1.0, 1.0, 0.0])))
  2.0
  """
  values = _checks.float_array(values, 'values', min_ndim=0)
  weights = jnp.asarray(weights)
  if weights.shape != values.shape[: weights.ndim]:
    raise ValueError(
        f'weights: got shape {weights.shape}, expected {values.shape} (the shape of values) or its leading axes'
    )
  weights = weights.astype(values.dtype)
  axes = tuple(range(weights.ndim))
  w = weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim))
  total = jnp.sum(jnp.where(w != 0, values * w, 0.0), axis=axes)
  return total / jnp.maximum(jnp.sum(weights), 1.0)
