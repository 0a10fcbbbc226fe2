"""Per-task gradients: the task Jacobian G [T, P] in one reverse pass, (un)flattening, and gradient diagnostics.

    losses, G = task_jacobian(loss_fn, shared_params, batch)   # loss_fn(params, batch) -> losses [T]
    update, weights, state = method.apply(state, G, losses, key)
    shared_update = unflatten_grads(update, shared_params)      # same tree as shared_params

G's columns follow `jax.flatten_util.ravel_pytree` order, so `flatten_grads` / `unflatten_grads` convert between a
parameter-shaped tree and a row of G. For loss-weighting methods the Jacobian can be skipped: take
``losses, vjp = jax.vjp(f, params)``, get the weights from the method, then ``vjp(weights)`` is Σ_t w_t ∇L_t.

The train step pulls the Jacobian rows back from one forward pass with `pullback_rows` (``config.weighting.jacobian``):
``'vmap'`` vmaps the VJP over the unit cotangents (one batched backward pass), ``'rows'`` calls it once per row, and
``'auto'`` (`resolve_jacobian`) takes rows on XLA:CPU — where the vmapped backward's convolutions measured 2-4x
slower than the same rows one by one (experiments/bench.py, CNN, T=2/4: 3.0x/5.5x EW vs 1.4x/2.7x) — and vmap on
GPU/TPU. Both give the same rows up to float32 summation order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mtlmatch.weighting.base import HIGHEST, safe_div

JACOBIAN_MODES = ('auto', 'vmap', 'rows')


def resolve_jacobian(how: str = 'auto', *, backend: str | None = None) -> str:
  """'vmap' or 'rows' for ``how`` in :data:`JACOBIAN_MODES`: 'auto' is 'rows' on the CPU backend (``backend``,
  default ``jax.default_backend()``, read at trace time) and 'vmap' elsewhere."""
  if how not in JACOBIAN_MODES:
    raise ValueError(f'jacobian: got {how!r}, expected one of {list(JACOBIAN_MODES)}')
  if how != 'auto':
    return how
  return 'rows' if (backend or jax.default_backend()) == 'cpu' else 'vmap'


def pullback_rows(vjp_fn: Callable[..., Any], cotangents: jax.Array, how: str = 'auto') -> Any:
  """``vjp_fn`` applied to each row of ``cotangents`` (an array [R, ...] or a pytree of them, every leaf with the
  leading axis R), stacked: the output structure of ``vjp_fn`` with a leading axis R on every leaf (with unit
  cotangents, the rows of the Jacobian). ``how``: see `resolve_jacobian`; 'vmap' is ``jax.vmap(vjp_fn)(cotangents)``,
  'rows' R calls of ``vjp_fn`` (they share the one forward pass)."""
  if resolve_jacobian(how) == 'vmap':
    return jax.vmap(vjp_fn)(cotangents)
  num_rows = jax.tree.leaves(cotangents)[0].shape[0]
  rows = [vjp_fn(jax.tree.map(lambda c, r=r: c[r], cotangents)) for r in range(num_rows)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)


def flatten_grads(tree: Any) -> jax.Array:
  """A parameter-shaped tree → one vector [P] (ravel_pytree order: leaves in tree order, each raveled)."""
  return ravel_pytree(tree)[0]


def unflatten_grads(vector: jax.Array, like: Any) -> Any:
  """A vector [P] → a tree shaped (and typed) like `like`; inverse of `flatten_grads`."""
  flat, unravel = ravel_pytree(like)
  vector = jnp.asarray(vector)
  if vector.shape != flat.shape:
    raise ValueError(f'unflatten_grads vector: got shape {vector.shape}, expected {flat.shape} (the size of like)')
  return unravel(vector)


def param_layout(tree: Any) -> tuple[tuple[str, int], ...]:
  """The leaves of a parameter tree in the order of a gradient row (`flatten_grads`): ``((module, size), ...)``, one
  pair per leaf, ``module`` the '/'-joined path of the dict that holds the leaf (the Flax module owning the parameter:
  ``'Conv_0'`` for ``{'Conv_0': {'kernel', 'bias'}}``) and ``size`` its number of entries. What GradVac's parameter
  groups are cut from (a group per module, ``all_layer``, or per leaf, ``all_matrix``); plain Python, no arrays.

  >>> param_layout({'Dense_0': {'bias': jnp.zeros(3), 'kernel': jnp.zeros((2, 3))}, 'scale': jnp.zeros(())})
  (('Dense_0', 3), ('Dense_0', 6), ('', 1))
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  layout = []
  for path, leaf in leaves:
    keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path[:-1]]
    layout.append(('/'.join(keys), int(math.prod(jnp.shape(leaf)))))
  return tuple(layout)


def flatten_task_grads(tree: Any) -> jax.Array:
  """A tree whose leaves have a leading task axis [T, ...] → G [T, P], row t = flatten_grads(tree at task t)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError('flatten_task_grads tree: got no leaves, expected arrays with a leading task axis')
  num_tasks = leaves[0].shape[0]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([jnp.reshape(leaf, (num_tasks, -1)).astype(dtype) for leaf in leaves], axis=1)


def task_jacobian(loss_fn: Callable[..., Any], params: Any, *args, has_aux: bool = False):
  """Per-task losses [T] and their gradients G [T, P] w.r.t. `params`, from ONE forward and one vmapped backward.

  ``loss_fn(params, *args)`` -> losses [T] (or (losses, aux) with has_aux=True). `jax.jacrev` runs the forward once and
  pulls back the T unit cotangents together (vmap of the VJP), rather than T separate `jax.grad` passes.
  Returns (losses, G) or (losses, G, aux); G's rows are `flatten_grads` of each task's gradient tree.
  """

  def fn(p):
    out = loss_fn(p, *args)
    losses, aux = out if has_aux else (out, None)
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
      raise ValueError(f'task_jacobian loss_fn: returned losses of shape {losses.shape}, expected [T]')
    return losses, (losses, aux)

  jac, (losses, aux) = jax.jacrev(fn, has_aux=True)(params)
  grads = flatten_task_grads(jac)
  return (losses, grads, aux) if has_aux else (losses, grads)


def cosine_similarity_matrix(grads: jax.Array) -> jax.Array:
  """cos(G_s, G_t) [T, T] for logging; 0 for any pair involving a zero row (an absent task), 1 on other diagonals."""
  grads = jnp.asarray(grads, jnp.float32)
  if grads.ndim != 2:
    raise ValueError(f'cosine_similarity_matrix grads: got shape {grads.shape}, expected [T, P]')
  g = jnp.matmul(grads, grads.T, precision=HIGHEST)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
  return jnp.clip(safe_div(g, norms[:, None] * norms[None, :], 0.0), -1.0, 1.0)
