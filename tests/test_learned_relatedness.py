"""Learned relatedness (docs/maths.md §8): soft counts and re-estimation against numpy, convergence to the table the
data were drawn from, the train loop's wiring; old checkpoints without the new state fields still resume."""

import dataclasses
import functools
import json
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, set_keys
from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib
from mtlmatch import losses
from mtlmatch import objective as objective_lib
from mtlmatch import experiment as experiment_lib
from mtlmatch import step as step_lib
from mtlmatch.tasks import TaskSpec


def _numpy_counts(logits_a, logits_b, labels_a, labels_b, b_kind):
  """N_ik = Σ_x q_A(i|x) q_B(k|x), n_i = Σ_x q_A(i|x), example by example."""
  c_a, c_b = logits_a.shape[1], logits_b.shape[1]
  joint, marginal = np.zeros((c_a, c_b)), np.zeros(c_a)
  for x in range(len(logits_a)):
    za = np.exp(logits_a[x] - logits_a[x].max())
    qa = np.eye(c_a)[labels_a[x]] if labels_a[x] != -1 else za / za.sum()
    if b_kind == 'multiclass':
      zb = np.exp(logits_b[x] - logits_b[x].max())
      qb = np.eye(c_b)[labels_b[x]] if labels_b[x] != -1 else zb / zb.sum()
    else:
      qb = np.where(labels_b[x] != -1, labels_b[x], 1 / (1 + np.exp(-logits_b[x])))
    joint += np.outer(qa, qb)
    marginal += qa
  return joint, marginal


@pytest.mark.parametrize('b_kind', ['multilabel', 'multiclass'])
def test_soft_counts_and_reestimate_match_numpy(b_kind):
  rng = np.random.default_rng(0)
  n, c_a, c_b = 12, 3, 4
  logits_a, logits_b = rng.normal(size=(n, c_a)) * 2, rng.normal(size=(n, c_b)) * 2
  labels_a = np.where(rng.random(n) < 0.5, rng.integers(0, c_a, n), -1)
  if b_kind == 'multiclass':
    labels_b = np.where(rng.random(n) < 0.5, rng.integers(0, c_b, n), -1)
  else:  # some examples fully labelled, some partly (per entry), some not at all
    labels_b = np.where(rng.random((n, c_b)) < 0.5, rng.integers(0, 2, (n, c_b)), -1)
  joint, marginal = losses.relatedness_soft_counts(logits_a, logits_b, labels_a, labels_b, b_kind=b_kind)
  ref_joint, ref_marginal = _numpy_counts(logits_a, logits_b, labels_a, labels_b, b_kind)
  np.testing.assert_allclose(joint, ref_joint, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(marginal, ref_marginal, rtol=1e-5, atol=1e-6)

  table = rng.random((c_a, c_b))
  if b_kind == 'multiclass':
    table /= table.sum(1, keepdims=True)
  alpha, rate = 1.5, 0.3
  pi = ref_joint.sum(0) / ref_marginal.sum()  # the soft B marginal
  expected = (1 - rate) * table + rate * (ref_joint + alpha * pi) / (ref_marginal[:, None] + alpha)
  new = losses.reestimate(table, joint, marginal, rate=rate, alpha=alpha, b_kind=b_kind)
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  if b_kind == 'multiclass':
    np.testing.assert_allclose(np.asarray(new).sum(1), 1.0, atol=1e-6)
  # A class with no mass (α = 0) gets π.
  empty = losses.reestimate(table, joint.at[0].set(0.0), marginal.at[0].set(0.0), rate=1.0, alpha=0.0, b_kind=b_kind)
  np.testing.assert_allclose(empty[0], np.asarray(joint.at[0].set(0.0)).sum(0) / float(marginal[1:].sum()), rtol=1e-5)


def test_reestimate_on_hard_labels_is_estimate_relatedness():
  """With hard labels only and rate 1, the update is estimate_relatedness's smoothed frequency (same α, same π)."""
  rng = np.random.default_rng(1)
  labels_a, labels_b = rng.integers(0, 3, 50), rng.integers(0, 2, (50, 4))
  joint, marginal = losses.relatedness_soft_counts(
      np.zeros((50, 3)), np.zeros((50, 4)), labels_a, labels_b, b_kind='multilabel'
  )
  new = losses.reestimate(np.full((3, 4), 0.5), joint, marginal, rate=1.0, alpha=2.0, b_kind='multilabel')
  ref = losses.estimate_relatedness(
      labels_a, labels_b, num_classes_a=3, num_classes_b=4, b_kind='multilabel', smoothing=2.0
  )
  np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-6)


def _simulated_batches(true_table, *, num_batches, batch_size=64, seed=0):
  """Batches from two sources drawn from ``true_table`` (a ~ uniform, b_k ~ Bernoulli(R[a, k])): half labelled for A
  only, half for B only, with the logits of a fixed, fairly good model: A's head puts logit 3 on the true class
  (+ N(0, 1) noise; ≈ 80% top-1) and B's head predicts logit(R[a]) + N(0, 0.3²)."""
  rng = np.random.default_rng(seed)
  c_a, c_b = true_table.shape
  for _ in range(num_batches):
    a = rng.integers(0, c_a, batch_size)
    b = (rng.random((batch_size, c_b)) < true_table[a]).astype(np.int32)
    logits_a = 3.0 * np.eye(c_a)[a] + rng.normal(size=(batch_size, c_a))
    logits_b = np.log(true_table[a] / (1 - true_table[a])) + 0.3 * rng.normal(size=(batch_size, c_b))
    has_a = np.arange(batch_size) % 2 == 0
    yield {
        'logits': {'a': logits_a, 'b': logits_b},
        'labels': {'a': np.where(has_a, a, -1), 'b': np.where(has_a[:, None], -1, b)},
    }


def _learn(init, true_table, *, every=5, rate=0.5, reestimations=10):
  """Runs ``step_lib.update_relatedness`` (the train step's update, jitted) over simulated batches; returns the tables
  after each re-estimation."""
  learned = objective_lib.LearnedTable('a->b', 'a', 'b', 'multilabel', np.asarray(init, np.float32), 'learned:test')
  objective = types.SimpleNamespace(learned_tables={'a->b': learned})
  update = jax.jit(
      functools.partial(step_lib.update_relatedness, objective=objective, every=every, rate=rate, smoothing=1.0)
  )
  tables = {'a->b': jnp.asarray(init, jnp.float32)}
  counts = {'a->b': {'joint': jnp.zeros(init.shape), 'marginal': jnp.zeros(init.shape[:1])}}
  history = []
  for step, batch in enumerate(_simulated_batches(true_table, num_batches=every * reestimations)):
    joint, marginal = losses.relatedness_soft_counts(
        batch['logits']['a'], batch['logits']['b'], batch['labels']['a'], batch['labels']['b'], b_kind='multilabel'
    )
    tables, counts = update(tables, counts, {'a->b': {'joint': joint, 'marginal': marginal}}, step)
    if (step + 1) % every == 0:
      history.append(np.asarray(tables['a->b']))
      assert not np.any(np.asarray(counts['a->b']['marginal'])), 'counts restart after each re-estimation'
  return history


TRUE = np.random.default_rng(7).uniform(0.05, 0.95, (4, 6))


def test_learned_table_approaches_the_true_one_from_uniform():
  """From uniform (0.5): mean |R − R_true| 0.231 → 0.039 after 10 re-estimations (ρ = 0.5, 320 examples each;
  Frobenius 1.30 → 0.21). It levels off by the 5th: what is left is the sampling noise of each estimate (ρ = 0.5 keeps
  about two re-estimations' worth of counts, ≈ 80 examples per class) and the bias of the fixed model (its A head
  misclassifies ≈ 20% of the B-labelled examples)."""
  start = np.full(TRUE.shape, 0.5)
  history = _learn(start, TRUE)
  distances = [float(np.abs(t - TRUE).mean()) for t in history]
  assert np.abs(start - TRUE).mean() == pytest.approx(0.231, abs=1e-3)
  assert distances[-1] == pytest.approx(0.039, abs=0.005), distances
  assert all(b < a for a, b in zip(distances[:4], distances[1:5])), distances


def test_a_wrong_prior_moves_toward_the_truth():
  """From the complement of the truth (every entry on the wrong side of 0.5): 0.462 → 0.039 in 10 re-estimations
  (Frobenius 2.61 → 0.21), the same level as from uniform."""
  start = 1 - TRUE
  history = _learn(start, TRUE)
  distances = [float(np.abs(t - TRUE).mean()) for t in history]
  assert np.abs(start - TRUE).mean() == pytest.approx(0.462, abs=1e-3)
  assert distances[-1] == pytest.approx(0.039, abs=0.005), distances
  assert all(b < a for a, b in zip(distances[:4], distances[1:5])), distances


def test_objective_reads_learned_tables_and_scales():
  tasks = {'a': TaskSpec('a', 'multiclass', 3), 'b': TaskSpec('b', 'multilabel', 2)}
  init = np.full((3, 2), 0.5, np.float32)
  env = objective_lib.Env(tasks, lambda spec, a, b: init, lambda task, kind: None)
  terms = {
      name: dict(kind=kind, task_a='a', task_b='b', relatedness='learned:uniform')
      for name, kind in (('dm', 'distribution_matching'), ('coann', 'co_annotation'))
  }
  objective = objective_lib.build_objective({'terms': terms}, env)
  assert list(objective.learned_tables) == ['a->b']  # one table shared by the pair's two terms
  assert objective.feeds('dm') == ('b',) and objective.feeds('coann') == ('a', 'b')
  rng = np.random.default_rng(0)
  outputs = {'features': np.zeros((4, 1)), 'logits': {'a': rng.normal(size=(4, 3)), 'b': rng.normal(size=(4, 2))}}
  labels = {'a': np.array([0, 1, -1, -1]), 'b': np.array([[-1, -1], [-1, -1], [1, 0], [0, 1]])}
  # One compilation: the tables and scales are arguments, as in the train step.
  call = jax.jit(
      lambda tables, scales: objective(
          outputs, labels, dummies={}, rng=jax.random.PRNGKey(0), tables=tables, scales=scales
      )
  )
  one = {'coann': 1.0}
  base = call({'a->b': jnp.asarray(init)}, one)
  learned = objective.learned_tables['a->b']
  np.testing.assert_array_equal(objective_lib._current(learned, None), init)  # no tables: the initial one
  other = call({'a->b': jnp.asarray([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])}, one)
  assert abs(float(other['term/dm'] - base['term/dm'])) > 1e-3
  scaled = call({'a->b': jnp.asarray(init)}, {'coann': 0.25})
  np.testing.assert_allclose(scaled['term/coann'], 0.25 * base['term/coann'], rtol=1e-6)
  np.testing.assert_allclose(scaled['term/dm'], base['term/dm'])
  terms['coann']['relatedness'] = 'learned:prior:other'
  other = dataclasses.replace(env, resolve_relatedness=lambda spec, a, b: init * (0.5 if 'other' in spec else 1.0))
  with pytest.raises(ValueError, match=r'both learn the relatedness of a->b but start from different tables'):
    objective_lib.build_objective({'terms': terms}, other)


@flax.struct.dataclass
class _Old:
  step: jax.Array
  params: dict


@flax.struct.dataclass
class _New:
  step: jax.Array
  params: dict
  relatedness: dict = flax.struct.field(default_factory=dict)


def test_a_checkpoint_of_version_0_1_is_refused_naming_both_versions(tmp_path):
  """0.1 wrote no version into a checkpoint's metadata (and carried shims to resume across added fields); a 0.x
  package keeps no compatibility across minor versions, so such a checkpoint is one clear error, never a resume."""
  old = _Old(step=jnp.int32(3), params={'w': jnp.arange(4.0)})
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(3, old, {'step': 3})
  checkpointer.wait()
  state, meta = checkpointer.restore_latest(ckpt_lib.abstract_like(old))  # this version: resumes
  assert meta == {'step': 3} and int(state.step) == 3
  (meta_file,) = [p for p in tmp_path.rglob('*') if p.is_file() and b'"version"' in p.read_bytes()]
  saved = json.loads(meta_file.read_text())
  del saved['version']  # what 0.1 wrote
  meta_file.write_text(json.dumps(saved))
  new = _New(step=jnp.int32(0), params={'w': jnp.zeros(4)})
  with pytest.raises(ValueError, match=r'checkpoint step 3 in .* was written by mtlmatch 0\.1; this is mtlmatch 0\.2'):
    checkpointer.restore_latest(ckpt_lib.abstract_like(new))
  checkpointer.close()


def test_config_errors_name_the_value(tfds_dir):
  for overrides, message in [
      ({'objective.terms.dm.relatedness': 'learned:table'}, r"relatedness 'learned:table': got initial table 'table'"),
      ({'relatedness_rate': 0.0}, r'config.relatedness_rate: got 0.0, expected a number in \(0, 1\]'),
      ({'objective.terms.dm.relatedness': 'learned:uniform', 'relatedness_every': 0}, r'relatedness_every: got 0'),
  ]:
    config = set_keys(config_lib.load_config(f'{REPO}/configs/affect.py:dm,smoke'), **{'data.data_dir': tfds_dir})
    with pytest.raises(ValueError, match=message):
      experiment_lib.build_experiment(set_keys(config, **overrides))
