"""Per-pixel losses of dense tasks: semantic segmentation, depth and surface normals (docs/maths.md §11).

Every loss returns ``(per_pixel [B, H, W], weight [B, H, W])``: the per-pixel value and weight 1 where the pixel has
a valid target, 0 where it does not. An invalid pixel's value is exactly 0 and its gradient is exactly 0, whatever
its target or prediction holds (NaN and ±inf included). Reduce with the one rule, over the **global** batch::

    per_pixel, weight = pixel_softmax_xent(logits, labels)     # labels [B, H, W] int, -1 = ignore
    loss = masked_mean(per_pixel, weight)                      # Σ v·w / max(Σ w, 1): the mean over valid pixels

That is LibMTL's ``Σ loss·mask / num_valid``: every valid pixel of the batch weighs the same, so an image with many
valid pixels weighs more than one with few, and an image without the task's label (all pixels invalid) weighs 0.

Conventions (the contract with the data): segmentation labels ``[B, H, W]`` int in ``[-1, C)``, ``-1`` = ignore;
depth targets ``[B, H, W, 1]``, ``0`` (or NaN, ±inf) = invalid; normal targets ``[B, H, W, 3]`` unit vectors, the
0-vector (or any non-finite component) = invalid. ``[B, H, W]`` stands for any leading shape (so the losses also work
under ``jax.vmap`` over images). Shape and dtype checks always run; the label-range check runs only on concrete
labels: inside ``jit`` a label outside ``[0, C)`` weighs 0, like ``-1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtlmatch.losses import _checks
from mtlmatch.losses.classification import known_multiclass

# x̂ = x / ‖x‖ where ‖x‖ > NORMAL_EPS (torch.nn.functional.normalize's eps), else 0 with zero gradient (`unit`).
NORMAL_EPS = 1e-12


def _pair(predictions, targets, channels: int, what: str) -> tuple[jax.Array, jax.Array]:
  predictions = _checks.float_array(predictions, 'predictions', min_ndim=2)
  targets = _checks.float_array(targets, 'targets', min_ndim=2)
  if predictions.shape[-1] != channels:
    raise ValueError(f'predictions: got shape {predictions.shape}, expected [B, H, W, {channels}] ({what})')
  if targets.shape != predictions.shape:
    raise ValueError(f'targets: got shape {targets.shape}, expected {predictions.shape} (the shape of predictions)')
  return predictions, targets


def depth_valid(targets) -> jax.Array:
  """bool ``[B, H, W]`` for depth targets ``[B, H, W, 1]``: the target is finite and not 0 (0 and NaN mark a pixel
  without depth, as in LibMTL's ``gt != 0`` mask). The one rule the depth loss and metrics use."""
  return jnp.all(jnp.isfinite(targets) & (targets != 0), axis=-1)


def normal_valid(targets) -> jax.Array:
  """bool ``[B, H, W]`` for normal targets ``[B, H, W, 3]``: every component finite and ``‖y‖ > 0`` (the 0-vector
  marks a pixel without a normal). The one rule the normal loss and metrics use."""
  finite = jnp.all(jnp.isfinite(targets), axis=-1)
  return finite & (jnp.sum(jnp.square(jnp.where(finite[..., None], targets, 0.0)), axis=-1) > 0)


def unit(x, *, eps: float = NORMAL_EPS) -> jax.Array:
  """``x / ‖x‖`` over the last axis where ``‖x‖ > eps``, and ``0`` (a constant: zero gradient) where ``‖x‖ ≤ eps``.
  Computed in at least float32, returned in that dtype.

  Why not torch's ``x / max(‖x‖, eps)``: its gradient at ``x = 0`` is ``1 / eps`` (1e12), and an exactly-zero
  prediction is common at initialisation (Flax's zero bias after a ReLU whose channels are all 0 at a pixel). One
  such pixel then gave a gradient norm ~1e8 that set the direction of every clipped update of the first step and
  made MGDA-UB's Gram matrix ill-conditioned; the cosine is undefined at 0, so no direction is preferred there."""
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  ok = sq > eps * eps
  return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def pixel_softmax_xent(logits, labels) -> tuple[jax.Array, jax.Array]:
  """Per-pixel categorical cross-entropy with ignored pixels (semantic segmentation).

  ``per_pixel[b, h, w] = −log softmax(logits[b, h, w])[labels[b, h, w]]`` (``log_softmax``: finite for
  ``|logits| = 1e4``), 0 where the label is ignored; ``weight = [0 ≤ label < C]``. The logits of an ignored pixel
  are replaced by 0 before the softmax, so even a non-finite logit there gets gradient exactly 0.

  Args:
    logits: float ``[B, H, W, C]``.
    labels: int ``[B, H, W]``, values in ``[-1, C)``; -1 = ignore.

  Returns:
    ``(per_pixel [B, H, W], weight [B, H, W])`` in the logits' float dtype.

  Example (uniform logits over 4 classes cost log 4 = 1.3863 per labelled pixel):

  >>> import jax.numpy as jnp
  >>> per_pixel, weight = pixel_softmax_xent(jnp.zeros((1, 1, 2, 4)), jnp.array([[[2, -1]]]))
  >>> [round(float(v), 4) for v in per_pixel.ravel()], weight.ravel().tolist()
  ([1.3863, 0.0], [1.0, 0.0])
  """
  logits = _checks.float_array(logits, 'logits', min_ndim=2)
  labels = _checks.int_labels(labels, 'labels')
  c = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f'labels: got shape {labels.shape}, expected {logits.shape[:-1]} (the leading shape of logits '
        f'{logits.shape}; segmentation labels are [B, H, W] for logits [B, H, W, C])'
    )
  value = _checks.concrete(labels)
  if value is not None:
    bad = (value < _checks.MISSING) | (value >= c)
    if bad.any():
      raise ValueError(f'labels: got value {value[bad].flat[0]}, expected values in [-1, {c}) (-1 = ignore)')
  valid = known_multiclass(labels, c)  # out of range (only possible under jit): weight 0, as if ignored
  safe_logits = jnp.where(valid[..., None], logits, 0.0)
  safe_labels = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(safe_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe_labels[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0), valid.astype(logits.dtype)


def depth_l1(predictions, targets) -> tuple[jax.Array, jax.Array]:
  """Per-pixel absolute depth error ``|x − y|``, 0 where the target is invalid; ``weight = [y finite, y ≠ 0]``.

  Args:
    predictions: float ``[B, H, W, 1]``.
    targets: float ``[B, H, W, 1]``; 0 or NaN (or ±inf) = no depth at that pixel.

  Returns:
    ``(per_pixel [B, H, W], weight [B, H, W])`` in the predictions' float dtype.

  >>> import jax.numpy as jnp
  >>> per_pixel, weight = depth_l1(jnp.ones((1, 1, 3, 1)), jnp.array([3.0, 0.0, jnp.nan]).reshape(1, 1, 3, 1))
  >>> per_pixel.ravel().tolist(), weight.ravel().tolist()
  ([2.0, 0.0, 0.0], [1.0, 0.0, 0.0])
  """
  predictions, targets = _pair(predictions, targets, 1, 'depth has one channel')
  valid = depth_valid(targets)
  error = jnp.where(valid[..., None], predictions - targets.astype(predictions.dtype), 0.0)
  return jnp.abs(error)[..., 0], valid.astype(predictions.dtype)


def normal_cosine(predictions, targets, *, eps: float = NORMAL_EPS) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cosine loss of surface normals, ``1 − x̂·ŷ``, 0 where the target is invalid; ``weight = [‖y‖ > 0]``.

  ``x̂ = x / ‖x‖`` (:func:`unit`): the predictions need not be unit vectors; where ``‖x‖ ≤ eps`` (``eps`` =
  ``NORMAL_EPS`` = 1e-12, torch's ``F.normalize``) ``x̂ = 0``, the loss is 1 and its gradient 0 (torch's
  ``−ŷ / eps`` there is 1e12: see :func:`unit`). ``ŷ = y / ‖y‖``: the targets are expected to be unit vectors
  already (then ``x̂·ŷ = x̂·y``, LibMTL's loss); normalising them too keeps the loss the true ``1 − cos θ`` for
  slightly non-unit targets (e.g. normals decoded from 8-bit images). Computed in at least float32.

  Args:
    predictions: float ``[B, H, W, 3]``.
    targets: float ``[B, H, W, 3]``; the 0-vector (or a non-finite component) = no normal at that pixel.
    eps: ``‖x‖`` at or below which a prediction has no direction (> 0).

  Returns:
    ``(per_pixel [B, H, W], weight [B, H, W])`` in the predictions' float dtype.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[[[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]])
  >>> y = jnp.array([[[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
  >>> per_pixel, weight = normal_cosine(x, y)
  >>> per_pixel.ravel().tolist(), weight.ravel().tolist()
  ([0.0, 1.0, 0.0], [1.0, 1.0, 0.0])
  """
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f'eps: got {eps!r}, expected a number > 0')
  predictions, targets = _pair(predictions, targets, 3, 'normals have three channels')
  valid = normal_valid(targets)
  y = jnp.where(valid[..., None], targets, 0.0)
  y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
  y_hat = y * jax.lax.rsqrt(jnp.where(valid, jnp.sum(y * y, axis=-1), 1.0))[..., None]
  x_hat = unit(jnp.where(valid[..., None], predictions, 0.0), eps=eps)
  cosine = jnp.sum(x_hat * y_hat.astype(x_hat.dtype), axis=-1)
  return jnp.where(valid, 1.0 - cosine, 0.0).astype(predictions.dtype), valid.astype(predictions.dtype)
