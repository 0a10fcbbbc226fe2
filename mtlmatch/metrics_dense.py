"""Evaluation metrics of dense tasks (segmentation, depth, surface normals) from additive statistics.

Like :mod:`mtlmatch.metrics`, each kind has three functions: ``*_statistics`` (jittable, one batch: int32 counts and
float32 sums over its valid pixels; inside a ``jax.jit`` over a mesh with the batch sharded it sums over the global
batch), ``*_zero_statistics`` (the empty set, int64 / float64: the identity of :func:`mtlmatch.metrics.accumulate`)
and ``*_finalize`` (host-side, float64). The metrics are functions of the statistics summed over the **whole** eval
set: a pixel counts the same in whichever batch, device or host it was evaluated, so the result is the metric of
the set, not a mean of per-batch metrics (docs/maths.md §11).

Conventions (:mod:`mtlmatch.losses.dense`): logits ``[B, H, W, C]`` with labels ``[B, H, W]`` (a label outside
``[0, C)``, e.g. -1, is ignored); depth ``[B, H, W, 1]`` (target 0, NaN or ±inf = invalid); normals ``[B, H, W, 3]``
(the 0-vector or a non-finite target = invalid). ``mask [B]`` is 1 for real images and 0 for padding; a padded image
contributes nothing, nor does an image without a valid pixel. Shapes are checked, values are not.

Metric names (a contract with the train loop and reports):

* segmentation: ``miou``, ``pixel_accuracy``, ``iou_<k>`` per class k (:meth:`~mtlmatch.tasks.TaskSpec.class_keys`),
  ``count``;
* depth: ``abs_err``, ``rel_err``, ``count``;
* normals: ``mean_angle``, ``median_angle`` (degrees), ``within_11.25``, ``within_22.5``, ``within_30`` (fractions),
  ``count``.

``count`` is the number of real images with at least one valid pixel. Lower is better for the metrics in
:data:`DEPTH_LOWER_IS_BETTER` and :data:`NORMALS_LOWER_IS_BETTER`, higher for all others.

>>> import jax, numpy as np
>>> from mtlmatch.metrics import accumulate
>>> from mtlmatch.tasks import TaskSpec
>>> task = TaskSpec('seg', 'multiclass', 2)
>>> logits = np.zeros((1, 1, 3, 2), np.float32); logits[..., 1, 1] = 1      # predicts 0, 1, 0
>>> labels = np.array([[[0, 1, 1]]])
>>> total = segmentation_zero_statistics(task)
>>> for _ in range(2):
...   total = accumulate(total, jax.device_get(segmentation_statistics(task, logits, labels)))
>>> metrics = segmentation_finalize(task, total)
>>> {k: round(metrics[k], 4) for k in ('miou', 'pixel_accuracy', 'iou_0', 'iou_1', 'count')}
{'miou': 0.5, 'pixel_accuracy': 0.6667, 'iou_0': 0.5, 'iou_1': 0.5, 'count': 2}
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.losses.classification import known_multiclass
from mtlmatch.losses.dense import depth_valid, normal_valid, unit

SEGMENTATION_KEYS = ('confusion', 'count')
DEPTH_KEYS = ('n', 'abs_err', 'rel_err', 'count')
NORMALS_KEYS = ('n', 'angle_sum', 'within', 'histogram', 'count')

SEGMENTATION_LOWER_IS_BETTER = ()
DEPTH_LOWER_IS_BETTER = ('abs_err', 'rel_err')
NORMALS_LOWER_IS_BETTER = ('mean_angle', 'median_angle')

# The angle thresholds (degrees) of the within_<t> metrics (MTAN / LibMTL).
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
# The median's histogram: ANGLE_BINS bins of ANGLE_BIN_WIDTH = 0.01° over [0°, 180°].
ANGLE_BINS = 18000
ANGLE_BIN_WIDTH = 180.0 / ANGLE_BINS


def _within_key(t: float) -> str:
  return f'within_{t:g}'


def _real(mask, b: int) -> jax.Array:
  if mask is None:
    return jnp.ones((b,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (b,):
    raise ValueError(f'mask: got shape {mask.shape}, expected [{b}]')
  return mask > 0


def _check_dense(task, predictions, targets, channels: int, what: str) -> None:
  if predictions.ndim != 4 or predictions.shape[-1] != channels:
    raise ValueError(
        f'predictions of task {task.name!r}: got shape {predictions.shape}, expected [B, H, W, {channels}] ({what})'
    )
  if targets.shape != predictions.shape:
    raise ValueError(
        f'targets of task {task.name!r}: got shape {targets.shape}, expected {list(predictions.shape)} ({what})'
    )


def _check_keys(task, stats, keys, kind: str) -> dict[str, np.ndarray]:
  if not isinstance(stats, Mapping) or set(stats) != set(keys):
    got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
    raise ValueError(f'stats of task {task.name!r}: got keys {got}, expected {sorted(keys)} ({kind})')
  return {k: np.asarray(v) for k, v in stats.items()}


def _ratio(num, den) -> float:
  num, den = float(num), float(den)
  return num / den if den > 0 else math.nan


# --- segmentation ----------------------------------------------------------------------------------------------------


def segmentation_statistics(task: Any, logits, labels, mask=None) -> dict[str, jax.Array]:
  """Additive statistics of one batch of a segmentation task (jittable): ``confusion`` int32 ``[C, C]``, entry
  ``[i, j]`` = the valid pixels labelled i and predicted j (prediction = argmax over C, ties → lowest index), and
  ``count`` int32 (real images with a valid pixel). A pixel is valid when its label is in ``[0, C)`` and its image
  is real.

  Args:
    task: has ``.name`` and ``.num_classes`` C.
    logits: float ``[B, H, W, C]``.
    labels: int ``[B, H, W]``; -1 (or anything outside ``[0, C)``) = ignore.
    mask: ``[B]``, 1 = real image, 0 = padding; None = all real.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  c = task.num_classes
  if logits.ndim != 4 or logits.shape[-1] != c:
    raise ValueError(f'logits of task {task.name!r}: got shape {logits.shape}, expected [B, H, W, {c}]')
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f'labels of task {task.name!r}: got shape {labels.shape}, expected {list(logits.shape[:-1])}')
  labels = labels.astype(jnp.int32)
  valid = known_multiclass(labels, c) & _real(mask, labels.shape[0])[:, None, None]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  index = jnp.where(valid, labels * c + pred, 0).ravel()
  confusion = jnp.zeros((c * c,), jnp.int32).at[index].add(valid.ravel().astype(jnp.int32))
  return {
      'confusion': confusion.reshape(c, c),
      'count': jnp.sum(jnp.any(valid, axis=(1, 2)), dtype=jnp.int32),
  }


def segmentation_zero_statistics(task: Any) -> dict[str, np.ndarray]:
  """Statistics of an empty set for a segmentation task (the identity of ``accumulate``)."""
  c = task.num_classes
  return {'confusion': np.zeros((c, c), np.int64), 'count': np.zeros((), np.int64)}


def segmentation_finalize(task: Any, stats: Mapping[str, Any]) -> dict[str, float]:
  """Segmentation metrics from the accumulated confusion matrix M (float64 on the host):

  * ``iou_<k>`` = tp / (tp + fp + fn) with tp = M[k, k], fp = Σ_i M[i, k] − tp, fn = Σ_j M[k, j] − tp; NaN for a
    class whose union tp + fp + fn is 0 (never labelled, never predicted);
  * ``miou``: the mean of ``iou_<k>`` over the classes with a non-empty union (LibMTL takes the mean over all
    classes; the two agree when every class occurs);
  * ``pixel_accuracy`` = Σ_k tp / Σ M (LibMTL's pixel accuracy); ``count``.
  """
  s = _check_keys(task, stats, SEGMENTATION_KEYS, 'segmentation')
  m = s['confusion'].astype(np.float64)
  tp = np.diag(m)
  union = m.sum(0) + m.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
  defined = iou[~np.isnan(iou)]
  metrics = {
      'miou': float(defined.mean()) if defined.size else math.nan,
      'pixel_accuracy': _ratio(tp.sum(), m.sum()),
      'count': int(s['count']),
  }
  metrics.update({f'iou_{key}': float(v) for key, v in zip(task.class_keys(), iou)})
  return metrics


# --- depth -----------------------------------------------------------------------------------------------------------


def depth_statistics(task: Any, predictions, targets, mask=None) -> dict[str, jax.Array]:
  """Additive statistics of one batch of a depth task (jittable), over the valid pixels (target finite and ≠ 0,
  real image): ``n`` int32 (their number), the float32 sums ``abs_err`` ``Σ|x − y|`` and ``rel_err``
  ``Σ|x − y| / y``, and ``count`` int32 (real images with a valid pixel).

  Args:
    task: has ``.name``.
    predictions, targets: float ``[B, H, W, 1]``.
    mask: ``[B]``, 1 = real image, 0 = padding; None = all real.
  """
  predictions, targets = jnp.asarray(predictions, jnp.float32), jnp.asarray(targets, jnp.float32)
  _check_dense(task, predictions, targets, 1, 'depth')
  valid = depth_valid(targets) & _real(mask, targets.shape[0])[:, None, None]
  x, y = predictions[..., 0], jnp.where(valid, targets[..., 0], 1.0)
  error = jnp.where(valid, jnp.abs(x - y), 0.0)
  return {
      'n': jnp.sum(valid, dtype=jnp.int32),
      'abs_err': jnp.sum(error),
      'rel_err': jnp.sum(error / y),
      'count': jnp.sum(jnp.any(valid, axis=(1, 2)), dtype=jnp.int32),
  }


def depth_zero_statistics(task: Any) -> dict[str, np.ndarray]:
  """Statistics of an empty set for a depth task (the identity of ``accumulate``)."""
  del task
  zeros = {'n': np.zeros((), np.int64), 'count': np.zeros((), np.int64)}
  return zeros | {k: np.zeros((), np.float64) for k in ('abs_err', 'rel_err')}


def depth_finalize(task: Any, stats: Mapping[str, Any]) -> dict[str, float]:
  """Depth metrics over all valid pixels of the set (MTAN / LibMTL): ``abs_err = Σ|x − y| / n``,
  ``rel_err = Σ(|x − y| / y) / n`` (NaN when n = 0), ``count``. Both errors are lower-is-better."""
  s = _check_keys(task, stats, DEPTH_KEYS, 'depth')
  n = float(s['n'])
  return {
      'abs_err': _ratio(s['abs_err'].astype(np.float64), n),
      'rel_err': _ratio(s['rel_err'].astype(np.float64), n),
      'count': int(s['count']),
  }


# --- surface normals -------------------------------------------------------------------------------------------------


def normal_angles(predictions, targets) -> jax.Array:
  """The angle (degrees, float32 ``[B, H, W]``) between each predicted normal and its target,
  θ = arccos(clip(cos(x̂, ŷ), −1, 1)), computed as ``atan2(‖x̂ × ŷ‖, x̂·ŷ)`` (the same angle, accurate to float32
  rounding also near 0° and 180°, where arccos of a rounded cosine is off by up to ~0.02°). A prediction x = 0 has
  x̂ = 0, cos = 0: θ = 90°. Meaningful only where the target is valid."""
  x = unit(jnp.asarray(predictions, jnp.float32))
  y = unit(jnp.asarray(targets, jnp.float32))
  sine = jnp.linalg.norm(jnp.cross(x, y), axis=-1)
  cosine = jnp.sum(x * y, axis=-1)
  theta = jnp.degrees(jnp.arctan2(sine, cosine))
  return jnp.where(jnp.any(x != 0, axis=-1), theta, 90.0)


def normals_statistics(task: Any, predictions, targets, mask=None) -> dict[str, jax.Array]:
  """Additive statistics of one batch of a surface-normals task (jittable), over the valid pixels (target finite
  and non-zero, real image), with θ the angle of :func:`normal_angles`:

  ``n`` int32 (their number), ``angle_sum`` float32 Σθ, ``within`` int32 ``[3]`` the counts of θ < t for t in
  :data:`NORMAL_THRESHOLDS` (exact comparisons on θ), ``histogram`` int32 ``[ANGLE_BINS]`` the counts of θ in
  ``[k w, (k + 1) w)`` (w = ``ANGLE_BIN_WIDTH`` = 0.01°; 180° falls in the last bin), and ``count`` int32 (real
  images with a valid pixel).

  Args:
    task: has ``.name``.
    predictions, targets: float ``[B, H, W, 3]``.
    mask: ``[B]``, 1 = real image, 0 = padding; None = all real.
  """
  predictions, targets = jnp.asarray(predictions, jnp.float32), jnp.asarray(targets, jnp.float32)
  _check_dense(task, predictions, targets, 3, 'normals')
  valid = normal_valid(targets) & _real(mask, targets.shape[0])[:, None, None]
  safe = jnp.where(valid[..., None], targets, 1.0)
  theta = jnp.where(valid, normal_angles(jnp.where(valid[..., None], predictions, 1.0), safe), 0.0)
  thresholds = jnp.asarray(NORMAL_THRESHOLDS, jnp.float32)
  within = valid[..., None] & (theta[..., None] < thresholds)
  bins = jnp.clip(jnp.floor(theta * (ANGLE_BINS / 180.0)), 0, ANGLE_BINS - 1).astype(jnp.int32)  # θ·100: exact scale
  histogram = jnp.zeros((ANGLE_BINS,), jnp.int32).at[bins.ravel()].add(valid.ravel().astype(jnp.int32))
  return {
      'n': jnp.sum(valid, dtype=jnp.int32),
      'angle_sum': jnp.sum(theta),
      'within': jnp.sum(within, axis=(0, 1, 2), dtype=jnp.int32),
      'histogram': histogram,
      'count': jnp.sum(jnp.any(valid, axis=(1, 2)), dtype=jnp.int32),
  }


def normals_zero_statistics(task: Any) -> dict[str, np.ndarray]:
  """Statistics of an empty set for a surface-normals task (the identity of ``accumulate``)."""
  del task
  return {
      'n': np.zeros((), np.int64),
      'angle_sum': np.zeros((), np.float64),
      'within': np.zeros((len(NORMAL_THRESHOLDS),), np.int64),
      'histogram': np.zeros((ANGLE_BINS,), np.int64),
      'count': np.zeros((), np.int64),
  }


def histogram_median(histogram, *, width: float = ANGLE_BIN_WIDTH) -> float:
  """The median of the values counted in ``histogram`` (bin k = ``[k·width, (k + 1)·width)``), NaN if it is empty.

  With n values in sorted order v_1 ≤ … ≤ v_n, the median is ``(v_lo + v_hi) / 2`` with ranks lo = ⌊(n + 1) / 2⌋ and
  hi = ⌊n / 2⌋ + 1 (the same rank for odd n; ``np.median``'s definition). Each of v_lo, v_hi is estimated by the
  midpoint of the bin holding its rank (the first bin whose cumulative count reaches the rank), so it is off by at
  most width / 2, and so is the median: ``|histogram_median − np.median| ≤ width / 2``. (Taking the bin where the
  cumulative count crosses n / 2 alone is not enough for even n: v_{n/2} and v_{n/2+1} may lie far apart.)
  """
  counts = np.asarray(histogram, np.int64)
  cumulative = np.cumsum(counts)
  n = int(cumulative[-1]) if counts.size else 0
  if n == 0:
    return math.nan
  ranks = np.array([(n + 1) // 2, n // 2 + 1])
  bins = np.searchsorted(cumulative, ranks, side='left')
  return float(np.mean((bins + 0.5) * width))


def normals_finalize(task: Any, stats: Mapping[str, Any]) -> dict[str, float]:
  """Surface-normal metrics over all valid pixels of the set (MTAN / LibMTL), θ in degrees:

  * ``mean_angle`` = Σθ / n (exact up to the float32 rounding of each batch's sum);
  * ``median_angle``: the median of θ from the histogram (:func:`histogram_median`): within ``ANGLE_BIN_WIDTH / 2``
    = 0.005° of the exact median of the (float32) angles;
  * ``within_11.25``, ``within_22.5``, ``within_30``: the fractions of pixels with θ < t (exact counts);
  * ``count``. NaN when n = 0. ``mean_angle`` and ``median_angle`` are lower-is-better.
  """
  s = _check_keys(task, stats, NORMALS_KEYS, 'normals')
  n = float(s['n'])
  if s['histogram'].shape != (ANGLE_BINS,):
    shape = s['histogram'].shape
    raise ValueError(f'stats of task {task.name!r}: got histogram shape {shape}, expected [{ANGLE_BINS}] (normals)')
  metrics = {
      'mean_angle': _ratio(s['angle_sum'].astype(np.float64), n),
      'median_angle': histogram_median(s['histogram']),
  }
  metrics.update({_within_key(t): _ratio(c, n) for t, c in zip(NORMAL_THRESHOLDS, s['within'])})
  metrics['count'] = int(s['count'])
  return metrics
