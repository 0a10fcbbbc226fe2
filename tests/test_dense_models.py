"""Dense encoders and heads (mtlmatch.models.dense): the features contract, per-pixel outputs at the image size,
stateless heads (DGR's dummies), a finite gradient, and build_model. Shapes are checked abstractly
(``jax.eval_shape``: no compilation); a few tiny models are run for real."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compile_fast
from mtlmatch.models import ENCODERS, HEADS, build_encoder, build_head, build_model, dense
from mtlmatch.tasks import TaskSpec

B, C = 2, 5
TINY_ENCODERS = {
    'dilated_resnet': dict(widths=(4, 8, 8, 16), stage_sizes=(1, 1, 1, 1), block='basic'),
    'segnet': dict(widths=(4, 8, 8), convs_per_stage=(1, 1, 1)),
}
NUM_STAGES = {'dilated_resnet': 5, 'segnet': 3}


def _run(fn, *args):
  """``jax.jit(fn)(*args)`` compiled with conftest's cheap XLA:CPU options: 4-10× faster to compile on a busy
  2-core box (the parameter init's threefry most of all); the tiny arrays run in milliseconds either way."""
  return compile_fast(jax.jit(fn).lower(*args))(*args)


def _tiny_head(name: str, encoder: str) -> dict:
  if name == 'aspp':
    return dict(channels=8, rates=(1, 2, 3))
  return dict(widths=(8,) * NUM_STAGES[encoder], norm='none' if encoder == 'segnet' else 'group')


def _images(size=32, channels=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, size, size, channels)), jnp.float32)


def _shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), tree)


def test_registered():
  assert {'dilated_resnet', 'segnet'} <= set(ENCODERS) and {'aspp', 'segnet_decoder', 'mtan'} <= set(HEADS)
  assert ENCODERS['dilated_resnet'] is dense.DilatedResNet and HEADS['mtan'] is dense.MTANHead
  assert build_encoder('segnet', widths=[4, 8], convs_per_stage=[1, 1]).widths == (4, 8)
  assert build_head('aspp', 3, rates=[1, 2]).rates == (1, 2)


@pytest.mark.parametrize('output_stride', [8, 16])
def test_dilated_resnet_output_stride_and_stages(output_stride):
  enc = build_encoder('dilated_resnet', **TINY_ENCODERS['dilated_resnet'], output_stride=output_stride)
  x = _images(32)
  variables = jax.eval_shape(lambda: enc.init(jax.random.key(0), x, train=False))
  feats = jax.eval_shape(lambda v: enc.apply(v, x, train=False), variables)
  s = 32 // output_stride
  stage3 = 4 if output_stride == 8 else 2
  assert _shapes(feats) == {
      'out': ((B, s, s, 16), 'float32'),
      'stages': (
          ((B, 16, 16, 4), 'float32'),  # stem, stride 2
          ((B, 8, 8, 4), 'float32'),  # stride 4
          ((B, 4, 4, 8), 'float32'),  # stride 8
          ((B, stage3, stage3, 8), 'float32'),
          ((B, s, s, 16), 'float32'),
      ),
  }
  assert set(variables) == {'params', 'batch_stats'}
  # Dilation instead of striding: stage 3's 3×3 convs have the same kernel shapes as a plain ResNet's.
  assert variables['params']['stage3_block0']['conv1']['kernel'].shape == (3, 3, 8, 16)


def test_bottleneck_default_is_resnet50_width():
  enc = build_encoder('dilated_resnet', widths=(2, 4, 4, 8), stage_sizes=(1, 1, 1, 1))  # block='bottleneck'
  x = _images(16)
  feats = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), x, train=False)[0])
  assert feats['out'].shape == (B, 2, 2, 32)  # 4 × widths[-1], as ResNet-50's 2048 = 4 × 512
  assert dense.DilatedResNet().widths[-1] * 4 == 2048 and dense.DilatedResNet().output_stride == 8


def test_segnet_stages_halve():
  enc = build_encoder('segnet', **TINY_ENCODERS['segnet'])
  x = _images(32, channels=1)
  feats = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), x, train=False)[0])
  assert [s.shape for s in feats['stages']] == [(B, 16, 16, 4), (B, 8, 8, 8), (B, 4, 4, 8)]
  assert feats['out'].shape == (B, 4, 4, 8)


@pytest.mark.parametrize('head_name', ['aspp', 'segnet_decoder', 'mtan'])
@pytest.mark.parametrize('encoder_name', ['dilated_resnet', 'segnet'])
def test_every_pair_gives_per_pixel_outputs_at_the_image_size_and_only_params(encoder_name, head_name):
  enc = build_encoder(encoder_name, **TINY_ENCODERS[encoder_name])
  head = build_head(head_name, C, **_tiny_head(head_name, encoder_name))
  x = _images(32)

  def run():
    feats = enc.init_with_output(jax.random.key(0), x, train=False)[0]
    head_vars = head.init(jax.random.key(1), feats)
    return head_vars, head.apply(head_vars, feats)

  head_vars, out = jax.eval_shape(run)
  assert set(head_vars) == {'params'}, 'heads are stateless'
  assert (out.shape, out.dtype) == ((B, 32, 32, C), jnp.float32)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(head_vars))


def test_bfloat16_compute_keeps_float32_params_features_and_outputs():
  enc = build_encoder('segnet', **TINY_ENCODERS['segnet'], dtype='bfloat16')
  head = build_head('mtan', C, widths=(8, 8, 8), dtype='bfloat16')
  x = _images(16)

  def run():
    feats, enc_vars = enc.init_with_output(jax.random.key(0), x, train=False)
    head_vars = head.init(jax.random.key(1), feats)
    return enc_vars, feats, head_vars, head.apply(head_vars, feats)

  enc_vars, feats, head_vars, out = jax.eval_shape(run)
  assert {a.dtype for a in jax.tree.leaves((enc_vars, head_vars, feats, out))} == {jnp.dtype(jnp.float32)}


def _pixel_loss(logits, labels):
  """Mean per-pixel softmax cross-entropy; logits [B, H, W, C], labels [B, H, W]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


@pytest.mark.parametrize('encoder_name, head_name', [('segnet', 'mtan'), ('dilated_resnet', 'aspp')])
def test_finite_gradient_and_dummy_head_params(encoder_name, head_name):
  """A per-pixel loss differentiates through encoder and head (train-mode BatchNorm); the head re-applied with
  parameters from another ``head.init`` (DGR's dummies) gives finite outputs of the same shape."""
  enc = build_encoder(encoder_name, **TINY_ENCODERS[encoder_name])
  head = build_head(head_name, C, **_tiny_head(head_name, encoder_name))
  x = _images(16)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, C, (B, 16, 16)))

  def run(key):
    k_enc, k_head, k_dummy = jax.random.split(key, 3)
    enc_vars = enc.init(k_enc, x, train=False)
    feats = enc.apply(enc_vars, x, train=False)
    phi = head.init(k_head, feats)['params']
    dummy = head.init(k_dummy, feats)['params']

    def loss(theta, phi):
      feats, _ = enc.apply({**enc_vars, 'params': theta}, x, train=True, mutable=['batch_stats'])
      return _pixel_loss(head.apply({'params': phi}, feats), labels)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(enc_vars['params'], phi)
    return value, grads, head.apply({'params': phi}, feats), head.apply({'params': dummy}, feats)

  value, (g_enc, g_head), out, out_dummy = _run(run, jax.random.key(0))
  assert np.isfinite(value) and value > 0
  for g in (g_enc, g_head):
    leaves = jax.tree.leaves(g)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert sum(float(jnp.sum(leaf**2)) for leaf in leaves) > 0
  assert out.shape == out_dummy.shape == (B, 16, 16, C) and np.all(np.isfinite(out_dummy))
  assert not np.allclose(out, out_dummy)


@pytest.mark.parametrize('head_name', ['segnet_decoder', 'mtan'])
def test_build_model_with_a_dense_task(head_name):
  tasks = {'seg': TaskSpec('seg', 'multiclass', C), 'seg2': TaskSpec('seg2', 'multiclass', 3)}
  model = build_model(
      tasks, encoder='segnet', encoder_kwargs=TINY_ENCODERS['segnet'], head=head_name, head_kwargs={'widths': (8, 4, 4)}
  )
  x = _images(16)

  def run(key):
    variables = model.init(key, x)
    return variables, model.apply(variables, x, train=True)

  variables, (outputs, batch_stats) = _run(run, jax.random.key(0))
  assert set(variables['params']['heads']) == {'seg', 'seg2'} and set(batch_stats) == {'encoder'}
  assert outputs['logits']['seg'].shape == (B, 16, 16, C) and outputs['logits']['seg2'].shape == (B, 16, 16, 3)
  assert outputs['features']['out'].shape == (B, 2, 2, 8)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(outputs))


def test_errors():
  with pytest.raises(ValueError, match=r'DilatedResNet images: got spatial size \(20, 20\), expected multiples of'):
    enc = build_encoder('dilated_resnet', **TINY_ENCODERS['dilated_resnet'])
    jax.eval_shape(lambda: enc.init(jax.random.key(0), _images(20), train=False))
  with pytest.raises(
      ValueError, match=r'SegNetEncoder images: got spatial size \(12, 12\), expected multiples of the total stride 8'
  ):
    enc = build_encoder('segnet', **TINY_ENCODERS['segnet'])
    jax.eval_shape(lambda: enc.init(jax.random.key(0), _images(12), train=False))
  with pytest.raises(ValueError, match=r"SegNetDecoder features: got ndarray, expected a dense encoder's"):
    jax.eval_shape(lambda: build_head('segnet_decoder', C).init(jax.random.key(0), np.zeros((B, 8), np.float32)))
  feats = {'out': jnp.zeros((B, 2, 2, 8)), 'stages': (jnp.zeros((B, 4, 4, 4)), jnp.zeros((B, 2, 2, 8)))}
  with pytest.raises(ValueError, match=r'SegNetDecoder.widths: got 3 decoder widths \(8, 8, 8\), expected one per'):
    jax.eval_shape(lambda: build_head('segnet_decoder', C, widths=(8, 8, 8)).init(jax.random.key(0), feats))
  with pytest.raises(ValueError, match=r"ASPPHead.norm: got 'batch', expected one of \['group', 'none'\]"):
    build_head('aspp', C, norm='batch')
  with pytest.raises(ValueError, match=r'DilatedResNet.output_stride: got 4, expected one of \[8, 16\]'):
    build_encoder('dilated_resnet', output_stride=4)
  with pytest.raises(ValueError, match=r'SegNetEncoder.convs_per_stage: got \(1,\), expected one count per width'):
    build_encoder('segnet', widths=(4, 8), convs_per_stage=(1,))
  with pytest.raises(ValueError, match=r"head 'mtan' kwargs: got unknown \['rates'\]"):
    build_head('mtan', C, rates=(1,))


@pytest.mark.parametrize('encoder_name', ['dilated_resnet', 'segnet'])
def test_remat_keeps_the_parameter_tree(encoder_name):
  x = _images(16)

  def tree(remat):
    enc = build_encoder(encoder_name, **TINY_ENCODERS[encoder_name], remat=remat)

    def grads():
      variables = enc.init(jax.random.key(0), x, train=False)
      loss = lambda p: jnp.sum(enc.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])[0]['out'])
      return variables, jax.grad(loss)(variables['params'])

    return _shapes(jax.eval_shape(grads))

  assert tree(True) == tree(False)
