"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) train like one process on the same global
batch."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import data
from mtlmatch import train
from test_train import smoke_config

VARIANT = 'dm'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(tfds_dir, tmp_path):
  config = smoke_config('affect', VARIANT, tfds_dir)
  data.get_benchmark(config.data.name, data_dir=tfds_dir, **config.data.options)  # prepare once, before the race
  port, workdir = _free_port(), tmp_path / 'two_hosts'
  # 4 CPU devices per process: 8 global devices, like the reference mesh below.
  flags = os.environ['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=4'
  )
  env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              '-m',
              'mtlmatch.main',
              f'--config=configs/affect.py:{VARIANT},smoke',
              f'--workdir={workdir}',
              f'--config.data.data_dir={tfds_dir}',
              f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2',
              f'--process_id={i}',
          ],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]

  # Reference: one process, 8 devices, global batches = host 0's rows then host 1's (the order of
  # jax.make_array_from_process_local_data over processes).
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  exp = train.build_experiment(config, mesh)
  state = exp.init_state()
  hosts = [
      data.train_iterator(
          exp.benchmark, global_batch_size=config.batch_size, seed=config.seed, process_index=i, process_count=2
      )
      for i in range(2)
  ]
  for _ in range(config.total_steps):
    local = [next(h) for h in hosts]
    batch = jax.tree.map(lambda *parts: np.concatenate(parts), *local)
    state, _ = exp.step_fn(state, jax.device_put(batch, exp.data_sharding))

  restored = ckpt_lib.Checkpointer(str(workdir)).restore_latest(ckpt_lib.abstract_like(exp.init_state()))
  assert restored is not None and int(restored[0].step) == config.total_steps
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(restored[0].params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert (workdir / 'results.json').exists()
