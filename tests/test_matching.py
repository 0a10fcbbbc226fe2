"""Distribution matching and soft co-annotation against hand-written numpy references (docs/maths.md §2–§4)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from mtlmatch import losses

EPS = 1e-4


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _log_sigmoid(z):
  return -np.logaddexp(0, -z)


def _xlogx(q):
  return np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0.0)


def _h(q, logp, log1mp, kind, divergence):
  """H(q, p) (or KL(q‖p)) for one example."""
  if kind == 'multilabel':
    h = -np.mean(q * logp + (1 - q) * log1mp)
    return h + (np.mean(_xlogx(q) + _xlogx(1 - q)) if divergence == 'kl' else 0)
  h = -np.sum(q * logp)
  return h + (np.sum(_xlogx(q)) if divergence == 'kl' else 0)


def _q_a(pb, logpb, log1mpb, r, kind, mode, log_prior=0.0):
  """Implied A distribution, one example: virtual evidence P(p_B | a = i) (bayes) or prototype scores, times π_A."""
  s = np.zeros(r.shape[0])
  for i in range(r.shape[0]):
    if mode == 'bayes':
      rt = np.clip(r[i], EPS, 1 - EPS)
      if kind == 'multilabel':  # Π_k P(observing p_k | a = i) = Π_k (p_k R_ik + (1 − p_k)(1 − R_ik))
        s[i] = np.sum(np.log(pb * rt + (1 - pb) * (1 - rt)))
      else:  # P(observing p | a = i) = Σ_k p_k R_ik
        s[i] = np.log(np.sum(pb * rt))
    else:
      members = r[i] >= 0.5
      s[i] = np.mean(logpb[members]) if members.any() else np.mean(log1mpb)
  return np.exp(_log_softmax(s + log_prior))


def _ref_dm(za, zb, r, kind, direction, mode, divergence, prior='model'):
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  out = np.zeros(len(za))
  for n in range(len(za)):
    logpa = _log_softmax(za[n])
    if kind == 'multilabel':
      logpb, log1mpb = _log_sigmoid(zb[n]), _log_sigmoid(-zb[n])
    else:
      logpb = _log_softmax(zb[n])
      log1mpb = np.log1p(-np.exp(logpb))
    pa, pb = np.exp(logpa), np.exp(logpb)
    if direction in ('a_to_b', 'both'):
      out[n] += _h(pa @ r, logpb, log1mpb, kind, divergence)
    if direction in ('b_to_a', 'both'):
      log_prior = {'model': logpa, 'uniform': 0.0}[prior] if isinstance(prior, str) else np.log(prior)
      out[n] += _h(_q_a(pb, logpb, log1mpb, r, kind, mode, log_prior), logpa, None, 'multiclass', divergence)
  return out


def _ref_co(za, zb, ya, yb, r, kind, prior='model'):
  za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
  per, w = np.zeros(len(za)), np.zeros(len(za))
  for n in range(len(za)):
    has_a = ya[n] != -1
    has_b = np.any(yb[n] != -1)
    if has_a and not has_b:
      if kind == 'multilabel':
        per[n] = _h(r[ya[n]], _log_sigmoid(zb[n]), _log_sigmoid(-zb[n]), kind, 'xent')
      else:
        per[n] = _h(r[ya[n]], _log_softmax(zb[n]), None, kind, 'xent')
      w[n] = 1
    elif has_b and not has_a:
      rt = np.clip(r, EPS, 1 - EPS)
      if kind == 'multilabel':
        s = np.zeros(r.shape[0])
        for k in np.nonzero(yb[n] != -1)[0]:  # only labelled entries
          s += np.log(rt[:, k]) if yb[n, k] == 1 else np.log(1 - rt[:, k])
      else:
        s = np.log(rt[:, yb[n]])
      if prior == 'model':  # the model's own prediction, re-weighted by P(b | a)
        s = s + _log_softmax(za[n])
      per[n] = _h(np.exp(_log_softmax(s)), _log_softmax(za[n]), None, 'multiclass', 'xent')
      w[n] = 1
  return per, w


def _problem(kind, seed=0, b=8, ca=4, cb=5, scale=3.0):
  rng = np.random.default_rng(seed)
  za = (scale * rng.standard_normal((b, ca))).astype(np.float32)
  zb = (scale * rng.standard_normal((b, cb))).astype(np.float32)
  if kind == 'multilabel':
    r = rng.uniform(0, 1, (ca, cb))
    r[0] = 0.05  # a neutral-like class: empty prototype set
    r[1, 0] = 0.0
    yb = rng.integers(0, 2, (b, cb))
    yb[rng.random((b, cb)) < 0.4] = -1
    yb[:2] = -1  # fully missing B
  else:
    r = rng.dirichlet(np.ones(cb) * 0.5, ca)
    yb = rng.integers(0, cb, b)
    yb[rng.random(b) < 0.4] = -1
    yb[:2] = -1
  ya = rng.integers(0, ca, b)
  ya[rng.random(b) < 0.4] = -1
  ya[0] = -1  # neither labelled
  ya[1] = 2  # A only
  return za, zb, r.astype(np.float32), ya.astype(np.int32), yb.astype(np.int32)


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_distribution_matching_matches_reference(kind):
  za, zb, r, _, _ = _problem(kind)
  vector = np.random.default_rng(1).dirichlet(np.ones(r.shape[0]))
  for direction, mode, divergence, prior in itertools.product(
      ('a_to_b', 'b_to_a', 'both'), ('bayes', 'prototype'), ('xent', 'kl'), ('model', 'uniform', 'vector')
  ):
    prior = vector if prior == 'vector' else prior
    per, w = losses.distribution_matching(
        za, zb, r, b_kind=kind, direction=direction, mode=mode, divergence=divergence, prior=prior
    )
    ref = _ref_dm(za, zb, r.astype(np.float64), kind, direction, mode, divergence, prior)
    np.testing.assert_allclose(per, ref, rtol=2e-4, atol=2e-5, err_msg=f'{direction} {mode} {divergence} {prior}')
    np.testing.assert_array_equal(w, 1)


def test_defaults_are_a_to_b_stopped_targets_virtual_evidence_and_model_prior():
  za, zb, r, ya, yb = _problem('multilabel', seed=3)
  per, _ = losses.distribution_matching(za, zb, r, b_kind='multilabel')
  np.testing.assert_allclose(
      per, _ref_dm(za, zb, r.astype(np.float64), 'multilabel', 'a_to_b', 'bayes', 'xent', 'model'), rtol=2e-4, atol=2e-5
  )
  # With both directions the B → A target uses the virtual-evidence rule and the model prior by default.
  per, _ = losses.distribution_matching(za, zb, r, b_kind='multilabel', direction='both')
  np.testing.assert_allclose(
      per, _ref_dm(za, zb, r.astype(np.float64), 'multilabel', 'both', 'bayes', 'xent', 'model'), rtol=2e-4, atol=2e-5
  )
  # Stopped targets by default: the A→B term reaches logits_a only through q_B, so no gradient there.
  g = jax.grad(lambda za: jnp.sum(losses.distribution_matching(za, zb, r, b_kind='multilabel', direction='a_to_b')[0]))(
      za
  )
  np.testing.assert_array_equal(g, 0)
  per, _ = losses.co_annotation(za, zb, ya, yb, r, b_kind='multilabel')
  np.testing.assert_allclose(
      per, _ref_co(za, zb, ya, yb, r.astype(np.float64), 'multilabel', 'model')[0], rtol=1e-4, atol=1e-5
  )


def test_uninformative_b_implies_the_prior_not_a_confident_class():
  # The old expected-log-likelihood rule put 0.96 on "sad" for every face when the AU head said 0.5 everywhere; the
  # virtual-evidence rule returns π_A (uniform, or the model's own prediction).
  from mtlmatch.priors import load_prior

  r = load_prior('expressions_to_aus').relatedness
  q = losses.implied_a(np.full((2, 17), 0.5, np.float32), r, b_kind='multilabel')
  np.testing.assert_allclose(q, 1 / 7, atol=1e-6)
  za = np.random.default_rng(0).standard_normal((2, 7)).astype(np.float32)
  per, _ = losses.distribution_matching(
      za, np.zeros((2, 17), np.float32), r, b_kind='multilabel', direction='b_to_a', divergence='kl'
  )
  np.testing.assert_allclose(per, 0, atol=1e-5)  # target = the model's own p_A: nothing to change


def test_model_prior_keeps_a_fine_head_within_a_coarse_group():
  # A coarse multiclass B (group) shared by A classes {0, 1} and {2, 3}: with a uniform prior the target is flat
  # inside the group and pulls a confident A head (0.9 on class 0) back to 0.5 / 0.5; with the model prior the
  # target keeps A's own ranking inside the group and only removes the other group's mass.
  r = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
  za = np.log(np.array([[0.85, 0.05, 0.05, 0.05]], np.float32))
  zb = np.log(np.array([[0.99, 0.01]], np.float32))
  logp_b = np.log(np.array([0.99, 0.01]))
  for prior in ('uniform', 'model'):
    ref = _ref_dm(za, zb, r.astype(np.float64), 'multiclass', 'b_to_a', 'bayes', 'xent', prior)
    per, _ = losses.distribution_matching(za, zb, r, b_kind='multiclass', direction='b_to_a', prior=prior)
    np.testing.assert_allclose(per, ref, rtol=1e-4)
  q_uniform = _q_a(np.exp(logp_b), logp_b, None, r.astype(np.float64), 'multiclass', 'bayes')
  q_model = _q_a(np.exp(logp_b), logp_b, None, r.astype(np.float64), 'multiclass', 'bayes', _log_softmax(za[0]))
  assert abs(q_uniform[0] - q_uniform[1]) < 1e-3 and q_model[0] > 0.9
  g = {
      p: jax.grad(
          lambda z, p=p: losses.distribution_matching(z, zb, r, b_kind='multiclass', direction='b_to_a', prior=p)[
              0
          ].sum()
      )(za)
      for p in ('uniform', 'model')
  }
  assert g['uniform'][0, 0] > 0.3 and g['model'][0, 0] <= 0.05  # uniform pushes class 0 down; model hardly


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_co_annotation_uniform_prior_is_the_label_posterior(kind):
  # prior='uniform' keeps the values of the rule before priors existed: q_A(b) ∝ Π_{k labelled} P(b_k | a).
  za, zb, r, ya, yb = _problem(kind, seed=5, b=16)
  per, w = losses.co_annotation(za, zb, ya, yb, r, b_kind=kind, prior='uniform')
  ref_per, ref_w = _ref_co(za, zb, ya, yb, r.astype(np.float64), kind, prior='uniform')
  np.testing.assert_array_equal(w, ref_w)
  np.testing.assert_allclose(per, ref_per, rtol=1e-4, atol=1e-5)
  # With the model prior the target is stopped: the gradient w.r.t. logits_a comes from p_A in H(q_A, p_A) only.
  f = lambda za: jnp.sum(losses.co_annotation(za, zb, ya, yb, r, b_kind=kind)[0])
  b_only = (ref_w == 1) & (ya == -1)
  g = jax.grad(f)(za)
  assert np.all(np.isfinite(g)) and np.abs(g[b_only]).max() > 0


def test_distribution_matching_mask_and_stop_gradient():
  za, zb, r, _, _ = _problem('multilabel')
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
  per, w = losses.distribution_matching(za, zb, r, b_kind='multilabel', mask=mask)
  full, _ = losses.distribution_matching(za, zb, r, b_kind='multilabel')
  np.testing.assert_array_equal(w, mask.astype(np.float32))
  np.testing.assert_allclose(per, np.where(mask, full, 0), rtol=1e-6)
  g = jax.grad(lambda za: jnp.sum(losses.distribution_matching(za, zb, r, b_kind='multilabel', mask=mask)[0]))(za)
  np.testing.assert_array_equal(g[~mask], 0)
  # With the target stopped, the A→B term H(q_B, p_B) reaches logits_a only through q_B: no gradient there.
  a_to_b = lambda za, sg: jnp.sum(
      losses.distribution_matching(za, zb, r, b_kind='multilabel', direction='a_to_b', stop_gradient_target=sg)[0]
  )
  np.testing.assert_array_equal(jax.grad(a_to_b)(za, True), 0)
  assert np.abs(jax.grad(a_to_b)(za, False)).max() > 1e-3  # unstopped: the target's task is trained too


@pytest.mark.parametrize('kind', ['multiclass', 'multilabel'])
def test_gradient_vanishes_at_agreement(kind):
  rng = np.random.default_rng(4)
  za = rng.standard_normal((6, 4)).astype(np.float32)
  pa = np.exp(_log_softmax(za.astype(np.float64)))
  if kind == 'multiclass':
    r = rng.dirichlet(np.ones(5), 4)
    zb = np.log(pa @ r)  # softmax(zb) = p_A R
  else:
    r = rng.uniform(0.1, 0.9, (4, 5))
    q = pa @ r
    zb = np.log(q) - np.log1p(-q)  # sigmoid(zb) = p_A R
  r, zb = r.astype(np.float32), zb.astype(np.float32)
  for divergence in ('xent', 'kl'):
    f = lambda zb: jnp.sum(
        losses.distribution_matching(
            za, zb, r, b_kind=kind, direction='a_to_b', stop_gradient_target=True, divergence=divergence
        )[0]
    )
    assert np.abs(jax.grad(f)(zb)).max() < 1e-5
  kl, _ = losses.distribution_matching(za, zb, r, b_kind=kind, direction='a_to_b', divergence='kl')
  np.testing.assert_allclose(kl, 0, atol=1e-5)


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_co_annotation_matches_reference(kind):
  za, zb, r, ya, yb = _problem(kind, seed=5, b=16)
  per, w = losses.co_annotation(za, zb, ya, yb, r, b_kind=kind)
  ref_per, ref_w = _ref_co(za, zb, ya, yb, r.astype(np.float64), kind)
  np.testing.assert_array_equal(w, ref_w)
  assert 0 < ref_w.sum() < len(ref_w)
  np.testing.assert_allclose(per, ref_per, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_all_missing_and_huge_logits(kind):
  za, zb, r, ya, yb = _problem(kind, scale=1.0)
  za, zb = np.sign(za) * 1e4, np.sign(zb) * 1e4
  none_a, none_b = np.full_like(ya, -1), np.full_like(yb, -1)
  co = lambda za, zb, ya, yb: losses.masked_mean(*losses.co_annotation(za, zb, ya, yb, r, b_kind=kind))
  value, grads = jax.value_and_grad(co, (0, 1))(za, zb, none_a, none_b)
  assert float(value) == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0)
  value, grads = jax.value_and_grad(co, (0, 1))(za, zb, ya, yb)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
  for mode, divergence, sg in itertools.product(('bayes', 'prototype'), ('xent', 'kl'), (False, True)):
    dm = lambda za, zb: losses.masked_mean(
        *losses.distribution_matching(za, zb, r, b_kind=kind, mode=mode, divergence=divergence, stop_gradient_target=sg)
    )
    value, grads = jax.value_and_grad(dm, (0, 1))(za, zb)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads), (mode, divergence, sg)
  # Masked-out everything: 0 with zero gradients.
  dm0 = lambda za, zb: losses.masked_mean(
      *losses.distribution_matching(za, zb, r, b_kind=kind, mask=np.zeros(len(za), bool))
  )
  value, grads = jax.value_and_grad(dm0, (0, 1))(za, zb)
  assert float(value) == 0.0 and all(np.all(g == 0) for g in grads)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    # Targets carrying gradient (stop_gradient_target=False, fixed prior): the whole function, by check_grads. One
    # DM configuration per B kind (bayes/xent and prototype/kl), plus co-annotation for both kinds.
    for kind, mode, divergence in (('multilabel', 'bayes', 'xent'), ('multiclass', 'prototype', 'kl')):
      za, zb, r, ya, yb = _problem(kind, seed=6, b=4, ca=3, cb=4, scale=1.5)
      za, zb, r = za.astype(np.float64), zb.astype(np.float64), r.astype(np.float64)
      f = lambda za, zb: losses.masked_mean(
          *losses.distribution_matching(
              za, zb, r, b_kind=kind, mode=mode, divergence=divergence, stop_gradient_target=False, prior='uniform'
          )
      )
      check_grads(jax.jit(f), (za, zb), order=1, modes=['rev'], atol=1e-5, rtol=1e-5)
      ya[:] = [2, -1, 0, -1]
      yb[:] = -1
      yb[1] = 1
      co = lambda za, zb: losses.masked_mean(*losses.co_annotation(za, zb, ya, yb, r, b_kind=kind, prior='uniform'))
      check_grads(jax.jit(co), (za, zb), order=1, modes=['rev'], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['multilabel', 'multiclass'])
def test_stopped_target_gradient_is_the_fixed_target_cross_entropy(kind):
  # Stopped targets and the model prior (defaults; both directions) differentiate H(q(z₀), p(z)) at z = z₀:
  # compare with central finite differences of the numpy reference with q frozen at z₀.
  za, zb, r, _, _ = _problem(kind, seed=8, b=3, ca=3, cb=4, scale=1.5)
  za, zb, r = za.astype(np.float64), zb.astype(np.float64), r.astype(np.float64)

  def ref(za_now, zb_now):  # Σ_n H(q_B(z₀), p_B(z)) + H(q_A(z₀), p_A(z))
    total = 0.0
    for n in range(len(za)):
      logpa0 = _log_softmax(za[n])
      if kind == 'multilabel':
        logpb0, log1mpb0 = _log_sigmoid(zb[n]), _log_sigmoid(-zb[n])
        logpb, log1mpb = _log_sigmoid(zb_now[n]), _log_sigmoid(-zb_now[n])
      else:
        logpb0, log1mpb0 = _log_softmax(zb[n]), None
        logpb, log1mpb = _log_softmax(zb_now[n]), None
      total += _h(np.exp(logpa0) @ r, logpb, log1mpb, kind, 'xent')
      q_a = _q_a(np.exp(logpb0), logpb0, log1mpb0, r, kind, 'bayes', logpa0)
      total += _h(q_a, _log_softmax(za_now[n]), None, 'multiclass', 'xent')
    return total

  with jax.enable_x64(True):
    ga, gb = jax.grad(
        lambda za, zb: jnp.sum(losses.distribution_matching(za, zb, r, b_kind=kind, direction='both')[0]), (0, 1)
    )(za, zb)
  h = 1e-6
  for got, z, which in ((ga, za, 0), (gb, zb, 1)):
    fd = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
      up, down = z.copy(), z.copy()
      up[idx] += h
      down[idx] -= h
      args_up = (up, zb) if which == 0 else (za, up)
      args_down = (down, zb) if which == 0 else (za, down)
      fd[idx] = (ref(*args_up) - ref(*args_down)) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-6)


def test_jit_and_sharded_batch_match_eager():
  za, zb, r, ya, yb = _problem('multilabel', seed=7, b=16)

  def f(za, zb, ya, yb):
    dm = losses.distribution_matching(za, zb, r, b_kind='multilabel', mode='prototype', divergence='kl')
    co = losses.co_annotation(za, zb, ya, yb, r, b_kind='multilabel')
    return dm, co, losses.masked_mean(*dm) + losses.masked_mean(*co)

  eager = f(za, zb, ya, yb)
  jitted = jax.jit(f)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  sharded = jitted(*(jax.device_put(x, shard) for x in (za, zb, ya, yb)))
  for out in (jitted(za, zb, ya, yb), sharded):
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_over_examples():
  za, zb, r, ya, yb = _problem('multiclass')
  dm = functools.partial(losses.distribution_matching, relatedness=r, b_kind='multiclass')
  np.testing.assert_allclose(jax.vmap(dm)(za, zb)[0], dm(za, zb)[0], rtol=1e-5)
  co = lambda za, zb, ya, yb: losses.co_annotation(za, zb, ya, yb, r, b_kind='multiclass')
  np.testing.assert_allclose(jax.vmap(co)(za, zb, ya, yb)[0], co(za, zb, ya, yb)[0], rtol=1e-5)


def test_validation_errors():
  za, zb, r, ya, yb = _problem('multilabel')
  dm = functools.partial(losses.distribution_matching, za, zb)
  cases = [
      (lambda: dm(r, b_kind='multiclass'), r'relatedness: got row 0 summing to'),
      (lambda: dm(r[:3], b_kind='multilabel'), r'relatedness: got shape \(3, 5\), expected 4 rows'),
      (lambda: dm(r[:, :4], b_kind='multilabel'), r'relatedness: got shape \(4, 4\), expected 5 columns'),
      (lambda: dm(r[0], b_kind='multilabel'), r'relatedness: got shape \(5,\), expected a 2-D table'),
      (lambda: dm(r + 0.5, b_kind='multilabel'), r'relatedness: got value 1\.\d+ at'),
      (lambda: dm(r, b_kind='multi'), r"b_kind: got 'multi'"),
      (lambda: dm(r, b_kind='multilabel', direction='up'), r"direction: got 'up'"),
      (lambda: dm(r, b_kind='multilabel', mode='proto'), r"mode: got 'proto'"),
      (lambda: dm(r, b_kind='multilabel', divergence='js'), r"divergence: got 'js'"),
      (lambda: dm(r, b_kind='multilabel', mask=np.ones(3)), r'mask: got shape \(3,\)'),
      (lambda: dm(r, b_kind='multilabel', stop_gradient_target='yes'), r"stop_gradient_target: got 'yes'"),
      (lambda: losses.distribution_matching(za, zb[:4], r, b_kind='multilabel'), r'logits_b: got shape \(4, 5\)'),
      (lambda: losses.co_annotation(za, zb, ya, yb[:, :4], r, b_kind='multilabel'), r'labels_b: got shape'),
      (lambda: losses.co_annotation(za, zb, ya + 4, yb, r, b_kind='multilabel'), r'labels_a: got value \d'),
      (lambda: losses.co_annotation(za, zb, ya, yb + 2, r, b_kind='multilabel'), r'labels_b: got value \d'),
      (
          lambda: losses.co_annotation(za, zb, ya, yb, r / r.sum(1, keepdims=True), b_kind='multiclass'),
          r'labels_b: got shape \(8, 5\), expected \(8,\)',
      ),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
