"""The accelerator switches on CPU: ``config.precision`` (bfloat16 tracks float32 on the affect smoke run),
``config.weighting.jacobian`` ('vmap' and 'rows' give the same Jacobian — w.r.t. the parameters and, as MGDA-UB
takes it, w.r.t. the features — the same update for every gradient method, and the same PCGrad train step) and the
config checks of ``precision``, ``remat`` and ``weighting.jacobian``.

Cheapness: steps and the Jacobian programs are compiled with XLA:CPU's quick options (as in
tests/test_weighting_in_train_step.py; the traced programs are the train loop's own), on a one-device mesh, from one
shared initial state per objective. ``remat`` in the real train step runs in tests/test_bench.py's device_check test
(ResNet-50 with BatchNorm); its gradients are compared in tests/test_models.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, compile_fast as _compile
from mtlmatch import config_checks
from mtlmatch import config_lib
from mtlmatch import data
from mtlmatch import experiment as experiment_lib
from mtlmatch import step as step_lib
from mtlmatch import weighting


def _mesh1():
  return jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])


def _host_copy(state, exp):
  # Fresh device buffers for each run: the step donates its state.
  return jax.device_put(jax.tree.map(np.array, state), exp.replicated)


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision.

# The largest relative gap |L_bf16 − L_f32| / L_f32 seen on the affect smoke run below (6 steps; measured on this
# CPU): total loss 1.0e-2 (seed 0, step 6; 1.4e-4 and 2.6e-4 with seeds 1 and 2), any single named loss 1.4e-2.
# The tolerances leave a margin of about 3x.
BF16_RTOL_TOTAL = 0.03
BF16_RTOL_NAMED = 0.05


def test_bfloat16_tracks_float32_on_the_affect_smoke_run(tfds_dir):
  """configs/affect.py:dm,smoke (6 steps of 16, logged every 2) from one initial state on the same batches: every
  step's loss in bfloat16 within BF16_RTOL_TOTAL of float32's (and each named loss within BF16_RTOL_NAMED), while
  the parameters and the optimizer state stay float32 and the run really computed in bfloat16."""
  runs, initial, batches = {}, None, None
  config = config_lib.load_config(f'{REPO}/configs/affect.py:dm,smoke')
  config.data.data_dir = tfds_dir
  benchmark = data.get_benchmark(config.data.name, data_dir=tfds_dir, seed=config.data.seed, **config.data.options)
  for precision in ('float32', 'bfloat16'):
    config.precision = precision
    exp = experiment_lib.build_experiment(config, _mesh1(), benchmark=benchmark)
    if initial is None:  # the initial state and the batches do not depend on the compute dtype: share them
      initial = jax.device_get(_compile(jax.jit(exp.init_state).lower())())
      stream = exp.train_batches(0)
      batches = [next(stream) for _ in range(config.total_steps)]
    state = _host_copy(initial, exp)
    step = _compile(exp.step_fn.lower(state, batches[0]))
    metrics = []
    for batch in batches:
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
    runs[precision] = jax.device_get(state), metrics
  assert exp.model.encoder.dtype == jnp.bfloat16 and all(h.dtype == jnp.bfloat16 for h in exp.model.heads.values())
  state, metrics = runs['bfloat16']
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state)) if x.dtype.kind == 'f')
  reference = runs['float32'][1]
  for step, (m32, m16) in enumerate(zip(reference, metrics, strict=True), start=1):
    assert bool(m16['finite'])
    np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=BF16_RTOL_TOTAL, err_msg=f'step {step}')
    for key in (k for k in m32 if k.startswith('loss/')):
      np.testing.assert_allclose(m16[key], m32[key], rtol=BF16_RTOL_NAMED, err_msg=f'step {step} {key}')
  assert any(m16['loss'] != m32['loss'] for m32, m16 in zip(reference, metrics))


# ---------------------------------------------------------------------------------------------------------------
# The Jacobian path: 'vmap' vs 'rows'.


def _dm_dgr_config(tfds_dir, method, jacobian):
  """affect dm+dgr smoke with a tiny CNN: DM as a third combined loss (terms_as_tasks) and DGR added on top."""
  config = config_lib.load_config(f'{REPO}/configs/affect.py:dm+dgr,smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4,), 'features': 8}
  config.weighting.terms_as_tasks = True
  config_lib.set_weighting(config, method)
  config.weighting.jacobian = jacobian
  return config


@functools.cache
def _setup(tfds_dir):
  """PCGrad's experiment with the 'rows' Jacobian, its initial state and one batch (shared by the two tests below)."""
  exp = experiment_lib.build_experiment(_dm_dgr_config(tfds_dir, 'pcgrad', 'rows'), _mesh1())
  initial = jax.device_get(_compile(jax.jit(exp.init_state).lower())())
  return exp, initial, next(exp.train_batches(0))


def test_resolve_jacobian():
  assert weighting.resolve_jacobian('auto', backend='cpu') == 'rows'
  assert weighting.resolve_jacobian('auto', backend='gpu') == 'vmap'
  assert weighting.resolve_jacobian('auto', backend='tpu') == 'vmap'
  assert [weighting.resolve_jacobian(m, backend='cpu') for m in ('vmap', 'rows')] == ['vmap', 'rows']
  with pytest.raises(ValueError, match=r"jacobian: got 'jvp', expected one of \['auto', 'vmap', 'rows'\]"):
    weighting.resolve_jacobian('jvp')


def test_vmap_and_rows_give_the_same_jacobian_and_update_for_every_gradient_method(tfds_dir):
  """G of the train step's losses (3 combined, the tiny CNN with the CPU GEMM convolution) pulled back both ways, and
  MGDA-UB's rows w.r.t. the shared features and the heads, in one program; then every method of
  weighting.GRADIENT_METHODS applied to each G, in a second program."""
  exp, initial, batch = _setup(tfds_dir)
  combined, _ = experiment_lib.loss_names(exp.objective, exp.config)
  params = initial.params

  def encode(p):
    return exp.model.encode({'params': p, 'batch_stats': initial.batch_stats}, batch['image'], train=True)[0]

  def losses_from(features, heads):
    logits = {t: exp.model.apply_head(t, heads[t], features) for t in exp.model.heads}
    named = exp.objective(
        {'features': features, 'logits': logits},
        batch['labels'],
        dummies=initial.dummy_params,
        rng=jax.random.PRNGKey(0),
    )
    return jnp.stack([named[n] for n in combined])

  def jacobians(p):
    eye = jnp.eye(len(combined))
    rows, vjp_fn = jax.vjp(lambda q: losses_from(encode(q), q['heads']), p)
    _, features_vjp = jax.vjp(losses_from, encode(p), p['heads'])  # MGDA-UB's (d_features, d_heads) rows
    out = {}
    for how in ('vmap', 'rows'):
      jac = weighting.pullback_rows(vjp_fn, eye, how)[0]
      out[how] = jax.vmap(weighting.flatten_grads)(jac['encoder']), weighting.pullback_rows(features_vjp, eye, how)
    return rows, out

  task_losses, out = _compile(jax.jit(jacobians).lower(params))(params)
  jax.tree.map(lambda r, v: np.testing.assert_allclose(r, v, rtol=1e-5, atol=1e-7), out['rows'], out['vmap'])
  grads = {how: g for how, (g, _) in out.items()}
  assert grads['vmap'].shape == (3, weighting.flatten_grads(params['encoder']).size)
  assert np.all(np.linalg.norm(grads['vmap'], axis=1) > 0)

  methods = {name: weighting.get_method(name) for name in weighting.GRADIENT_METHODS}
  states = {name: weighting.init_state(m, len(combined), grads['vmap'].shape[1]) for name, m in methods.items()}

  def updates(g_vmap, g_rows, losses_):
    key = jax.random.PRNGKey(1)
    return {
        name: (m.apply(states[name], g_vmap, losses_, key)[0], m.apply(states[name], g_rows, losses_, key)[0])
        for name, m in methods.items()
    }

  args = (grads['vmap'], grads['rows'], task_losses)
  for name, (u_vmap, u_rows) in _compile(jax.jit(updates).lower(*args))(*args).items():
    assert np.all(np.isfinite(u_vmap)) and np.any(u_vmap != 0), name
    np.testing.assert_allclose(u_rows, u_vmap, rtol=1e-4, atol=1e-6, err_msg=name)


def test_vmap_and_rows_give_the_same_train_step(tfds_dir):
  """PCGrad's train step (the parameter Jacobian, DM as a combined loss, DGR's additive row) built from
  ``weighting.jacobian='rows'``, against the same step with 'vmap'."""
  exp, initial, batch = _setup(tfds_dir)
  step_rows = exp.step_fn.__wrapped__  # the functools.partial of step_lib.train_step that build_experiment jitted
  assert step_rows.keywords['jacobian'] == 'rows'  # the config key reaches the step
  step_vmap = functools.partial(step_rows.func, **{**step_rows.keywords, 'jacobian': 'vmap'})
  combined, _ = experiment_lib.loss_names(exp.objective, exp.config)
  state = initial.replace(weighting_state=step_lib.weighting_init(exp.method, len(combined), initial.params))
  results = {}
  for how, step in (('rows', step_rows), ('vmap', step_vmap)):
    new_state, metrics = _compile(jax.jit(step).lower(state, batch))(state, batch)
    results[how] = jax.device_get((new_state.params, metrics))
  (params_v, m_v), (params_r, m_r) = results['vmap'], results['rows']
  for a, b in zip(jax.tree.leaves(params_v), jax.tree.leaves(params_r), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  for key in (k for k in m_v if k.startswith(('loss', 'weight/', 'cosine/')) or k == 'grad_norm'):
    np.testing.assert_allclose(m_r[key], m_v[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert m_v['grad_norm'] > 0


# ---------------------------------------------------------------------------------------------------------------
# Config checks.


@pytest.mark.parametrize(
    'change, message',
    [
        ({'precision': 'float16'}, r"config\.precision: got 'float16', expected one of \['float32', 'bfloat16'\]"),
        ({'remat': 'yes'}, r"config\.remat: got 'yes', expected True or False"),
        ({'weighting.jacobian': 'jvp'}, r"config\.weighting\.jacobian: got 'jvp', expected one of \['auto', 'vmap'"),
        (
            {'precision': 'bfloat16', 'encoder.kwargs.dtype': 'float16'},
            r"config\.precision='bfloat16' with config\.encoder\.kwargs\.dtype='float16'",
        ),
    ],
)
def test_config_errors(change, message):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,smoke').to_dict()
  for key, value in change.items():  # on a dict: a ConfigDict refuses a value of another type
    *path, last = key.split('.')
    functools.reduce(lambda d, k: d[k], path, config)[last] = value
  config = ml_collections.ConfigDict(config)
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)


def test_model_kwargs_apply_precision_and_remat():
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,encoder=resnet50,smoke')
  encoder, head = config_lib.model_kwargs(config)
  assert encoder == dict(config.encoder.kwargs) and 'remat' not in encoder and head == {}
  config.precision, config.remat = 'bfloat16', True
  encoder, head = config_lib.model_kwargs(config)
  assert encoder == {**config.encoder.kwargs, 'dtype': 'bfloat16', 'remat': True} and head == {'dtype': 'bfloat16'}
  assert 'remat' not in config.encoder.kwargs  # one switch: config.remat, not an encoder field in the config
