"""The negative-transfer monitor (docs/maths.md §9): a constructed harmful term is warned about and annealed, a
harmless one is not; references from a single-task run's results.json; the train loop's wiring."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from conftest import REPO, set_keys
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_checks
from mtlmatch import config_lib
from mtlmatch import monitor as monitor_lib
from mtlmatch import train
from mtlmatch import experiment as experiment_lib
from mtlmatch import workdir as workdir_lib
from mtlmatch.tasks import TaskSpec


def _monitor(action='anneal', patience=2):
  return monitor_lib.Monitor(
      references={'t': 1.0},
      metrics={'t': 'accuracy'},
      feeds={'term': ('t',), 'other': ('u',)},
      margin=0.05,
      patience=patience,
      action=action,
      anneal=0.5,
  )


def _train(term_target, monitor, *, steps=300, eval_every=10, lr=0.1):
  """A one-parameter "model": task loss (θ − 1)², term loss s·(θ − term_target)² with the monitor's scale s; the
  task's validation "accuracy" is 1 − |θ − 1| and its single-task reference 1 (θ = 1 without the term). A term with
  target −1 is harmful: at s = 1 it holds θ at 0."""
  theta, record, messages, metrics = 0.0, None, [], []
  for step in range(1, steps + 1):
    s = record['scales'].get('term', 1.0) if record else 1.0
    theta -= lr * (2 * (theta - 1.0) + s * 2 * (theta - term_target))
    if step % eval_every == 0:
      metrics.append(1 - abs(theta - 1.0))
      record, new = monitor.update(record, step, {'t': {'accuracy': metrics[-1]}, 'u': {'accuracy': 1.0}})
      messages += new
  return record, messages, metrics


def test_a_harmful_term_is_warned_about_and_annealed_a_harmless_one_is_not():
  record, messages, metrics = _train(-1.0, _monitor())
  assert messages and all("negative transfer on task 't'" in m and "'term'" in m for m in messages)
  anneals = [e for e in record['events'] if e['action'] == 'anneal']
  assert anneals[0]['step'] == 20 and anneals[0]['terms'] == ['term']  # 2 evaluations below (patience 2)
  # Halved until the task is back within the margin (s = 1/64: θ = 0.969), then it oscillates between 1/64 and 1/32
  # (recovered → ×2 → below again for 2 evaluations → ×0.5).
  assert any(e['action'] == 'recover' for e in record['events'])
  assert record['scales']['term'] in (1 / 64, 1 / 32) and 'other' not in record['scales']  # 'other' feeds u only
  assert metrics[0] < 0.5 and min(metrics[-6:]) > 0.9  # without the monitor θ stays at 0: accuracy 0
  record, messages, _ = _train(1.0, _monitor())  # the term agrees with the task
  assert messages == [] and record['scales'] == {'term': 1.0} and record['events'] == []
  record, messages, _ = _train(-1.0, _monitor(action='warn'))  # warns, changes nothing
  assert messages and record['scales'] == {} and {e['action'] for e in record['events']} == {'warn'}


def test_patience_and_repeated_steps():
  monitor = _monitor(patience=3)
  record, messages = monitor.update(None, 10, {'t': {'accuracy': 0.5}})
  record, messages = monitor.update(record, 20, {'t': {'accuracy': 0.5}})
  assert messages == [] and record['below'] == {'t': 2} and record['scales'] == {'term': 1.0}
  record, messages = monitor.update(record, 20, {'t': {'accuracy': 0.5}})  # the same step again (a resumed run)
  assert record['below'] == {'t': 2}
  record, messages = monitor.update(record, 30, {'t': {'accuracy': float('nan')}})  # no validation value: kept
  assert record['below'] == {'t': 2} and messages == []
  record, messages = monitor.update(record, 40, {'t': {'accuracy': 0.5}})
  assert len(messages) == 1 and record['scales'] == {'term': 0.5}
  assert monitor.scalars(record) == {'nt/scale/term': 0.5, 'nt/below/t': 3, 'nt/gap/t': -0.5}


def test_references_from_a_single_task_run_and_errors(tmp_path):
  tasks = {'expression': TaskSpec('expression', 'multiclass', 7), 'aus': TaskSpec('aus', 'multilabel', 17)}
  run = tmp_path / 'single_expression'
  run.mkdir()
  results = {
      'metrics': {'expression': {'accuracy': 0.99}},  # test metrics: never the reference
      'selection': {
          'validation': {'expression': {'accuracy': 0.8, 'macro_f1': 0.7}},
          'history': [{'step': s, 'validation': {'expression': v}} for s, v in ((10, 0.5), (20, 0.8), (30, 0.6))],
      },
  }
  (run / 'results.json').write_text(json.dumps(results))
  config = config_lib.base_config()
  config.nt_reference = {'expression': str(run), 'aus': 0.6}
  monitor = monitor_lib.build(config, tasks, {'dm': ('aus',), 'coann': ('expression', 'aus'), 'dgr': ()})
  assert monitor.references == {'expression': 0.8, 'aus': 0.6}
  # A run's reference follows its validation curve (its running best), then its best-validation value.
  at = {step: monitor.reference_at('expression', step) for step in (5, 10, 15, 20, 30, 40)}
  assert at == {5: 0.5, 10: 0.5, 15: 0.5, 20: 0.8, 30: 0.8, 40: 0.8}
  assert monitor.reference_at('aus', 10) == 0.6  # a number: the same at every step
  assert monitor.metrics == {'expression': 'accuracy', 'aus': 'mean_f1'}
  assert monitor.annealed_terms == ()  # nt_action='warn' (default)
  config.nt_action = 'anneal'
  assert monitor_lib.build(config, tasks, {'dm': ('aus',), 'dgr': ()}).annealed_terms == ('dm',)
  for reference, message in [
      ({'face': 0.5}, r"config.nt_reference: got task 'face', expected some of the trained tasks"),
      ({'aus': str(run)}, r'has no finite selection.validation.aus.mean_f1'),
      ({'aus': str(tmp_path / 'nowhere.json')}, r"config.nt_reference.aus: got '.*nowhere.json', expected a number"),
      ({'aus': True}, r'config.nt_reference.aus: got True'),
  ]:
    config = config_lib.base_config()
    config.nt_reference = reference
    with pytest.raises(ValueError, match=message):
      monitor_lib.build(config, tasks, {})
  for key, value, message in [
      ('nt_action', 'stop', r"config.nt_action: got 'stop', expected 'warn' or 'anneal'"),
      ('nt_anneal', 1.0, r'config.nt_anneal: got 1.0, expected a number in \(0, 1\)'),
      ('nt_patience', 0, r'config.nt_patience: got 0, expected an int >= 1'),
  ]:
    config = config_lib.base_config()
    config[key] = value
    with pytest.raises(ValueError, match=message):
      config_checks.validate_relatedness_and_monitor(config)


def test_train_loop_learns_the_table_and_anneals_the_terms_feeding_a_task_below_reference(tfds_dir, tmp_path, caplog):
  """Smoke run, dm + coann on a learned table, expression's reference out of reach (1.0: harmed), aus's at 0
  (harmless): coann (feeds both) is halved at each of the 3 evaluations, dm (a_to_b: feeds aus) is not."""
  config = config_lib.load_config(f'{REPO}/configs/affect.py:dm+coann,encoder=mlp,smoke')  # mlp: half the time
  config.nt_reference = {'expression': 1.0, 'aus': 0.0}
  config = set_keys(
      config,
      **{
          'data.data_dir': tfds_dir,
          'objective.terms.dm.relatedness': 'learned:prior:expressions_to_aus',
          'objective.terms.coann.relatedness': 'learned:prior:expressions_to_aus',
          'relatedness_every': 2,
          'eval_every': 2,
          'nt_patience': 1,
          'nt_action': 'anneal',
          'evals.test.every': 0,  # validation only during training: cheaper
      },
  )
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if 'negative transfer' in r.getMessage()]
  assert len(warnings) == 3 and all("task 'expression'" in w and "'coann'" in w for w in warnings)
  assert not any("task 'aus'" in w for w in warnings)
  assert results['negative_transfer']['scales'] == {'dm': 1.0, 'coann': 0.125}
  # The state: the learned table (checkpointed at step 6 with the scales of the evaluation at step 4).
  exp = experiment_lib.build_experiment(config)
  state, meta = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(ckpt_lib.abstract_like(exp.init_state()))
  state = jax.device_get(state)
  assert set(state.relatedness) == {'expression->aus'} and float(state.term_scales['coann']) == 0.25
  assert meta['monitor']['scales'] == {'dm': 1.0, 'coann': 0.25}
  table = np.asarray(state.relatedness['expression->aus'])
  np.testing.assert_allclose(table, results['learned_relatedness']['expression->aus'], rtol=1e-6)
  prior = exp.objective.learned_tables['expression->aus'].init
  assert np.abs(table - prior).max() > 0.01  # re-estimated 3 times
  assert not np.any(np.asarray(state.relatedness_counts['expression->aus']['marginal']))  # step 6 re-estimated
  written = json.loads((tmp_path / workdir_lib.LEARNED_RELATEDNESS_FILE).read_text())
  assert written['step'] == 6 and [h['step'] for h in written['history']] == [0, 2, 4, 6]
  np.testing.assert_allclose(written['tables']['expression->aus'], table, rtol=1e-6)
  np.testing.assert_allclose(written['history'][0]['tables']['expression->aus'], prior, rtol=1e-6)
  events = b''.join((tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if f.startswith('events.out'))
  assert b'relatedness/expression->aus' in events and b'nt/scale/coann' in events
