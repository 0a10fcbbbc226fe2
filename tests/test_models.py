"""Tests of mtlmatch.models: encoder shapes on several input sizes, variable layout, BatchNorm train/eval behaviour
(against numpy statistics), stateless heads, build errors, and a batch-sharded jit over 8 devices equal to 1 device.

Widths are tiny and most calls run eagerly: on CPU the cost is compiling each primitive (parameter initialisers
included) once per shape, so the tests reuse one batch size (8) and the shapes of the first test where they can.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlmatch.models import (ENCODERS, HEADS, MultiTaskModel, build_encoder, build_head, build_model)
from mtlmatch.tasks import TaskSpec

TINY = {
    'mlp': dict(hidden=(16, 8)),
    'cnn': dict(widths=(4, 8, 8), features=16),
    'resnet18': dict(width=4),
    'vit_tiny': dict(dim=12, depth=1, num_heads=3),
}
FEATURE_DIM = {'mlp': 8, 'cnn': 16, 'resnet18': 32, 'vit_tiny': 12}
TASKS = {'expr': TaskSpec('expr', 'multiclass', 7), 'au': TaskSpec('au', 'multilabel', 5)}


def _images(shape, batch=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch,) + shape), jnp.float32)


def test_registries():
  assert sorted(ENCODERS) == ['cnn', 'mlp', 'resnet18', 'vit_tiny']
  assert sorted(HEADS) == ['linear', 'mlp']


@pytest.mark.parametrize('name', sorted(TINY))
def test_encoder_features_on_any_input_size(name):
  enc = build_encoder(name, **TINY[name])
  # 8×8 (sklearn digits); vit_tiny's tiny-input case (2×2 patches) is in test_vit_cls_pool_and_input_smaller...
  for shape in [(32, 32, 1), (36, 36, 1), (32, 32, 3)] + ([(8, 8, 1)] if name != 'vit_tiny' else []):
    x = _images(shape)
    variables = enc.init(jax.random.key(0), x, train=False)
    # eval mode only: train mode differs only in resnet18's BatchNorm, tested below
    feats = enc.apply(variables, x, train=False)
    assert feats.shape == (8, FEATURE_DIM[name]) and feats.dtype == jnp.float32, shape
    assert np.all(np.isfinite(feats)), shape
    # params always float32; BatchNorm state only for resnet18
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
    assert ('batch_stats' in variables) == (name == 'resnet18')


def test_bfloat16_compute_keeps_float32_params_and_features():
  enc = build_encoder('cnn', **TINY['cnn'], dtype='bfloat16')
  assert enc.dtype == jnp.bfloat16
  x = _images((8, 8, 1))
  variables = enc.init(jax.random.key(0), x, train=False)
  feats = enc.apply(variables, x, train=False)
  ref = build_encoder('cnn', **TINY['cnn']).apply(variables, x, train=False)
  assert feats.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert not np.array_equal(feats, ref)  # the compute really ran in bfloat16 ...
  np.testing.assert_allclose(feats, ref, rtol=0.1, atol=0.05)  # ... which keeps ~3 significant digits


def test_resnet18_layout_and_parameter_count():
  x = _images((32, 32, 3))
  variables = build_encoder('resnet18', width=4).init(jax.random.key(0), x, train=False)
  params = variables['params']
  blocks = [k for k in params if k.startswith('stage')]
  assert len(blocks) == 8 and {'stem_conv', 'stem_bn'} <= set(params)
  convs = [p['kernel'] for p in _conv_kernels(params)]
  assert sum(k.shape[0] == 3 for k in convs) == 17  # 1 stem + 16 block convs are 3×3 (+ 3 1×1 shortcuts)
  assert sum(k.shape[0] == 1 for k in convs) == 3
  # the standard ResNet-18 count (11,168,832 without the fc for w = 64, as torchvision-style CIFAR ResNet-18),
  # recomputed for width w and 3 input channels: 1×1 shortcuts, convs without bias, BN scale + bias
  w = 4
  widths = [w, 2 * w, 4 * w, 8 * w]
  n_conv = 9 * 3 * w
  cin = w
  for s, c in enumerate(widths):
    n_conv += 9 * cin * c + 9 * c * c + 2 * 9 * c * c + (cin * c if s else 0)
    cin = c
  n_bn = 2 * (w + sum(4 * c + (c if s else 0) for s, c in enumerate(widths)))
  assert sum(p.size for p in jax.tree.leaves(params)) == n_conv + n_bn


def _conv_kernels(tree):
  out = []
  for value in tree.values():
    if isinstance(value, dict) and 'kernel' in value and value['kernel'].ndim == 4:
      out.append(value)
    elif isinstance(value, dict):
      out.extend(_conv_kernels(value))
  return out


def test_batchnorm_train_updates_running_stats_with_momentum_and_eval_uses_them():
  enc = build_encoder('resnet18', width=4, stage_sizes=(1, 1))
  x = _images((8, 8, 1))
  variables = enc.init(jax.random.key(1), x, train=False)
  _, state = enc.apply(
      variables,
      x,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'stem_conv',
  )
  conv_out = np.asarray(state['intermediates']['stem_conv']['__call__'][0], np.float64)
  bn = state['batch_stats']['stem_bn']
  # running ← 0.9·running + 0.1·batch, starting from mean 0, var 1 (flax uses the biased batch variance)
  np.testing.assert_allclose(bn['mean'], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn['var'], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  # eval mode: each example's features do not depend on the rest of the batch (running statistics are used)
  new_vars = {'params': variables['params'], 'batch_stats': state['batch_stats']}
  full = enc.apply(new_vars, x, train=False)
  np.testing.assert_allclose(enc.apply(new_vars, x[:2], train=False), full[:2], rtol=1e-5, atol=1e-6)
  # train mode: they do (batch statistics)
  part = enc.apply(new_vars, x[:2], train=True, mutable=['batch_stats'])[0]
  whole = enc.apply(new_vars, x, train=True, mutable=['batch_stats'])[0]
  assert not np.allclose(part, whole[:2], atol=1e-4)


@pytest.mark.parametrize('head,kwargs', [('linear', {}), ('mlp', {'hidden': 6})])
def test_heads_are_stateless_and_give_logits(head, kwargs):
  h = build_head(head, 5, **kwargs)
  feats = _images((16,))
  variables = h.init(jax.random.key(0), feats)
  assert set(variables) == {'params'}
  logits = h.apply(variables, feats)
  assert logits.shape == (8, 5) and logits.dtype == jnp.float32
  # a head re-applied with other parameters of the same structure (DGR's dummy heads)
  other = h.init(jax.random.key(1), feats)['params']
  assert jax.tree.structure(other) == jax.tree.structure(variables['params'])
  if head == 'linear':
    p = variables['params']['out']
    np.testing.assert_allclose(logits, np.asarray(feats) @ p['kernel'] + p['bias'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('encoder', ['cnn', 'resnet18'])
def test_multitask_model_layout_and_apply(encoder):
  kwargs = dict(TINY[encoder], **({'stage_sizes': (1, 1)} if encoder == 'resnet18' else {}))
  model = build_model(TASKS, encoder=encoder, encoder_kwargs=kwargs, head='mlp', head_kwargs={'hidden': 6})
  assert model.tasks == ('expr', 'au')
  x = _images((8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'encoder', 'heads'} and set(variables['params']['heads']) == {'expr', 'au'}
  has_bn = encoder == 'resnet18'
  assert (set(variables['batch_stats']) == {'encoder'}) if has_bn else variables['batch_stats'] == {}
  for train in (False, True):
    outputs, stats = model.apply(variables, x, train=train)
    d = outputs['features'].shape[1]
    assert outputs['features'].shape == (8, d)
    assert {k: v.shape for k, v in outputs['logits'].items()} == {'expr': (8, 7), 'au': (8, 5)}
    assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])
    changed = any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(variables['batch_stats']))
    )
    assert changed == (train and has_bn)
    # encode + apply_head give the same logits as apply
    feats, stats2 = model.encode(variables, x, train=train)
    np.testing.assert_array_equal(feats, outputs['features'])
    jax.tree.map(np.testing.assert_array_equal, stats2, stats)
    logits = model.apply_head('au', variables['params']['heads']['au'], feats)
    np.testing.assert_array_equal(logits, outputs['logits']['au'])
  # heads: deterministic init independent of the dict order
  swapped = build_model(
      {'au': TASKS['au'], 'expr': TASKS['expr']},
      encoder=encoder,
      encoder_kwargs=kwargs,
      head='mlp',
      head_kwargs={'hidden': 6},
  ).init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, swapped, variables)
  hash(model)  # usable as a static jit argument


def test_build_errors():
  with pytest.raises(ValueError, match=r"encoder name: got 'resnet50', expected one of \['cnn'"):
    build_encoder('resnet50')
  with pytest.raises(ValueError, match="encoder 'cnn' kwargs: got unknown \\['depth'\\]"):
    build_encoder('cnn', depth=3)
  with pytest.raises(ValueError, match='ResNet18.width: got 0'):
    build_encoder('resnet18', width=0)
  with pytest.raises(ValueError, match='CNNEncoder.widths: got \\(\\)'):
    build_encoder('cnn', widths=[])
  with pytest.raises(ValueError, match='dtype'):
    build_encoder('cnn', dtype='int8')
  with pytest.raises(ValueError, match='ViTTiny.dim: got 10'):
    build_encoder('vit_tiny', dim=10, num_heads=3)
  with pytest.raises(ValueError, match="ViTTiny.pool: got 'max'"):
    build_encoder('vit_tiny', pool='max')
  with pytest.raises(ValueError, match=r"head name: got 'conv', expected one of \['linear', 'mlp'\]"):
    build_head('conv', 3)
  with pytest.raises(ValueError, match='LinearHead.num_classes: got 0'):
    build_head('linear', 0)
  with pytest.raises(ValueError, match='tasks: got'):
    build_model({'x': TASKS['expr']})
  with pytest.raises(ValueError, match='MultiTaskModel.heads'):
    MultiTaskModel(build_encoder('mlp'), {})
  model = build_model({'expr': TASKS['expr']}, encoder='mlp', encoder_kwargs={'hidden': [4]})
  with pytest.raises(ValueError, match="task: got 'au', expected one of \\['expr'\\]"):
    model.apply_head('au', {}, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='variables: got'):
    model.apply({'params': {}}, jnp.ones((2, 4, 4, 1)), train=False)
  with pytest.raises(ValueError, match='images: got shape'):
    model.init(jax.random.key(0), jnp.ones((4, 4, 1)))


def test_vit_cls_pool_and_input_smaller_than_patch():
  enc = build_encoder('vit_tiny', **TINY['vit_tiny'], pool='cls')
  x = _images((9, 9, 1))  # 2×2 patches, a 1-pixel border dropped
  variables = enc.init(jax.random.key(0), x, train=False)
  assert variables['params']['cls'].shape == (1, 1, 12)
  assert enc.apply(variables, x, train=False).shape == (8, 12)
  with pytest.raises(ValueError, match='expected at least patch_size=4'):
    enc.init(jax.random.key(0), _images((3, 3, 1)), train=False)


def test_sharded_jit_apply_equals_single_device():
  """Train-mode apply jitted over 8 devices with the batch sharded equals the unsharded result, BatchNorm batch
  statistics included: inside jit over global arrays the BN mean/var are global-batch reductions."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  model = build_model(TASKS, encoder='resnet18', encoder_kwargs={'width': 4, 'stage_sizes': (1, 1)})
  x = _images((8, 8, 1), seed=3)  # one example per device: per-device BN statistics would differ wildly
  variables = model.init(jax.random.key(0), x)
  ref_out, ref_stats = model.apply(variables, x, train=True)  # eager, one device

  replicated = NamedSharding(mesh, P())
  variables_r = jax.device_put(variables, replicated)
  x_s = jax.device_put(x, NamedSharding(mesh, P('data')))
  out, stats = jax.jit(lambda v, im: model.apply(v, im, train=True))(variables_r, x_s)
  assert len(out['features'].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), stats, ref_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, ref_out)
  # the statistics really moved (so the comparison is not vacuous)
  assert not np.allclose(stats['encoder']['stem_bn']['mean'], variables['batch_stats']['encoder']['stem_bn']['mean'])
