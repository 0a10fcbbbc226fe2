"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) train like one process on the same global
batch. The run is the face recipe (configs/faces.py) on generated files, its AU manifest prepared as an ArrayRecord
dataset: both kinds of sources read by row. (In-memory sources split the global batch the same way:
tests/test_data_pipeline.py.)"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import priors
from mtlmatch import experiment as experiment_lib
from mtlmatch.data import faces
from mtlmatch.data import prepare as prepare_lib
from test_files import face_config, face_manifests


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
  options, expression_rows = face_manifests(tmp_path)
  options['au_manifest'] = prepare_lib.prepare(
      options['au_manifest'], str(tmp_path / 'prepared'), name='aus', image_column='path',
      labels={'aus': list(faces.DEFAULT_AUS)}, missing=faces.AU_MISSING,
  )  # fmt: skip
  config = face_config(options)
  port, workdir = _free_port(), tmp_path / 'two_hosts'
  # 4 CPU devices per process: 8 global devices, like the reference mesh below.
  flags = os.environ['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=4'
  )
  env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  overrides = [f'--config.data.options.{k}={v}' for k, v in options.items()]
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              '-m',
              'mtlmatch.main',
              '--config=configs/faces.py:dm+coann,encoder=cnn,smoke',
              f'--workdir={workdir}',
              '--config.data.validation_fraction=0.25',
              *overrides,
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

  # Reference: one process, 8 devices, fed the one-process stream (the hosts' halves of each global batch must be
  # exactly its two halves, for the result to match).
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  exp = experiment_lib.build_experiment(config, mesh)
  state = exp.init_state()
  batches = exp.train_batches(0)  # one process: the whole global batch from this process's iterator
  for _ in range(config.total_steps):
    state, _ = exp.step_fn(state, next(batches))

  restored = ckpt_lib.Checkpointer(str(workdir)).restore_latest(ckpt_lib.abstract_like(exp.init_state()))
  assert restored is not None and int(restored[0].step) == config.total_steps
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(restored[0].params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The face recipe end to end: test sets read from files, AffectNet's codes 7, 8 and 10 not annotated, the prior
  # restricted to the AUs present.
  per_source = json.loads((workdir / 'results.json').read_text())['per_source']
  annotated = sum(code < 7 for _, code in expression_rows[24:])
  assert per_source['test_expressions']['expression']['count'] == annotated
  assert per_source['test_aus']['aus']['count'] == 8
  table = np.array(next(iter(json.loads((workdir / 'relatedness.json').read_text()).values())))
  prior = priors.load_prior(faces.PRIOR)
  np.testing.assert_array_equal(table, prior.restricted(prior.task_a.class_names, faces.DEFAULT_AUS))
