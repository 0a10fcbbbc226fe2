"""The linear probe: a seeded draw of labelled examples, their frozen shared features and an L2-regularised logistic
regression in JAX (scikit-learn's ``LogisticRegression`` objective), scored with the task's own metrics.

``evaluators.LinearProbe`` runs it during training (``config.evals.linear_probe``); ``experiments/report.py`` calls
:func:`probe_metrics` directly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlmatch import data as data_lib
from mtlmatch.tasks import MISSING, TaskSpec, kind_of


def _pixels(images, rows: np.ndarray) -> np.ndarray:
  """uint8 ``[n, H, W, C]`` of ``rows``: indexed in memory, or fetched and decoded for sources read by row."""
  if isinstance(images, data_lib.LazyImages):
    return data_lib.decode_rows(images, rows)
  return np.asarray(images)[rows]


def probe_sources(
    benchmark: data_lib.Benchmark, *, train_examples: int, test_examples: int, seed: int = 0
) -> dict[str, tuple[data_lib.Source, data_lib.Source]]:
  """``{task: (train source, test source)}``: up to ``train_examples`` labelled examples of each task from the
  training sources that annotate it and up to ``test_examples`` from the eval sources, a seeded draw kept in read
  order, as in-memory sources. Every host holds the same draw. A task without a labelled example in either part is
  left out."""
  rng = np.random.default_rng(seed)
  out = {}
  for task in benchmark.tasks:
    parts = []
    for part, sources, cap in (
        ('train', benchmark.train_sources, train_examples),
        ('test', benchmark.eval_sources, test_examples),
    ):
      stores, rows, labels = [], [], []  # per source: its images, the labelled rows, their labels
      for source in sources:
        if task in source.tasks:
          ex = data_lib.load_examples(source, benchmark.tasks, image_shape=benchmark.image_shape)
          y = np.asarray(ex.labels[task])
          keep = (y != MISSING) if y.ndim == 1 else (y != MISSING).any(axis=1)
          stores.append(ex.images)
          rows.append(np.flatnonzero(keep))
          labels.append(y[keep])
      n = sum(len(y) for y in labels)
      if not n:
        parts.append(None)
        continue
      idx = np.sort(rng.permutation(n)[:cap])
      owner = np.searchsorted(np.cumsum([len(r) for r in rows]), idx, side='right')  # which source each draw is from
      starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
      images = [
          _pixels(stores[s], rows[s][idx[owner == s] - starts[s]]) for s in range(len(stores)) if (owner == s).any()
      ]
      parts.append(
          data_lib.array_source(f'probe_{part}/{task}', np.concatenate(images), {task: np.concatenate(labels)[idx]})
      )
    if all(p is not None for p in parts):
      out[task] = tuple(parts)
  return out


def probe_outputs(params, batch_stats, batch, *, model):
  """The frozen shared features (eval mode) of an eval batch, with its labels and mask."""
  features, _ = model.encode({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  return {'features': features, 'labels': batch['labels'], 'mask': batch['mask']}


def probe_features(
    fn, source: data_lib.Source, task: TaskSpec, *, batch_size: int, sharding=None
) -> tuple[np.ndarray, np.ndarray]:
  """``(features [N, D], labels of task)`` of every example of ``source``; ``fn(batch)`` is :func:`probe_outputs`
  with the model's variables bound (jitted; with ``sharding``, replicated outputs)."""
  features, labels = [], []
  for batch in data_lib.eval_iterator(source, {task.name: task}, global_batch_size=batch_size, sharding=sharding):
    out = jax.device_get(fn(batch))
    real = np.asarray(out['mask']) > 0
    # Any feature pytree: each example's leaves, flattened and concatenated.
    flat = [np.asarray(x, np.float32).reshape(real.shape[0], -1) for x in jax.tree.leaves(out['features'])]
    features.append(np.concatenate(flat, axis=1)[real])
    labels.append(np.asarray(out['labels'][task.name])[real])
  return np.concatenate(features), np.concatenate(labels)


@dataclasses.dataclass(frozen=True)
class Logistic:
  """A fitted probe: ``logits = ((x − mean) / scale) @ w + b``."""

  mean: np.ndarray  # [D]
  scale: np.ndarray  # [D]
  w: np.ndarray  # [D, C]
  b: np.ndarray  # [C]; multiclass: −1e30 for a class absent from the training labels (never predicted)
  steps: int  # LBFGS iterations taken

  def logits(self, features) -> np.ndarray:
    return ((np.asarray(features, np.float32) - self.mean) / self.scale) @ self.w + self.b


@functools.partial(jax.jit, static_argnames=('multiclass', 'max_steps'))
def _fit(z, targets, weights, present, c, tol, *, multiclass: bool, max_steps: int):
  n = jnp.maximum(jnp.sum(jnp.any(weights > 0, axis=-1)), 1)

  def objective(params):
    logits = z @ params['w'] + params['b']
    if multiclass:
      logits = jnp.where(present, logits, -1e30)
      losses = -targets * jax.nn.log_softmax(logits)
    else:
      losses = optax.sigmoid_binary_cross_entropy(logits, targets)
    return (c * jnp.sum(weights * losses) + 0.5 * jnp.sum(params['w'] ** 2)) / n

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    return (count == 0) | ((count < max_steps) & (optax.tree.norm(optax.tree.get(state, 'grad')) >= tol))

  params = {
      'w': jnp.zeros((z.shape[1], targets.shape[1]), jnp.float32),
      'b': jnp.zeros((targets.shape[1],), jnp.float32),
  }
  params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
  return params, optax.tree.get(state, 'count')


def fit_logistic(
    features, labels, task: TaskSpec, *, c: float = 1.0, max_steps: int = 500, tol: float = 1e-6
) -> Logistic:
  """An L2-regularised logistic regression of ``labels`` (``-1`` = missing) on standardised ``features``.

  Minimises ``C · Σ_i loss_i + ½‖W‖²`` (the intercept is not penalised), as scikit-learn's ``LogisticRegression(C=c)``
  does: multinomial (softmax cross-entropy) for a multiclass task, one binary logistic regression per label for a
  multilabel task (over that label's labelled entries). Features are standardised with the training mean and
  standard deviation (a constant feature is only centred). Full batch, from zero, LBFGS until the gradient norm of
  the objective / N is below ``tol`` or ``max_steps`` iterations: deterministic.

  A constant (uninformative) feature leaves only the intercept, which then predicts the label frequencies:

  >>> import numpy as np
  >>> task = TaskSpec('t', 'multiclass', 3)
  >>> probe = fit_logistic(np.ones((8, 2)), np.array([0, 0, 0, 0, 0, 0, 1, 1]), task)
  >>> np.round(np.exp(probe.b[:2]) / np.exp(probe.b[:2]).sum(), 3)     # class 2 never seen: never predicted
  array([0.75, 0.25], dtype=float32)
  """
  x = np.asarray(features, np.float64)
  x = x.reshape(x.shape[0], -1)
  y = np.asarray(labels)
  mean, std = x.mean(0), x.std(0)
  scale = np.where(std > 0, std, 1.0)
  z = ((x - mean) / scale).astype(np.float32)
  if task.kind == 'multiclass':
    labelled = y != MISSING
    targets = np.eye(task.num_classes, dtype=np.float32)[np.where(labelled, y, 0)] * labelled[:, None]
    weights = np.broadcast_to(labelled[:, None], targets.shape).astype(np.float32)
    present = targets.sum(0) > 0
  else:
    targets, weights = (y == 1).astype(np.float32), (y != MISSING).astype(np.float32)
    present = np.ones(task.num_classes, bool)
  # Zero-padded to power-of-two sizes (at least 64 rows, 32 features, 32 classes) so that probes of similar sizes
  # share one compilation: padded rows have weight 0, padded features are 0 (their weights stay 0 under the
  # penalty), padded classes are absent (multiclass) or unweighted (multilabel).
  (n, d), k = z.shape, targets.shape[1]
  size = lambda m, least: max(least, 1 << (m - 1).bit_length())  # noqa: E731
  pad = lambda a, *shape: np.pad(a, [(0, s - m) for s, m in zip(shape, a.shape)])  # noqa: E731
  rows, cols, classes = size(n, 64), size(d, 32), size(k, 32)
  params, steps = _fit(
      pad(z, rows, cols),
      pad(targets, rows, classes),
      pad(weights, rows, classes),
      pad(present, classes),
      jnp.float32(c),
      jnp.float32(tol),
      multiclass=task.kind == 'multiclass',
      max_steps=int(max_steps),
  )
  w, b = np.asarray(params['w'])[:d, :k], np.asarray(params['b'])[:k]
  b = np.where(present, b, np.float32(-1e30)).astype(np.float32)
  return Logistic(mean.astype(np.float32), scale.astype(np.float32), w, b, int(steps))


def probe_metrics(task: TaskSpec, train: tuple, test: tuple, *, c: float = 1.0, max_steps: int = 500) -> dict:
  """The task's metrics (its kind's ``finalize``) of a probe fitted on ``train = (features, labels)`` and applied to
  ``test``; its score is ``metrics[task.primary_metric]``. A multilabel label with one value only
  among the training labels is left out of the score (its test entries count as missing, ``f1_<k>`` NaN)."""
  probe = fit_logistic(*train, task, c=c, max_steps=max_steps)
  y_test = np.asarray(test[1])
  if task.kind == 'multilabel':
    y_train = np.asarray(train[1])
    both = np.array([{0, 1} <= set(y_train[:, k][y_train[:, k] != MISSING].tolist()) for k in range(task.num_classes)])
    y_test = np.where(both[None, :], y_test, MISSING)
  kind = kind_of(task)
  return kind.finalize(task, jax.device_get(kind.statistics(task, probe.logits(test[0]), y_test)))
