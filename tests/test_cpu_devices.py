"""Tests of mtlmatch.cpu_devices: one CPU device per core dividing the batch, the user's XLA_FLAGS count wins, and
the CLI starting JAX with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from mtlmatch import cpu_devices


def test_device_count_divides_every_batch_size():
  assert cpu_devices.device_count_for(2, (128, 512)) == 2
  assert cpu_devices.device_count_for(8, (128, 512)) == 8
  assert cpu_devices.device_count_for(6, (128, 512)) == 4
  assert cpu_devices.device_count_for(3, (64, 100)) == 2
  assert cpu_devices.device_count_for(4, (7,)) == 1
  assert cpu_devices.device_count_for(5) == 5
  with pytest.raises(ValueError, match=r'cores: got 0, expected an int >= 1'):
    cpu_devices.device_count_for(0)


def test_xla_flags_keep_the_users_count_and_other_flags():
  flag = '--xla_force_host_platform_device_count'
  assert cpu_devices.xla_flags_with_cores(None, 2, (128,)) == f'{flag}=2'
  assert cpu_devices.xla_flags_with_cores('--xla_dump_to=/tmp/d', 4, (6,)) == f'--xla_dump_to=/tmp/d {flag}=3'
  assert cpu_devices.xla_flags_with_cores(f'{flag}=8 --xla_dump_to=/x', 2, (128,)) == f'{flag}=8 --xla_dump_to=/x'
  assert cpu_devices.user_device_count(f'--a=1 {flag}=16') == 16
  assert cpu_devices.user_device_count('') is None
  assert cpu_devices.available_cores() >= 1


@pytest.mark.slow  # a whole CLI process (~1 min on 2 busy cores); `make test-all` runs it
def test_cli_starts_jax_with_one_device_per_core(tmp_path):
  """``python -m mtlmatch.main`` without XLA_FLAGS: as many devices as cores (dividing batch 16 / eval 64)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'mtlmatch.main',
          '--config=configs/affect.py:mtl,smoke',
          f'--workdir={tmp_path / "run"}',
          f'--config.data.data_dir={tmp_path / "tfds"}',
          '--config.total_steps=1',
      ],
      cwd=REPO,
      env={**env, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  expected = cpu_devices.device_count_for(cpu_devices.available_cores(), (16, 64))
  assert f'JAX devices: {expected} global' in out.stderr
