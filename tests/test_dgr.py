"""Dummy gradient norm (DGR, docs/maths.md): closed form for a linear head, double backprop, dummy initialisation."""

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


def _np_dummy_grads(f, labels, w, b, select):
  """Closed-form gradient (∇_W, ∇_b) of the mean softmax CE over the selected labelled examples."""
  y = np.eye(w.shape[-1])[np.where(labels == -1, 0, labels)]
  m = select.astype(np.float64)[:, None]
  err = m * (_np_softmax(f @ w + b) - y) / max(m.sum(), 1)
  return f.T @ err, err.sum(0)


def test_unbiased_norm_closed_form_on_the_two_halves():
  # sq_l2_unbiased = ⟨g_1, g_2⟩, g_h the dummy gradient of half h of the labelled examples in batch order.
  features, labels, dummies = _problem(seed=3, b=11)
  got = losses.dummy_gradient_norm(
      features, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent, norm='sq_l2_unbiased'
  )
  labelled = np.flatnonzero(labels != -1)
  first = np.zeros(len(labels), bool)
  first[labelled[: len(labelled) // 2]] = True
  second = (labels != -1) & ~first
  f = np.asarray(features, np.float64)
  values = []
  for w, b in zip(np.asarray(dummies['w'], np.float64), np.asarray(dummies['b'], np.float64)):
    (w1, b1), (w2, b2) = _np_dummy_grads(f, labels, w, b, first), _np_dummy_grads(f, labels, w, b, second)
    values.append(np.sum(w1 * w2) + np.sum(b1 * b2))
  np.testing.assert_allclose(got, np.mean(values), rtol=1e-4, atol=1e-7)


def test_unbiased_norm_is_unbiased_and_sq_l2_is_not():
  # A population of N examples and one dummy head: ‖g‖² of the full data vs the mean over many random batches of B
  # (drawn with replacement, so examples are i.i.d.). E sq_l2 = ‖g‖² + tr Σ / B; E sq_l2_unbiased = ‖g‖².
  rng = np.random.default_rng(0)
  n, d, c, batch, draws = 400, 5, 3, 16, 4000
  f = rng.standard_normal((n, d))
  labels = rng.integers(0, c, n).astype(np.int32)
  w, b = rng.standard_normal((d, c)) * 0.3, np.zeros(c)
  all_rows = np.ones(n, bool)
  gw, gb = _np_dummy_grads(f, labels, w, b, all_rows)
  true_sq = np.sum(gw**2) + np.sum(gb**2)
  per_example = [
      np.concatenate([x.ravel() for x in _np_dummy_grads(f[i : i + 1], labels[i : i + 1], w, b, np.ones(1, bool))])
      for i in range(n)
  ]
  trace_cov = np.sum(np.var(np.stack(per_example), axis=0))  # population covariance (draws with replacement)
  dummies = {'w': w[None].astype(np.float32), 'b': b[None].astype(np.float32)}
  idx = rng.integers(0, n, (draws, batch))

  def penalty(rows, norm):
    return losses.dummy_gradient_norm(
        jnp.asarray(f, jnp.float32)[rows],
        jnp.asarray(labels)[rows],
        dummies,
        head_apply=_linear,
        loss_fn=losses.softmax_xent,
        norm=norm,
    )

  results = {}
  for norm in ('sq_l2', 'sq_l2_unbiased'):
    values = np.asarray(jax.jit(jax.vmap(lambda r, norm=norm: penalty(r, norm)))(idx), np.float64)
    results[norm] = (values.mean(), values.std() / np.sqrt(draws))
  mean_unbiased, se_unbiased = results['sq_l2_unbiased']
  mean_sq, se_sq = results['sq_l2']
  assert abs(mean_unbiased - true_sq) < 4 * se_unbiased, (mean_unbiased, true_sq, se_unbiased)
  assert abs(mean_sq - (true_sq + trace_cov / batch)) < 4 * se_sq, (mean_sq, true_sq + trace_cov / batch, se_sq)
  assert mean_sq - true_sq > 10 * se_sq  # the bias is real and visible at this batch size


def _problem(seed=0, b=8, d=6, c=4, k=3):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((b, d)).astype(np.float32)
  labels = rng.integers(0, c, b).astype(np.int32)
  labels[rng.random(b) < 0.3] = -1
  dummies = {
      'w': rng.standard_normal((k, d, c)).astype(np.float32) * 0.5,
      'b': rng.standard_normal((k, c)).astype(np.float32) * 0.1,
  }
  return features, labels, dummies


@pytest.mark.parametrize('norm', ['sq_l2', 'l2'])
def test_linear_head_closed_form(norm):
  features, labels, dummies = _problem()
  got = losses.dummy_gradient_norm(
      features, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent, norm=norm
  )
  np.testing.assert_allclose(got, _ref_penalty(features, labels, dummies, norm), rtol=1e-5)


def test_double_backprop_matches_finite_differences():
  features, labels, dummies = _problem(seed=1, b=5, d=3, c=3, k=2)
  with jax.enable_x64(True):
    dummies64 = jax.tree_util.tree_map(lambda x: x.astype(np.float64), dummies)
    for norm in ('sq_l2', 'l2', 'sq_l2_unbiased'):
      f = jax.jit(
          lambda feats: losses.dummy_gradient_norm(
              feats, labels, dummies64, head_apply=_linear, loss_fn=losses.softmax_xent, norm=norm
          )
      )
      check_grads(f, (features.astype(np.float64),), order=1, modes=['rev'], atol=1e-6, rtol=1e-5)
    # And for a multilabel task with sigmoid_xent.
    ym = np.random.default_rng(2).integers(-1, 2, (5, 3)).astype(np.int32)
    g = jax.jit(
        lambda feats: losses.dummy_gradient_norm(feats, ym, dummies64, head_apply=_linear, loss_fn=losses.sigmoid_xent)
    )
    check_grads(g, (features.astype(np.float64),), order=1, modes=['rev'], atol=1e-6, rtol=1e-5)


def test_dummies_are_never_trained_and_zero_gradient_is_safe():
  features, labels, dummies = _problem()
  f = lambda feats, d, norm: losses.dummy_gradient_norm(
      feats, labels, d, head_apply=_linear, loss_fn=losses.softmax_xent, norm=norm
  )
  g = jax.grad(f, argnums=1)(features, dummies, 'sq_l2')
  for leaf in jax.tree_util.tree_leaves(g):
    np.testing.assert_array_equal(leaf, 0)
  # All labels missing: the dummy loss is 0, its gradient is 0, and the l2 norm's gradient stays finite (0).
  none = np.full_like(labels, -1)
  for norm in ('sq_l2', 'l2'):
    value, grad = jax.value_and_grad(
        lambda x: losses.dummy_gradient_norm(
            x, none, dummies, head_apply=_linear, loss_fn=losses.softmax_xent, norm=norm
        )
    )(features)
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
  value = losses.dummy_gradient_norm(
      features, jnp.array([1, -1]), dummies, head_apply=apply, loss_fn=losses.softmax_xent
  )
  assert np.isfinite(value) and value > 0


def test_sharded_batch_matches_unsharded():
  features, labels, dummies = _problem(b=16)

  @jax.jit
  def value_and_grad(feats, labels):
    return jax.value_and_grad(
        lambda x: losses.dummy_gradient_norm(x, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent)
    )(feats)

  eager = jax.value_and_grad(
      lambda x: losses.dummy_gradient_norm(x, labels, dummies, head_apply=_linear, loss_fn=losses.softmax_xent)
  )(features)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  for out in (
      value_and_grad(features, labels),
      value_and_grad(jax.device_put(features, shard), jax.device_put(labels, shard)),
  ):
    np.testing.assert_allclose(out[0], eager[0], rtol=1e-5)
    np.testing.assert_allclose(out[1], eager[1], rtol=1e-4, atol=1e-7)


def test_validation_errors():
  features, labels, dummies = _problem()
  call = lambda d, **kw: losses.dummy_gradient_norm(
      features, labels, d, head_apply=_linear, loss_fn=losses.softmax_xent, **kw
  )
  with pytest.raises(ValueError, match=r"norm: got 'l1'"):
    call(dummies, norm='l1')
  with pytest.raises(ValueError, match=r'dummy_params: got leaves with leading dimensions'):
    call({'w': dummies['w'], 'b': dummies['b'][:2]})
  with pytest.raises(ValueError, match=r'dummy_params: got an empty pytree'):
    call({})
  with pytest.raises(ValueError, match=r'num_dummies: got 0'):
    losses.init_dummy_params(nn.Dense(2), jax.random.key(0), features, num_dummies=0)
