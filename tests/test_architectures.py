"""LibMTL's architectures (mtlmatch/models/architectures.py, docs/maths.md §12) against references written here.

* levels: running an encoder's levels in turn is the whole encoder, bit for bit (cnn; resnet18 with its BatchNorm
  updates), so ``hps`` — the plain model, built by the same call — is unchanged;
* forwards: MMoE, CGC, DSelect-k and cross-stitch from their parameters, in numpy (the experts / columns are the
  plain base encoder applied with each copy's parameters; gates, smooth steps, codes, mixing and towers in numpy);
* the split rule: perturbing task t's head parameters changes task t's output only, for every architecture;
* LTB: its Gumbel noise is a function of (seed, step counter) and the eval path is deterministic;
* per-task encoder rows through the step's feature pullback equal jax.grad of each task's loss (mmoe, cross_stitch,
  ltb: pytree features);
* the train step: two steps of ``configs/affect.py:mtl,arch=<name>,smoke`` for every name (MMoE with PCGrad on 1 and
  8 devices, CGC with DGR, DSelect-k with MGDA-UB's feature rows, LTB with gradient accumulation).
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
from mtlmatch import models
from mtlmatch.models import architectures
from mtlmatch.tasks import TaskSpec

TASKS = {'a': TaskSpec('a', 'multiclass', 3), 'b': TaskSpec('b', 'multiclass', 2)}
CNN = {'widths': (3, 4), 'features': 5}
IMAGES = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 2)), np.float32)


def _model(name, encoder='cnn', encoder_kwargs=CNN, **kwargs):
  return models.build_model(TASKS, encoder=encoder, encoder_kwargs=encoder_kwargs, arch=name, arch_kwargs=kwargs)


def _base(encoder='cnn', encoder_kwargs=CNN):
  return models.build_encoder(encoder, **encoder_kwargs)


def _linear(p, x):
  return np.asarray(x, np.float64) @ np.asarray(p['out']['kernel'], np.float64) + np.asarray(p['out']['bias'])


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _dense(p, x):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def _expert(params):
  return np.asarray(_base().apply({'params': params}, IMAGES, train=False), np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Levels and hps.


@pytest.mark.parametrize('encoder,kwargs', [('cnn', CNN), ('resnet18', {'width': 2, 'stage_sizes': (1, 1)})])
def test_levels_in_turn_are_the_whole_encoder_bit_for_bit(encoder, kwargs):
  enc = _base(encoder, kwargs)
  variables = enc.init(jax.random.PRNGKey(0), IMAGES, train=False)
  apply = jax.jit(functools.partial(enc.apply, train=True, mutable=['batch_stats']), static_argnames='level')
  whole, whole_stats = apply(variables, IMAGES)
  x, stats = IMAGES, variables.get('batch_stats', {})
  for level in range(models.encoders.levels_of(enc) + 1):
    x, upd = apply({**variables, 'batch_stats': stats}, x, level=level)
    stats = {**stats, **upd.get('batch_stats', {})}
  np.testing.assert_array_equal(np.asarray(x), np.asarray(whole))
  jax.tree.map(np.testing.assert_array_equal, stats, whole_stats.get('batch_stats', {}))
  with pytest.raises(ValueError, match='level'):
    enc.apply(variables, IMAGES, train=False, level=models.encoders.levels_of(enc) + 1)


def test_hps_is_the_plain_model():
  plain = models.build_model(TASKS, encoder='cnn', encoder_kwargs=CNN)
  hps = _model('hps')
  assert hps == plain and type(hps.encoder) is models.CNNEncoder
  a = plain.init(jax.random.PRNGKey(0), IMAGES)
  b = hps.init(jax.random.PRNGKey(0), IMAGES)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------------------------
# Forwards against numpy.


def _logits(model, variables):
  out, _ = model.apply(variables, IMAGES, train=False)
  return {t: np.asarray(v, np.float64) for t, v in out['logits'].items()}


def test_mmoe_matches_numpy():
  model = _model('mmoe', num_experts=3)
  v = model.init(jax.random.PRNGKey(1), IMAGES)
  enc, heads = v['params']['encoder'], v['params']['heads']
  experts = np.stack([_expert(enc[f'expert_{k}']) for k in range(3)])  # [E, B, D]
  x = IMAGES.reshape(4, -1).astype(np.float64)
  got = _logits(model, v)
  for t in TASKS:
    g = _softmax(_dense(heads[t]['gate'], x))  # [B, E]
    np.testing.assert_allclose(
        got[t], _linear(heads[t]['tower'], np.einsum('be,ebd->bd', g, experts)), rtol=1e-5, atol=1e-6
    )


def test_cgc_matches_numpy():
  model = _model('cgc', num_shared=2, num_specific=2)
  v = model.init(jax.random.PRNGKey(2), IMAGES)
  enc, heads = v['params']['encoder'], v['params']['heads']
  shared = [_expert(enc[f'expert_{k}']) for k in range(2)]
  x = IMAGES.reshape(4, -1).astype(np.float64)
  got = _logits(model, v)
  for t in TASKS:
    experts = np.stack(shared + [_expert(heads[t][f'expert_{k}']) for k in range(2)])  # shared first, then own
    g = _softmax(_dense(heads[t]['gate'], x))
    np.testing.assert_allclose(
        got[t], _linear(heads[t]['tower'], np.einsum('be,ebd->bd', g, experts)), rtol=1e-5, atol=1e-6
    )


def test_dselect_k_smooth_step_codes_and_forward_match_numpy():
  gamma = 1.0
  t = np.linspace(-1, 1, 41)
  ref = np.where(t <= -0.5, 0.0, np.where(t >= 0.5, 1.0, -2 * t**3 + 1.5 * t + 0.5))
  np.testing.assert_allclose(np.asarray(architectures.smooth_step(jnp.asarray(t), gamma)), ref, atol=1e-6)
  np.testing.assert_array_equal(architectures.binary_codes(5), [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]])

  model = _model('dselect_k', num_experts=4, num_nonzeros=2, gamma=gamma)
  v = model.init(jax.random.PRNGKey(3), IMAGES)
  # Larger gate weights than the init's ±γ/100, so the smooth step leaves its linear part and saturates somewhere.
  v = jax.tree_util.tree_map_with_path(lambda path, p: p * 300.0 if 'z_logits' in jax.tree_util.keystr(path) else p, v)
  enc, heads = v['params']['encoder'], v['params']['heads']
  experts = np.stack([_expert(enc[f'expert_{k}']) for k in range(4)])
  x = IMAGES.reshape(4, -1).astype(np.float64)
  codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], bool)
  got = _logits(model, v)
  saturated = 0
  for task in TASKS:
    z = _dense(heads[task]['z_logits'], x).reshape(4, 2, 2)
    s = np.where(z <= -0.5, 0.0, np.where(z >= 0.5, 1.0, -2 * z**3 + 1.5 * z + 0.5))
    saturated += int(((s == 0) | (s == 1)).sum())
    q = np.ones((4, 2, 4))
    for e in range(4):
      for j in range(2):
        q[:, :, e] *= np.where(codes[e, j], s[:, :, j], 1 - s[:, :, j])
    w = _softmax(_dense(heads[task]['w_logits'], x))
    g = np.einsum('bk,bke->be', w, q)
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)  # E a power of 2: every selector's q sums to 1
    ref = _linear(heads[task]['tower'], np.einsum('be,ebd->bd', g, experts))
    np.testing.assert_allclose(got[task], ref, rtol=1e-4, atol=1e-5)
  assert saturated > 0


def test_mtan_heads_read_their_attended_map_through_their_own_readout():
  """arch=mtan over cnn: y_t = h_t(ReLU(flat(a_t) W_t + b_t)), a_t head t's last attended map, (W_t, b_t) its own
  copy of the encoder's readout Dense; over resnet18 the readout is the global average (no parameters)."""
  model = _model('mtan')
  v = model.init(jax.random.PRNGKey(3), IMAGES)
  features = model.encoder.apply({'params': v['params']['encoder']}, IMAGES, train=False)
  logits = _logits(model, v)
  for t in TASKS:
    head = v['params']['heads'][t]
    attended = np.asarray(model.heads[t].attention.apply({'params': head['attention']}, features), np.float64)
    assert attended.shape == (4, 2, 2, CNN['widths'][-1])  # two 2x2 pools of 8x8
    hidden = np.maximum(_dense(head['readout']['dense'], attended.reshape(4, -1)), 0.0)
    np.testing.assert_allclose(logits[t], _linear(head['tower'], hidden), rtol=1e-5, atol=1e-6)
  resnet = _model('mtan', 'resnet18', {'width': 2, 'stage_sizes': (1, 1)})
  heads = resnet.init(jax.random.PRNGKey(3), IMAGES)['params']['heads']
  assert all('readout' not in heads[t] for t in TASKS)


def test_cross_stitch_matches_numpy():
  model = _model('cross_stitch')
  v = model.init(jax.random.PRNGKey(4), IMAGES)
  enc, heads = v['params']['encoder'], v['params']['heads']
  alpha = np.asarray(enc['cross_stitch'], np.float64)
  np.testing.assert_allclose(alpha[0], [[0.9, 0.1], [0.1, 0.9]], rtol=1e-6)  # Misra et al.'s initialisation
  alpha = alpha + np.asarray(jax.random.normal(jax.random.PRNGKey(5), alpha.shape)) * 0.3
  v['params']['encoder']['cross_stitch'] = jnp.asarray(alpha, jnp.float32)
  base = _base()

  def level(t, x, i):
    return np.asarray(base.apply({'params': enc[f'column_{t}']}, jnp.asarray(x, jnp.float32), train=False, level=i))

  tasks = list(TASKS)
  z = [level(t, IMAGES, 0) for t in tasks]  # block 0 = level 0 (two conv levels, then the readout)
  mixed = [sum(alpha[0, i, j] * z[j] for j in range(2)) for i in range(2)]
  out = [level(t, level(t, m, 1), 2) for t, m in zip(tasks, mixed)]
  got = _logits(model, v)
  for t, feats in zip(tasks, out):
    np.testing.assert_allclose(got[t], _linear(heads[t]['tower'], feats), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The split rule.

SPLIT_CASES = [(name, 'cnn', CNN) for name in architectures.ARCHITECTURES] + [
    ('cgc', 'resnet18', {'width': 2, 'stage_sizes': (1, 1)}),
    ('ple', 'resnet18', {'width': 2, 'stage_sizes': (1, 1)}),
]


@pytest.mark.parametrize('name,encoder,kwargs', SPLIT_CASES, ids=[f'{c[0]}-{c[1]}' for c in SPLIT_CASES])
def test_a_head_changes_only_its_task_and_batch_norm_stays_in_the_encoder(name, encoder, kwargs):
  model = _model(name, encoder, kwargs)
  v = model.init(jax.random.PRNGKey(0), IMAGES)
  before = _logits(model, v)
  for t in TASKS:
    bumped = jax.tree.map(lambda p: p + 0.5, v['params']['heads'][t])
    after = _logits(model, {**v, 'params': {**v['params'], 'heads': {**v['params']['heads'], t: bumped}}})
    for other in TASKS:
      changed = not np.allclose(after[other], before[other])
      assert changed == (other == t), (name, t, other)
  stats = v['batch_stats']
  assert bool(jax.tree.leaves(stats)) == (encoder == 'resnet18' or name == 'ltb')
  assert set(stats) <= {'encoder'}


def test_bad_arch_names_and_kwargs_raise_one_clear_error():
  with pytest.raises(ValueError, match=r"arch name: got 'moe', expected one of \['cgc'"):
    _model('moe')
  with pytest.raises(ValueError, match='num_experts: got 0, expected an int >= 1'):
    _model('mmoe', num_experts=0)
  with pytest.raises(ValueError, match=r"unknown \['experts'\]"):
    _model('mmoe', experts=2)
  with pytest.raises(ValueError, match='num_nonzeros: got 5, expected at most num_experts=4'):
    _model('dselect_k', num_nonzeros=5)
  with pytest.raises(ValueError, match='runs by levels'):
    _model('cross_stitch', 'mlp', {'hidden': (4,)})


def test_ltb_noise_is_a_function_of_seed_and_step_and_eval_is_deterministic():
  model = _model('ltb', seed=3)
  v = model.init(jax.random.PRNGKey(0), IMAGES)
  assert int(v['batch_stats']['encoder']['ltb_step']) == 0
  f1, s1 = model.encode(v, IMAGES, train=True)
  f1b, _ = model.encode(v, IMAGES, train=True)
  assert int(s1['encoder']['ltb_step']) == 1
  jax.tree.map(np.testing.assert_array_equal, f1, f1b)  # same (seed, step): same sample
  # The counter decides the noise: the sample at steps 0..7 is not always the same path.
  outs = []
  for n in range(8):
    stats = {'encoder': {'ltb_step': jnp.asarray(n, jnp.int32)}}
    outs.append(np.asarray(model.encode({**v, 'batch_stats': stats}, IMAGES, train=True)[0]['a']))
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])
  e1, se = model.encode(v, IMAGES, train=False)
  e2, _ = model.encode({**v, 'batch_stats': s1}, IMAGES, train=False)
  jax.tree.map(np.testing.assert_array_equal, e1, e2)
  assert int(se['encoder']['ltb_step']) == 0


# ---------------------------------------------------------------------------------------------------------------
# The train step, through the affect config.


def _mesh(n: int):
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _config(name: str, tfds_dir: str, methods='mtl', weighting='ew', accum=1):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:{methods},arch={name},weighting={weighting},smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4, 4), 'features': 8}
  config.batch_size = 16
  config.grad_accum_steps = accum
  return config


@functools.cache
def _batch(tfds_dir: str):
  config = _config('hps', tfds_dir)
  benchmark = data.get_benchmark(config.data.name, data_dir=tfds_dir, seed=config.data.seed, **config.data.options)
  return benchmark, next(data.train_iterator(benchmark, global_batch_size=16, seed=0))


def _step(config, tfds_dir: str, devices: int = 1):
  benchmark, batch = _batch(tfds_dir)
  exp = experiment_lib.build_experiment(config, _mesh(devices), benchmark=benchmark)
  initial = jax.tree.map(np.array, jax.device_get(_compile(jax.jit(exp.init_state).lower())()))  # own host copies
  state = jax.device_put(jax.tree.map(np.array, initial), exp.replicated)
  step = _compile(exp.step_fn.lower(state, batch))
  for _ in range(2):  # the learning rate of step 0 is 0 (linear warmup from 0)
    state, metrics = step(state, batch)
  return initial, jax.device_get(state), jax.device_get(metrics)


STEP_CASES = {
    'hps': {},
    'mmoe': {'weighting': 'pcgrad'},
    'cgc': {'methods': 'mtl+dgr'},
    'ple': {},
    'dselect_k': {'weighting': 'mgda_ub'},
    'cross_stitch': {},
    'ltb': {'accum': 2},
    'mtan': {},
}


def test_every_architecture_has_a_step_case():
  assert sorted(STEP_CASES) == sorted(architectures.ARCHITECTURES)


@pytest.mark.parametrize('name', sorted(STEP_CASES))
def test_train_steps_of_every_architecture(name, tfds_dir):
  initial, state, metrics = _step(_config(name, tfds_dir, **STEP_CASES[name]), tfds_dir)
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial.params, state.params)
  assert any(jax.tree.leaves(moved['encoder'])) and all(any(jax.tree.leaves(moved['heads'][t])) for t in moved['heads'])
  if name == 'ltb':
    assert int(state.batch_stats['encoder']['ltb_step']) == 2
  if name == 'cgc':
    assert 'term/dgr' in ''.join(metrics)


def test_mmoe_with_pcgrad_one_device_equals_eight(tfds_dir):
  config = _config('mmoe', tfds_dir, weighting='pcgrad')
  _, one, m1 = _step(config, tfds_dir, 1)
  _, eight, m8 = _step(config, tfds_dir, 8)
  np.testing.assert_allclose(float(m1['loss']), float(m8['loss']), rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), one.params, eight.params)


@pytest.mark.parametrize('name', ['mmoe', 'cross_stitch', 'ltb'])
def test_per_task_encoder_rows_through_the_feature_pullback_equal_jax_grad_of_each_task(name):
  """The step's route (features Z, the cotangent ∂L_t/∂Z through the heads, then the encoder's pullback) gives
  ∇_θ L_t of the whole model for each task t, with Z a pytree (experts, or one column per task)."""
  from mtlmatch import step as step_lib  # pylint: disable=g-import-not-at-top

  model = _model(name)
  v = model.init(jax.random.PRNGKey(0), IMAGES)
  params, stats = v['params'], v['batch_stats']
  images = jnp.asarray(IMAGES)
  labels = {'a': jnp.array([0, 1, 2, 0]), 'b': jnp.array([1, 0, 1, 1])}

  def task_loss(t, logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[t][:, None], axis=1))

  features, _, pullback = step_lib.encoder_pass(model, params, stats, images)
  for t in TASKS:
    d_features = jax.grad(lambda z, t=t: task_loss(t, model.apply_head(t, params['heads'][t], z)))(features)
    row = jax.tree.map(lambda g: g[0], pullback(jax.tree.map(lambda c: c[None], d_features), 'rows'))

    def whole(enc, t=t):
      p = {**params, 'encoder': enc}
      return task_loss(t, model.apply({'params': p, 'batch_stats': stats}, images, train=True)[0]['logits'][t])

    reference = jax.grad(whole)(params['encoder'])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), row, reference)
