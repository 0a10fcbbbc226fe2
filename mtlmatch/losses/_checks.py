"""Boundary checks shared by the loss modules (private).

Two kinds of check, with one rule: every failure raises ONE ``ValueError`` that names the argument, what it got and
what was expected.

* Static checks (shapes, dtypes, option strings) use only Python values and shapes, so they run always, also under
  ``jax.jit`` / ``jax.vmap`` / ``jax.grad``.
* Value checks (label ranges, relatedness range / row sums / finiteness) need the numbers. They run only when the
  array is concrete (a numpy or a committed ``jax.Array``, not a tracer); inside ``jit``/``vmap`` they are skipped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The label value of a missing annotation (docs/maths.md §1); mtlmatch.tasks re-exports it.
MISSING = -1
# The task kinds the classification losses (and distribution matching's B task) are defined for.
CLASSIFICATION_KINDS = ('multiclass', 'multilabel')

# Rows of a multiclass-B relatedness table (and of probability vectors) must sum to 1 within this tolerance.
ROW_SUM_TOL = 1e-4


def check_choice(value, choices: Sequence[str], arg: str) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f'{arg}: got {value!r}, expected one of {tuple(choices)}')
  return value


def check_b_kind(b_kind) -> str:
  if b_kind not in CLASSIFICATION_KINDS:
    raise ValueError(f'b_kind: got {b_kind!r}, expected one of {CLASSIFICATION_KINDS}')
  return b_kind


def concrete(x) -> Optional[np.ndarray]:
  """The numpy value of ``x``, or None when ``x`` is a tracer (value checks are then skipped)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def float_array(x, arg: str, *, min_ndim: int = 1) -> jax.Array:
  """``x`` as a floating jnp array (integers are promoted to float32) with at least ``min_ndim`` dims."""
  try:
    x = jnp.asarray(x)
  except TypeError as e:
    raise ValueError(f'{arg}: got {type(x).__name__}, expected a numeric array') from e
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f'{arg}: got dtype {x.dtype}, expected a real floating array')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if x.ndim < min_ndim:
    raise ValueError(f'{arg}: got shape {x.shape}, expected at least {min_ndim} dimension(s) ([..., C])')
  return x


def int_labels(x, arg: str) -> jax.Array:
  try:
    x = jnp.asarray(x)
  except TypeError as e:
    raise ValueError(f'{arg}: got {type(x).__name__}, expected an integer array') from e
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{arg}: got dtype {x.dtype}, expected integer labels (-1 = missing)')
  return x


def check_multiclass_labels(logits: jax.Array, labels: jax.Array, *, logits_arg: str, labels_arg: str) -> None:
  """labels ``[...]`` with values in [-1, C) for logits ``[..., C]``."""
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f'{labels_arg}: got shape {labels.shape}, expected {logits.shape[:-1]} (the leading shape of '
        f'{logits_arg} {logits.shape}; multiclass labels are [B])'
    )
  value = concrete(labels)
  if value is not None:
    bad = (value < MISSING) | (value >= logits.shape[-1])
    if np.any(bad):
      raise ValueError(
          f'{labels_arg}: got value {value[bad].flat[0]}, expected values in [-1, '
          f'{logits.shape[-1]}) (-1 = missing)'
      )


def check_multilabel_labels(logits: jax.Array, labels: jax.Array, *, logits_arg: str, labels_arg: str) -> None:
  """labels ``[..., C]`` with values in {-1, 0, 1} for logits ``[..., C]``."""
  if labels.shape != logits.shape:
    raise ValueError(
        f'{labels_arg}: got shape {labels.shape}, expected {logits.shape} (the shape of {logits_arg}; '
        'multilabel labels are [B, C])'
    )
  value = concrete(labels)
  if value is not None:
    bad = (value < MISSING) | (value > 1)
    if np.any(bad):
      raise ValueError(
          f'{labels_arg}: got value {value[bad].flat[0]}, expected values in {{-1, 0, 1}} ' '(-1 = missing)'
      )


def check_labels(logits, labels, *, kind: str, logits_arg: str, labels_arg: str) -> None:
  if kind == 'multilabel':
    check_multilabel_labels(logits, labels, logits_arg=logits_arg, labels_arg=labels_arg)
  else:
    check_multiclass_labels(logits, labels, logits_arg=logits_arg, labels_arg=labels_arg)


def relatedness_value_error(r: np.ndarray, *, b_kind: Optional[str], arg: str = 'relatedness') -> Optional[str]:
  """The message for the first thing wrong with the values of a concrete relatedness table, or None."""
  if not np.all(np.isfinite(r)):
    i, k = np.argwhere(~np.isfinite(r))[0]
    return f'{arg}: got non-finite value {r[i, k]} at [{i}, {k}], expected finite probabilities in [0, 1]'
  bad = (r < 0) | (r > 1)
  if np.any(bad):
    i, k = np.argwhere(bad)[0]
    return f'{arg}: got value {r[i, k]} at [{i}, {k}], expected values in [0, 1]'
  if b_kind == 'multiclass':
    sums = r.astype(np.float64).sum(-1)
    bad_rows = np.abs(sums - 1) > ROW_SUM_TOL
    if np.any(bad_rows):
      i = int(np.argmax(bad_rows))
      return (
          f'{arg}: got row {i} summing to {sums[i]:.6g}, expected every row to sum to 1 (tolerance '
          f'{ROW_SUM_TOL}) because task B is multiclass (row i is p(b | a = i))'
      )
  return None


def check_relatedness_shape(
    shape: tuple, *, num_classes_a: Optional[int], num_classes_b: Optional[int], arg: str = 'relatedness'
) -> None:
  if len(shape) != 2:
    raise ValueError(f'{arg}: got shape {tuple(shape)}, expected a 2-D table [C_A, C_B]')
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f'{arg}: got shape {tuple(shape)}, expected a non-empty table [C_A, C_B]')
  if num_classes_a is not None and shape[0] != num_classes_a:
    raise ValueError(
        f'{arg}: got shape {tuple(shape)}, expected {num_classes_a} rows (C_A = number of task-A ' 'classes)'
    )
  if num_classes_b is not None and shape[1] != num_classes_b:
    raise ValueError(
        f'{arg}: got shape {tuple(shape)}, expected {num_classes_b} columns (C_B = number of task-B ' 'classes)'
    )


def relatedness(
    r,
    *,
    b_kind: Optional[str],
    num_classes_a: Optional[int],
    num_classes_b: Optional[int],
    dtype,
    arg: str = 'relatedness',
) -> jax.Array:
  """Checks a relatedness table passed to a loss (shape always, values when concrete); returns it as ``dtype``."""
  r = float_array(r, arg, min_ndim=0)
  check_relatedness_shape(r.shape, num_classes_a=num_classes_a, num_classes_b=num_classes_b, arg=arg)
  value = concrete(r)
  if value is not None:
    message = relatedness_value_error(value, b_kind=b_kind, arg=arg)
    if message:
      raise ValueError(message)
  return r.astype(dtype)


def check_probabilities(p, *, kind: str, arg: str) -> None:
  """Eager-only check that ``p`` holds probabilities (rows summing to 1 for ``kind='multiclass'``)."""
  value = concrete(p)
  if value is None:
    return
  if not np.all(np.isfinite(value)) or np.any((value < 0) | (value > 1)):
    bad = ~np.isfinite(value) | (value < 0) | (value > 1)
    raise ValueError(f'{arg}: got value {value[bad].flat[0]}, expected probabilities in [0, 1]')
  if kind == 'multiclass' and value.size:
    sums = value.astype(np.float64).sum(-1)
    if np.any(np.abs(sums - 1) > 1e-3):
      raise ValueError(
          f'{arg}: got a row summing to {sums.flat[int(np.argmax(np.abs(sums - 1)))]:.6g}, expected '
          'rows of a categorical distribution summing to 1 (tolerance 1e-3)'
      )


def check_leading(x: jax.Array, leading: tuple, *, arg: str, other: str) -> None:
  if x.shape[:-1] != leading:
    raise ValueError(f'{arg}: got shape {x.shape}, expected leading (batch) shape {leading} to match {other}')
