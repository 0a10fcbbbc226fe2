"""The train step through the dense networks is exact: 4 microbatches on 8 devices equal one pass on 1 device.

Per gradient path (``method.needs``): EW with DGR's dummy decoders (the losses path and the grad-of-grad), PCGrad
(per-task rows of the shared parameters, through MTAN's attention heads) and MGDA-UB (rows w.r.t. the encoder's
feature *pytree*: every stage map, under one-label so tasks are absent from the batch). The SegNet encoder runs with
GroupNorm there, which normalises each example on its own (with BatchNorm each microbatch has its own statistics, by
design). DeepLabV3's split network (dilated ResNet with BatchNorm, ASPP heads) is checked 1 device against 8 without
accumulation: the BatchNorm statistics are those of the global batch either way.

Each case compiles two steps at 16 × 16 with the smallest networks (XLA:CPU's quick options, conftest.compile_fast).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import REPO, compile_fast as _compile, set_keys
from mtlmatch import config_lib
from mtlmatch import experiment as experiment_lib

CASES = {
    # name: (variant, weighting, encoder, encoder kwargs, head, extra overrides)
    'ew_dgr_segnet': ('mtl+dgr', 'ew', 'segnet', {'norm': 'none'}, 'segnet_decoder', {}),
    'pcgrad_mtan': ('mtl', 'pcgrad', 'segnet', {'norm': 'none'}, 'mtan', {}),
    'mgda_ub_one_label': (
        'mtl',
        'mgda_ub',
        'segnet',
        {'norm': 'none'},
        'segnet_decoder',
        {'data.options.labels': 'one-label'},
    ),
    'upgrad_deeplab': ('mtl+dgr', 'upgrad', 'dilated_resnet', {}, 'aspp', {}),
}


def _config(tfds_dir, case: str, accum_steps: int):
  variant, method, encoder, encoder_kwargs, head, extra = CASES[case]
  config = config_lib.load_config(f'{REPO}/configs/scenes.py:{variant},encoder={encoder},smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {**config.encoder.kwargs, **encoder_kwargs}
  config.head.name = head
  config.head.kwargs = {'widths': (8, 8, 8)} if head != 'aspp' else {'channels': 8, 'rates': (1, 2)}
  config_lib.set_weighting(config, method)
  config.batch_size = 32
  config.grad_accum_steps = accum_steps
  return set_keys(config, **extra)


def _mesh(n):
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


@functools.cache
def _one_step(tfds_dir, case, accum_steps, devices):
  exp = experiment_lib.build_experiment(_config(tfds_dir, case, accum_steps), _mesh(devices))
  state = _compile(jax.jit(exp.init_state).lower())()
  batch = next(exp.train_batches(0))
  new_state, metrics = _compile(exp.step_fn.lower(state, batch))(state, batch)
  return jax.device_get((new_state.params, new_state.batch_stats, new_state.weighting_state, metrics, batch['labels']))


@pytest.mark.parametrize('case', sorted(CASES))
def test_eight_devices_with_microbatches_equal_one_device_in_one_pass(tfds_dir, case):
  accum = 1 if CASES[case][2] == 'dilated_resnet' else 4  # BatchNorm: no accumulation (module docstring)
  params_1, stats_1, wstate_1, m_1, labels = _one_step(tfds_dir, case, 1, 1)
  params_8, stats_8, wstate_8, m_8, _ = _one_step(tfds_dir, case, accum, 8)
  keys = [k for k in m_1 if k.startswith(('loss', 'weight/', 'cosine/'))] + ['grad_norm']
  for key in keys:  # a cosine near 0.1 is a difference of larger numbers: its rounding is absolute, ~1e-6
    np.testing.assert_allclose(
        m_8[key], m_1[key], rtol=3e-5, atol=1e-5 if key.startswith('cosine/') else 1e-7, err_msg=key
    )
  assert m_1['grad_norm'] > 0 and all(np.isfinite(m_1[k]) for k in keys)
  if CASES[case][0] == 'mtl+dgr':
    assert m_1['loss/term/dgr'] > 0
  if 'one-label' in CASES[case][5].values():  # each image labelled for one task: every pixel of the others invalid
    seg_valid = (labels['segmentation'] >= 0).any((1, 2))
    depth_valid = (labels['depth'] > 0).any((1, 2, 3))
    assert not np.any(seg_valid & depth_valid)
  leaves_1, leaves_8 = jax.tree.leaves((params_1, stats_1, wstate_1)), jax.tree.leaves((params_8, stats_8, wstate_8))
  assert len(leaves_1) == len(leaves_8)
  for a, b in zip(leaves_1, leaves_8, strict=True):
    np.testing.assert_allclose(b, a, rtol=3e-5, atol=2e-6)
