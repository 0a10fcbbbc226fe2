"""Pure loss functions on arrays (the maths: docs/maths.md): no models, data or training loop in here.

* :mod:`~mtlmatch.losses.classification`: ``softmax_xent``, ``sigmoid_xent`` (missing labels = -1),
  ``masked_mean``, the one reduction rule ``Σ v·w / max(Σ w, 1)`` over the global batch, and
  ``invalid_label_count`` (out-of-range labels, which weigh 0 inside ``jit``).
* :mod:`~mtlmatch.losses.regression`: ``mse``, ``l1``, ``huber`` (targets float, NaN = missing) and the
  concordance correlation ``ccc`` / ``ccc_loss`` of the global batch, from its moments (``ccc_moments``).
* :mod:`~mtlmatch.losses.dense`: per-pixel ``pixel_softmax_xent``, ``depth_l1`` and ``normal_cosine`` (values and
  weights ``[B, H, W]``, reduced by ``masked_mean`` over the valid pixels of the global batch).
* :mod:`~mtlmatch.losses.relatedness`: relatedness tables R[C_A, C_B] (``validate_relatedness``,
  ``estimate_relatedness``), the distributions they imply (``implied_b``, ``implied_a``) and the learned table's
  soft counts and update (``relatedness_soft_counts``, ``reestimate``).
* :mod:`~mtlmatch.losses.matching`: ``distribution_matching`` and ``co_annotation`` (Kollias et al., AAAI 2024).
* :mod:`~mtlmatch.losses.dgr`: ``dummy_gradient_norm`` and ``init_dummy_params`` (Shin et al., ECCV 2024).

Every per-example loss returns ``(per_example [B], weight [B])``; reduce with ``masked_mean``::

    from mtlmatch import losses
    loss = losses.masked_mean(*losses.softmax_xent(logits, labels))

Keyword options (``b_kind``, ``mode``, ...) are Python values: bind them with ``functools.partial`` (or close over
them) before ``jax.jit``. Shape and option checks always run; value checks (label ranges, relatedness range and row
sums, probabilities) run only on concrete arrays, not on tracers inside ``jit``/``vmap``; there an out-of-range label
weighs 0 (as if missing) and ``invalid_label_count(kind, labels, num_classes)`` counts them for the step's metrics.
"""

from __future__ import annotations

from mtlmatch.losses import dense, regression
from mtlmatch.losses._checks import CLASSIFICATION_KINDS, MISSING
from mtlmatch.losses.classification import (
    invalid_label_count,
    known_multiclass,
    known_multilabel,
    masked_mean,
    sigmoid_xent,
    softmax_xent,
)
from mtlmatch.losses.dense import depth_l1, normal_cosine, pixel_softmax_xent
from mtlmatch.losses.dgr import dummy_gradient_norm, init_dummy_params
from mtlmatch.losses.matching import co_annotation, distribution_matching
from mtlmatch.losses.regression import ccc, ccc_loss, ccc_moments, huber, l1, mse
from mtlmatch.losses.relatedness import (
    BAYES_EPS,
    PROTOTYPE_TAU,
    estimate_relatedness,
    implied_a,
    implied_b,
    reestimate,
    relatedness_soft_counts,
    validate_relatedness,
)

__all__ = [
    'BAYES_EPS',
    'CLASSIFICATION_KINDS',
    'MISSING',
    'PROTOTYPE_TAU',
    'ccc',
    'ccc_loss',
    'ccc_moments',
    'co_annotation',
    'dense',
    'depth_l1',
    'distribution_matching',
    'dummy_gradient_norm',
    'estimate_relatedness',
    'huber',
    'implied_a',
    'implied_b',
    'init_dummy_params',
    'invalid_label_count',
    'known_multiclass',
    'known_multilabel',
    'l1',
    'masked_mean',
    'mse',
    'normal_cosine',
    'pixel_softmax_xent',
    'reestimate',
    'regression',
    'relatedness_soft_counts',
    'sigmoid_xent',
    'softmax_xent',
    'validate_relatedness',
]
