"""The one train loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: build sources → (estimate relatedness) → model → objective → state → restore if a checkpoint
exists → loop (train step, the evaluators of ``config.evals`` that are due, log, checkpoint) → every evaluator at the
last step → results.json. What is evaluated, and how often, is ``mtlmatch/evaluators.py``'s business.

The train step is a pure function ``(state, batch) -> (state, metrics)``, jitted over a 1-D device mesh with the
global batch sharded on the ``data`` axis and the state replicated (the data-parallel step; XLA inserts the
cross-device reductions, so losses, gradients and BatchNorm statistics are over the global batch and the result does
not depend on the number of devices or hosts). The state is donated; randomness is ``fold_in(state.rng, step)``.

Gradients: the objective yields a vector of named losses ``[T']`` (tasks, plus DM/co-annotation terms when
``config.weighting.terms_as_tasks``) and an additive part (DGR always; the other terms otherwise), all functions of the
shared features [B, D] and the heads. One encoder pass (`encoder_pass`) gives the features and a pullback; the VJP of
the loss vector w.r.t. (features, heads) turns any cotangent into a feature cotangent and head gradients without a
convolution. A loss-weighting method (EW, UW, DWA, RLW, FAMO, GLS, STCH, ...) pulls back one cotangent, its weights,
through the encoder; a method that needs G (`weighting.is_gradient_method`: the gradient methods, GradNorm, ExcessMTL)
pulls back one feature cotangent per loss (``config.weighting.jacobian``, `weighting.pullback_rows`: 'auto' vmaps
them on accelerators and pulls them back row by row on XLA:CPU, where that measured 2-4x faster), combines the
shared-encoder rows, and gives every head the sum of its rows (a head only receives gradient from the losses that use
it; GradNorm and ExcessMTL, loss weightings, give the heads their weighted sum Σ_t w_t ∇L_t as their papers do).
MGDA-UB combines the rows w.r.t. the shared features instead and pulls the combined feature gradient back once. The
additive part's gradient is added on top of the combined gradient. Auto-Lambda (``needs_validation``) first updates
its weights from a validation batch (``batch['validation']``, a second stream from ``Experiment.train_batches``)
through a look-ahead step, then takes the loss-weighting step with the new weights (`_auto_lambda_meta_step`).

Gradient accumulation (``config.grad_accum_steps = k``): the encoder pass runs the batch as k microbatches in turn,
forward to collect the features, then again to pull back each microbatch's slice of the feature cotangents, so the
encoder's activations are held for one microbatch at a time; everything after the features sees the whole batch.
The step is therefore the one-pass step for every objective and method — the DGR penalty is that of the full-batch
dummy gradient, gradient methods combine the rows of the whole batch once — except for BatchNorm, which normalises
each microbatch with its own statistics (docs/maths.md §6.2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import time
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from clu import periodic_actions
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import evaluators
from mtlmatch import losses
from mtlmatch import models
from mtlmatch import monitor as monitor_lib
from mtlmatch import objective as objective_lib
from mtlmatch import priors
from mtlmatch import progress as progress_lib
from mtlmatch import warm_start
from mtlmatch import weighting
from mtlmatch.data import fingerprint as fingerprint_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken = the data position
  params: Any  # {'encoder': ..., 'heads': {task: ...}}
  batch_stats: Any  # BatchNorm statistics ({} for encoders without BN)
  opt_state: Any
  weighting_state: Any  # explicit state of the weighting method
  dummy_params: Any  # fixed DGR dummy heads {term: {task: stacked params}}, never trained
  rng: jax.Array  # base key; each step uses fold_in(rng, step)
  skipped: jax.Array  # int32 count of non-finite updates skipped (config.nonfinite='skip')
  # Learned relatedness (docs/maths.md §8): {pair key '<a>-><b>': R [C_A, C_B]} and the soft counts since the last
  # re-estimation {pair key: {'joint': N [C_A, C_B], 'marginal': n [C_A]}}; the negative-transfer monitor's term
  # scales {term: float32 scalar} (mtlmatch/monitor.py). Each is {} when its feature is off: no leaves, so a
  # checkpoint written before these fields existed has the same layout and resumes.
  relatedness: Any = flax.struct.field(default_factory=dict)
  relatedness_counts: Any = flax.struct.field(default_factory=dict)
  term_scales: Any = flax.struct.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks, each a small pure function of the config.


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: with jax 0.10.2 the grad-of-grad (DGR) step failed with a ShardingTypeError under Explicit axes.
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the step: linear warmup, then cosine decay or constant."""
  opt = config.optimizer
  if opt.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(
        0.0,
        opt.learning_rate,
        opt.warmup_steps,
        max(config.total_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.final_lr_fraction,
    )
  elif opt.schedule == 'constant':
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), optax.constant_schedule(opt.learning_rate)],
        [opt.warmup_steps],
    )
  else:
    raise ValueError(f"config.optimizer.schedule: got {opt.schedule!r}, expected 'cosine' or 'constant'")
  return lr


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """adam / adamw / sgd (+momentum) with :func:`make_schedule`'s learning rate and optional global-norm clipping."""
  opt = config.optimizer
  lr = make_schedule(config)
  if opt.name == 'adam':
    base = optax.adam(lr)
  elif opt.name == 'adamw':
    base = optax.adamw(lr, weight_decay=opt.weight_decay)
  elif opt.name == 'sgd':
    base = optax.sgd(lr, momentum=opt.momentum or None, nesterov=bool(opt.get('nesterov', False)))
  else:
    raise ValueError(f"config.optimizer.name: got {opt.name!r}, expected one of ['adam', 'adamw', 'sgd']")
  return optax.chain(optax.clip_by_global_norm(opt.clip_norm), base) if opt.clip_norm else base


def select_tasks(benchmark: data_lib.Benchmark, names) -> data_lib.Benchmark:
  """Restricts a benchmark to the trained tasks (e.g. a single-task baseline); sources keep only those tasks and a
  source left with none is dropped."""
  names = list(names or benchmark.tasks)
  for name in names:
    if name not in benchmark.tasks:
      raise ValueError(
          f'config.tasks: got task {name!r}, expected names from benchmark {benchmark.name!r}: '
          f'{list(benchmark.tasks)}'
      )

  def keep(sources):
    kept = (
        dataclasses.replace(s, tasks=tuple(t for t in s.tasks if t in names))
        for s in sources
        if set(s.tasks) & set(names)
    )
    return {s.name: s for s in kept}

  return dataclasses.replace(
      benchmark,
      tasks={n: benchmark.tasks[n] for n in names},
      train_sources=tuple(keep(benchmark.train_sources).values()),
      eval_sources=tuple(keep(benchmark.eval_sources).values()),
      aux_sources=keep(benchmark.aux_sources.values()),
  )


LEARNED_INITS = "'prior:<name>', 'estimate:<source>' or 'uniform'"


def make_relatedness_resolver(benchmark: data_lib.Benchmark, log: dict):
  """``(spec, task_a, task_b) -> R``: 'prior:<name>', 'estimate:<source>', a literal nested list, or
  'learned:<init>' (the initial table of a learned one, docs/maths.md §8: init 'prior:<name>', 'estimate:<source>' or
  'uniform' = 0.5 per entry for multilabel B, 1/C_B for multiclass B)."""

  def resolve(spec, task_a: str, task_b: str) -> np.ndarray:
    ta, tb = benchmark.tasks[task_a], benchmark.tasks[task_b]
    if isinstance(spec, str) and spec.startswith(objective_lib.LEARNED_PREFIX):
      init = spec[len(objective_lib.LEARNED_PREFIX) :]
      if init == 'uniform':
        table = np.full((ta.num_classes, tb.num_classes), 0.5 if tb.kind == 'multilabel' else 1 / tb.num_classes)
      elif init.startswith(('prior:', 'estimate:')):
        table = resolve(init, task_a, task_b)
      else:
        raise ValueError(f'relatedness {spec!r}: got initial table {init!r}, expected {LEARNED_INITS}')
    elif isinstance(spec, str) and spec.startswith('prior:'):
      prior = priors.load_prior(spec[len('prior:') :])
      if (
          ta.class_names
          and tb.class_names
          and (ta.class_names, tb.class_names)
          != (
              prior.task_a.class_names,
              prior.task_b.class_names,
          )
      ):
        table = prior.restricted(ta.class_names, tb.class_names)  # e.g. the AUs a face dataset annotates, by name
      elif (prior.task_a.num_classes, prior.task_b.num_classes) != (ta.num_classes, tb.num_classes):
        raise ValueError(
            f'relatedness {spec!r}: the prior relates {prior.task_a.num_classes} x '
            f'{prior.task_b.num_classes} classes, expected {ta.num_classes} x {tb.num_classes} for '
            f'tasks {task_a!r} -> {task_b!r}'
        )
      else:
        table = prior.relatedness
    elif isinstance(spec, str) and spec.startswith('estimate:'):
      name = spec[len('estimate:') :]
      sources = {**{s.name: s for s in benchmark.train_sources}, **dict(benchmark.aux_sources)}
      if name not in sources:
        raise ValueError(f'relatedness {spec!r}: no source {name!r}, expected one of {sorted(sources)}')
      labels = data_lib.source_labels(sources[name], benchmark.tasks)
      table = losses.estimate_relatedness(
          labels[task_a], labels[task_b], num_classes_a=ta.num_classes, num_classes_b=tb.num_classes, b_kind=tb.kind
      )
    elif isinstance(spec, (list, tuple, np.ndarray, str)):  # a nested list, its JSON text or a .json/.csv file
      table = priors.relatedness_table(spec)
    else:
      raise ValueError(
          f"relatedness: got {spec!r}, expected 'prior:<name>' (one of "
          f"{priors.available_priors()}), 'estimate:<source>', 'learned:<init>' (init {LEARNED_INITS}) or a "
          'nested list [C_A][C_B]'
      )
    log[f'{task_a}->{task_b} ({spec if isinstance(spec, str) else "literal"})'] = np.asarray(table).tolist()
    return np.asarray(table, np.float32)

  return resolve


def weighting_init(method, num_combined: int, params) -> dict:
  """The weighting method's initial state; methods that track gradients get P = the shared encoder's size."""
  num_params = int(ravel_pytree(params['encoder'])[0].size) if method.needs_num_params else None
  return weighting.init_state(method, num_combined, num_params)


def init_state(model, objective, method, tx, num_combined: int, image_shape, rng, term_scales=()) -> TrainState:
  """The fresh state; ``term_scales``: the names of the terms the negative-transfer monitor may anneal (scale 1)."""
  init_rng, dummy_rng, state_rng = jax.random.split(rng, 3)
  images = jnp.zeros((2, *image_shape), jnp.float32)
  variables = model.init(init_rng, images)
  params = variables['params']
  features, _ = model.encode(variables, images, train=False)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      weighting_state=weighting_init(method, num_combined, params),
      dummy_params=objective.draw_dummies(dummy_rng, features, mode='fixed'),
      rng=state_rng,
      skipped=jnp.zeros((), jnp.int32),
      relatedness={k: jnp.asarray(t.init, jnp.float32) for k, t in objective.learned_tables.items()},
      relatedness_counts={
          k: {'joint': jnp.zeros(t.init.shape, jnp.float32), 'marginal': jnp.zeros(t.init.shape[:1], jnp.float32)}
          for k, t in objective.learned_tables.items()
      },
      term_scales={name: jnp.ones((), jnp.float32) for name in term_scales},
  )


# The key under which a step's soft counts of the learned relatedness ride along with the named losses, popped
# before the metrics (they are [C_A, C_B] statistics, not losses).
SOFT_COUNTS = 'relatedness_soft_counts'


def update_relatedness(tables, counts, batch_counts, step, *, objective, every: int, rate: float, smoothing: float):
  """The learned relatedness after one step (docs/maths.md §8): ``(tables, counts)``.

  ``counts += batch_counts`` (the soft counts of this step's global batch, :meth:`Objective.soft_counts`); at the
  steps with ``(step + 1) % every == 0`` each table becomes ``reestimate(table, counts)`` and the counts restart
  from 0 (``jnp.where``: no host round trip, no recompilation). Pure and jittable; ``({}, {})`` stays ``({}, {})``.
  """
  if not tables:
    return tables, counts
  counts = jax.tree.map(jnp.add, counts, batch_counts)
  due = (step + 1) % every == 0
  learned = objective.learned_tables
  estimated = {
      k: losses.reestimate(tables[k], c['joint'], c['marginal'], rate=rate, alpha=smoothing, b_kind=learned[k].b_kind)
      for k, c in counts.items()
  }
  tables = jax.tree.map(lambda new, old: jnp.where(due, new, old), estimated, tables)
  counts = jax.tree.map(lambda c: jnp.where(due, jnp.zeros_like(c), c), counts)
  return tables, counts


def loss_names(objective: objective_lib.Objective, config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(names of the losses the weighting method combines, names added on top)."""
  additive = objective.additive_names(config.weighting.terms_as_tasks)
  combined = tuple(
      [f'task/{t}' for t in objective.tasks]
      + [f'term/{b.name}' for b in objective.terms if f'term/{b.name}' not in additive]
  )
  return combined, additive


def split_microbatches(x: jax.Array, k: int, axis: int = 0) -> jax.Array:
  """[..., B, ...] → [k, ..., B/k, ...]: microbatch m holds the examples i ≡ m (mod k) of ``axis``.

  Strided, so that a batch sharded over devices in contiguous blocks (each block a multiple of k) keeps every
  microbatch spread over all devices with no data movement, and the split does not depend on the device count."""
  shape = x.shape
  x = x.reshape(*shape[:axis], shape[axis] // k, k, *shape[axis + 1 :])
  return jnp.moveaxis(x, axis + 1, 0)


def merge_microbatches(x: jax.Array, axis: int = 0) -> jax.Array:
  """The inverse of :func:`split_microbatches`: [k, ..., B/k, ...] → [..., B, ...] (``axis`` of the result)."""
  x = jnp.moveaxis(x, 0, axis + 1)
  return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def encoder_pass(model, params, batch_stats, images: jax.Array, *, accum_steps: int = 1):
  """The shared encoder on the batch: ``(features [B, D], new batch_stats, pullback)``.

  ``pullback(cotangents [R, B, D], how)`` gives the encoder's parameter gradients for R feature cotangents (every
  leaf with a leading axis R; ``how`` as in `weighting.pullback_rows`). With ``accum_steps = k > 1`` the batch is cut
  into k microbatches (:func:`split_microbatches`) and the encoder's activations are never held for more than one:
  the forward pass runs the microbatches in turn (``lax.scan``) and keeps only their features; the pullback runs them
  in turn again, recomputing each microbatch's forward pass to pull back its slice of the cotangents, and sums the
  gradients. Whatever comes after the features (heads, task losses, every objective term, the weighting method) sees
  the whole batch, so the gradient equals the one-pass gradient (up to float summation order) — except that
  BatchNorm normalises each microbatch with its own statistics; the running statistics become the mean of the k
  microbatch updates (each from the step's starting statistics). The price: one more forward pass of the encoder.
  """

  def encode(encoder_params, x):
    return model.encode({'params': {**params, 'encoder': encoder_params}, 'batch_stats': batch_stats}, x, train=True)

  if accum_steps == 1:
    features, vjp_fn, new_stats = jax.vjp(lambda p: encode(p, images), params['encoder'], has_aux=True)
    return features, new_stats, lambda cotangents, how: weighting.pullback_rows(lambda c: vjp_fn(c)[0], cotangents, how)

  micro_images = split_microbatches(images, accum_steps)
  _, (micro_features, micro_stats) = jax.lax.scan(lambda _, x: (None, encode(params['encoder'], x)), None, micro_images)
  new_stats = jax.tree.map(lambda s: s.mean(0).astype(s.dtype), micro_stats)

  def pullback(cotangents, how):
    zeros = jax.tree.map(lambda p: jnp.zeros((cotangents.shape[0], *p.shape), p.dtype), params['encoder'])

    def body(total, slices):
      x, c = slices  # [B/k, ...], [R, B/k, D]
      _, vjp_fn, _ = jax.vjp(lambda p: encode(p, x), params['encoder'], has_aux=True)
      return jax.tree.map(jnp.add, total, weighting.pullback_rows(lambda r: vjp_fn(r)[0], c, how)), None

    total, _ = jax.lax.scan(body, zeros, (micro_images, split_microbatches(cotangents, accum_steps, axis=1)))
    return total

  return merge_microbatches(micro_features), new_stats, pullback


def train_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    model,
    objective,
    tx,
    method,
    gradient_method: bool,
    combined: tuple[str, ...],
    additive: tuple[str, ...],
    skip_nonfinite: bool,
    schedule: Optional[optax.Schedule] = None,
    jacobian: str = 'auto',
    accum_steps: int = 1,
    relatedness_update=None,
):
  """One data-parallel step. Pure: ``(state, batch) -> (state, metrics)``; metrics stay on device.

  The encoder gives the shared features (:func:`encoder_pass`); the objective's loss vector [T' + 1] (the combined
  losses, then the additive part) is a function of the features and the heads, and its VJP gives, per cotangent,
  a feature cotangent [B, D] and head gradients — cheap (no convolution). Each feature cotangent the method needs is
  then pulled back through the encoder: one for a loss-weighting method (the weighted sum), one per row for a
  gradient method (``jacobian``, `weighting.pullback_rows`), and one for MGDA-UB, which combines the rows w.r.t. the
  features themselves ('auto' vmaps those). ``accum_steps`` (``config.grad_accum_steps``): see
  :func:`encoder_pass`.

  ``relatedness_update``: :func:`update_relatedness` with its options bound (None: no learned relatedness table).
  The objective reads the learned tables and the term scales from the state (``state.relatedness``,
  ``state.term_scales``).

  A method with ``needs_validation`` (Auto-Lambda) also reads ``batch['validation']`` (a batch of the same form,
  from the validation split) and ``schedule`` (the optimizer's learning rate, :func:`make_schedule`).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  dummy_rng, term_rng, method_rng = jax.random.split(rng, 3)

  def rows_from_features(features, head_params):
    """The loss vector [T' + 1] (combined losses, then the additive part) from shared features and head params."""
    logits = {t: model.apply_head(t, head_params[t], features) for t in model.heads}
    resampled = objective.draw_dummies(dummy_rng, jax.lax.stop_gradient(features), mode='resample')
    named = objective(
        {'features': features, 'logits': logits},
        batch['labels'],
        dummies={**state.dummy_params, **resampled},
        rng=term_rng,
        tables=state.relatedness,
        scales=state.term_scales,
    )
    if state.relatedness:  # learned relatedness: this batch's soft counts ride along (popped before the metrics)
      named[SOFT_COUNTS] = objective.soft_counts(jax.lax.stop_gradient(logits), batch['labels'])
    extra = sum((named[n] for n in additive), jnp.zeros((), jnp.float32))
    return jnp.stack([named[n] for n in combined] + [extra]), named

  features, batch_stats, encoder_pullback = encoder_pass(
      model, state.params, state.batch_stats, batch['image'], accum_steps=accum_steps
  )
  rows, rows_vjp, named = jax.vjp(rows_from_features, features, state.params['heads'], has_aux=True)
  task_losses = rows[:-1]

  def vjp_fn(cotangent):
    """Σ_r cotangent_r ∇(row r) w.r.t. every parameter: one pullback through the heads, one through the encoder."""
    d_features, d_heads = rows_vjp(cotangent)
    d_encoder = jax.tree.map(lambda g: g[0], encoder_pullback(d_features[None], 'rows'))
    return ({'encoder': d_encoder, 'heads': d_heads},)

  num_tasks = len(combined)
  # Unit cotangents pull back one Jacobian row each; the additive row only when there is an additive part
  # (otherwise it is identically zero and would cost a whole backward pass).
  cotangents = jnp.eye(num_tasks + 1 if additive else num_tasks, num_tasks + 1, dtype=jnp.float32)
  if gradient_method:
    # The rows w.r.t. the features and the heads (through the heads only): [R, B, D], head leaves [R, ...].
    d_features, d_heads = weighting.pullback_rows(rows_vjp, cotangents, 'vmap' if jacobian == 'auto' else jacobian)
    # MGDA-UB combines the rows w.r.t. the shared features, then pulls the result back through the encoder once.
    wrt_features = method.grads_wrt == 'features'
    if wrt_features:
      flat_rows = d_features.reshape(d_features.shape[0], -1)
    else:
      encoder_rows = encoder_pullback(d_features, jacobian)  # leaves [R, ...]; 'auto': rows on CPU
      flat_rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(encoder_rows)
    update, weights, weighting_state = method.apply(
        state.weighting_state, flat_rows[:num_tasks], task_losses, method_rng
    )
    if additive:
      update = update + flat_rows[num_tasks]
    if wrt_features:
      encoder_grads = jax.tree.map(lambda g: g[0], encoder_pullback(update.reshape(1, *features.shape), 'rows'))
    else:
      encoder_grads = ravel_pytree(state.params['encoder'])[1](update)
    # Heads: a loss-weighting method that needs G (GradNorm, ExcessMTL) weights its losses everywhere, heads included
    # (Σ_t w_t ∇L_t, as in the paper); a gradient method gives each head its own task's gradient (the sum of rows).
    if method.name in weighting.LOSS_WEIGHTING:
      head_coefficients = jnp.concatenate([jax.lax.stop_gradient(weights), jnp.ones((len(cotangents) - num_tasks,))])
    else:
      head_coefficients = jnp.ones((len(cotangents),))
    grads = {
        'encoder': encoder_grads,
        'heads': jax.tree.map(lambda g: jnp.tensordot(head_coefficients, g, axes=1), d_heads),
    }
    cosine = weighting.cosine_similarity_matrix(flat_rows[:num_tasks])
  elif method.needs_validation:
    if 'validation' not in batch:
      raise ValueError(
          f"batch: got keys {sorted(batch)}, expected also 'validation' (weighting method {method.name!r} meta-learns "
          'on validation batches: Experiment.train_batches adds them)'
      )
    weighting_state, meta = _auto_lambda_meta_step(
        state,
        batch['validation'],
        vjp_fn,
        model=model,
        objective=objective,
        method=method,
        combined=combined,
        schedule=schedule,
    )
    _, weights, weighting_state = method.apply(
        weighting_state, jnp.zeros((task_losses.shape[0], 1), rows.dtype), task_losses, method_rng
    )
    # The model step with the new λ: Σ_t λ_t ∇L_t (encoder and heads) + the additive part, one backward pass.
    grads = vjp_fn(jnp.concatenate([jax.lax.stop_gradient(weights), jnp.ones((1,), rows.dtype)]))[0]
    cosine = None
  else:
    # The weights of loss-weighting methods depend on losses and state only: G is not needed (a [T, 1] stand-in).
    _, weights, weighting_state = method.apply(
        state.weighting_state, jnp.zeros((task_losses.shape[0], 1), rows.dtype), task_losses, method_rng
    )
    grads = vjp_fn(jnp.concatenate([jax.lax.stop_gradient(weights), jnp.ones((1,), rows.dtype)]))[0]
    cosine = None
  total = jnp.dot(jax.lax.stop_gradient(weights), task_losses) + rows[-1]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # Learned relatedness (docs/maths.md §8): the counts are sums over the global batch (computed on the whole batch's
  # logits, also under gradient accumulation); the tables change only at re-estimation steps. No-op without them.
  batch_counts = named.pop(SOFT_COUNTS, {})
  relatedness, relatedness_counts = (
      relatedness_update(state.relatedness, state.relatedness_counts, batch_counts, state.step)
      if relatedness_update is not None
      else (state.relatedness, state.relatedness_counts)
  )
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
      weighting_state=weighting_state,
      relatedness=relatedness,
      relatedness_counts=relatedness_counts,
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  if method.needs_validation:  # λ of an absent task has weight 0 this step: check the meta step on its own too
    finite = finite & jnp.isfinite(meta['meta/val_loss']) & jnp.all(jnp.isfinite(weighting_state['lambdas']))
  if skip_nonfinite:
    # Keep everything but the step (and the data position) when this update is non-finite.
    new_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        new_state,
        state.replace(step=state.step + 1, skipped=state.skipped + 1),
    )
  metrics = {
      'loss': total,
      'grad_norm': grad_norm,
      'param_norm': optax.tree.norm(new_state.params),
      'finite': finite,
      'skipped': new_state.skipped,
      **{f'loss/{n}': v for n, v in named.items()},
      **{f'weight/{n}': w for n, w in zip(combined, weights)},
  }
  if method.needs_validation:
    metrics.update(meta)
  if cosine is not None:
    for i, a in enumerate(combined):
      for j in range(i + 1, len(combined)):
        metrics[f'cosine/{a}|{combined[j]}'] = cosine[i, j]
  return new_state, metrics


def _auto_lambda_meta_step(state, val_batch, vjp_fn, *, model, objective, method, combined, schedule):
  """Auto-Lambda's meta step (``weighting.AutoLambda``): returns (weighting state with the new λ, meta metrics).

  With ``vjp_fn`` the VJP of the training loss rows at θ (rows: the combined losses, then the additive part) and
  λ the current weights: g(λ) = Σ_t λ_t ∇L_t(θ) (a params tree, linear in λ); the look-ahead θ' = θ − α g(λ) with α
  the method's look-ahead rate (by default ``schedule(step)``, the rate of this step's model update); the validation
  loss L_val = Σ of the task losses (``task/<name>``; terms are auxiliary) at θ' on ``val_batch``, forward in train
  mode (BatchNorm normalises with the validation batch's statistics; the running statistics it would produce are
  dropped: the train state keeps those of the training batch) and v = ∇L_val(θ'); then ∂L_val/∂λ = −α J v, with
  J v = [⟨∇L_t(θ), v⟩]_t the transpose of the linear map λ ↦ g(λ) applied to v — a forward-mode product through
  the residuals of the training forward pass (no second forward pass; ``jax.jvp`` itself cannot differentiate the
  CPU convolution's ``custom_vjp``). Exact: no finite differences, no Hessian.
  """
  if schedule is None:
    raise ValueError(f'train_step schedule: got None, expected the learning-rate schedule ({method.name} looks ahead)')
  ws = state.weighting_state
  lambdas = ws['lambdas']
  zero = jnp.zeros((1,), lambdas.dtype)

  def weighted_grad(lam):
    return vjp_fn(jnp.concatenate([lam, zero]))[0]

  alpha = method.lookahead_lr(ws, schedule(state.step))
  lookahead = jax.tree.map(lambda p, g: p - alpha * g, state.params, weighted_grad(lambdas))
  primary = [n for n in combined if n.startswith('task/')]

  def val_loss(params):
    features, _ = model.encode({'params': params, 'batch_stats': state.batch_stats}, val_batch['image'], train=True)
    logits = {t: model.apply_head(t, params['heads'][t], features) for t in model.heads}
    named = objective.task_losses(logits, val_batch['labels'])
    return sum((named[n] for n in primary), jnp.zeros((), jnp.float32))

  loss, v = jax.value_and_grad(val_loss)(lookahead)
  (jv,) = jax.linear_transpose(weighted_grad, lambdas)(v)
  meta_grad = -alpha * jv
  metrics = {
      'meta/val_loss': loss,
      'meta/lookahead_lr': alpha,
      **{f'meta/grad/{n}': g for n, g in zip(combined, meta_grad)},
  }
  return method.meta_update(ws, meta_grad), metrics


class _Preemption:
  """Turns SIGTERM (what a preempted cloud VM receives) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not in the main thread (e.g. a notebook worker): no preemption handling
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _health_error(step: int, metrics: Mapping[str, Any], last_checkpoint: Optional[int] = None) -> str:
  """The FloatingPointError message: the step, every non-finite task loss and term by name, the norms, and which
  checkpoint is kept (none at or after ``step`` was written: the check runs before the save)."""
  bad = []
  for key, value in metrics.items():
    if key.startswith('loss/') and not np.all(np.isfinite(value)):
      kind, _, name = key[len('loss/') :].partition('/')  # 'task/expression' or 'term/dm'
      bad.append(f'{kind} {name!r} = {value}')
  norms = f'loss = {metrics["loss"]}, grad_norm = {metrics["grad_norm"]}, param_norm = {metrics["param_norm"]}'
  what = f'non-finite {", ".join(bad)} ({norms})' if bad else f'non-finite update ({norms})'
  kept = (
      f'the last good checkpoint, step {last_checkpoint}, is kept'
      if last_checkpoint is not None
      else 'no checkpoint had been written yet'
  )
  return (
      f'non-finite training at step {step}: {what}. Health is checked at log and checkpoint steps, so it may '
      f'have begun after the previous check; {kept}. Lower the learning rate, check the inputs, or set '
      "config.nonfinite='skip' to skip such updates."
  )


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a config determines besides the train state: sources, model, objective, optimizer, weighting
  method and the compiled step functions over ``mesh``."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  benchmark: data_lib.Benchmark
  model: models.MultiTaskModel
  objective: objective_lib.Objective
  method: Any
  tx: optax.GradientTransformation
  relatedness: dict  # the resolved tables, for the record
  step_fn: Any  # jitted (state, batch) -> (state, metrics), state donated
  eval_fn: Any  # jitted (params, batch_stats, batch) -> metric statistics
  monitor: Optional[monitor_lib.Monitor] = None  # the negative-transfer monitor (config.nt_reference), or None

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P('data'))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def init_state(self) -> TrainState:
    """The fresh train state, created directly with a replicated sharding (works across hosts)."""
    combined, _ = loss_names(self.objective, self.config)
    return jax.jit(
        functools.partial(
            init_state,
            self.model,
            self.objective,
            self.method,
            self.tx,
            len(combined),
            self.benchmark.image_shape,
            term_scales=self.monitor.annealed_terms if self.monitor else (),
        ),
        out_shardings=self.replicated,
    )(jax.random.PRNGKey(self.config.seed))

  def train_batches(self, start_step: int):
    """The training stream from ``start_step`` (batch t is a pure function of (seed, t): resume is exact).

    A method with ``needs_validation`` (Auto-Lambda) gets ``batch['validation']`` too: batch t of a second stream of
    the same size over ``benchmark.validation_sources``, with its own seed (:func:`validation_seed`), so it resumes
    exactly as well. Those batches only move the method's weights, never the model's parameters directly.
    """
    train = self._stream(self.benchmark, self.config.seed, start_step)
    if not self.method.needs_validation:
      return train
    validation = dataclasses.replace(
        self.benchmark, train_sources=self.benchmark.validation_sources, validation_sources=()
    )
    val = self._stream(validation, validation_seed(self.config.seed), start_step)
    return ({**batch, 'validation': val_batch} for batch, val_batch in zip(train, val))

  def _stream(self, benchmark: data_lib.Benchmark, seed: int, start_step: int):
    return data_lib.train_iterator(
        benchmark,
        global_batch_size=self.config.batch_size,
        seed=seed,
        start_step=start_step,
        sharding=self.data_sharding,
        mixing=self.config.data.mixing,
        augment=self.config.data.augment,
    )


def validation_seed(seed: int) -> int:
  """The seed of the validation-batch stream (Auto-Lambda) of a run with ``config.seed = seed``: a fixed function
  of it, distinct from it, so the two streams draw independent mixing counts and permutations."""
  return int(np.random.SeedSequence([seed, 0x76616C]).generate_state(1, np.uint32)[0])


def build_experiment(
    config: ml_collections.ConfigDict,
    mesh: Optional[jax.sharding.Mesh] = None,
    *,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> Experiment:
  """Validates ``config`` and builds sources → (relatedness) → model → objective → optimizer → step functions.

  ``benchmark``: your own (``data.make_benchmark`` of in-memory or TFDS sources) instead of ``config.data.name``.
  """
  config_lib.validate_config(config)
  config = config_lib.resolved(config)  # every field of the chosen encoder and weighting method
  mesh = mesh or make_mesh()
  if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(
        f'config.batch_size={config.batch_size} / eval_batch_size={config.eval_batch_size}: expected '
        f'multiples of the device count {mesh.size}'
    )
  accum_steps = config.get('grad_accum_steps', 1)
  if config.batch_size % (mesh.size * accum_steps):
    raise ValueError(
        f'config.grad_accum_steps={accum_steps} with config.batch_size={config.batch_size} on {mesh.size} devices: '
        f'expected a batch size divisible by grad_accum_steps x devices = {accum_steps * mesh.size} (each device '
        'splits its share of the batch into grad_accum_steps microbatches)'
    )
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  if benchmark is None:
    benchmark = data_lib.get_benchmark(
        config.data.name,
        data_dir=config.data.data_dir,
        seed=config.data.seed,
        on_bad_image=config.data.get('on_bad_image', 'raise'),
        **config.data.options,
    )
  benchmark = select_tasks(benchmark, config.tasks)
  benchmark = data_lib.with_validation(benchmark, config.data.get('validation_fraction', 0.0), seed=config.data.seed)
  if weighting.METHODS[config.weighting.name].needs_validation and not benchmark.validation_sources:
    raise ValueError(
        f'weighting.name={config.weighting.name!r} meta-learns its task weights on validation batches, but '
        f'config.data.validation_fraction={config.data.get("validation_fraction", 0.0)!r} holds out no validation '
        'split: expected config.data.validation_fraction in (0, 1), e.g. 0.1'
    )
  validate_sources(benchmark)
  # config.precision / config.remat applied to the encoder's and heads' kwargs (config_lib.model_kwargs).
  encoder_kwargs, head_kwargs = config_lib.model_kwargs(config)
  model = models.build_model(
      benchmark.tasks,
      encoder=config.encoder.name,
      encoder_kwargs=encoder_kwargs,
      head=config.head.name,
      head_kwargs=head_kwargs,
  )
  head_dtype = {'dtype': head_kwargs['dtype']} if 'dtype' in head_kwargs else {}
  relatedness = {}
  env = objective_lib.Env(
      benchmark.tasks,
      make_relatedness_resolver(benchmark, relatedness),
      lambda task, kind: model.heads[task]
      if kind == 'task'
      else models.build_head('linear', benchmark.tasks[task].num_classes, **head_dtype),
  )
  objective = objective_lib.build_objective(config.objective.to_dict(), env)
  relatedness_update = None
  if objective.learned_tables:
    if config.relatedness_every < 1:
      raise ValueError(
          f'config.relatedness_every: got {config.relatedness_every!r}, expected an int >= 1 (steps between '
          f're-estimations of the learned relatedness tables {sorted(objective.learned_tables)})'
      )
    relatedness_update = functools.partial(
        update_relatedness,
        objective=objective,
        every=config.relatedness_every,
        rate=float(config.relatedness_rate),
        smoothing=float(config.relatedness_smoothing),
    )
  monitor = monitor_lib.build(config, benchmark.tasks, {b.name: objective.feeds(b.name) for b in objective.terms})
  if monitor is not None:
    check_monitor_schedule(config, benchmark)
  combined, additive = loss_names(objective, config)
  method = weighting.get_method(config.weighting.name, **config.weighting.hparams)
  tx = make_optimizer(config)
  step_fn = jax.jit(
      functools.partial(
          train_step,
          model=model,
          objective=objective,
          tx=tx,
          method=method,
          gradient_method=weighting.is_gradient_method(config.weighting.name),
          combined=combined,
          additive=additive,
          skip_nonfinite=config.nonfinite == 'skip',
          schedule=make_schedule(config),
          jacobian=config.weighting.get('jacobian', 'auto'),
          accum_steps=accum_steps,
          relatedness_update=relatedness_update,
      ),
      in_shardings=(replicated, data_sharding),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )
  eval_fn = jax.jit(
      functools.partial(evaluators.eval_step, model=model, tasks=benchmark.tasks),
      in_shardings=(replicated, replicated, data_sharding),
      out_shardings=replicated,
  )
  return Experiment(config, mesh, benchmark, model, objective, method, tx, relatedness, step_fn, eval_fn, monitor)


def check_monitor_schedule(config: ml_collections.ConfigDict, benchmark: data_lib.Benchmark) -> None:
  """The negative-transfer monitor compares validation metrics during training: it needs a validation split and an
  evaluator that computes them at an interval (the validation or selection evaluator with ``every`` > 0)."""
  if not benchmark.validation_sources:
    raise ValueError(
        f'config.nt_reference={dict(config.nt_reference)!r} compares validation metrics, but '
        f'config.data.validation_fraction={config.data.get("validation_fraction", 0.0)!r} holds out no validation '
        'split: expected config.data.validation_fraction in (0, 1), e.g. 0.1'
    )
  periodic = [
      name
      for name, entry in config.evals.items()
      if entry.get('enabled', True)
      and (entry['kind'] == 'selection' or (entry['kind'] == 'classification' and entry.get('split') == 'validation'))
      and (config.eval_every if entry.get('every') is None else entry['every']) > 0
  ]
  if not periodic:
    raise ValueError(
        f'config.nt_reference={dict(config.nt_reference)!r} acts at validation evaluations during training, but none '
        f'is scheduled (config.eval_every={config.eval_every}): expected config.eval_every > 0 or '
        'config.evals.validation.every > 0'
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: Optional[int] = None,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and returns the final results dict.

  ``stop_at``: checkpoint and return after that step, as a preemption would (to cut a long run into jobs of bounded
  length; the next call resumes exactly where this one stopped). ``benchmark``: see :func:`build_experiment`.
  """
  t_start = time.time()
  is_main = jax.process_index() == 0
  progress_lib.quiet_libraries()
  # 1-2. Sources, relatedness, model, objective, compiled steps (all validation happens here, before any write).
  exp = build_experiment(config, benchmark=benchmark)
  config, benchmark = exp.config, exp.benchmark
  warn_if_no_eval(benchmark)
  data_fingerprint = fingerprint_lib.benchmark_fingerprint(benchmark)
  config_json = json.loads(config_lib.to_json(config))

  # 3. State: fresh initialisation, replaced by the newest restorable checkpoint in the workdir if there is one.
  _check_workdir(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = exp.init_state()
  restored = checkpointer.restore_latest(
      ckpt_lib.abstract_like(state), check_meta=lambda meta: ckpt_lib.check_config_drift(meta['config'], config_json)
  )
  evals = evaluators.build(config, exp)
  records = {}  # the evaluators' records (e.g. the best-validation selection), continued from the checkpoint
  # The negative-transfer monitor's record (JSON, in checkpoint metadata; its scales are also in state.term_scales).
  monitor_record = exp.monitor.initial_record() if exp.monitor else None
  if restored is not None:
    # After the config and layout checks: a resume, or a cached result, of other data is refused too.
    fingerprint_lib.check(restored[1].get('data'), data_fingerprint, where=f'the checkpoint in {workdir!r}')
    state, meta = restored
    records = evaluators.records_from_meta(evals, meta)
    monitor_record = meta.get('monitor') or monitor_record
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  elif config.get('init_from'):
    state = warm_start.apply(state, config)
  start_step = int(state.step)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(config, indent=2))
    if exp.relatedness:
      with open(os.path.join(workdir, 'relatedness.json'), 'w') as f:
        json.dump(exp.relatedness, f, indent=1)
  step_fn = exp.step_fn

  # 5. The loop.
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=False)
  if start_step == 0:
    flat = config_lib.flat_keys(config)
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in sorted(flat.items())})
  sizes = parameter_counts(state.params)
  logging.info('Parameters: %s', ', '.join(f'{k} {v:,}' for k, v in sizes.items()))
  writer.write_scalars(start_step, {f'params/{k}': v for k, v in sizes.items()})
  batches = exp.train_batches(start_step)
  schedule = make_schedule(config)
  # Progress (steps/s, ETA, uptime) is clu's ReportProgress; a jax.profiler trace of config.profile_steps steps
  # from config.profile_first_step goes to <workdir>/profile (TensorBoard's profile tab).
  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every, every_secs=None
      )
  ]
  if config.get('profile_steps', 0) and is_main:
    hooks.append(
        periodic_actions.Profile(
            logdir=os.path.join(workdir, 'profile'),
            num_profile_steps=config.profile_steps,
            profile_duration_ms=None,
            first_profile=config.get('profile_first_step', 10),
            every_steps=None,
            every_secs=None,
        )
    )
  interval = _IntervalMean()

  def save(step):
    checkpointer.save(
        step,
        state,
        {
            'step': step,
            'data_position': {'start_step': step},
            'config': config_json,
            'data': data_fingerprint,
            'evals': records,
            **({'monitor': monitor_record} if exp.monitor else {}),
        },
    )

  def evaluate(chosen, step) -> dict:
    """Runs the ``chosen`` evaluators on the current state, writes their scalars, keeps their records; where they
    computed validation metrics, the negative-transfer monitor compares them with its references."""
    nonlocal records, state, monitor_record
    at = evaluators.At(exp, state, step)
    reports, records = evaluators.run(chosen, at, records)
    scalars = {k: v for report in reports.values() for k, v in report.scalars.items()}
    if exp.monitor is not None and at.computed('validation'):
      monitor_record, messages = exp.monitor.update(monitor_record, step, at.classification('validation')['metrics'])
      for message in messages:
        logging.warning(message)
      scalars.update(exp.monitor.scalars(monitor_record))
      if monitor_record['scales']:  # nt_action='anneal': the step reads the scales from the state
        scales = {t: np.float32(v) for t, v in monitor_record['scales'].items()}
        state = state.replace(term_scales=jax.device_put(scales, exp.replicated))
    writer.write_scalars(step, scalars)
    return reports

  learned = exp.objective.learned_tables
  learned_path = os.path.join(workdir, LEARNED_RELATEDNESS_FILE)
  learned_history = []  # every logged {step, tables}, continued from the file of an earlier run in this workdir
  if learned and is_main and os.path.exists(learned_path):
    with open(learned_path) as f:
      learned_history = json.load(f).get('history', [])

  def log_relatedness(step) -> None:
    """The learned tables as TensorBoard heat-maps (``relatedness/<a>-><b>``, brighter = higher; cells 8 px) and
    as ``<workdir>/relatedness_learned.json``: the latest tables and their step, and ``history``, every logged
    ``{step, tables}`` (a resumed run drops the entries from its own step on, which it logs again)."""
    tables = {k: np.asarray(v).tolist() for k, v in jax.device_get(state.relatedness).items()}
    writer.write_images(step, {f'relatedness/{k}': relatedness_image(t) for k, t in tables.items()})
    if is_main:
      learned_history[:] = [h for h in learned_history if h['step'] < step] + [{'step': step, 'tables': tables}]
      text = json.dumps({'step': step, 'tables': tables, 'history': learned_history})
      _write_atomically(learned_path, text)

  stop_reason = lambda: evaluators.stop_reason(evals, records)  # noqa: E731

  # XLA:CPU meets the threads of all fake devices at each collective on a shared thread pool; with a second step
  # already dispatched, its blocked participants can starve the first step's (seen here as a rendezvous abort after
  # ~100 steps with 8 devices on 2 cores). Accelerators keep asynchronous dispatch.
  one_step_in_flight = jax.default_backend() == 'cpu' and exp.mesh.size > 1
  step, results = start_step, None
  if learned and start_step == 0:
    log_relatedness(0)  # the initial tables
  progress = progress_lib.Progress(config.total_steps, start_step, enabled=is_main)
  # A checkpoint is written in the background while the next steps run (checkpoint.py); every exit below waits for it.
  with _Preemption() as preemption, checkpointer.closed_on_error():
    while step < config.total_steps and not stop_reason():
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = step_fn(state, next(batches))
      if one_step_in_flight:
        jax.block_until_ready(metrics['loss'])
      interval.add(metrics)
      step += 1
      if learned and step % config.relatedness_every == 0:  # the step just re-estimated the tables
        log_relatedness(step)
      progress.advance(step)
      for hook in hooks:
        hook(step)
      due = evaluators.due(evals, step, config.total_steps)
      if due:  # before the checkpoint of this step, so that its metadata holds the records of this evaluation
        evaluate(due, step)
        if stop_reason():
          logging.info('Early stopping at step %d: %s.', step, stop_reason())
      log_now = step % config.log_every == 0 or step == config.total_steps
      interrupted = preemption.requested or step == stop_at
      ckpt_now = step % config.checkpoint_every == 0 or step == config.total_steps or interrupted or stop_reason()
      if log_now or ckpt_now:
        fetched = jax.device_get(metrics)  # health scalars leave the device only here
        if not (fetched['finite'] and np.isfinite(fetched['param_norm'])) and config.nonfinite == 'halt':
          try:  # waits for the write in flight: only a committed step counts
            last_checkpoint = checkpointer.latest_step()
          except ckpt_lib.CheckpointWriteError as e:  # still report the non-finite step, which is why the run stops
            logging.error('%s', e)
            last_checkpoint = checkpointer.latest_step()
          checkpointer.close()
          progress.close()
          raise FloatingPointError(_health_error(step, fetched, last_checkpoint))
        if log_now:
          # Each train metric as its mean over the steps since the last log (health counters: their last value).
          means = {**_scalars(fetched), **interval.pop()}
          writer.write_scalars(step, {**means, 'learning_rate': float(schedule(step - 1))})
          progress.log(step, config.total_steps, means['loss'])
        if ckpt_now:
          save(step)
      if interrupted and step < config.total_steps and not stop_reason():
        checkpointer.close()  # the step's write is committed before the log says so and the process may exit
        logging.warning(
            '%s: checkpoint saved at step %d; stopping so the run can resume.',
            'SIGTERM received' if preemption.requested else f'stop_at={stop_at}',
            step,
        )
        progress.close()
        writer.flush()
        return {'step': step, 'interrupted': True}

  checkpointer.close()  # the last step's write is committed before the final evaluation
  progress.close()
  # 6. Every evaluator at the last step; results.json gathers their parts (test metrics at the last and at the
  # best-validation step, ...).
  if step > start_step or not os.path.exists(os.path.join(workdir, 'results.json')):
    reports = evaluate(evals, step)
    results = {
        'step': step,
        'wall_time_s': time.time() - t_start,
        **{k: v for report in reports.values() for k, v in report.results.items()},
        'stopped_early': bool(stop_reason()),
    }
    if learned:
      results['learned_relatedness'] = {k: np.asarray(v).tolist() for k, v in jax.device_get(state.relatedness).items()}
    if exp.monitor is not None:
      results['negative_transfer'] = monitor_record
    if is_main:
      _write_atomically(os.path.join(workdir, 'results.json'), json.dumps(results, indent=1, default=_jsonable))
  else:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  writer.flush()
  return results


LEARNED_RELATEDNESS_FILE = 'relatedness_learned.json'


def relatedness_image(table, cell: int = 8) -> np.ndarray:
  """A relatedness table ``[C_A, C_B]`` in [0, 1] as a grey heat-map image ``[1, C_A·cell, C_B·cell, 3]`` (rows =
  A classes, columns = B labels, brighter = higher), for clu's ``write_images``."""
  t = np.clip(np.asarray(table, np.float32), 0.0, 1.0)
  pixels = np.kron(t, np.ones((cell, cell), np.float32))
  return np.repeat(pixels[None, :, :, None], 3, axis=-1)


class _IntervalMean:
  """Sums of the train metrics over the steps since the last :meth:`pop`, kept on device (one small jitted add per
  step; nothing leaves the device until the log step). ``finite`` and ``skipped`` are health counters, not averaged."""

  _COUNTERS = ('finite', 'skipped')

  def __init__(self):
    self._sums, self._count = None, 0
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def add(self, metrics: Mapping[str, Any]) -> None:
    values = {k: v.astype(jnp.float32) for k, v in metrics.items() if k not in self._COUNTERS}
    self._sums = values if self._sums is None else self._add(self._sums, values)
    self._count += 1

  def pop(self) -> dict[str, float]:
    if self._sums is None:
      return {}
    means = {k: float(v) / self._count for k, v in jax.device_get(self._sums).items()}
    self._sums, self._count = None, 0
    return means


def parameter_counts(params) -> dict[str, int]:
  """Parameters per module: ``{'encoder': n, 'head/<task>': n, ...}`` (what the run logs at its start)."""
  count = lambda tree: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))  # noqa: E731
  return {'encoder': count(params['encoder']), **{f'head/{t}': count(p) for t, p in params['heads'].items()}}


def warn_if_no_eval(benchmark: data_lib.Benchmark) -> None:
  """A benchmark without eval sources would end with ``metrics: {}``: say so before training, not after."""
  if not benchmark.eval_sources:
    logging.warning(
        'Benchmark %r has no eval source for the trained tasks %s: the run will end with no metrics '
        '(results.json "metrics": {}). Pass eval_sources=[...] to data.make_benchmark to evaluate.',
        benchmark.name,
        list(benchmark.tasks),
    )


def _jsonable(value):
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'not JSON serialisable: {type(value)}')


# Below this much free space on the workdir's filesystem a run is refused at start (a floor, not a capacity plan:
# a full disk otherwise shows up as a failed checkpoint write hours later; the previous checkpoint survives that).
MIN_FREE_BYTES = 64 * 2**20


def _check_workdir(workdir: str) -> None:
  """A clear error before training when the workdir cannot be written (a path under a file, read-only, ENOSPC on a
  synced probe write) or its filesystem has less than :data:`MIN_FREE_BYTES` free."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_probe')
    with open(probe, 'w') as f:
      f.write('ok')
      f.flush()
      os.fsync(f.fileno())
    try:
      os.remove(probe)
    except FileNotFoundError:  # another host of this run probed the same shared workdir at the same moment
      pass
    free = shutil.disk_usage(workdir).free
  except OSError as e:
    raise ValueError(
        f'workdir {workdir!r}: cannot write there ({e.strerror or e}); expected a writable directory ' 'with free space'
    ) from None
  if free < MIN_FREE_BYTES:
    raise ValueError(
        f'workdir {workdir!r}: {free / 2 ** 20:.1f} MiB free on its filesystem, expected at least '
        f'{MIN_FREE_BYTES / 2 ** 20:.0f} MiB for checkpoints'
    )


def _write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a synced temporary file and a rename: readers see the old or the new file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def validate_sources(benchmark: data_lib.Benchmark) -> None:
  """Reads and checks every source this host uses — training, evaluation and auxiliary — before anything is written
  (labels in range, at least one example, one image shape): a bad test set fails now, not at the first evaluation
  hours later. Readers cache what they read, so the input pipelines do not read again."""
  for source in (
      *benchmark.train_sources,
      *benchmark.validation_sources,
      *benchmark.eval_sources,
      *benchmark.aux_sources.values(),
  ):
    data_lib.load_examples(
        source,
        benchmark.tasks,
        image_shape=benchmark.image_shape,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
