"""Dummy Gradient norm Regularization, DGR (the maths: docs/maths.md).

Shin, Do, Son, "Learning Representation for Multitask learning through Self Supervised Auxiliary learning", ECCV 2024
(arXiv 2409.16651). K randomly initialised, never-trained "dummy" heads φ^(1..K) sit on the shared features f; the
penalty is the mean over k of the squared norm of the gradient of their loss with respect to their own parameters,

    R(f) = (1/K) Σ_k ‖∇_φ L(φ^(k); f)‖²,   L(φ; f) = masked_mean(loss_fn(head_apply(φ, f), labels)),

which pushes the encoder toward features any head can fit. The authors estimate the penalty's gradient by finite
differences; here ``jax.grad`` of :func:`dummy_gradient_norm` w.r.t. the features (or the encoder parameters behind
them) is exact, by double backprop. The trainer multiplies by λ, sums over the regularised tasks and adds the
penalty's gradient on top of the combined task gradient.

Usage (a linear head on all-zero features: only the bias gradient is non-zero; it is mean(softmax(0) − onehot(y))
= (−0.5, 0.5) for two classes and label 0, whatever the random kernels, so the penalty is 0.25 + 0.25 = 0.5):

>>> import flax.linen as nn
>>> import jax, jax.numpy as jnp
>>> from mtlmatch.losses import softmax_xent
>>> head = nn.Dense(2)                                                # or the task's own head module
>>> features, labels = jnp.zeros((8, 16)), jnp.zeros(8, jnp.int32)
>>> dummies = init_dummy_params(head, jax.random.key(0), features, num_dummies=4)    # leaves [K, ...]
>>> dummies['kernel'].shape
(4, 16, 2)
>>> penalty = dummy_gradient_norm(features, labels, dummies, loss_fn=softmax_xent,
...                               head_apply=lambda p, f: head.apply({'params': p}, f))
>>> round(float(penalty), 4)
0.5

Pure maths: the module imports no models; a head enters only through its ``init``/``apply``. Jittable with the
keyword arguments bound statically (``functools.partial``). Checks (``norm``, the K axis) are static and always run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mtlmatch.losses import _checks
from mtlmatch.losses.classification import masked_mean

NORMS = ('sq_l2', 'l2', 'sq_l2_unbiased')


def _safe_sqrt(x: jax.Array) -> jax.Array:
  # sqrt has an infinite derivative at 0; this version's gradient at 0 is 0 (a valid subgradient of the norm).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _num_dummies(dummy_params) -> int:
  leaves = jax.tree_util.tree_leaves(dummy_params)
  if not leaves:
    raise ValueError('dummy_params: got an empty pytree, expected parameter sets stacked on a leading axis K')
  sizes = {tuple(jnp.shape(x))[:1] for x in leaves}
  if len(sizes) != 1 or () in sizes:
    raise ValueError(
        f'dummy_params: got leaves with leading dimensions {sorted(sizes)}, expected every leaf to '
        'have the same leading axis K (stacked dummy parameter sets)'
    )
  return int(sizes.pop()[0])


def _halves(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Split the weighted (labelled) examples, in batch order, into two halves: masks of ``weight``'s shape ([B], or
  [B, ...] for per-pixel weights: an example is labelled when any of its entries is) of the first ⌊n/2⌋ examples and
  the rest. The batch order is a random draw, so the halves are two independent random subsets."""
  nonzero = weight != 0
  labelled = jnp.any(nonzero.reshape(nonzero.shape[0], -1), axis=1) if weight.ndim > 1 else nonzero
  rank = jnp.cumsum(labelled.astype(jnp.int32))  # 1-based rank among the labelled examples
  first = labelled & (rank <= jnp.sum(labelled) // 2)
  first = first.reshape(first.shape + (1,) * (weight.ndim - 1))
  return (nonzero & first).astype(weight.dtype), (nonzero & ~first).astype(weight.dtype)


def dummy_gradient_norm(
    features,
    labels,
    dummy_params,
    *,
    head_apply: Callable[[Any, jax.Array], jax.Array],
    loss_fn: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]],
    norm: str = 'sq_l2',
    reduce: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> jax.Array:
  """Mean over K dummy heads of a norm of the dummy gradient ``g = ∇_φ L(φ)``.

  ``L(φ) = masked_mean(*loss_fn(head_apply(φ, features), labels))``, or ``reduce`` of it when the loss is a function
  of masked means (the CCC loss of a regression task: ``reduce`` maps the batch's moments to the loss);
  ``dummy_params`` go through ``jax.lax.stop_gradient`` (never trained); ``jax.vmap`` runs the K heads at once. The
  result is differentiable w.r.t. ``features`` (grad of a grad).

  * ``'sq_l2'`` (default; what the authors' code penalises): ``‖g‖²``. On a minibatch of B_t labelled examples it is
    biased: ``E‖g_batch‖² = ‖g‖² + tr Σ / B_t`` (Σ the per-example gradient covariance), so λ's effect depends on the
    batch size and the label fraction.
  * ``'sq_l2_unbiased'``: ``⟨g_1, g_2⟩`` with g_1, g_2 the dummy gradients of the two halves of the labelled examples
    (:func:`_halves`); the halves are independent, so ``E⟨g_1, g_2⟩ = ‖g‖²`` exactly. Fewer than 2 labelled
    examples give 0.
  * ``'l2'``: ``‖g‖``, with a safe square root, so its gradient is finite (0) where the dummy gradient vanishes.

  Args:
    features: shared features ``[B, ...]`` (whatever ``head_apply`` takes).
    labels: the task's labels, passed unchanged to ``loss_fn``.
    dummy_params: a pytree whose every leaf has a leading axis K (e.g. from :func:`init_dummy_params`).
    head_apply: ``(params, features) -> logits``, e.g. ``lambda p, f: head.apply({'params': p}, f)``.
    loss_fn: ``(logits, labels) -> (per_example [B, ...], weight [B])``, e.g. ``softmax_xent``.
    norm: 'sq_l2', 'sq_l2_unbiased' or 'l2'.
    reduce: None (the loss is the masked mean) or ``means -> scalar``.

  Returns:
    A scalar.
  """
  norm = _checks.check_choice(norm, NORMS, 'norm')
  _num_dummies(dummy_params)
  dummy_params = jax.lax.stop_gradient(dummy_params)

  def dummy_loss(params, select=None):
    per_example, weight = loss_fn(head_apply(params, features), labels)
    means = masked_mean(per_example, weight if select is None else weight * select(weight))
    return means if reduce is None else reduce(means)

  def inner(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

  def penalty(params):
    if norm == 'sq_l2_unbiased':
      g1 = jax.grad(dummy_loss)(params, lambda w: _halves(w)[0])
      g2 = jax.grad(dummy_loss)(params, lambda w: _halves(w)[1])
      return inner(g1, g2)
    grads = jax.grad(dummy_loss)(params)
    sq = inner(grads, grads)
    return sq if norm == 'sq_l2' else _safe_sqrt(sq)

  return jnp.mean(jax.vmap(penalty)(dummy_params))


def init_dummy_params(head, rng: jax.Array, features, *, num_dummies: int, scale: float = 1.0):
  """K dummy parameter sets from a Flax Linen head's own initializer, stacked on a leading axis K.

  Set k is ``scale * head.init(keys[k], features)['params']`` with ``keys = jax.random.split(rng, num_dummies)``
  (other collections, e.g. batch statistics, are dropped). Draw once and keep them in the train state (``fixed``), or
  call again each step with ``jax.random.fold_in(rng, step)`` (``resample``).

  Args:
    head: an object with Linen's ``init(rng, features) -> {'params': ...}`` (e.g. ``nn.Dense(C)``).
    rng: a PRNG key.
    features: an example input for the head (only its shape and dtype matter to standard initializers).
    num_dummies: K ≥ 1.
    scale: multiplies every parameter (the "init scale" variant of DGR).

  Returns:
    The params pytree with every leaf ``[K, ...]``.
  """
  if not isinstance(num_dummies, int) or isinstance(num_dummies, bool) or num_dummies < 1:
    raise ValueError(f'num_dummies: got {num_dummies!r}, expected an int >= 1')
  if not hasattr(head, 'init'):
    raise ValueError(f'head: got {type(head).__name__}, expected a Flax Linen module with .init(rng, features)')
  keys = jax.random.split(rng, num_dummies)
  params = jax.vmap(lambda key: head.init(key, features)['params'])(keys)
  return jax.tree_util.tree_map(lambda x: x * scale, params)
