"""A researcher's first hour, from Python: no stale results on other data, warm starts, eval and
predict modes, a progress line without logging set up, interval means of the logged metrics, a warning when nothing
is evaluated."""

import json
import logging
import os
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, set_keys
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib, data, modes, train, warm_start
from mtlmatch import experiment as experiment_lib
from mtlmatch.tasks import TaskSpec

sys.path.insert(0, str(REPO))
from experiments import report  # noqa: E402

TASKS = [TaskSpec('a', 'multiclass', 3), TaskSpec('b', 'multilabel', 2)]

R = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)


def bench(seed=0, *, with_eval=True, relabel=False, reimage=False):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8)
  a, b = rng.integers(0, 3, 96), rng.integers(0, 2, (96, 2))
  if relabel:
    a = (a + 1) % 3  # same shapes, other labels: what the layout check cannot see
  if reimage:
    x = 255 - x  # same labels, other images
  evals = [data.array_source('test', x[64:], {'a': a[64:], 'b': b[64:]})] if with_eval else []
  return data.make_benchmark(
      'toy',
      TASKS,
      [data.array_source('src_a', x[:32], {'a': a[:32]}), data.array_source('src_b', x[32:64], {'b': b[32:64]})],
      eval_sources=evals,
  )


def tiny_config(**overrides):
  config = config_lib.base_config()
  config_lib.set_encoder(config, 'mlp', hidden=(8,))
  config.total_steps, config.batch_size, config.eval_batch_size = 2, 16, 16
  config.log_every, config.checkpoint_every, config.optimizer.warmup_steps = 1, 2, 1
  return set_keys(config, **overrides)


def test_reused_workdir_on_other_data_is_refused(tmp_path, caplog, capfd):
  config = tiny_config()
  config.objective.terms.update(config_lib.pair_terms('dm', [('a', 'b')], relatedness=R))
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, workdir, benchmark=bench(with_eval=False))
  assert results['metrics'] == {} and "Benchmark 'toy' has no eval source" in caplog.text  # item 10
  err = capfd.readouterr().err
  assert 'train' in err and '2/2' in err, err  # item 6: a progress bar, logging not set up
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  np.testing.assert_allclose(saved['objective']['terms']['dm']['relatedness'], R)  # numbers, not "unserializable"
  # The same data (rebuilt from the same arrays): the cached result comes back.
  assert train.train_and_evaluate(config, workdir, benchmark=bench(with_eval=False))['step'] == 2
  # Other labels of the same shapes, then other images: refused, naming the source; nothing is written.
  with pytest.raises(ValueError, match=r"trained on other data: source 'train/src_a' differs \(labels: saved "):
    train.train_and_evaluate(config, workdir, benchmark=bench(with_eval=False, relabel=True))
  with pytest.raises(ValueError, match=r"source 'train/src_a' differs \(images: saved [0-9a-f]+, now [0-9a-f]+\)"):
    train.train_and_evaluate(config, workdir, benchmark=bench(with_eval=False, reimage=True))
  meta = ckpt_lib.Checkpointer(workdir).restore_latest(
      ckpt_lib.abstract_like(experiment_lib.build_experiment(config, benchmark=bench(with_eval=False)).init_state())
  )[1]
  # 32 examples, 10 % of them held out for validation (config.data.validation_fraction).
  assert meta['data']['train/src_a']['examples'] == 29 and meta['data']['validation/src_a']['examples'] == 3
  assert meta['data']['train/src_b']['tasks'] == ['b']


def test_warm_start_eval_and_predict(tmp_path):
  single = tiny_config(tasks=('a',))
  source_dir = str(tmp_path / 'single')
  first = train.train_and_evaluate(single, source_dir, benchmark=bench())
  trained = jax.device_get(warm_start.restore_raw(warm_start.resolve(source_dir))['params'])

  # --mode=eval: the newest checkpoint into eval/<step>-<time>.json, results.json untouched, no training;
  # --mode=predict: probabilities + the examples' rows and part.
  (tmp_path / 'single' / 'results.json').write_text('{}')
  again = modes.evaluate_checkpoint(single, source_dir, benchmark=bench())
  assert again['metrics'] == first['metrics'] and again['step'] == 2
  assert json.loads(open(again['path']).read())['metrics'] == first['metrics']
  assert again['path'].startswith(str(tmp_path / 'single' / 'eval' / '2-'))
  assert (tmp_path / 'single' / 'results.json').read_text() == '{}'  # what training wrote stays
  (path,) = modes.predict(single, source_dir, source='test', benchmark=bench())
  pred = np.load(path)
  assert path.endswith('predictions/test.npz')
  np.testing.assert_array_equal(pred['rows'], np.arange(32))
  assert set(pred['part']) == {'test'}
  assert pred['a'].shape == (32, 3) and np.allclose(pred['a'].sum(1), 1, atol=1e-5)
  np.testing.assert_array_equal(
      pred['labels/a'], np.asarray(bench().eval_sources[0].reader.read('train', 0, 1).labels['a'])
  )
  # src_b annotates no trained task, so it is not a source of this run.
  with pytest.raises(ValueError, match=r"--source: got 'nope', expected one of \['src_a', 'test'\]"):
    modes.predict(single, source_dir, source='nope', benchmark=bench())

  # Single-task -> multi-task warm start: the encoder and the shared task's head are taken, the new head is fresh.
  multi = tiny_config(init_from=source_dir, init_heads=True)
  exp = experiment_lib.build_experiment(multi, benchmark=bench())
  fresh = exp.init_state()
  started = jax.device_get(warm_start.apply(fresh, exp.config))
  for got, want in zip(jax.tree.leaves(started.params['encoder']), jax.tree.leaves(trained['encoder'])):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(started.params['heads']['a']['out']['kernel'], trained['heads']['a']['out']['kernel'])
  np.testing.assert_array_equal(
      started.params['heads']['b']['out']['kernel'], jax.device_get(fresh.params['heads']['b']['out']['kernel'])
  )
  assert train.train_and_evaluate(multi, str(tmp_path / 'multi'), benchmark=bench())['step'] == 2

  # Another encoder size: one clear error naming the leaves.
  other = tiny_config(init_from=source_dir, **{'encoder.kwargs.hidden': (16,)})
  exp = experiment_lib.build_experiment(other, benchmark=bench())
  with pytest.raises(
      ValueError,
      match=r"config.init_from='.*single': params.encoder does not match this run \(2 "
      r'differences: params.encoder.dense_0.bias: saved shape \(8,\), now shape '
      r'\(16,\); params.encoder.dense_0.kernel: saved shape \(64, 8\), now shape '
      r'\(64, 16\)\); expected the same encoder',
  ):
    warm_start.apply(exp.init_state(), exp.config)
  with pytest.raises(ValueError, match=r"config.init_from: got '.*nowhere', expected a workdir with checkpoints"):
    warm_start.resolve(str(tmp_path / 'nowhere'))


def test_logged_train_metrics_are_interval_means_with_rate_lr_params_and_a_profile(tfds_dir, tmp_path):
  """Each logged train metric is its mean over the steps since the last log (checked against a run that logs every
  step); the learning rate, clu's steps/s, the parameter counts, the hparams and a profiler trace are written."""
  config = config_lib.load_config(f'{REPO}/configs/affect.py:mtl,encoder=mlp,smoke')  # the cheapest to compile
  config.data.data_dir = tfds_dir
  config.total_steps, config.checkpoint_every = 4, 4
  runs = {}
  for log_every in (1, 2):
    config.log_every = log_every
    config.profile_steps, config.profile_first_step = (1, 2) if log_every == 2 else (0, 10)
    train.train_and_evaluate(config, str(tmp_path / str(log_every)))
    runs[log_every] = report.read_scalars(str(tmp_path / str(log_every)))
  every, pairs = runs[1], runs[2]
  for tag in ('loss', 'loss/task/expression', 'grad_norm'):
    np.testing.assert_array_equal(pairs[tag][0], [2, 4])
    np.testing.assert_allclose(pairs[tag][1], every[tag][1].reshape(2, 2).mean(1), rtol=1e-5)
  schedule = experiment_lib.make_schedule(config)
  np.testing.assert_allclose(pairs['learning_rate'][1], [schedule(1), schedule(3)], rtol=1e-6)
  assert pairs['steps_per_sec'][0].tolist() == [2, 4] and np.all(pairs['steps_per_sec'][1] > 0)
  exp = experiment_lib.build_experiment(config)
  assert pairs['params/encoder'][1][0] == sum(x.size for x in jax.tree.leaves(exp.init_state().params['encoder']))
  traces = [f for _, _, files in os.walk(tmp_path / '2' / 'profile') for f in files if f.endswith('.xplane.pb')]
  assert traces, 'no profiler trace written'
