"""Tests of mtlmatch.weighting: the contract every method keeps, the loss-weighting methods against hand-worked /
numpy references, and the task Jacobian against T separate `jax.grad` calls. Gradient methods have their own file.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlmatch import weighting as W
from mtlmatch.weighting import base

ALL = sorted(W.METHODS)
# The generic contract tests below compile every method; those added with issues 14 and 28 run theirs in
# test_weighting_zoo.py (1 and 8 devices, absent task, no task present), so they are compiled once there; Auto-Lambda,
# MOML and FORUM (weights meta-learned in the train step) run them, and their meta steps, in test_auto_lambda.py and
# test_bilevel.py.
BEFORE_ZOO = (
    'ew',
    'uw',
    'dwa',
    'rlw',
    'gradnorm',
    'famo',
    'mgda',
    'mgda_ub',
    'pcgrad',
    'cagrad',
    'nash_mtl',
    'imtl',
    'aligned_mtl',
)
KEY = jax.random.key(0)


@functools.lru_cache(maxsize=None)
def jitted(name):
  # One compiled apply per method (hparams live in the state as arrays, so other hparam values reuse it).
  return jax.jit(W.METHODS[name].apply)


# ---- contract -----------------------------------------------------------------------------------------------------
def test_registry_names_and_kinds():
  assert set(W.METHODS) == {
      'ew',
      'uw',
      'dwa',
      'rlw',
      'gradnorm',
      'famo',
      'mgda',
      'mgda_ub',
      'pcgrad',
      'cagrad',
      'nash_mtl',
      'imtl',
      'aligned_mtl',
      'sum',
      'mean',
      'constant',
      'gls',
      'imtl_l',
      'stch',
      'go4align',
      'excess_mtl',
      'fairgrad',
      'upgrad',
      'dualproj',
      'config',
      'gradvac',
      'graddrop',
      'krum',
      'trimmed_mean',
      'rgw',
      'moco',
      'modo',
      'sdmgrad',
      'cr_mogm',
      'db_mtl',
      'auto_lambda',
      'cosmos',
      'pbi',
      'pcd',
      'moml',
      'forum',
  }
  assert len(W.METHODS) >= 30
  for name in (
      'ew',
      'uw',
      'dwa',
      'rlw',
      'famo',
      'sum',
      'mean',
      'constant',
      'gls',
      'imtl_l',
      'stch',
      'go4align',
      'auto_lambda',
      'cosmos',
      'pbi',
      'moml',
      'forum',
  ):
    assert not W.is_gradient_method(name)
  assert {n for n, m in W.METHODS.items() if m.needs == 'meta'} == {'auto_lambda', 'moml', 'forum'}
  for name in ('gradnorm', 'excess_mtl') + W.GRADIENT_METHODS:
    assert W.is_gradient_method(name)
  for name, method in W.METHODS.items():
    assert method.name == name
    assert type(method).__doc__  # every method documents its rule
    hash(method)  # usable as a static closure


def test_every_method_declares_a_valid_kind_and_needs_and_the_tuples_derive_from_them():
  assert W.KINDS == ('loss_weighting', 'gradient')
  assert W.NEEDS == ('losses', 'shared_rows', 'feature_rows', 'meta')
  for name, method in W.METHODS.items():
    cls = type(method)
    assert 'kind' in vars(cls) and 'needs' in vars(cls), name  # declared on the class itself, never inherited
    assert method.kind in W.KINDS and method.needs in W.NEEDS, name
    assert W.is_gradient_method(name) == (method.needs in ('shared_rows', 'feature_rows'))
  # The two public tuples, in the order they had when they were written out by hand.
  assert W.LOSS_WEIGHTING == (
      'ew', 'sum', 'mean', 'constant', 'uw', 'dwa', 'rlw', 'gls', 'imtl_l', 'stch', 'cosmos', 'pbi', 'go4align', 'famo',
      'gradnorm', 'excess_mtl', 'auto_lambda', 'moml', 'forum',
  )  # fmt: skip
  assert W.GRADIENT_METHODS == (
      'mgda', 'mgda_ub', 'pcgrad', 'cagrad', 'nash_mtl', 'fairgrad', 'imtl', 'aligned_mtl', 'upgrad', 'dualproj', 'pcd',
      'config', 'gradvac', 'graddrop', 'krum', 'trimmed_mean', 'rgw', 'moco', 'modo', 'sdmgrad', 'cr_mogm', 'db_mtl',
  )  # fmt: skip
  assert tuple(W.METHODS) == W.LOSS_WEIGHTING + W.GRADIENT_METHODS
  needs = {n: m.needs for n, m in W.METHODS.items()}
  assert {n for n, v in needs.items() if v == 'feature_rows'} == {'mgda_ub'}
  assert {n for n, v in needs.items() if v == 'meta'} == {'auto_lambda', 'moml', 'forum'}
  assert {n for n, m in W.METHODS.items() if W.needs_validation(n)} == {'auto_lambda', 'moml'}
  assert {n for n, v in needs.items() if v == 'shared_rows'} == set(W.GRADIENT_METHODS) - {'mgda_ub'} | {
      'gradnorm',
      'excess_mtl',
  }
  assert all(W.METHODS[n].needs in ('losses', 'shared_rows', 'meta') for n in W.LOSS_WEIGHTING)
  assert set(W.__all__) >= {type(m).__name__ for m in W.METHODS.values()} | {'METHODS', 'KINDS', 'NEEDS'}
  assert all(hasattr(W, n) for n in W.__all__)


def test_registration_refuses_missing_or_bad_declarations():
  def make(**attrs):
    return dataclasses.dataclass(frozen=True)(type('M', (W.WeightingMethod,), {'name': 'm', **attrs}))

  assert base.registry([make(kind='gradient', needs='shared_rows')])['m'].needs == 'shared_rows'
  with pytest.raises(ValueError, match="no 'kind' of its own"):
    base.registry([make(needs='losses')])
  with pytest.raises(ValueError, match=r"M\.needs: got 'grads', expected one of"):
    base.registry([make(kind='loss_weighting', needs='grads')])
  with pytest.raises(ValueError, match=r"M\.kind: got 'loss', expected one of"):
    base.registry([make(kind='loss', needs='losses')])
  with pytest.raises(ValueError, match="kind 'gradient'"):
    base.registry([make(kind='gradient', needs='losses')])
  inherits = dataclasses.dataclass(frozen=True)(type('Sub', (W.MGDA,), {'name': 'sub'}))
  with pytest.raises(ValueError, match="Sub: got no 'kind' of its own"):
    base.registry([inherits])
  with pytest.raises(ValueError, match="'ew', expected a name no other method has"):
    base.registry([W.EW, W.EW])


def test_bad_names_and_hparams_raise_one_value_error():
  with pytest.raises(ValueError, match="'adam'.*expected one of"):
    W.get_method('adam')
  with pytest.raises(ValueError, match='unknown.*temp.*expected a subset'):
    W.get_method('dwa', temp=2.0)
  with pytest.raises(ValueError, match="'c'.*got 1.5"):
    W.get_method('cagrad', c=1.5)
  with pytest.raises(ValueError, match="'distribution'.*'normal'"):
    W.METHODS['rlw'].init(3, distribution='normal')
  with pytest.raises(ValueError, match="'window'.*expected an int"):
    W.METHODS['dwa'].init(3, window=2.5)
  with pytest.raises(ValueError, match='num_tasks'):
    W.METHODS['ew'].init(0)
  with pytest.raises(ValueError, match='grads'):
    W.METHODS['ew'].apply(W.METHODS['ew'].init(2), jnp.zeros(3), jnp.zeros(2))
  with pytest.raises(ValueError, match='losses'):
    W.METHODS['ew'].apply(W.METHODS['ew'].init(2), jnp.zeros((2, 3)), jnp.zeros(3))
  with pytest.raises(ValueError, match='another number of tasks'):
    W.METHODS['uw'].apply(W.METHODS['uw'].init(3), jnp.zeros((2, 3)), jnp.zeros(2))
  with pytest.raises(ValueError, match='key'):
    W.METHODS['rlw'].apply(W.METHODS['rlw'].init(2), jnp.zeros((2, 3)), jnp.ones(2))


def test_numpy_integers_are_ints_and_bools_are_not():
  # num_tasks, num_params and int hparams accept numpy integers and 0-d integer arrays (e.g. a count read from an
  # array's shape arithmetic); bools, floats and 1-d arrays are still refused.
  for n in (np.int64(3), np.int32(3), np.array(3), jnp.asarray(3, jnp.int32)):
    state = W.METHODS['dwa'].init(n, window=np.int64(5))
    assert state['window_sum'].shape == (3,) and int(state['hparams']['window']) == 5
  assert W.METHODS['ew'].init(np.int64(5)) == W.METHODS['ew'].init(5)
  assert W.METHODS['moco'].init(np.int64(2), np.int32(4))['y'].shape == (2, 4)
  assert int(W.get_method('trimmed_mean', trim_number=np.int8(2)).init(np.uint8(5))['hparams']['trim_number']) == 2
  for bad in (True, np.bool_(True), 3.0, np.float32(3.0), np.array([3]), '3'):
    with pytest.raises(ValueError, match='num_tasks: got .*expected an int >= 1'):
      W.METHODS['ew'].init(bad)
    with pytest.raises(ValueError, match='num_params: got .*expected an int >= 1'):
      W.METHODS['moco'].init(2, bad)
    with pytest.raises(ValueError, match="'window': got .*expected an int"):
      W.METHODS['dwa'].init(3, window=bad)
  with pytest.raises(ValueError, match="'temperature': got .*expected a finite float"):
    W.METHODS['dwa'].init(3, temperature=np.bool_(True))


def test_hparams_bound_then_overridden_at_init():
  method = W.get_method('dwa', window=7)
  assert int(method.init(2)['hparams']['window']) == 7
  assert int(method.init(2, window=3)['hparams']['window']) == 3
  assert int(W.METHODS['dwa'].init(2)['hparams']['window']) == 100
  assert int(W.get_method('rlw', distribution='dirichlet').init(2)['hparams']['distribution']) == 1


def test_other_hparam_values_reuse_the_compiled_apply():
  traces = []

  def apply(state, grads, losses, key):
    traces.append(1)  # runs once per trace
    return W.METHODS['dwa'].apply(state, grads, losses, key)

  fn = jax.jit(apply)
  for window, temperature in ((1, 2.0), (3, 0.5), (10, 5.0)):
    state = W.get_method('dwa', window=window, temperature=temperature).init(3)
    for _ in range(3):
      _, weights, state = fn(state, G3, jnp.array([1.0, 2.0, 3.0]), KEY)
  assert len(traces) == 1
  np.testing.assert_allclose(weights, 1.0)  # window 10: no complete window yet


@pytest.mark.parametrize('name', BEFORE_ZOO)
def test_every_method_jits_is_finite_with_a_zero_row_and_keeps_a_state_of_arrays(name):
  rng = np.random.default_rng(1)
  grads = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32).at[1].set(0.0)  # task 1: no labels in the batch
  losses = jnp.array([0.7, 0.0, 1.3])
  method = W.METHODS[name]
  state = W.init_state(method, 3, 4)
  for step in range(2):
    update, weights, new = jitted(name)(state, grads, losses, jax.random.fold_in(KEY, step))
    assert update.shape == (4,) and weights.shape == (3,)
    assert np.all(np.isfinite(update)) and np.all(np.isfinite(weights))
    if method.linear:
      np.testing.assert_allclose(update, np.asarray(weights) @ np.asarray(grads), rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    for leaf in jax.tree_util.tree_leaves(new):
      assert isinstance(leaf, jax.Array) and np.all(np.isfinite(leaf))
    assert int(new['step']) == step + 1
    state = new
  if W.is_gradient_method(name) and name != 'gradnorm':
    assert float(weights[1]) == 0.0  # absent task left out


@pytest.mark.parametrize('name', BEFORE_ZOO)
def test_all_zero_grads_and_losses_give_zero_update_and_finite_weights(name):
  method = W.METHODS[name]
  # The same compile as the test above.
  update, weights, state = jitted(name)(W.init_state(method, 3, 4), jnp.zeros((3, 4)), jnp.zeros(3), KEY)
  assert np.all(update == 0) and np.all(np.isfinite(weights))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


def test_states_round_trip_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  states = {name: W.init_state(W.METHODS[name], 3, 4) for name in ALL}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'states', states)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / 'states', jax.tree.map(lambda x: x, states))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), states, restored)


# ---- loss weighting -----------------------------------------------------------------------------------------------
G3 = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, -1.0, 0.5], [3.0, 0.0, 0.0, 1.0]], np.float32)


def test_ew_weights_one_and_update_is_the_sum():
  update, weights, _ = jitted('ew')(W.METHODS['ew'].init(3), G3, jnp.array([1.0, 2.0, 3.0]), KEY)
  np.testing.assert_array_equal(weights, np.ones(3))
  np.testing.assert_allclose(update, G3.sum(0), rtol=1e-6)


def test_uw_log_variances_move_toward_log_loss():
  method = W.get_method('uw', lr=0.1)
  state = method.init(3)
  losses = jnp.array([4.0, 0.5, 0.0])  # task 2 absent
  _, weights, new = jitted('uw')(state, G3, losses, KEY)
  np.testing.assert_allclose(weights, np.ones(3))  # exp(-0) at the first step
  # s ← s − lr (1 − e^{−s} L): up for the large loss, down for the small one, unchanged for the absent task.
  np.testing.assert_allclose(new['log_var'], [-0.1 * (1 - 4.0), -0.1 * (1 - 0.5), 0.0], rtol=1e-6)
  for _ in range(150):
    update, weights, new = jitted('uw')(new, G3, losses, KEY)
  np.testing.assert_allclose(new['log_var'][:2], np.log([4.0, 0.5]), atol=1e-3)  # fixed point s = log L
  np.testing.assert_allclose(weights[:2], [0.25, 2.0], rtol=1e-3)
  np.testing.assert_allclose(update, np.asarray(weights) @ G3, rtol=1e-5)


def dwa_reference(loss_seq, window, temperature):
  """Independent DWA: per-window average over present steps; weights from the last two complete windows."""
  loss_seq = np.asarray(loss_seq, np.float64)
  T = loss_seq.shape[1]
  averages, out = [], []
  for k in range(len(loss_seq)):
    if len(averages) >= 2:
      last, before = averages[-1], averages[-2]
      r = np.where((last > 0) & (before > 0), last / np.where(before > 0, before, 1), 1.0)
      e = np.exp(r / temperature)
      out.append(T * e / e.sum())
    else:
      out.append(np.ones(T))
    if (k + 1) % window == 0:
      chunk = loss_seq[k + 1 - window : k + 1]
      count = (chunk != 0).sum(0)
      averages.append(np.where(count > 0, chunk.sum(0) / np.maximum(count, 1), 0.0))
  return np.array(out)


def test_dwa_follows_the_loss_ratio_formula():
  rng = np.random.default_rng(0)
  loss_seq = rng.uniform(0.2, 2.0, size=(11, 3)).astype(np.float32)
  loss_seq[4, 1] = 0.0  # a step where task 1 has no labels
  loss_seq[2:4, 2] = 0.0  # task 2 absent for a whole window
  method = W.get_method('dwa', window=2, temperature=2.0)
  state = method.init(3)
  got = []
  for losses in loss_seq:
    _, weights, state = jitted('dwa')(state, G3, losses, KEY)
    got.append(np.asarray(weights))
  got = np.array(got)
  np.testing.assert_allclose(got, dwa_reference(loss_seq, 2, 2.0), rtol=1e-5)
  np.testing.assert_allclose(got.sum(1), 3.0, rtol=1e-5)
  assert np.all(got[:4] == 1.0) and not np.allclose(got[4:], 1.0)


@pytest.mark.parametrize('distribution', ['softmax', 'dirichlet'])
def test_rlw_random_positive_weights_summing_to_t(distribution):
  state = W.get_method('rlw', distribution=distribution).init(3)
  draws = [np.asarray(jitted('rlw')(state, G3, jnp.ones(3), jax.random.key(k))[1]) for k in range(4)]
  for w in draws:
    assert np.all(w > 0)
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)
  assert not np.allclose(draws[0], draws[1])
  again = np.asarray(jitted('rlw')(state, G3, jnp.ones(3), jax.random.key(0))[1])
  np.testing.assert_array_equal(again, draws[0])
  update, weights, _ = jitted('rlw')(state, G3, jnp.ones(3), jax.random.key(0))
  np.testing.assert_allclose(update, np.asarray(weights) @ G3, rtol=1e-5)


def test_gradnorm_raises_the_weight_of_the_slower_task():
  method = W.get_method('gradnorm', alpha=1.5, lr=0.025)
  grads = jnp.eye(2)  # equal gradient norms 1
  state = method.init(2)
  _, weights, state = jitted('gradnorm')(state, grads, jnp.array([1.0, 1.0]), KEY)  # records L(0); r = 1
  np.testing.assert_allclose(weights, [1.0, 1.0])
  np.testing.assert_allclose(state['weights'], [1.0, 1.0])  # |G^W − target| = 0: no step
  _, weights, state = jitted('gradnorm')(state, grads, jnp.array([0.9, 0.5]), KEY)
  np.testing.assert_allclose(weights, [1.0, 1.0])  # the update uses this step's weights
  # r = (0.9, 0.5) / 0.7; targets 1 · r^1.5 = (1.458, 0.604); G^W = (1, 1): sign = (−1, +1), step ±lr.
  np.testing.assert_allclose(state['weights'], [1.025, 0.975], rtol=1e-6)
  # An absent task (zero row, zero loss) gets no step and leaves the others' statistics alone.
  # Task 0 alone: r_0 = 1, target = Ḡ = G^W_0, so no step either.
  _, _, state2 = jitted('gradnorm')(state, grads.at[1].set(0.0), jnp.array([0.9, 0.0]), KEY)
  np.testing.assert_allclose(state2['weights'], [1.025, 0.975], rtol=1e-6)


def test_famo_weights_and_logit_step():
  method = W.get_method('famo', lr=0.025, weight_decay=0.0)
  state = method.init(2)
  grads = jnp.eye(2)
  update, weights, state = jitted('famo')(state, grads, jnp.array([1.0, 1.0]), KEY)
  np.testing.assert_allclose(weights, [1.0, 1.0], rtol=1e-6)  # equal losses and logits: EW
  np.testing.assert_allclose(state['logits'], [0.0, 0.0])  # nothing to compare with on the first step
  # Task 0's loss halves, task 1's stays: δ = (log 2, 0); ∇ξ = z(δ − zᵀδ) = (+, −); Adam's first step is ±lr.
  losses = np.array([0.5, 1.0], np.float32)
  _, weights, state = jitted('famo')(state, grads, jnp.asarray(losses), KEY)
  np.testing.assert_allclose(state['logits'], [-0.025, 0.025], rtol=1e-4)
  z = np.exp([-0.025, 0.025]) / np.exp([-0.025, 0.025]).sum()
  expected = 2 * (z / (losses + 1e-8)) / (z / (losses + 1e-8)).sum()
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  # Absent task: weight 0, the present one carries T_p = 1; nothing NaN.
  update, weights, state = jitted('famo')(state, grads.at[1].set(0.0), jnp.array([0.4, 0.0]), KEY)
  np.testing.assert_allclose(weights, [1.0, 0.0], rtol=1e-6)
  assert np.all(np.isfinite(state['logits'])) and float(state['prev_losses'][1]) == 0.0


# ---- Jacobian helpers ---------------------------------------------------------------------------------------------
def _mlp_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      'hidden': {'w': jax.random.normal(k1, (4, 6)), 'b': jnp.zeros(6)},
      'out': {'w': jax.random.normal(k2, (6, 3)), 'b': jax.random.normal(k3, (3,))},
  }


def _task_losses(params, x, y):
  h = jnp.tanh(x @ params['hidden']['w'] + params['hidden']['b'])
  z = h @ params['out']['w'] + params['out']['b']  # [B, 3]: one regression output per task
  return jnp.mean(jnp.square(z - y), axis=0)  # [3]


def test_task_jacobian_matches_separate_grads():
  params = _mlp_params(jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (5, 4))
  y = jax.random.normal(jax.random.key(3), (5, 3))
  losses, grads = jax.jit(functools.partial(W.task_jacobian, _task_losses))(params, x, y)
  np.testing.assert_allclose(losses, jax.jit(_task_losses)(params, x, y), rtol=1e-6)
  assert grads.shape == (3, 4 * 6 + 6 + 6 * 3 + 3)
  grad_t = jax.jit(lambda p, t: jax.grad(lambda q: _task_losses(q, x, y)[t])(p))  # T separate passes, one compile
  for t in range(3):
    g_t = grad_t(params, t)
    np.testing.assert_allclose(grads[t], W.flatten_grads(g_t), rtol=1e-5, atol=1e-6)
    back = W.unflatten_grads(grads[t], params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(g_t)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  aux = jax.jit(
      lambda p: W.task_jacobian(
          lambda q: (jnp.stack([q['out']['b'][0] ** 2, q['out']['b'].sum()]), {'aux': q['out']['b']}), p, has_aux=True
      )
  )(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  expected = [
      {**zeros, 'out': {**zeros['out'], 'b': jnp.array([2 * params['out']['b'][0], 0.0, 0.0])}},
      {**zeros, 'out': {**zeros['out'], 'b': jnp.ones(3)}},
  ]
  np.testing.assert_allclose(aux[1], np.stack([W.flatten_grads(e) for e in expected]), rtol=1e-6)
  np.testing.assert_array_equal(aux[2]['aux'], params['out']['b'])
  with pytest.raises(ValueError, match='vector'):
    W.unflatten_grads(jnp.zeros(3), params)


def test_cosine_similarity_matrix_is_safe_for_zero_rows():
  grads = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
  cos = np.asarray(W.cosine_similarity_matrix(grads))
  s = 1 / np.sqrt(2)
  expected = np.array([[1, s, 0, -1], [s, 1, 0, -s], [0, 0, 0, 0], [-1, -s, 0, 1]])
  np.testing.assert_allclose(cos, expected, rtol=1e-6, atol=1e-7)
