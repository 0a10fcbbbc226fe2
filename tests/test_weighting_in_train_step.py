"""Every loss-weighting / gradient method inside the real train step.

For each method in ``OBJECTIVE`` (one or more of every kind of ``weighting.METHODS``: loss-only, gradient, feature-
gradient, non-linear, tracked state): two steps of the affect smoke config (a tiny CNN, batch 16) on a 1-device
and an 8-device mesh from the same initial state and the same batches give the same parameters, losses and weights
(rtol/atol 1e-5); every loss is finite; a batch in which a task has no labelled example (all AU labels −1) gives a
finite step with that task's loss exactly 0; the metrics hold ``weight/<loss>`` for every combined loss and, for the
methods that need the task Jacobian, ``cosine/<a>|<b>`` for every pair. For two gradient methods (with and without
an additive part), for MGDA-UB (rows w.r.t. the shared features) and for GradNorm (weighted head gradients) the first
step's gradient norm and weights match an independent computation from ``jax.jacrev``.

The methods are spread over two objectives so that each compile counts: plain MTL (two task losses), and
distribution matching as an extra "task" (``terms_as_tasks``) with DGR added on top (three combined losses + one
additive). Cheapness, on purpose: each method's step is compiled once per mesh and shared by all three tests; the
experiments share one benchmark, one initial state per objective (methods differ only in ``weighting_state``) and
one pair of batches; the step is compiled with XLA:CPU's fusion emitters off and at backend optimisation level 0
(about a third of the default compile time; the traced program is ``exp.step_fn``'s own — same shardings and
donation — only the code generation differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, compile_fast as _compile
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import experiment as experiment_lib
from mtlmatch import step as step_lib
from mtlmatch import weighting

NUM_STEPS = 2

# Objective per method: 'mtl' (two task losses) or 'dm+dgr' (DM as a third combined loss, terms_as_tasks=True, and
# DGR added on top). Both kinds of methods appear with each; CAGrad, MGDA, PCGrad and GradNorm see DM as a task.
# The methods added with issue 14 are here only where they bring a mechanism of their own into the train step
# (tracked [T, P] state with an update that is not weights @ G: MoCo; a loss weighting that reads gradients and tracks
# [T, P] state: ExcessMTL); tests/test_weighting_zoo.py checks every method's `apply` on 1 and 8 devices.
# Auto-Lambda is not here: its step needs validation batches (``needs`` 'meta'), and tests/test_auto_lambda.py
# runs it in the train step (1 vs 8 devices, absent task, its meta-gradient against references).
OBJECTIVE = {
    'ew': 'dm+dgr',
    'uw': 'dm+dgr',
    'dwa': 'mtl',
    'rlw': 'mtl',
    'gradnorm': 'dm+dgr',
    'famo': 'mtl',
    'mgda': 'dm+dgr',
    'mgda_ub': 'dm+dgr',
    'pcgrad': 'dm+dgr',
    'cagrad': 'dm+dgr',
    'nash_mtl': 'mtl',
    'imtl': 'mtl',
    'aligned_mtl': 'mtl',
    'moco': 'mtl',
    'excess_mtl': 'dm+dgr',
    # Issue 28's: a random scalarisation and a fixed one (losses path), a constrained projection (rows path, DM as a
    # task); MOML and FORUM (needs 'meta') run in the train step in tests/test_bilevel.py.
    'cosmos': 'mtl',
    'pbi': 'mtl',
    'pcd': 'dm+dgr',
}
COMBINED = {'mtl': ('task/expression', 'task/aus'), 'dm+dgr': ('task/expression', 'task/aus', 'term/dm')}


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _config(objective: str, method: str, tfds_dir: str):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:{objective},smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4,), 'features': 8}
  config.batch_size = 16
  config.weighting.name = method
  config.weighting.terms_as_tasks = objective != 'mtl'
  return config


@functools.cache
def _shared(tfds_dir: str):
  """The benchmark and the batches every experiment uses: 2 training batches and one with no AU label."""
  config = _config('mtl', 'ew', tfds_dir)
  benchmark = data.get_benchmark(config.data.name, data_dir=tfds_dir, seed=config.data.seed, **config.data.options)
  stream = data.train_iterator(benchmark, global_batch_size=config.batch_size, seed=config.seed)
  batches = [next(stream) for _ in range(NUM_STEPS)]
  assert all((b['labels']['aus'] >= 0).any() and (b['labels']['expression'] >= 0).any() for b in batches)
  no_aus = {**batches[0], 'labels': {**batches[0]['labels'], 'aus': np.full_like(batches[0]['labels']['aus'], -1)}}
  return benchmark, batches, no_aus


@functools.cache
def _initial_state(objective: str, tfds_dir: str):
  """Host copy of the initial train state of an objective (the same for every method but its weighting_state)."""
  benchmark = _shared(tfds_dir)[0]
  exp = experiment_lib.build_experiment(_config(objective, 'ew', tfds_dir), _mesh(1), benchmark=benchmark)
  # jit around init_state's own jit: the same program, compiled with the fast options.
  return jax.device_get(_compile(jax.jit(exp.init_state).lower())())


@functools.cache
def _run(method: str, tfds_dir: str) -> dict:
  """Per mesh size: final host state and metrics of every step; for 8 devices also the no-AU step's metrics."""
  objective = OBJECTIVE[method]
  benchmark, batches, no_aus = _shared(tfds_dir)
  results = {}
  for n in (1, 8):
    exp = experiment_lib.build_experiment(_config(objective, method, tfds_dir), _mesh(n), benchmark=benchmark)
    combined, _ = experiment_lib.loss_names(exp.objective, exp.config)
    assert combined == COMBINED[objective]
    initial = _initial_state(objective, tfds_dir)
    state = initial.replace(weighting_state=step_lib.weighting_init(exp.method, len(combined), initial.params))
    # Fresh host copies: leaves that share one buffer (e.g. equal constants in a method's init) cannot be donated.
    state = jax.device_put(jax.tree.map(np.array, state), exp.replicated)
    step = _compile(exp.step_fn.lower(state, batches[0]))
    metrics = []
    for batch in batches:
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
    results[n] = {'state': jax.device_get(state), 'metrics': metrics}
    if n == 8:
      _, m = step(state, no_aus)
      results['no_aus'] = jax.device_get(m)
  return results


METHODS = sorted(OBJECTIVE)


def test_every_mechanism_is_covered():
  assert set(OBJECTIVE) <= set(weighting.METHODS)
  # Every value of every switch the loop reads, and every (kind, needs) pair; needs 'meta' (Auto-Lambda) is
  # covered by tests/test_auto_lambda.py.
  in_loop = [m for m in weighting.METHODS.values() if m.needs != 'meta']
  for attr in ('kind', 'needs', 'linear', 'needs_num_params'):
    assert {getattr(m, attr) for m in in_loop} == {getattr(weighting.METHODS[n], attr) for n in OBJECTIVE}, attr
  pairs = {n: (m.kind, m.needs) for n, m in weighting.METHODS.items()}
  assert {pairs[m.name] for m in in_loop} == {pairs[n] for n in OBJECTIVE}
  assert {(weighting.is_gradient_method(n), n in weighting.LOSS_WEIGHTING) for n in weighting.METHODS} == {
      (weighting.is_gradient_method(n), n in weighting.LOSS_WEIGHTING) for n in OBJECTIVE
  }
  assert {m for m, o in OBJECTIVE.items() if o != 'mtl' and weighting.is_gradient_method(m)}, 'DM as a task'


@pytest.mark.parametrize('method', METHODS)
def test_method_trains_with_finite_loss_and_one_device_equals_eight(method, tfds_dir):
  runs = _run(method, tfds_dir)
  for n in (1, 8):
    for m in runs[n]['metrics']:
      assert bool(m['finite']) and np.isfinite(m['loss']) and np.isfinite(m['grad_norm']), (n, m)
      assert all(np.isfinite(v) for k, v in m.items() if k.startswith(('loss/', 'weight/', 'cosine/')))
  one, eight = runs[1], runs[8]
  assert int(one['state'].step) == int(eight['state'].step) == NUM_STEPS
  for a, b in zip(jax.tree.leaves(one['state'].params), jax.tree.leaves(eight['state'].params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(
      jax.tree.leaves(one['state'].weighting_state), jax.tree.leaves(eight['state'].weighting_state), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for m1, m8 in zip(one['metrics'], eight['metrics'], strict=True):
    assert set(m1) == set(m8)
    for key in m1:
      if key.startswith(('loss', 'weight/', 'cosine/')) or key == 'grad_norm':
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # The parameters moved (a step that silently produced a zero update would pass the checks above).
  initial = _initial_state(OBJECTIVE[method], tfds_dir).params
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(one['state'].params))]
  assert all(moved)


@pytest.mark.parametrize('method', METHODS)
def test_a_task_without_labelled_examples_gives_a_finite_step(method, tfds_dir):
  m = _run(method, tfds_dir)['no_aus']
  assert bool(m['finite']) and np.isfinite(m['loss']) and np.isfinite(m['grad_norm']), m
  assert m['loss/task/aus'] == 0.0
  assert m['loss/task/expression'] > 0
  combined = COMBINED[OBJECTIVE[method]]
  assert all(np.isfinite(m[f'weight/{name}']) for name in combined)
  if weighting.is_gradient_method(method):
    # The absent task's gradient row is exactly zero, and the logged cosine of a zero row is 0 by convention.
    assert m['cosine/task/expression|task/aus'] == 0.0
  if OBJECTIVE[method] != 'mtl':
    assert m['loss/term/dgr'] > 0 and m['loss/term/dm'] > 0


@pytest.mark.parametrize('method', METHODS)
def test_metrics_log_weights_and_gradient_cosines(method, tfds_dir):
  m = _run(method, tfds_dir)[8]['metrics'][-1]
  combined = COMBINED[OBJECTIVE[method]]
  assert {k for k in m if k.startswith('weight/')} == {f'weight/{name}' for name in combined}
  cosines = {k for k in m if k.startswith('cosine/')}
  if weighting.is_gradient_method(method):
    pairs = {f'cosine/{a}|{b}' for i, a in enumerate(combined) for b in combined[i + 1 :]}
    assert cosines == pairs
    assert all(-1.0 <= m[k] <= 1.0 for k in pairs)
  else:
    assert not cosines
  if method == 'ew':
    np.testing.assert_array_equal([m[f'weight/{name}'] for name in combined], 1.0)
  if OBJECTIVE[method] != 'mtl':
    assert 'weight/term/dgr' not in m and 'loss/term/dgr' in m  # DGR is added on top, never weighted


@pytest.mark.parametrize('method', ['cagrad', 'imtl', 'mgda_ub', 'gradnorm'])
def test_first_step_gradient_matches_an_independent_jacobian(method, tfds_dir):
  """The step's grad_norm and weights against G from ``jax.jacrev`` of the named losses, the method applied to G
  (MGDA-UB: to the Jacobian w.r.t. the shared features, then Σ_t α_t ∇_θ L_t), every additive loss's encoder gradient
  added on top, and the head gradients: each loss's summed, or for GradNorm weighted by its weights."""
  objective = OBJECTIVE[method]
  benchmark, batches, _ = _shared(tfds_dir)
  exp = experiment_lib.build_experiment(_config(objective, method, tfds_dir), _mesh(1), benchmark=benchmark)
  state = _initial_state(objective, tfds_dir)
  combined = COMBINED[objective]
  init = step_lib.weighting_init(exp.method, len(combined), state.params)
  if method == 'gradnorm':  # unequal weights, so that weighting the heads' gradients is visible in grad_norm
    init = {**init, 'weights': jnp.array([0.5, 2.0, 0.5], jnp.float32)}

  def reference(params, batch):
    def features_of(p):
      return exp.model.encode({'params': p, 'batch_stats': state.batch_stats}, batch['image'], train=True)[0]

    def losses_from(features, heads):
      logits = {t: exp.model.apply_head(t, heads[t], features) for t in exp.model.heads}
      # Fixed DGR dummies come from the state; neither DM nor fixed DGR draws randomness.
      return exp.objective(
          {'features': features, 'logits': logits},
          batch['labels'],
          dummies=state.dummy_params,
          rng=jax.random.PRNGKey(0),
      )

    named_losses = lambda p: losses_from(features_of(p), p['heads'])  # noqa: E731
    losses, jac = named_losses(params), jax.jacrev(named_losses)(params)
    flat = {n: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(jac[n]['encoder'])]) for n in losses}
    task_losses = jnp.stack([losses[n] for n in combined])
    if method == 'mgda_ub':
      jac_features = jax.jacrev(lambda f: losses_from(f, params['heads']))(features_of(params))
      _, weights, _ = exp.method.apply(init, jnp.stack([jnp.ravel(jac_features[n]) for n in combined]), task_losses)
      update = sum(w * flat[n] for w, n in zip(weights, combined))
    else:
      update, weights, _ = exp.method.apply(init, jnp.stack([flat[n] for n in combined]), task_losses)
    encoder = update + sum((flat[n] for n in losses if n not in combined), jnp.zeros_like(update))
    coefficient = {n: weights[combined.index(n)] if method == 'gradnorm' and n in combined else 1.0 for n in losses}
    head_sum = jax.tree.map(
        lambda *g: sum(g), *[jax.tree.map(lambda x, n=n: coefficient[n] * x, jac[n]['heads']) for n in losses]
    )
    heads = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(head_sum))
    return jnp.sqrt(jnp.sum(jnp.square(encoder)) + heads), weights

  grad_norm, weights = _compile(jax.jit(reference).lower(state.params, batches[0]))(state.params, batches[0])
  if method == 'gradnorm':
    start = jax.device_put(jax.tree.map(np.array, state.replace(weighting_state=init)), exp.replicated)
    step = jax.device_get(_compile(exp.step_fn.lower(start, batches[0]))(start, batches[0])[1])
    assert not np.allclose(weights, 1.0)
  else:
    step = _run(method, tfds_dir)[1]['metrics'][0]
  np.testing.assert_allclose(step['grad_norm'], grad_norm, rtol=1e-4)
  np.testing.assert_allclose([step[f'weight/{n}'] for n in combined], weights, rtol=1e-4, atol=1e-6)
