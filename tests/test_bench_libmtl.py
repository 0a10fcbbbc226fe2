"""experiments/bench_libmtl.py and experiments/libmtl_side.py without PyTorch: the NYUv2-layout round trip and the
image mapping both sides read, the Flax → torch parameter layout (against a numpy convolution in torch's layout),
the float64 numpy reference metrics (a hand-computed case, then ``metrics_dense`` on random data), the per-batch vs
whole-set losses, the report writer and LibMTL's patches. The forward comparison itself needs torch (skipped here)."""

from __future__ import annotations

import importlib.util
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from mtlmatch.data import dense_benchmarks, nyuv2_layout, scenes
from mtlmatch.models import dense


def _load(name):
  spec = importlib.util.spec_from_file_location(f'mtlmatch_{name}', REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def bench():
  return _load('bench_libmtl')


@pytest.fixture(scope='module')
def side():
  return _load('libmtl_side')


def test_layout_round_trip_and_both_sides_see_the_same_image(tmp_path):
  arrays = scenes.generate_scenes(0, 'test', 3, 16, 16)
  nyuv2_layout.write_layout(str(tmp_path), 'val', arrays)
  back = nyuv2_layout.read_layout(str(tmp_path), 'val', num_classes=6)
  np.testing.assert_array_equal(back['image'], arrays['image'])
  for t in ('segmentation', 'depth', 'normal'):
    np.testing.assert_array_equal(back[t], arrays[t])
  # libmtl_side's NYUv2 loader: 2x − 1 of the float file; mtlmatch: uint8 / 127.5 − 1.
  theirs = 2 * np.load(tmp_path / 'val' / 'image' / '1.npy') - 1
  ours = arrays['image'][1].astype(np.float32) / np.float32(127.5) - 1
  np.testing.assert_allclose(theirs, ours, atol=1e-6)
  assert np.load(tmp_path / 'val' / 'label' / '1.npy').shape == (16, 16)


def _conv_nchw(x, w, b=None):
  """Cross-correlation with torch's layout (x [N, C, H, W], w [O, C, kh, kw], padding (k − 1) / 2), numpy."""
  k = w.shape[-1]
  p = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  h, wd = x.shape[2:]
  out = np.zeros((x.shape[0], w.shape[0], h, wd))
  for i in range(k):
    for j in range(k):
      out += np.einsum('nchw,oc->nohw', xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
  return out if b is None else out + b[None, :, None, None]


def _flax_tree(rng, widths=(4, 8), decoder=(8, 4), classes=5):
  """A parameter tree in the layout of mtlmatch's segnet encoder (one conv per stage) and a segnet_decoder head."""
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  enc, stats, c_in = {}, {}, 3
  for i, w in enumerate(widths):
    enc[f'stage{i}_conv0'] = {'kernel': normal(3, 3, c_in, w)}
    enc[f'stage{i}_bn0'] = {'scale': normal(w), 'bias': normal(w)}
    stats[f'stage{i}_bn0'] = {'mean': normal(w), 'var': np.abs(normal(w))}
    c_in = w
  head = {}
  for k, w in enumerate(decoder):
    head[f'dec{k}_conv'] = {'kernel': normal(3, 3, c_in, w), 'bias': normal(w)}
    head[f'dec{k}_gn'] = {'scale': normal(w), 'bias': normal(w)}
    c_in = w
  head['classifier'] = {'kernel': normal(1, 1, c_in, classes), 'bias': normal(classes)}
  return {'encoder': enc, 'heads': {'segmentation': head}}, {'encoder': stats}


def test_torch_state_layout_and_conv_weights_in_torch_order(bench):
  rng = np.random.default_rng(0)
  params, stats = _flax_tree(rng)
  state = bench.torch_state(params, stats)
  expected = {
      'encoder.stages.0.0.weight': (4, 3, 3, 3),
      'encoder.stages.1.0.weight': (8, 4, 3, 3),
      'encoder.stages.1.1.running_var': (8,),
      'decoders.segmentation.steps.0.0.weight': (8, 8, 3, 3),
      'decoders.segmentation.steps.1.1.weight': (4,),
      'decoders.segmentation.classifier.weight': (5, 4, 1, 1),
      'decoders.segmentation.classifier.bias': (5,),
  }
  for k, shape in expected.items():
    assert state[k].shape == shape, k
  assert len(state) == 2 * 5 + 2 * 4 + 2  # per stage conv + 4 BN arrays; per step conv w, b + GN w, b; classifier
  np.testing.assert_array_equal(state['encoder.stages.1.1.running_mean'], stats['encoder']['stage1_bn0']['mean'])
  np.testing.assert_array_equal(
      state['decoders.segmentation.steps.1.1.bias'], params['heads']['segmentation']['dec1_gn']['bias']
  )
  # Flax's conv (NHWC input, HWIO kernel) equals the numpy cross-correlation with the converted weight (NCHW, OIHW).
  x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
  kernel = params['encoder']['stage1_conv0']['kernel']
  flax_out = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  torch_order = _conv_nchw(np.moveaxis(x, -1, 1).astype(np.float64), state['encoder.stages.1.0.weight'])
  np.testing.assert_allclose(np.moveaxis(torch_order, 1, -1), flax_out, atol=1e-4)
  two = {'encoder': {**params['encoder'], 'stage0_conv1': params['encoder']['stage0_conv0']}, 'heads': {}}
  with pytest.raises(ValueError, match='one conv \\+ BatchNorm per stage'):
    bench.torch_state(two, stats)


def test_reference_metrics_on_a_hand_computed_case(bench):
  logits = np.zeros((1, 1, 4, 2))
  logits[0, 0, [1, 2], 1] = 1  # predicts 0, 1, 1, 0
  outputs = {
      'segmentation': logits,
      'depth': np.array([2.0, 1.0, 5.0, 3.0]).reshape(1, 1, 4, 1),
      'normal': np.array([[0, 0, 2], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float).reshape(1, 1, 4, 3),
  }
  labels = {
      'segmentation': np.array([[[0, 1, 0, -1]]]),
      'depth': np.array([1.0, 2.0, 0.0, 3.0]).reshape(1, 1, 4, 1),
      'normal': np.array([[0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], float).reshape(1, 1, 4, 3),
  }
  m = bench.reference_metrics(outputs, labels)
  # Confusion over 3 labelled pixels: (0→0), (1→1), (0→1): IoU_0 = 1/2, IoU_1 = 1/2; 2 of 3 right.
  assert m['segmentation'] == {'miou': 0.5, 'pixel_accuracy': pytest.approx(2 / 3)}
  assert m['depth'] == {'abs_err': pytest.approx(2 / 3), 'rel_err': pytest.approx((1 + 0.5 + 0) / 3)}  # 2 invalid
  # Angles 0°, 90°, 45°; pixel 3 invalid.
  assert m['normal']['mean_angle'] == pytest.approx(45.0)
  assert m['normal']['median_angle'] == pytest.approx(45.0)
  assert m['normal']['within_11.25'] == pytest.approx(1 / 3) and m['normal']['within_30'] == pytest.approx(1 / 3)


def _random_set(rng, n=6, h=8, w=8, c=6):
  outputs = {
      'segmentation': rng.normal(size=(n, h, w, c)).astype(np.float32),
      'depth': rng.uniform(0.5, 4, size=(n, h, w, 1)).astype(np.float32),
      'normal': rng.normal(size=(n, h, w, 3)).astype(np.float32),
  }
  seg = rng.integers(-1, c, size=(n, h, w)).astype(np.int32)
  depth = rng.uniform(0.5, 4, size=(n, h, w, 1)).astype(np.float32) * (rng.uniform(size=(n, h, w, 1)) > 0.2)
  normal = rng.normal(size=(n, h, w, 3))
  normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True) * (rng.uniform(size=(n, h, w, 1)) > 0.2)
  return outputs, {'segmentation': seg, 'depth': depth.astype(np.float32), 'normal': normal.astype(np.float32)}


def test_metrics_dense_agrees_with_the_numpy_reference_on_random_data(bench):
  outputs, labels = _random_set(np.random.default_rng(1))
  tasks = dense_benchmarks.dense_tasks(6, (8, 8))
  ours = bench.our_metrics(tasks, outputs, labels, batch=6)
  ref = bench.reference_metrics(outputs, labels)
  for t, keys in bench.METRIC_KEYS.items():
    for k in keys:
      if k != 'median_angle':  # float32 sums against float64: relative 1e-6 (angles ~ 90°: 1e-4 degrees)
        assert ours[t][k] == pytest.approx(ref[t][k], rel=1e-6, abs=1e-7), (t, k)
  assert abs(ours['normal']['median_angle'] - ref['normal']['median_angle']) <= 0.005 + 1e-4  # the stated bound


def test_losses_per_batch_mean_differs_from_the_whole_set_mean(bench):
  outputs, labels = _random_set(np.random.default_rng(2), n=3)
  labels['depth'][0, :, :6] = 0  # image 0 has few valid depth pixels: its batch mean weighs more per pixel
  got = bench.test_losses(outputs, labels, batch=1)
  d_true = labels['depth'][..., 0].astype(np.float64)
  err = np.abs(outputs['depth'][..., 0] - d_true)
  per_image = [err[i][d_true[i] != 0].mean() for i in range(3)]
  assert got['depth']['per_batch_mean'] == pytest.approx(np.mean(per_image))
  assert got['depth']['whole_set'] == pytest.approx(err[d_true != 0].mean())
  assert abs(got['depth']['per_batch_mean'] - got['depth']['whole_set']) > 1e-3
  whole = bench.test_losses(outputs, labels, batch=3)
  for t in ('segmentation', 'depth', 'normal'):  # one batch: the two reductions are the same number
    assert whole[t]['per_batch_mean'] == pytest.approx(whole[t]['whole_set'])


def test_report_writer(bench, tmp_path):
  metrics = {t: {k: 0.5 for k in keys} for t, keys in bench.METRIC_KEYS.items()}
  diff = {**{t: {k: 1e-7 for k in keys} for t, keys in bench.METRIC_KEYS.items()}, 'max_abs': 1e-7}
  results = {
      'command': 'python experiments/bench_libmtl.py',
      'setup': {
          'num_train': 8,
          'num_test': 4,
          'size': 16,
          'steps': 3,
          'dgr_steps': 3,
          'warmup': 1,
          'batch': 2,
          'lr': 1e-3,
          'seed': 0,
          'threads': 1,
          'widths': [4, 8],
          'decoder_widths': [8, 4],
      },
      'forward_check': {'max_abs': 3e-6},
      'runs': {'mtlmatch ew': {'test': metrics}, 'LibMTL EW': {'test': metrics}},
      'timing': {'note': 'a note', 'rows': {'libmtl_ew': 200.0, 'mtlmatch_ew': 300.0}},
      'metric_agreement': {
          'ours_minus_numpy': diff,
          'libmtl_minus_numpy': diff,
          'losses': {t: {'whole_set': 1.0, 'per_batch_mean': 1.25} for t in bench.TASKS},
          'libmtl_losses': {t: 1.25 for t in bench.TASKS},
      },
      'versions': {'torch': 'x', 'LibMTL': '1.1.5'},
  }
  text = open(bench.write_report(results, str(tmp_path / 'REPORT.md')), encoding='utf-8').read()
  assert '| mtlmatch ew | 0.500 | 0.500 | 0.500 | 0.500 | 0.50 | 0.50 | 0.500 | 0.500 | 0.500 |' in text
  assert '| mtlmatch_ew | 300 | 1.50 |' in text
  assert '| depth | 1.00000 | 1.25000 | 1.25000 |' in text
  assert str(tmp_path) not in text and 'LibMTL 1.1.5' in text


def test_libmtl_patches_apply_once_and_refuse_other_versions(side, tmp_path):
  for rel, old, _, _ in side.PATCHES:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ''
    path.write_text(text + f'x = 1\n{old}\n')
  assert all(line.endswith(': patched') for line in side.apply_patches(str(tmp_path)))
  assert all(line.endswith('already patched') for line in side.apply_patches(str(tmp_path)))
  for rel, old, new, _ in side.PATCHES:
    assert new in (tmp_path / rel).read_text() and old not in (tmp_path / rel).read_text().replace(new, '')
  (tmp_path / 'trainer.py').write_text('nothing to patch\n')
  with pytest.raises(ValueError, match='expected LibMTL 1.1.5'):
    side.apply_patches(str(tmp_path))


def test_forward_of_the_converted_torch_network_matches(bench, side):
  torch = pytest.importorskip('torch')  # not in mtlmatch's environment; bench_libmtl.py checks this on each run
  x = np.random.default_rng(3).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  enc = dense.SegNetEncoder(widths=(4, 8), convs_per_stage=(1, 1))
  enc_vars = enc.init(jax.random.PRNGKey(0), x, train=False)
  feats = enc.apply(enc_vars, x, train=False)
  heads = {
      t: dense.SegNetDecoder(num_classes=c, widths=(8, 4))
      for t, c in (('segmentation', 6), ('depth', 1), ('normal', 3))
  }
  head_params = {t: h.init(jax.random.PRNGKey(1), feats)['params'] for t, h in heads.items()}
  state = bench.torch_state({'encoder': enc_vars['params'], 'heads': head_params}, {'encoder': enc_vars['batch_stats']})
  encoder_class, decoders = side.build_network(torch, (4, 8), (8, 4), 6)
  model = torch.nn.ModuleDict({'encoder': encoder_class(), 'decoders': decoders}).eval()
  model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  with torch.no_grad():
    rep = model['encoder'](torch.from_numpy(np.moveaxis(x, -1, 1)))
    for t, h in heads.items():
      theirs = np.moveaxis(model['decoders'][t](rep).numpy(), 1, -1)
      np.testing.assert_allclose(theirs, h.apply({'params': head_params[t]}, feats), atol=1e-5)
