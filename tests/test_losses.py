"""softmax_xent, sigmoid_xent and masked_mean against hand-written numpy references (docs/maths.md §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlmatch import losses


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_softmax_xent(z, y):
  z = np.asarray(z, np.float64)
  per, w = np.zeros(len(y)), np.zeros(len(y))
  for n, label in enumerate(y):
    if label != -1:
      per[n] = -_np_log_softmax(z[n])[label]
      w[n] = 1
  return per, w


def _np_sigmoid_xent(z, y):
  z = np.asarray(z, np.float64)
  per, w = np.zeros(len(y)), np.zeros(len(y))
  for n in range(len(y)):
    terms = [
        np.logaddexp(0, -z[n, k]) if y[n, k] == 1 else np.logaddexp(0, z[n, k])
        for k in range(z.shape[1])
        if y[n, k] != -1
    ]
    if terms:
      per[n], w[n] = np.mean(terms), 1
  return per, w


def _np_masked_mean(v, w):
  return float(np.sum(v * w) / max(np.sum(w), 1))


def _data(seed=0, b=16, c=5, scale=3.0):
  rng = np.random.default_rng(seed)
  z = (scale * rng.standard_normal((b, c))).astype(np.float32)
  y = rng.integers(0, c, b).astype(np.int32)
  y[rng.random(b) < 0.3] = -1
  ym = rng.integers(0, 2, (b, c)).astype(np.int32)
  ym[rng.random((b, c)) < 0.4] = -1
  ym[0] = -1  # one example with no labelled entry at all
  return z, y, ym


@pytest.mark.parametrize(
    'loss, reference, labels',
    [(losses.softmax_xent, _np_softmax_xent, 1), (losses.sigmoid_xent, _np_sigmoid_xent, 2)],
    ids=['softmax', 'sigmoid'],
)
def test_task_loss_matches_reference(loss, reference, labels):
  data = _data()
  z, y = data[0], data[labels]
  per, w = loss(z, y)
  ref_per, ref_w = reference(z, y)
  np.testing.assert_allclose(per, ref_per, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(w, ref_w)
  np.testing.assert_allclose(losses.masked_mean(per, w), _np_masked_mean(ref_per, ref_w), rtol=1e-5)


def test_softmax_xent_docstring_example():
  per, w = losses.softmax_xent(jnp.zeros((2, 4)), jnp.array([1, -1]))
  np.testing.assert_allclose(per, [np.log(4), 0], rtol=1e-6)
  np.testing.assert_array_equal(w, [1, 0])


def test_missing_labels_have_zero_value_and_gradient():
  z, y, ym = _data()
  g = jax.grad(lambda z: jnp.sum(losses.softmax_xent(z, y)[0]))(z)
  np.testing.assert_array_equal(g[y == -1], 0)
  assert np.all(np.abs(g[y != -1]).sum(-1) > 0)
  gm = jax.grad(lambda z: jnp.sum(losses.sigmoid_xent(z, ym)[0]))(z)
  np.testing.assert_array_equal(gm[ym == -1], 0)


@pytest.mark.parametrize('which', ['softmax', 'sigmoid'])
def test_all_missing_batch_is_zero_with_finite_gradient(which):
  z, y, ym = _data()
  fn, labels = (
      (losses.softmax_xent, np.full_like(y, -1)) if which == 'softmax' else (losses.sigmoid_xent, np.full_like(ym, -1))
  )
  f = lambda z: losses.masked_mean(*fn(z, labels))
  value, g = jax.value_and_grad(f)(z)
  assert float(value) == 0.0
  np.testing.assert_array_equal(g, 0)


def test_huge_logits_are_finite():
  z, y, ym = _data(scale=1.0)
  z = np.sign(z) * 1e4
  for fn, labels in ((losses.softmax_xent, y), (losses.sigmoid_xent, ym)):
    f = lambda z: losses.masked_mean(*fn(z, labels))
    value, g = jax.value_and_grad(f)(jnp.asarray(z))
    assert np.isfinite(value) and np.all(np.isfinite(g))
  # Exact at this magnitude: a confidently wrong class costs 2e4 nats.
  per, _ = losses.softmax_xent(jnp.array([[1e4, -1e4]]), jnp.array([1]))
  np.testing.assert_allclose(per, [2e4], rtol=1e-6)
  per, _ = losses.sigmoid_xent(jnp.array([[1e4, -1e4]]), jnp.array([[0, 0]]))
  np.testing.assert_allclose(per, [5e3], rtol=1e-6)


def test_masked_mean():
  v = np.array([1.0, 2.0, 3.0, np.nan], np.float32)
  w = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  assert float(losses.masked_mean(v, w)) == 2.0  # NaN under weight 0 does not leak
  assert float(losses.masked_mean(v[:3], np.zeros(3))) == 0.0
  # max(Σw, 1): fractional total weight below 1 divides by 1.
  np.testing.assert_allclose(losses.masked_mean(np.array([4.0]), np.array([0.5])), 2.0)


def test_vmap_over_examples():
  z, y, ym = _data()
  per, w = jax.vmap(losses.softmax_xent)(z, y)
  np.testing.assert_allclose(per, losses.softmax_xent(z, y)[0], rtol=1e-6)
  per, w = jax.vmap(losses.sigmoid_xent)(z, ym)
  np.testing.assert_allclose(per, losses.sigmoid_xent(z, ym)[0], rtol=1e-6)


def test_jit_and_sharded_batch_match_eager():
  z, y, ym = _data(b=16)

  def f(z, y, ym):
    a = losses.softmax_xent(z, y)
    b = losses.sigmoid_xent(z, ym)
    return a, b, losses.masked_mean(*a) + losses.masked_mean(*b)

  eager = f(z, y, ym)
  jitted = jax.jit(f)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  sharded = jitted(*(jax.device_put(x, shard) for x in (z, y, ym)))
  for out in (jitted(z, y, ym), sharded):
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    'call, match',
    [
        (lambda: losses.softmax_xent(np.zeros((4, 3)), np.array([0, 1, 3, -1])), r'labels: got value 3.*\[-1, 3\)'),
        (lambda: losses.softmax_xent(np.zeros((4, 3)), np.array([0, 1, -2, -1])), r'labels: got value -2'),
        (lambda: losses.softmax_xent(np.zeros((4, 3)), np.array([0, 1, 2])), r'labels: got shape \(3,\).*\(4,\)'),
        (lambda: losses.softmax_xent(np.zeros((4, 3)), np.zeros(4, np.float32)), r'labels: got dtype float32'),
        (
            lambda: losses.sigmoid_xent(np.zeros((2, 3)), np.array([[0, 1, 2], [0, 0, 0]])),
            r'labels: got value 2.*\{-1, 0, 1\}',
        ),
        (lambda: losses.sigmoid_xent(np.zeros((2, 3)), np.zeros((2, 4), np.int32)), r'labels: got shape \(2, 4\)'),
        (lambda: losses.masked_mean(np.zeros(3), np.zeros(4)), r'weights: got shape \(4,\)'),
        (lambda: losses.softmax_xent(np.zeros(()), np.zeros((), np.int32)), r'logits: got shape \(\)'),
    ],
)
def test_validation_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_label_range_checks_skip_under_jit():
  # Inside jit the values are unknown: only shapes are checked, and it must not raise.
  out = jax.jit(losses.softmax_xent)(jnp.zeros((2, 3)), jnp.array([0, -1]))
  np.testing.assert_allclose(out[0], [np.log(3), 0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Out-of-range labels inside jit (where no value check can raise): weight 0, as if missing, and counted.


def test_out_of_range_labels_under_jit_weigh_zero_and_are_counted():
  # Label 9 of a 7-class task gave NaN with weight 1, and a multilabel 2 a finite log 2: now both weigh 0.
  per, w = jax.jit(losses.softmax_xent)(jnp.zeros((3, 7)), jnp.array([1, 9, -2]))
  np.testing.assert_allclose(per, [np.log(7), 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(w, [1, 0, 0])
  labels = jnp.array([[2, 0, -1], [1, -3, 1], [2, 2, -1]])
  per, w = jax.jit(losses.sigmoid_xent)(jnp.zeros((3, 3)), labels)
  np.testing.assert_allclose(per, [np.log(2), np.log(2), 0], rtol=1e-6)  # the mean over the valid entries only
  np.testing.assert_array_equal(w, [1, 1, 0])
  count = jax.jit(losses.invalid_label_count, static_argnums=(0, 2))
  assert int(count('multiclass', jnp.array([1, 9, -1, -2, 6, 7]), 7)) == 3  # -1 is missing, not invalid
  assert int(count('multilabel', labels, 3)) == 4
  assert int(count('multiclass', jnp.array([0, -1, 6]), 7)) == 0
  # Eager calls still raise, naming the value.
  with pytest.raises(ValueError, match=r'got value 9, expected values in \[-1, 7\)'):
    losses.softmax_xent(jnp.zeros((2, 7)), jnp.array([1, 9]))
  with pytest.raises(ValueError, match=r'got value 2, expected values in \{-1, 0, 1\}'):
    losses.sigmoid_xent(jnp.zeros((3, 3)), labels)
  with pytest.raises(ValueError, match=r"kind: got 'binary'"):
    losses.invalid_label_count('binary', labels, 3)


def test_out_of_range_labels_under_jit_are_missing_for_the_pair_losses_and_counts():
  rng = np.random.default_rng(0)
  za, zb = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  r = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], jnp.float32)
  ya, ya_missing = jnp.array([0, 5, -1, 2]), jnp.array([0, -1, -1, 2])
  yb, yb_missing = jnp.array([[1, 0], [-1, -1], [3, 1], [-1, -1]]), jnp.array([[1, 0], [-1, -1], [-1, 1], [-1, -1]])
  co = jax.jit(lambda *args: losses.co_annotation(*args, r, b_kind='multilabel'))
  for got, want in zip(co(za, zb, ya, yb), co(za, zb, ya_missing, yb_missing)):
    np.testing.assert_array_equal(got, want)
  counts = jax.jit(lambda *args: losses.relatedness_soft_counts(*args, b_kind='multilabel'))
  for got, want in zip(counts(za, zb, ya, yb), counts(za, zb, ya_missing, yb_missing)):
    np.testing.assert_array_equal(got, want)
