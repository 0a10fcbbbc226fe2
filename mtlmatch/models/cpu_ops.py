"""Convolution and 2×2 max-pooling with backward passes that are fast on XLA:CPU; same values, same gradients.

XLA:CPU lowers the *weight* gradient of a convolution to a convolution whose "kernel" is the whole output map (e.g.
18×18 for the second conv of a small CNN), which its conv emitter runs many times slower than the forward pass; and
it lowers the backward of ``nn.max_pool`` to ``select_and_scatter``, again many times the forward. Both are replaced
here by exact reformulations in plain, differentiable JAX ops:

* :func:`conv_general_dilated` — a drop-in for ``lax.conv_general_dilated`` (pass it to ``nn.Conv`` as
  ``conv_general_dilated=...``; parameter names and shapes stay ``kernel [kh, kw, C_in, C_out]`` / ``bias``). Forward
  and input gradient are the native convolution ops; the weight gradient is, per kernel row ``i``,

      dW[i] = cols_iᵀ @ dY,   cols_i = [x̃[:, i·d + s·h, j·d + s·w, :] for j < kw] concatenated on channels,

  with x̃ the padded input, s the stride, d the kernel dilation; ``cols_i`` is ``[N·H_out·W_out, kw·C_in]`` and ``dY``
  ``[N·H_out·W_out, C_out]``, so each row is one GEMM (one GEMM over all ``kh·kw·C_in`` columns when that is small).
* :func:`max_pool_2x2` — 2×2 max-pooling, stride 2, SAME padding (−∞ at the bottom/right of odd sizes), written on a
  reshape of the four window positions; its derivative is the tangent of the *first* maximal element of each window
  in row-major order, which is exactly what ``jax.grad`` of ``nn.max_pool`` gives (its ``select_and_scatter`` picks
  the first of tied maxima).

Measured on this 2-core CPU (float32, medians of 7 after compile, shared machine, load ≈ 2; ``x`` = input, ``g`` =
output cotangent):

  ==============================================  ========  ======================================================
  op                                              native    here (other formulations tried)
  ==============================================  ========  ======================================================
  dW, conv 18×18, 32→64, 3×3, batch 256           459 ms    109 ms per-row GEMMs (one 9-tap im2col GEMM 140–150,
                                                            nine shifted GEMMs 123–282, im2col split in 4–64 batch
                                                            chunks 141–149, [9, M, C_in] stacked einsum 218–243,
                                                            4-D einsum per tap 529, channel-major layout 665)
  dW, conv 36×36, 1→32, 3×3, batch 256            56 ms     15 ms one im2col GEMM (per-row GEMMs 21)
  dX, conv 18×18, 32→64                           42 ms     kept native (GEMM + 9 shifted adds: 150 ms)
  max-pool 2×2 backward, 256×36×36×32             336 ms    58 ms (reshape + ``jnp.max`` differentiated by JAX:
                                                            149 ms, and it splits ties instead of picking one)
  ==============================================  ========  ======================================================

The weight gradient agrees with the native one to ~1e-6 relative (float32 summation order). ``impl`` selects the
formulation: ``'auto'`` (the default) uses the GEMM backward when JAX's default backend is the CPU and the native ops
elsewhere (GPU/TPU convolution libraries compute the weight gradient well); ``'gemm'`` / ``'native'`` force one.

Differentiability: the conv is a ``jax.custom_vjp`` whose backward is written in differentiable ops, so reverse-mode
of any order (``jax.grad`` of ``jax.grad``, as DGR needs), ``jax.vmap`` of its VJP (per-task Jacobians) and
``jax.jit`` work; forward-mode (``jax.jvp``, ``jax.jacfwd``) of the GEMM conv does not (a JAX limit of
``custom_vjp``) — use ``impl='native'`` for that. The max-pool is a ``jax.custom_jvp``: every mode works.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'native', 'gemm')
# At most this many im2col columns (kh·kw·C_in), one GEMM over all taps beats one GEMM per kernel row (the column
# copy is small; e.g. a first conv on grey images has 9 columns).
_ONE_GEMM_MAX_COLUMNS = 128


def check_impl(where: str, impl) -> None:
  if impl not in IMPLS:
    raise ValueError(f'{where}: got {impl!r}, expected one of {list(IMPLS)}')


def use_gemm(impl: str) -> bool:
  """Whether ``impl`` means the GEMM backward here: 'gemm', or 'auto' on the CPU backend (checked at trace time)."""
  check_impl('conv_impl', impl)
  return impl == 'gemm' or (impl == 'auto' and jax.default_backend() == 'cpu')


# ---------------------------------------------------------------------------------------------------------------
# Convolution.

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def _native(x, w, strides, pads, dilation, precision):
  return lax.conv_general_dilated(
      x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision
  )


def _weight_grad(x, g, kernel_shape, strides, pads, dilation, precision):
  """dW [kh, kw, C_in, C_out] of ``y = conv(x, W)`` for output cotangent ``g [N, H_out, W_out, C_out]`` (see the
  module docstring): one GEMM per kernel row, or one for all taps when ``kh·kw·C_in`` is small."""
  kh, kw, ci, co = kernel_shape
  n, ho, wo, _ = g.shape
  (sh, sw), (dh, dw) = strides, dilation
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))

  def tap(i, j):  # [N, H_out, W_out, C_in]: the inputs that kernel tap (i, j) multiplies
    start = (0, i * dh, j * dw, 0)
    return lax.slice(xp, start, (n, start[1] + sh * (ho - 1) + 1, start[2] + sw * (wo - 1) + 1, ci), (1, sh, sw, 1))

  g2 = g.reshape(n * ho * wo, co)

  def cols_t_dot_g(taps):  # [len(taps)·C_in, C_out]; contracting dim 0 of both, no transposed copy
    cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    return lax.dot_general(
        cols.reshape(n * ho * wo, -1),
        g2,
        (((0,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )

  if kh * kw * ci <= _ONE_GEMM_MAX_COLUMNS:
    dw_ = cols_t_dot_g([tap(i, j) for i in range(kh) for j in range(kw)]).reshape(kh, kw, ci, co)
  else:
    dw_ = jnp.stack([cols_t_dot_g([tap(i, j) for j in range(kw)]).reshape(kw, ci, co) for i in range(kh)])
  return dw_.astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_gemm(x, w, strides, pads, dilation, precision):
  return _native(x, w, strides, pads, dilation, precision)


def _conv_gemm_fwd(x, w, strides, pads, dilation, precision):
  return _native(x, w, strides, pads, dilation, precision), (x, w)


def _conv_gemm_bwd(strides, pads, dilation, precision, residuals, g):
  x, w = residuals
  # dX: the native transposed convolution (as fast as the forward on XLA:CPU); its own derivatives are native too.
  dx = jax.vjp(lambda x_: _native(x_, w, strides, pads, dilation, precision), x)[1](g)[0]
  dw_ = _weight_grad(x, g, w.shape, strides, pads, dilation, precision)
  return dx, dw_.astype(w.dtype)


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def _gemm_supported(
    lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count, preferred_element_type
) -> bool:
  if not _is_nhwc(dimension_numbers, lhs.ndim) or rhs.ndim != 4:
    return False
  if lhs_dilation is not None and tuple(lhs_dilation) != (1, 1):
    return False
  if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
    return False
  if not isinstance(padding, str) and any(lo < 0 or hi < 0 for lo, hi in padding):
    return False
  return True


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    impl: str = 'auto',
):
  """``lax.conv_general_dilated`` with the GEMM weight gradient (module docstring) when ``impl`` asks for it.

  The GEMM path covers 2-D NHWC/HWIO convolutions (what ``nn.Conv`` builds) with any strides, kernel dilation and
  non-negative padding ('SAME', 'VALID' or explicit pairs); anything else (grouped or transposed convolutions,
  other layouts) runs the native op. Values are the native op's in every case.
  """
  if use_gemm(impl) and _gemm_supported(
      lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count, preferred_element_type
  ):
    strides = tuple(int(s) for s in window_strides)
    dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1, 1)
    if isinstance(padding, str):
      # lax's own resolution of 'SAME' / 'VALID' (and 'SAME_LOWER') to (low, high) pairs on the dilated kernel.
      kernel = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation))
      pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], kernel, strides, padding))
    else:
      pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_gemm(lhs, rhs, strides, pads, dilation, precision)
  return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )


def conv_general_dilated_gemm(*args, **kwargs):
  """:func:`conv_general_dilated` with ``impl='gemm'``; a module-level function (not a ``functools.partial``, which
  compares by identity) so that two ``nn.Conv`` built with it compare and hash equal."""
  return conv_general_dilated(*args, **kwargs, impl='gemm')


def conv_fn(impl: str):
  """The ``conv_general_dilated`` to give ``nn.Conv`` for ``impl``, resolved at trace time: the native op (so the
  traced program is exactly ``nn.Conv``'s default) or :func:`conv_general_dilated_gemm`."""
  return conv_general_dilated_gemm if use_gemm(impl) else lax.conv_general_dilated


# ---------------------------------------------------------------------------------------------------------------
# Max-pooling.


def _window_parts(x):
  """The four positions of each 2×2 window, row-major: 4 × [N, H/2, W/2, C] (H, W even)."""
  n, h, w, c = x.shape
  r = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return [r[:, :, a, :, b, :] for a in (0, 1) for b in (0, 1)]


@jax.custom_jvp
def _max_pool_2x2_even(x):
  p = _window_parts(x)
  return jnp.maximum(jnp.maximum(p[0], p[1]), jnp.maximum(p[2], p[3]))


@_max_pool_2x2_even.defjvp
def _max_pool_2x2_even_jvp(primals, tangents):
  # dy = dx at the first maximal position of each window (row-major), as select_and_scatter's ``ge`` select picks;
  # linear in the tangent (where + add), so JAX transposes it for reverse mode and differentiates it again.
  # y through the custom_jvp function itself, so that a second derivative also follows this rule (jnp.maximum's
  # own derivative would split ties 1/2 : 1/2).
  (x,), (t,) = primals, tangents
  y = _max_pool_2x2_even(x)
  parts, tparts = _window_parts(x), _window_parts(t)
  taken = parts[0] == y
  dy = jnp.where(taken, tparts[0], jnp.zeros_like(tparts[0]))
  for p, tp in zip(parts[1:], tparts[1:]):
    first = (p == y) & ~taken
    dy = dy + jnp.where(first, tp, jnp.zeros_like(tp))
    taken = taken | first
  return y, dy


def max_pool_2x2(x, *, impl: str = 'auto'):
  """``nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')`` for ``x [N, H, W, C]`` → ``[N, ⌈H/2⌉, ⌈W/2⌉, C]``.

  ``impl`` as for the conv (module docstring): the reshape form on CPU for 'auto', ``nn.max_pool``'s
  ``reduce_window`` for 'native'. Odd H or W: SAME pads one row/column of −∞ at the bottom/right (as lax does),
  whose gradient is dropped.
  """
  if x.ndim != 4:
    raise ValueError(f'max_pool_2x2: got input shape {x.shape}, expected [N, H, W, C]')
  if not use_gemm(impl):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
  _, h, w, _ = x.shape
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
  return _max_pool_2x2_even(x)
