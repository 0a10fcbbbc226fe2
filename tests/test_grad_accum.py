"""Gradient accumulation (``config.grad_accum_steps``): a step over 4 microbatches of 32 equals the step over the
whole batch of 128, for a loss weighting with DM + co-annotation + DGR (the DGR penalty is the full-batch dummy
gradient's), for PCGrad (per-task rows accumulated, combined once), for MGDA-UB (rows w.r.t. the features) and for
Auto-Lambda (its meta-gradient transposes the accumulated backward pass); the
microbatch split and its inverse; the config checks. With the regression task ``va`` (CCC loss: a statistic of the
whole batch, not a mean over examples) the accumulated step equals the one-pass step too: the loss is evaluated on
the features of the whole batch.

The accumulated steps run on 8 devices, the references on one: the comparison also covers the split of each
device's share into microbatches. The encoder is the tiny CNN without BatchNorm (with BatchNorm the microbatches are
normalised separately, by design). Programs are compiled with XLA:CPU's quick options (conftest.compile_fast).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import REPO, compile_fast as _compile
from mtlmatch import config_checks
from mtlmatch import config_lib
from mtlmatch import experiment as experiment_lib
from mtlmatch import step as step_lib


def _config(tfds_dir, variant: str, method: str, accum_steps: int):
  config = config_lib.load_config(f'{REPO}/configs/affect.py:{variant},smoke')
  config.data.data_dir = tfds_dir
  config.encoder.kwargs = {'widths': (4, 8), 'features': 8}
  config.batch_size = 128
  config.weighting.terms_as_tasks = method != 'ew'  # DM as a combined row for the gradient methods
  config_lib.set_weighting(config, method)
  config.grad_accum_steps = accum_steps
  if method == 'auto_lambda':
    config.data.validation_fraction = 0.1
    config.optimizer.warmup_steps = 0  # a look-ahead rate > 0 at the first step: a non-zero meta-gradient
  return config


def _mesh(n):
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


@functools.cache
def _one_step(tfds_dir, variant, method, accum_steps, devices):
  exp = experiment_lib.build_experiment(_config(tfds_dir, variant, method, accum_steps), _mesh(devices))
  state = _compile(jax.jit(exp.init_state).lower())()
  batch = next(exp.train_batches(0))
  new_state, metrics = _compile(exp.step_fn.lower(state, batch))(state, batch)
  return jax.device_get((new_state.params, new_state.weighting_state, metrics))


@pytest.mark.parametrize(
    'variant, method',
    [
        ('dm+coann+dgr', 'ew'),
        ('dm+dgr', 'pcgrad'),
        ('dm', 'mgda_ub'),
        ('mtl', 'auto_lambda'),
        ('dm+dgr,va', 'ew'),  # the CCC loss of the whole batch, and DGR's dummy regression heads
        pytest.param('mtl,va', 'upgrad', marks=pytest.mark.slow),  # the CCC again, on the rows path: test-all
    ],
)
def test_four_microbatches_of_32_equal_one_batch_of_128(tfds_dir, variant, method):
  params_1, wstate_1, m_1 = _one_step(tfds_dir, variant, method, 1, 1)
  params_4, wstate_4, m_4 = _one_step(tfds_dir, variant, method, 4, 8)
  for key in [k for k in m_1 if k.startswith(('loss', 'weight/', 'cosine/', 'meta/'))] + ['grad_norm']:
    np.testing.assert_allclose(m_4[key], m_1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  assert m_1['grad_norm'] > 0 and all(m_1[k] > 0 for k in m_1 if k.startswith('loss/term/'))
  assert method != 'auto_lambda' or abs(m_1['meta/grad/task/expression']) > 0
  for a, b in zip(jax.tree.leaves((params_1, wstate_1)), jax.tree.leaves((params_4, wstate_4)), strict=True):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


def test_microbatch_split_is_strided_and_inverted():
  x = np.arange(24).reshape(12, 2)
  micro = step_lib.split_microbatches(x, 3)
  assert micro.shape == (3, 4, 2)
  np.testing.assert_array_equal(micro[1], x[1::3])  # microbatch m: the examples i ≡ m (mod k)
  np.testing.assert_array_equal(step_lib.merge_microbatches(micro), x)
  rows = np.arange(2 * 12 * 5).reshape(2, 12, 5)  # cotangent rows [R, B, D]: split along the batch axis
  np.testing.assert_array_equal(step_lib.split_microbatches(rows, 3, axis=1)[2], rows[:, 2::3])
  np.testing.assert_array_equal(step_lib.merge_microbatches(step_lib.split_microbatches(rows, 3, axis=1), axis=1), rows)


def test_config_errors(tfds_dir):
  config = _config(tfds_dir, 'mtl', 'ew', 0)
  with pytest.raises(ValueError, match=r'config\.grad_accum_steps: got 0, expected an int >= 1'):
    config_checks.validate_config(config)
  config = _config(tfds_dir, 'mtl', 'ew', 3)
  with pytest.raises(ValueError, match=r'grad_accum_steps=3 with config\.batch_size=128 on 8 devices: expected a '):
    experiment_lib.build_experiment(config, _mesh(8))
