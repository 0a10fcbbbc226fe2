"""Tests of mtlmatch.models.cpu_ops: the GEMM-backward conv and the reshape max-pool equal the native lax / Flax ops
in value, gradient, vmapped VJP (per-task Jacobians) and grad-of-grad, including ties, odd sizes and every padding;
and the encoders built with conv_impl='gemm' equal those built with 'native' (same parameters, same gradients).

Shapes are small: on CPU most of the time is compiling each case once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mtlmatch.models import build_encoder, cpu_ops
from mtlmatch.tasks import TaskSpec

DN = ('NHWC', 'HWIO', 'NHWC')
TOL = dict(rtol=2e-5, atol=2e-5)


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _native(x, w, strides, padding, dilation=(1, 1)):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN)


def _gemm(x, w, strides, padding, dilation=(1, 1)):
  return cpu_ops.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN, impl='gemm')


# (input shape, kernel shape, strides, padding, kernel dilation): strides 1 and 2, SAME / explicit / VALID, odd
# sizes, 1×1 and non-square kernels, the one-GEMM path (few columns) and the per-row path (kh·kw·C_in > 128).
CASES = [
    ((2, 9, 7, 3), (3, 3, 3, 4), (1, 1), 'SAME', (1, 1)),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), 'SAME', (1, 1)),
    ((2, 8, 11, 17), (3, 3, 17, 5), (1, 1), 'SAME', (1, 1)),  # 153 columns: one GEMM per kernel row
    ((2, 11, 8, 17), (3, 3, 17, 5), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((2, 7, 9, 2), (3, 2, 2, 3), (2, 1), ((0, 2), (1, 0)), (1, 1)),
    ((2, 9, 9, 3), (4, 4, 3, 6), (4, 4), 'VALID', (1, 1)),  # ViT patch embedding (border dropped)
    ((2, 7, 7, 4), (1, 1, 4, 6), (2, 2), 'VALID', (1, 1)),  # ResNet shortcut
    ((2, 10, 9, 2), (3, 3, 2, 3), (1, 2), 'SAME', (2, 2)),  # kernel dilation
]


@pytest.mark.parametrize('xs,ws,strides,padding,dilation', CASES)
def test_conv_value_and_grads_match_native(xs, ws, strides, padding, dilation):
  x, w = _normal(xs, 0), _normal(ws, 1)
  y_native = _native(x, w, strides, padding, dilation)
  y_gemm = jax.jit(_gemm, static_argnums=(2, 3, 4))(x, w, strides, padding, dilation)
  np.testing.assert_array_equal(y_gemm, y_native)  # the forward *is* the native op
  g = _normal(y_native.shape, 2)
  _, vjp_native = jax.vjp(lambda x, w: _native(x, w, strides, padding, dilation), x, w)
  _, vjp_gemm = jax.vjp(lambda x, w: _gemm(x, w, strides, padding, dilation), x, w)
  for a, b in zip(vjp_gemm(g), vjp_native(g)):
    np.testing.assert_allclose(a, b, **TOL)


def test_conv_vmapped_vjp_matches_native():
  """Per-task Jacobian rows: the library vmaps one VJP over unit cotangents."""
  x, w = _normal((3, 8, 8, 5), 0), _normal((3, 3, 5, 4), 1)
  gs = _normal((2, 3, 8, 8, 4), 2)

  def jac(conv):
    _, vjp = jax.vjp(lambda x, w: jnp.tanh(conv(x, w, (1, 1), 'SAME')), x, w)
    return jax.jit(jax.vmap(vjp))(gs)

  for a, b in zip(jac(_gemm), jac(_native)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize('strides,padding', [((1, 1), 'SAME'), ((2, 2), ((1, 1), (1, 1)))])
def test_conv_grad_of_grad_matches_native(strides, padding):
  """DGR differentiates a gradient: d/dθ of a function of ∇_θ L must equal the native second derivative."""
  x, w = _normal((2, 7, 7, 3), 0), _normal((3, 3, 3, 4), 1)

  def outer(conv):
    def inner(w, x):
      return jnp.sum(jnp.tanh(conv(x, w, strides, padding)) ** 2)

    def penalty(w, x):
      gw, gx = jax.grad(inner, argnums=(0, 1))(w, x)
      return jnp.sum(gw**2) + jnp.sum(jnp.sin(gx))

    return jax.grad(penalty, argnums=(0, 1))(w, x)

  for a, b in zip(outer(_gemm), outer(_native)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_unsupported_cases_fall_back_to_native():
  x, w = _normal((2, 6, 6, 4), 0), _normal((3, 3, 2, 4), 1)
  grouped = cpu_ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2, impl='gemm')
  np.testing.assert_array_equal(
      grouped, lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2)
  )
  xt = jnp.transpose(x, (0, 3, 1, 2))  # NCHW, lax's default layout
  wt = jnp.transpose(_normal((3, 3, 4, 2), 2), (3, 2, 0, 1))
  np.testing.assert_array_equal(
      cpu_ops.conv_general_dilated(xt, wt, (1, 1), 'SAME', impl='gemm'),
      lax.conv_general_dilated(xt, wt, (1, 1), 'SAME'),
  )


def test_impl_resolution_and_errors():
  assert cpu_ops.use_gemm('gemm') and not cpu_ops.use_gemm('native')
  assert cpu_ops.use_gemm('auto') == (jax.default_backend() == 'cpu')
  assert cpu_ops.conv_fn('native') is lax.conv_general_dilated
  assert cpu_ops.conv_fn('gemm') is cpu_ops.conv_general_dilated_gemm
  with pytest.raises(ValueError, match=r"conv_impl: got 'fast', expected one of \['auto', 'native', 'gemm'\]"):
    cpu_ops.use_gemm('fast')
  with pytest.raises(ValueError, match=r"encoder 'cnn' conv_impl: got 'fast', expected one of"):
    build_encoder('cnn', conv_impl='fast')
  with pytest.raises(ValueError, match=r'max_pool_2x2: got input shape \(4, 4, 1\), expected \[N, H, W, C\]'):
    cpu_ops.max_pool_2x2(jnp.zeros((4, 4, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Max-pooling.


def _native_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')


def _pool(x):
  return cpu_ops.max_pool_2x2(x, impl='gemm')


@pytest.mark.parametrize('shape', [(2, 8, 6, 3), (2, 7, 5, 3), (1, 1, 1, 2), (2, 3, 4, 1)])
@pytest.mark.parametrize('tied', [False, True])
def test_max_pool_value_and_grad_match_native(shape, tied):
  x = _normal(shape, 0)
  if tied:  # coarse values: many windows hold several equal maxima (and the native op picks the first)
    x = jnp.round(x)
  y = _pool(x)
  np.testing.assert_array_equal(y, _native_pool(x))
  g = _normal(y.shape, 1)
  np.testing.assert_array_equal(jax.vjp(_pool, x)[1](g)[0], jax.vjp(_native_pool, x)[1](g)[0])


def test_max_pool_all_ties_go_to_the_first_position():
  x = jnp.ones((1, 4, 4, 1))
  grad = jax.grad(lambda x: _pool(x).sum())(x)[0, :, :, 0]
  np.testing.assert_array_equal(grad, jax.grad(lambda x: _native_pool(x).sum())(x)[0, :, :, 0])
  np.testing.assert_array_equal(grad[::2, ::2], np.ones((2, 2)))
  assert float(grad.sum()) == 4.0


def test_max_pool_vmap_jvp_and_grad_of_grad_match_native():
  x = jnp.round(_normal((3, 2, 6, 5, 2), 0) * 2) / 2  # ties included
  gs = _normal((3, 2, 3, 3, 2), 1)
  np.testing.assert_array_equal(
      jax.vmap(lambda x, g: jax.vjp(_pool, x)[1](g)[0])(x, gs),
      jax.vmap(lambda x, g: jax.vjp(_native_pool, x)[1](g)[0])(x, gs),
  )
  t = _normal(x.shape[1:], 2)
  np.testing.assert_array_equal(jax.jvp(_pool, (x[0],), (t,))[1], jax.jvp(_native_pool, (x[0],), (t,))[1])

  def outer(pool):
    return jax.grad(lambda x: jnp.sum(jnp.sin(jax.grad(lambda x: jnp.sum(pool(x) ** 3))(x))))(x[0])

  np.testing.assert_allclose(outer(_pool), outer(_native_pool), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: 'gemm' and 'native' build the same parameters and compute the same features and gradients.


@pytest.mark.parametrize(
    'name,kwargs,shape',
    [
        ('cnn', dict(widths=(4, 8), features=8), (9, 9, 1)),
        ('resnet18', dict(width=2, stage_sizes=(1, 1)), (9, 9, 3)),
        ('vit_tiny', dict(dim=8, depth=1, num_heads=2), (9, 9, 1)),
    ],
)
def test_encoders_gemm_equal_native(name, kwargs, shape):
  x = _normal((4, *shape), 0)
  enc_native = build_encoder(name, conv_impl='native', **kwargs)
  enc_gemm = build_encoder(name, conv_impl='gemm', **kwargs)
  variables = enc_native.init(jax.random.PRNGKey(0), x, train=False)
  assert jax.tree.structure(enc_gemm.init(jax.random.PRNGKey(0), x, train=False)) == jax.tree.structure(variables)
  assert jax.tree.map(jnp.shape, enc_gemm.init(jax.random.PRNGKey(0), x, train=False)) == jax.tree.map(
      jnp.shape, variables
  )

  def loss(enc):
    def f(params):
      out = enc.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])[0]
      return jnp.sum(jnp.tanh(out))

    return jax.jit(jax.value_and_grad(f))(variables['params'])

  (v_gemm, g_gemm), (v_native, g_native) = loss(enc_gemm), loss(enc_native)
  np.testing.assert_allclose(v_gemm, v_native, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_gemm, g_native)
  assert enc_gemm == build_encoder(name, conv_impl='gemm', **kwargs)  # hashable, equal: a static jit argument
  assert hash(enc_gemm) == hash(build_encoder(name, conv_impl='gemm', **kwargs))


def test_config_key_reaches_conv_encoders_and_is_checked():
  # conv_impl is a field of every conv encoder, so it is the key encoder.kwargs.conv_impl (default 'auto').
  from mtlmatch import config_lib, models  # pylint: disable=import-outside-toplevel

  for name in ('cnn', 'resnet18', 'vit_tiny'):
    assert config_lib.encoder_kwargs(name)['conv_impl'] == 'auto'
  assert 'conv_impl' not in config_lib.encoder_kwargs('mlp')
  config = config_lib.base_config()
  config.encoder.kwargs.conv_impl = 'native'
  model = models.build_model(
      {'t': TaskSpec('t', 'multiclass', 3)}, encoder='cnn', encoder_kwargs=dict(config.encoder.kwargs)
  )
  assert model.encoder.conv_impl == 'native'
  with pytest.raises(ValueError, match=r"encoder 'cnn' conv_impl: got 'fast', expected one of"):
    models.build_model({'t': TaskSpec('t', 'multiclass', 3)}, encoder='cnn', encoder_kwargs={'conv_impl': 'fast'})


def test_cnn_pool_then_relu_equals_relu_then_pool():
  """CNNEncoder pools before its ReLU: the same function and gradient as the usual ReLU → pool, ties included."""
  x = jnp.round(_normal((2, 7, 6, 3), 0) * 2) / 2
  g = _normal((2, 4, 3, 3), 1)
  for pool in (_pool, _native_pool):
    a = jax.vjp(lambda x: jax.nn.relu(pool(x)), x)
    b = jax.vjp(lambda x: pool(jax.nn.relu(x)), x)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1](g)[0], b[1](g)[0])
