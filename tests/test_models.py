"""Tests of mtlmatch.models: encoder shapes on several input sizes, variable layout, BatchNorm train/eval behaviour
(against numpy statistics), stateless heads, build errors, a batch-sharded jit over 8 devices equal to 1 device; and
ResNet-50 / the ImageNet stem (parameter counts against torchvision's, stage shapes), remat (same gradients) and
bfloat16 heads.

Widths are tiny and most calls run eagerly: on CPU the cost is compiling each primitive (parameter initialisers
included) once per shape, so the tests reuse one batch size (8) and the shapes of the first test where they can.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO
from mtlmatch import config_lib
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
  assert sorted(ENCODERS) == ['cnn', 'dilated_resnet', 'mlp', 'resnet18', 'resnet50', 'segnet', 'vit_tiny']
  assert sorted(HEADS) == ['aspp', 'linear', 'mlp', 'mtan', 'segnet_decoder']


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
  with pytest.raises(ValueError, match=r"encoder name: got 'resnet101', expected one of \['cnn'"):
    build_encoder('resnet101')
  with pytest.raises(ValueError, match=r"ResNet50.stem: got 'deep', expected one of \['cifar', 'imagenet'\]"):
    build_encoder('resnet50', stem='deep')
  with pytest.raises(ValueError, match=r"ViTTiny.remat: got 'yes', expected True or False"):
    build_encoder('vit_tiny', remat='yes')
  with pytest.raises(ValueError, match=r"head 'linear'.dtype: got 'int32', expected a floating dtype"):
    build_head('linear', 3, dtype='int32')
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
  with pytest.raises(
      ValueError, match=r"head name: got 'conv', expected one of \['aspp', 'linear', 'mlp', 'mtan', 'segnet_decoder'\]"
  ):
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


# ---------------------------------------------------------------------------------------------------------------
# ResNet-50, the ImageNet stem, remat and bfloat16 heads. Shapes and counts come from jax.eval_shape (no compute);
# the remat gradients from one jitted program per encoder, compiled with XLA:CPU's quick options.

FAST_COMPILE = {
    'xla_cpu_use_fusion_emitters': False,
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
}


def _num_params(name, shape, **kwargs):
  variables = jax.eval_shape(
      lambda: build_encoder(name, **kwargs).init(jax.random.key(0), jnp.zeros(shape), train=False)
  )
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def _resnet50_count(w: int, in_channels: int = 3, stem: str = 'imagenet') -> int:
  """Parameters of a ResNet-50 trunk by hand: convs without bias, BatchNorm scale + bias, bottlenecks of expansion 4
  with a 1×1-conv+BN shortcut in each stage's first block."""
  n = (49 if stem == 'imagenet' else 9) * in_channels * w + 2 * w  # stem conv + BN
  cin = w
  for s, blocks in enumerate((3, 4, 6, 3)):
    c = w * 2**s
    for b in range(blocks):
      n += cin * c + 9 * c * c + c * 4 * c + 2 * (c + c + 4 * c)  # 1×1, 3×3, 1×1 convs and their BNs
      if b == 0:
        n += cin * 4 * c + 2 * 4 * c  # shortcut conv + BN
      cin = 4 * c
  return n


def test_resnet50_parameter_count_is_torchvision_minus_the_fc_layer():
  # torchvision's resnet50 has 25,557,032 parameters; its fc layer 2048·1000 + 1000 = 2,049,000 of them.
  assert _resnet50_count(64) == 25_557_032 - 2_049_000 == 23_508_032
  assert _num_params('resnet50', (1, 224, 224, 3), stem='imagenet') == 23_508_032
  # The CIFAR stem (the default) differs only in the first conv (3×3 instead of 7×7); widths scale the count.
  assert _num_params('resnet50', (1, 32, 32, 1), width=4) == _resnet50_count(4, in_channels=1, stem='cifar')
  # ResNet-18 with the ImageNet stem: torchvision's 11,689,512 minus its fc layer (512·1000 + 1000).
  assert _num_params('resnet18', (1, 224, 224, 3), stem='imagenet') == 11_689_512 - 513_000


@pytest.mark.parametrize(
    'name, stem, size, spatial',
    [
        # ImageNet stem: /2 conv, /2 max-pool, then stages at strides 1, 2, 2, 2 (ceil at each step: 7 → 4).
        ('resnet50', 'imagenet', 112, [28, 14, 7, 4]),
        # CIFAR stem: full resolution into stage 0.
        ('resnet50', 'cifar', 36, [36, 18, 9, 5]),
    ],
)
def test_resnet_stage_shapes_and_features(name, stem, size, spatial):
  enc = build_encoder(name, width=4, stem=stem)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: enc.init(jax.random.key(0), x, train=False))
  feats, state = jax.eval_shape(
      lambda v: enc.apply(v, x, train=False, capture_intermediates=True, mutable=['intermediates']), variables
  )
  expansion = 4 if name == 'resnet50' else 1
  assert feats.shape == (2, 8 * 4 * expansion) and feats.dtype == jnp.float32
  last = [f'stage{s}_block{n - 1}' for s, n in enumerate(enc.stage_sizes)]
  got = [state['intermediates'][b]['__call__'][0].shape for b in last]
  assert got == [(2, h, h, 4 * 2**s * expansion) for s, h in enumerate(spatial)]


def test_resnet18_default_is_unchanged():
  """ResNet18() keeps its pre-stem fields' defaults (CIFAR stem, no remat) and its parameter tree."""
  enc = build_encoder('resnet18')
  assert (enc.width, tuple(enc.stage_sizes), enc.stem, enc.remat) == (64, (2, 2, 2, 2), 'cifar', False)
  assert _num_params('resnet18', (1, 32, 32, 3)) == 11_168_832  # the standard CIFAR ResNet-18 count (no fc)


def test_smoke_resnet50_is_small():
  kwargs = config_lib.SMOKE_ENCODERS['resnet50']
  assert _num_params('resnet50', (1, 32, 32, 1), **kwargs) < 20_000
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,encoder=resnet50,smoke')
  assert dict(config.encoder.kwargs) == {**config_lib.encoder_kwargs('resnet50'), **kwargs}


# The two ways remat wraps a block: a Module class with a static `train` argument (ResNet blocks, with BatchNorm; ViT
# blocks take the same path without it) and a method of the encoder (CNN stages, MLP layers).
REMAT_TINY = {
    'cnn': dict(widths=(4, 8), features=8),
    'resnet50': dict(width=2, stage_sizes=(1,)),
}


def _fast(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.mark.parametrize('name', sorted(REMAT_TINY))
def test_remat_gives_the_same_parameters_gradients_and_statistics(name):
  x = _images((8, 8, 3))
  plain, remat = (build_encoder(name, **REMAT_TINY[name], remat=r) for r in (False, True))
  remat_vars = jax.eval_shape(lambda: remat.init(jax.random.key(0), x, train=False))
  assert jax.tree.structure(remat_vars) == jax.tree.structure(
      jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))
  )  # the same parameter tree: checkpoints move between them

  def both(images):
    variables = plain.init(jax.random.key(0), images, train=False)

    def grads(enc):
      def loss(params):
        feats, updates = enc.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.square(feats)), updates

      return jax.grad(loss, has_aux=True)(variables['params'])

    return grads(plain), grads(remat)

  without, with_remat = _fast(both, x)  # gradients and BatchNorm statistics of each
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_remat), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 summation order
  # Not vacuous (the branches of residual blocks start at zero, so only some leaves have non-zero gradients).
  assert any(np.any(g != 0) for g in jax.tree.leaves(without[0]))


def test_bfloat16_heads_keep_float32_params_and_logits():
  feats = _images((16,))
  heads = {name: build_head(name, 5, **kwargs) for name, kwargs in (('linear', {}), ('mlp', {'hidden': 6}))}
  bf16 = {name: head.clone(dtype=jnp.bfloat16) for name, head in heads.items()}

  def run(f):
    variables = {name: head.init(jax.random.key(0), f) for name, head in heads.items()}
    bf16_variables = {name: head.init(jax.random.key(0), f) for name, head in bf16.items()}
    return variables, bf16_variables, {n: (heads[n].apply(v, f), bf16[n].apply(v, f)) for n, v in variables.items()}

  variables, bf16_variables, logits = _fast(run, feats)
  jax.tree.map(np.testing.assert_array_equal, bf16_variables, variables)  # the same (float32) parameters
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  for ref, got in logits.values():
    assert got.dtype == jnp.float32 and not np.array_equal(got, ref)  # computed in bfloat16 ...
    np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.05)  # ... to ~3 significant digits
