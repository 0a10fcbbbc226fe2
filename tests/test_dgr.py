"""Dummy gradient norm (DGR, DESIGN.md §4): closed form for a linear head, double backprop, dummy initialisation."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from mtlmatch import losses


def _linear(params, features):
  return features @ params['w'] + params['b']


def _np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def _ref_penalty(features, labels, dummies, norm='sq_l2'):
  """Closed form for a linear head and mean softmax CE over the labelled examples:
  ∇_W = Fᵀ M (softmax(FW + b) − Y) / n,  ∇_b = Σ_n M (softmax − Y) / n, with M the label mask and n = max(Σ M, 1)."""
  f = np.asarray(features, np.float64)
  present = (labels != -1).astype(np.float64)[:, None]
  y = np.eye(dummies['w'].shape[-1])[np.where(labels == -1, 0, labels)]
  n = max(present.sum(), 1)
  values = []
  for w, b in zip(np.asarray(dummies['w'], np.float64), np.asarray(dummies['b'], np.float64)):
    err = present * (_np_softmax(f @ w + b) - y) / n
    sq = np.sum((f.T @ err) ** 2) + np.sum(err.sum(0) ** 2)
    values.append(sq if norm == 'sq_l2' else np.sqrt(sq))
  return np.mean(values)


def _problem(seed=0, b=8, d=6, c=4, k=3):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((b, d)).astype(np.float32)
  labels = rng.integers(0, c, b).astype(np.int32)
  labels[rng.random(b) < 0.3] = -1
  dummies = {'w': rng.standard_normal((k, d, c)).astype(np.float32) * 0.5,
             'b': rng.standard_normal((k, c)).astype(np.float32) * 0.1}
  return features, labels, dummies


@pytest.mark.parametrize('norm', ['sq_l2', 'l2'])
def test_linear_head_closed_form(norm):
  features, labels, dummies = _problem()
  got = losses.dummy_gradient_norm(features, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent,
                                   norm=norm)
  np.testing.assert_allclose(got, _ref_penalty(features, labels, dummies, norm), rtol=1e-5)


def test_double_backprop_matches_finite_differences():
  features, labels, dummies = _problem(seed=1, b=5, d=3, c=3, k=2)
  with jax.enable_x64(True):
    dummies64 = jax.tree_util.tree_map(lambda x: x.astype(np.float64), dummies)
    for norm in ('sq_l2', 'l2'):
      f = jax.jit(lambda feats: losses.dummy_gradient_norm(feats, labels, dummies64, head_apply=_linear,
                                                           loss_fn=losses.softmax_xent, norm=norm))
      check_grads(f, (features.astype(np.float64),), order=1, modes=['rev'], atol=1e-6, rtol=1e-5)
    # And for a multilabel task with sigmoid_xent.
    ym = np.random.default_rng(2).integers(-1, 2, (5, 3)).astype(np.int32)
    g = jax.jit(lambda feats: losses.dummy_gradient_norm(feats, ym, dummies64, head_apply=_linear,
                                                         loss_fn=losses.sigmoid_xent))
    check_grads(g, (features.astype(np.float64),), order=1, modes=['rev'], atol=1e-6, rtol=1e-5)


def test_dummies_are_never_trained_and_zero_gradient_is_safe():
  features, labels, dummies = _problem()
  f = lambda feats, d, norm: losses.dummy_gradient_norm(feats, labels, d, head_apply=_linear,
                                                        loss_fn=losses.softmax_xent, norm=norm)
  g = jax.grad(f, argnums=1)(features, dummies, 'sq_l2')
  for leaf in jax.tree_util.tree_leaves(g):
    np.testing.assert_array_equal(leaf, 0)
  # All labels missing: the dummy loss is 0, its gradient is 0, and the l2 norm's gradient stays finite (0).
  none = np.full_like(labels, -1)
  for norm in ('sq_l2', 'l2'):
    value, grad = jax.value_and_grad(lambda x: losses.dummy_gradient_norm(
        x, none, dummies, head_apply=_linear, loss_fn=losses.softmax_xent, norm=norm))(features)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0)


def test_init_dummy_params_uses_the_head_initializer():
  head = nn.Dense(4)
  features = jnp.ones((2, 6))
  rng = jax.random.key(0)
  dummies = losses.init_dummy_params(head, rng, features, num_dummies=3, scale=0.5)
  assert dummies['kernel'].shape == (3, 6, 4) and dummies['bias'].shape == (3, 4)
  for k, key in enumerate(jax.random.split(rng, 3)):
    want = head.init(key, features)['params']
    np.testing.assert_allclose(dummies['kernel'][k], 0.5 * want['kernel'], rtol=1e-6)
    np.testing.assert_allclose(dummies['bias'][k], 0.5 * want['bias'], rtol=1e-6)
  assert not np.allclose(dummies['kernel'][0], dummies['kernel'][1])
  # The Flax head plugs into the penalty unchanged.
  apply = lambda p, f: head.apply({'params': p}, f)
  value = losses.dummy_gradient_norm(features, jnp.array([1, -1]), dummies, head_apply=apply,
                                     loss_fn=losses.softmax_xent)
  assert np.isfinite(value) and value > 0


def test_sharded_batch_matches_unsharded():
  features, labels, dummies = _problem(b=16)

  @jax.jit
  def value_and_grad(feats, labels):
    return jax.value_and_grad(lambda x: losses.dummy_gradient_norm(
        x, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent))(feats)

  eager = jax.value_and_grad(lambda x: losses.dummy_gradient_norm(
      x, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent))(features)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  for out in (value_and_grad(features, labels),
              value_and_grad(jax.device_put(features, shard), jax.device_put(labels, shard))):
    np.testing.assert_allclose(out[0], eager[0], rtol=1e-5)
    np.testing.assert_allclose(out[1], eager[1], rtol=1e-4, atol=1e-7)


def test_validation_errors():
  features, labels, dummies = _problem()
  call = lambda d, **kw: losses.dummy_gradient_norm(features, labels, d, head_apply=_linear,
                                                    loss_fn=losses.softmax_xent, **kw)
  with pytest.raises(ValueError, match=r"norm: got 'l1'"):
    call(dummies, norm='l1')
  with pytest.raises(ValueError, match=r'dummy_params: got leaves with leading dimensions'):
    call({'w': dummies['w'], 'b': dummies['b'][:2]})
  with pytest.raises(ValueError, match=r'dummy_params: got an empty pytree'):
    call({})
  with pytest.raises(ValueError, match=r'num_dummies: got 0'):
    losses.init_dummy_params(nn.Dense(2), jax.random.key(0), features, num_dummies=0)
