"""Relatedness tables: validation, estimation from data, implied distributions (docs/maths.md §2–§4)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlmatch import losses
from mtlmatch.priors import load_prior, relatedness_table


def _np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def _ref_estimate(a_onehot, a_present, b, b_present, alpha, prior=None):
  """Loop reference of docs/maths.md §2: smoothed conditional frequency over labelled pairs, per B entry."""
  n, ca = a_onehot.shape
  cb = b.shape[1]
  m = np.zeros((n, cb))
  for i in range(n):
    for k in range(cb):
      m[i, k] = float(a_present[i] and b_present[i, k])
  if prior is None:
    prior = np.array([sum(m[i, k] * b[i, k] for i in range(n)) / sum(m[:, k]) for k in range(cb)])
  r = np.zeros((ca, cb))
  for c in range(ca):
    for k in range(cb):
      num = sum(m[i, k] * a_onehot[i, c] * b[i, k] for i in range(n)) + alpha * prior[k]
      den = sum(m[i, k] * a_onehot[i, c] for i in range(n)) + alpha
      r[c, k] = num / den if den > 0 else prior[k]
  return r


def _sample(rng, r, n, b_kind, num_a):
  a = rng.integers(0, num_a, n)
  if b_kind == 'multilabel':
    b = (rng.random((n, r.shape[1])) < r[a]).astype(np.int32)
  else:
    cum = np.cumsum(r[a], -1)
    b = np.minimum((rng.random((n, 1)) > cum).sum(-1), r.shape[1] - 1).astype(np.int32)
  return a.astype(np.int32), b


@pytest.mark.parametrize('b_kind', ['multilabel', 'multiclass'])
def test_estimate_recovers_known_table(b_kind):
  rng = np.random.default_rng(0)
  ca, cb, n = 4, 5, 50_000
  if b_kind == 'multilabel':
    r_true = rng.uniform(0.05, 0.95, (ca, cb))
  else:
    r_true = rng.dirichlet(np.ones(cb), ca)
  a, b = _sample(rng, r_true, n, b_kind, ca)
  a[rng.random(n) < 0.1] = -1  # some examples lack the A label
  if b_kind == 'multilabel':
    b[rng.random(b.shape) < 0.1] = -1  # and some lack single AUs
  else:
    b[rng.random(n) < 0.1] = -1
  r = losses.estimate_relatedness(a, b, num_classes_a=ca, num_classes_b=cb, b_kind=b_kind)
  assert r.dtype == np.float32 and r.shape == (ca, cb)
  assert np.max(np.abs(r - r_true)) < 0.02
  if b_kind == 'multiclass':
    np.testing.assert_allclose(r.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize('b_kind', ['multilabel', 'multiclass'])
def test_estimate_matches_loop_reference_and_unseen_class_gets_prior(b_kind):
  rng = np.random.default_rng(1)
  ca, cb, n = 4, 3, 40
  a = rng.integers(0, ca - 1, n).astype(np.int32)  # class ca-1 never seen
  a[rng.random(n) < 0.2] = -1
  if b_kind == 'multilabel':
    b = rng.integers(0, 2, (n, cb)).astype(np.int32)
    b[rng.random((n, cb)) < 0.3] = -1
    b_vals, b_present = np.where(b == -1, 0, b).astype(float), b != -1
  else:
    b = rng.integers(0, cb, n).astype(np.int32)
    b[rng.random(n) < 0.2] = -1
    b_vals = np.eye(cb)[np.where(b == -1, 0, b)] * (b != -1)[:, None]
    b_present = np.repeat((b != -1)[:, None], cb, 1)
  a_onehot = np.eye(ca)[np.where(a == -1, 0, a)] * (a != -1)[:, None]
  for alpha in (0.0, 2.5):
    r = losses.estimate_relatedness(a, b, num_classes_a=ca, num_classes_b=cb, b_kind=b_kind, smoothing=alpha)
    ref = _ref_estimate(a_onehot, a != -1, b_vals, b_present, alpha)
    np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-6)
    # The unseen class gets π, the marginal frequency of each B label among the labelled pairs.
    m = (a != -1)[:, None] & b_present
    np.testing.assert_allclose(r[ca - 1], (m * b_vals).sum(0) / m.sum(0), rtol=1e-5)
  prior = np.full(cb, 1.0 / cb)
  r = losses.estimate_relatedness(a, b, num_classes_a=ca, num_classes_b=cb, b_kind=b_kind, prior=prior)
  np.testing.assert_allclose(r[ca - 1], prior, rtol=1e-6)
  np.testing.assert_allclose(r, _ref_estimate(a_onehot, a != -1, b_vals, b_present, 1.0, prior), rtol=1e-5)


def test_estimate_soft_counts():
  rng = np.random.default_rng(2)
  ca, cb, n = 3, 4, 30
  a = rng.integers(0, ca, n).astype(np.int32)
  b = rng.integers(0, 2, (n, cb)).astype(np.int32)
  a[:3] = -1
  b[5, 1] = -1
  hard = losses.estimate_relatedness(a, b, num_classes_a=ca, num_classes_b=cb, b_kind='multilabel')
  # One-hot probabilities with NaN rows / entries for missing give the same table as hard labels.
  a_soft = np.eye(ca)[a].astype(np.float32)
  a_soft[a == -1] = np.nan
  b_soft = np.where(b == -1, np.nan, b).astype(np.float32)
  soft = losses.estimate_relatedness(a_soft, b_soft, num_classes_a=ca, num_classes_b=cb, b_kind='multilabel')
  np.testing.assert_allclose(soft, hard, rtol=1e-6)
  # Real soft counts: each example adds p(a = i | x) as a fractional count.
  pa = rng.dirichlet(np.ones(ca), n)
  pb = rng.random((n, cb))
  r = losses.estimate_relatedness(pa, pb, num_classes_a=ca, num_classes_b=cb, b_kind='multilabel', smoothing=0.5)
  prior = pb.mean(0)
  ref = (pa.T @ pb + 0.5 * prior) / (pa.sum(0)[:, None] + 0.5)
  np.testing.assert_allclose(r, ref, rtol=1e-5)
  # Multiclass B from probabilities: rows still sum to 1.
  pbc = rng.dirichlet(np.ones(cb), n)
  rc = losses.estimate_relatedness(a, pbc, num_classes_a=ca, num_classes_b=cb, b_kind='multiclass')
  np.testing.assert_allclose(rc.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(labels_a=np.array([0, 3]), labels_b=np.array([0, 1])), r'labels_a: got value 3'),
        (dict(labels_a=np.array([0, 1]), labels_b=np.array([0, 1, 1])), r'labels_b: got 3 examples'),
        (dict(labels_a=np.array([-1, -1]), labels_b=np.array([0, 1])), r'no example labelled for both'),
        (dict(labels_a=np.array([0, 1]), labels_b=np.array([0, 1]), smoothing=-1.0), r'smoothing: got -1.0'),
        (
            dict(labels_a=np.array([0, 1]), labels_b=np.array([0, 1]), prior=np.array([0.2, 0.2, 0.2])),
            r'prior: got values summing to 0.6',
        ),
        (
            dict(labels_a=np.array([[0.5, 0.6, 0.0], [1.0, 0, 0]]), labels_b=np.array([0, 1])),
            r'labels_a: got a probability row summing to 1.1',
        ),
        (dict(labels_a=np.array([0.0, 1.0]), labels_b=np.array([0, 1])), r'labels_a: got float array of shape \(2,\)'),
        (dict(labels_a=np.array([0, 1]), labels_b=np.array([0, 1]), b_kind='binary'), r'b_kind: got \'binary\''),
    ],
)
def test_estimate_validation_errors(kwargs, match):
  kwargs = {'num_classes_a': 3, 'num_classes_b': 3, 'b_kind': 'multiclass', **kwargs}
  with pytest.raises(ValueError, match=match):
    losses.estimate_relatedness(**kwargs)


def test_validate_relatedness():
  prior = load_prior('expressions_to_aus')
  r = losses.validate_relatedness(prior.relatedness, b_kind='multilabel', num_classes_a=7, num_classes_b=17)
  assert r.dtype == np.float32 and r.shape == (7, 17)
  ok = np.full((2, 3), 1 / 3)
  losses.validate_relatedness(ok.astype(np.float64), b_kind='multiclass')
  cases = [
      (dict(relatedness=np.ones(3), b_kind='multilabel'), r'relatedness: got shape \(3,\)'),
      (dict(relatedness=ok, b_kind='multilabel', num_classes_a=3), r'relatedness: got shape \(2, 3\).*3 rows'),
      (dict(relatedness=ok, b_kind='multilabel', num_classes_b=4), r'relatedness: .*4 columns'),
      (dict(relatedness=ok * 4, b_kind='multilabel'), r'relatedness: got value 1.33.*\[0, 1\]'),
      (dict(relatedness=np.where(ok > 0, np.nan, 0), b_kind='multilabel'), r'relatedness: got non-finite'),
      (dict(relatedness=ok * 0.9, b_kind='multiclass'), r'relatedness: got row 0 summing to 0.9'),
      (dict(relatedness=ok, b_kind='multi'), r'b_kind: got \'multi\''),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      losses.validate_relatedness(**kwargs)


def _np_implied_a(pb, r, b_kind, mode, prior=None, eps=1e-4):
  ca = r.shape[0]
  out = np.zeros((pb.shape[0], ca))
  for n in range(pb.shape[0]):
    s = np.zeros(ca)
    for i in range(ca):
      if mode == 'bayes':  # virtual evidence: the chance that an A = i example would produce p_B
        rt = np.clip(r[i], eps, 1 - eps)
        if b_kind == 'multilabel':
          s[i] = np.sum(np.log(pb[n] * rt + (1 - pb[n]) * (1 - rt)))
        else:
          s[i] = np.log(np.sum(pb[n] * rt))
      else:
        members = [k for k in range(r.shape[1]) if r[i, k] >= 0.5]
        s[i] = np.mean(np.log(pb[n, members])) if members else np.mean(np.log(1 - pb[n]))
      if prior is not None:
        s[i] += np.log(prior[i] if prior.ndim == 1 else prior[n, i])
    out[n] = _np_softmax(s)
  return out


@pytest.mark.parametrize('b_kind', ['multilabel', 'multiclass'])
@pytest.mark.parametrize('mode', ['bayes', 'prototype'])
def test_implied_a_and_b_match_reference(b_kind, mode):
  rng = np.random.default_rng(3)
  ca, cb, n = 4, 5, 6
  if b_kind == 'multilabel':
    r = rng.uniform(0, 1, (ca, cb))
    r[0, :] = 0.1  # empty prototype set: a "neutral" class
    r[1, 2] = 0.0  # exercises the ε clip
    pb = rng.uniform(0.01, 0.99, (n, cb))
  else:
    r = rng.dirichlet(np.ones(cb) * 0.3, ca)
    pb = rng.dirichlet(np.ones(cb), n)
  pa = rng.dirichlet(np.ones(ca), n)
  np.testing.assert_allclose(losses.implied_b(pa.astype(np.float32), r), pa @ r, rtol=1e-5, atol=1e-6)
  q = losses.implied_a(pb.astype(np.float32), r.astype(np.float32), b_kind=b_kind, mode=mode)
  np.testing.assert_allclose(q, _np_implied_a(pb, r, b_kind, mode), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(q, -1), 1, atol=1e-5)
  for prior in (rng.dirichlet(np.ones(ca)), rng.dirichlet(np.ones(ca), n)):  # [C_A] and per example [B, C_A]
    q = losses.implied_a(pb, r, b_kind=b_kind, mode=mode, prior=prior)
    np.testing.assert_allclose(q, _np_implied_a(pb, r, b_kind, mode, prior), rtol=1e-4, atol=1e-6)


def test_implied_a_bayes_is_bayes_rule_for_hard_labels():
  # One-hot B under the bayes rule is the exact posterior p(a | b) ∝ π(a) Π_k p(b_k | a) when R is inside [ε, 1-ε].
  r = np.array([[0.9, 0.2], [0.3, 0.6], [0.5, 0.5]])
  b = np.array([[1.0, 0.0]])
  prior = np.array([0.5, 0.3, 0.2])
  like = np.prod(np.where(b == 1, r, 1 - r), -1) * prior
  np.testing.assert_allclose(losses.implied_a(b, r, b_kind='multilabel', prior=prior)[0], like / like.sum(), rtol=1e-5)


def test_implied_errors_and_jit():
  r = np.full((3, 2), 0.5, np.float32)
  with pytest.raises(ValueError, match=r"mode: got 'proto'"):
    losses.implied_a(np.full((1, 2), 0.5), r, b_kind='multilabel', mode='proto')
  with pytest.raises(ValueError, match=r'prior: got shape \(2,\), expected \(3,\) or \[B, 3\]'):
    losses.implied_a(np.full((1, 2), 0.5), r, b_kind='multilabel', prior=np.ones(2) / 2)
  with pytest.raises(ValueError, match=r'relatedness: got shape \(3, 2\), expected 3 columns'):
    losses.implied_a(np.full((1, 3), 0.5), r, b_kind='multilabel')
  with pytest.raises(ValueError, match=r'relatedness: got shape \(3, 2\), expected 4 rows'):
    losses.implied_b(np.full((1, 4), 0.25), r)
  with pytest.raises(ValueError, match=r'relatedness: got row 0 summing to 2'):
    losses.implied_a(np.full((1, 2), 0.5), r * 2, b_kind='multiclass')
  with pytest.raises(ValueError, match=r'probs_b: got value 1.5'):
    losses.implied_a(np.full((1, 2), 1.5), r, b_kind='multilabel')
  pb = jnp.array([[0.2, 0.7]])
  jitted = jax.jit(lambda p, r: losses.implied_a(p, r, b_kind='multilabel', mode='prototype'))
  np.testing.assert_allclose(jitted(pb, r), losses.implied_a(pb, r, b_kind='multilabel', mode='prototype'), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Tables the user gives: a nested list, its JSON text (the command line's form) or a .json / .csv file.


def test_relatedness_table_from_text_and_files(tmp_path, monkeypatch):
  table = np.random.default_rng(0).uniform(size=(3, 4)).round(3).astype(np.float32)
  (tmp_path / 'r.json').write_text(json.dumps(table.tolist()))
  (tmp_path / 'r.csv').write_text('\n'.join(','.join(str(v) for v in row) for row in table.tolist()) + '\n')
  monkeypatch.chdir(tmp_path)  # relative paths are read from the current directory
  for spec in (table.tolist(), table, json.dumps(table.tolist()), 'r.json', 'r.csv', str(tmp_path / 'r.csv')):
    got = relatedness_table(spec)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, table)
  for spec in ('prior:expressions_to_aus', 'estimate:coannotated', 'learned:uniform', 3, None):
    assert relatedness_table(spec) is None  # names of tables (or no table): resolved elsewhere


@pytest.mark.parametrize(
    'spec, content, match',
    [
        ('[[0.5, 0.5], [0.5', None, r"relatedness '\[\[0\.5, 0\.5\], \[0\.5': got text that is not JSON"),
        ('[[0.5, 0.5], [0.5]]', None, r'relatedness \(JSON text\): got .*expected a rectangular nested list'),
        ('[0.5, 0.5, 0.5, 0.5]', None, r'got shape \(4,\), expected a table \[C_A, C_B\]'),
        ('gone.csv', None, r"relatedness file 'gone\.csv': no such file \(looked for /.*/gone\.csv"),
        (
            'r.csv',
            'a,b,c,d\n1,0,0,0\n',
            r"relatedness file 'r\.csv': could not convert .*'a'.*no header",
        ),
        ('r.json', '{"R": 1', r"relatedness file 'r\.json': not valid JSON"),
        ('r.txt', '1,2', r"relatedness: got 'r\.txt', expected 'prior:<name>'.*\.json or \.csv file"),
    ],
)
def test_relatedness_table_errors(tmp_path, monkeypatch, spec, content, match):
  monkeypatch.chdir(tmp_path)
  if content is not None:
    (tmp_path / spec).write_text(content)
  with pytest.raises(ValueError, match=match):
    relatedness_table(spec)
