"""The train state and the pure, data-parallel train step: ``train_step(state, batch) -> (state, metrics)``.

The step is jitted over a 1-D device mesh (``mtlmatch/experiment.py``) with the global batch sharded on the ``data``
axis and the state replicated; XLA inserts the cross-device reductions, so losses, gradients and BatchNorm statistics
are over the global batch and the result does not depend on the number of devices or hosts. The state is donated;
randomness is ``fold_in(state.rng, step)``.

One batch, top to bottom:

1. :func:`encoder_pass` runs the shared encoder: the features (any pytree: one ``[B, D]`` array, multi-scale maps,
   per-expert features) and a *pullback* from feature cotangents to encoder gradients.
2. :func:`loss_rows` is the objective's loss vector ``[T' + 1]`` (the losses the weighting method combines, then the
   additive part: DGR always, the other terms unless ``config.weighting.terms_as_tasks``) as a function of the
   features and the heads; its VJP turns any cotangent into head gradients and a feature cotangent, without a
   convolution (:class:`Linearization`).
3. The weighting method declares what it needs (``method.needs``, ``mtlmatch/weighting/base.py``) and
   :data:`GRADIENT_PATHS` maps that to the gradients: ``'losses'`` pulls back one cotangent, its weights;
   ``'shared_rows'`` one per loss (the rows of G w.r.t. the shared parameters; ``config.weighting.jacobian``),
   ``'feature_rows'`` combines the rows w.r.t. the shared features and pulls the result back once (MGDA-UB);
   ``'meta'`` lets the method update its weights in a meta step first (Auto-Lambda's and MOML's ``meta_step`` on
   ``batch['validation']``, FORUM's on the training batch). How the heads are weighted is the method's ``kind``: a
   loss weighting gives each head Σ_t w_t ∇L_t, a gradient method each head the sum of its own rows. The additive
   part's gradient is added on top.
4. The optimizer update; the objective's own state (learned relatedness tables, docs/maths.md §8) advances through
   ``objective_update``; health scalars (loss, norms, finiteness) come back as metrics, fetched by the loop only at
   log steps.

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
from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from mtlmatch import losses
from mtlmatch import weighting
from mtlmatch.tasks import kind_of


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
  # The objective's state (each {} when its feature is off): the learned relatedness tables {pair key '<a>-><b>':
  # R [C_A, C_B]} and their soft counts since the last re-estimation {pair key: {'joint': N [C_A, C_B], 'marginal':
  # n [C_A]}} (docs/maths.md §8; advanced by the step), and the term scales {term: float32 scalar} that the
  # negative-transfer monitor's decisions set (mtlmatch/monitor.py; applied by the loop).
  relatedness: Any
  relatedness_counts: Any
  term_scales: Any


class LossNames(NamedTuple):
  """The names of the losses the weighting method combines (``combined``, T of them) and of those added on top."""

  combined: tuple[str, ...]
  additive: tuple[str, ...]


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


def weighting_init(method, num_combined: int, params) -> dict:
  """The weighting method's initial state; methods that track gradients get P = the shared encoder's size, those
  that group its parameters (GradVac) the encoder's `weighting.param_layout`."""
  num_params = int(ravel_pytree(params['encoder'])[0].size) if method.needs_num_params else None
  layout = weighting.param_layout(params['encoder']) if method.uses_param_layout else None
  return weighting.init_state(method, num_combined, num_params, param_layout=layout)


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


def keep_objective_state(tables, counts, batch_counts, step):
  """The objective-state update of an objective without learned tables: nothing changes."""
  del batch_counts, step
  return tables, counts


# ---------------------------------------------------------------------------------------------------------------
# The encoder pass, with gradient accumulation over microbatches.


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
  """The shared encoder on the batch: ``(features, new batch_stats, pullback)``; features is the encoder's output
  pytree (every leaf with a leading batch axis B).

  ``pullback(cotangents, how)`` gives the encoder's parameter gradients for R feature cotangents (the features'
  structure, every leaf with a leading axis R; ``how`` as in `weighting.pullback_rows`). With ``accum_steps = k > 1``
  the batch is cut into k microbatches (:func:`split_microbatches`) and the encoder's activations are never held for
  more than one: the forward pass runs the microbatches in turn (``lax.scan``) and keeps only their features; the
  pullback runs them in turn again, recomputing each microbatch's forward pass to pull back its slice of the
  cotangents, and sums the gradients. Whatever comes after the features (heads, task losses, every objective term,
  the weighting method) sees the whole batch, so the gradient equals the one-pass gradient (up to float summation
  order) — except that BatchNorm normalises each microbatch with its own statistics; the running statistics become
  the mean of the k microbatch updates (each from the step's starting statistics). The price: one more forward pass
  of the encoder.
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
    num_rows = jax.tree.leaves(cotangents)[0].shape[0]
    zeros = jax.tree.map(lambda p: jnp.zeros((num_rows, *p.shape), p.dtype), params['encoder'])

    def body(total, slices):
      x, c = slices  # [B/k, ...], leaves [R, B/k, ...]
      _, vjp_fn, _ = jax.vjp(lambda p: encode(p, x), params['encoder'], has_aux=True)
      return jax.tree.map(jnp.add, total, weighting.pullback_rows(lambda r: vjp_fn(r)[0], c, how)), None

    micro_cotangents = jax.tree.map(lambda c: split_microbatches(c, accum_steps, axis=1), cotangents)
    total, _ = jax.lax.scan(body, zeros, (micro_images, micro_cotangents))
    return total

  return jax.tree.map(merge_microbatches, micro_features), new_stats, pullback


# ---------------------------------------------------------------------------------------------------------------
# The loss vector and its linearization.


def loss_rows(features, head_params, *, state, batch, model, objective, names: LossNames, dummy_rng, term_rng):
  """``(loss vector [T' + 1], named losses)``: the combined losses, then the additive part, from the shared features
  and the head parameters (what the step differentiates). A learned relatedness table's soft counts of this batch
  ride along in the named losses under :data:`SOFT_COUNTS` (popped by the step)."""
  outputs = {t: model.apply_head(t, head_params[t], features) for t in model.heads}
  resampled = objective.draw_dummies(dummy_rng, jax.lax.stop_gradient(features), mode='resample')
  named = objective(
      {'features': features, 'logits': outputs},
      batch['labels'],
      dummies={**state.dummy_params, **resampled},
      rng=term_rng,
      tables=state.relatedness,
      scales=state.term_scales,
  )
  if state.relatedness:
    named[SOFT_COUNTS] = objective.soft_counts(jax.lax.stop_gradient(outputs), batch['labels'])
  extra = sum((named[n] for n in names.additive), jnp.zeros((), jnp.float32))
  return jnp.stack([named[n] for n in names.combined] + [extra]), named


# The key under which a step's soft counts of the learned relatedness ride along with the named losses, popped
# before the metrics (they are [C_A, C_B] statistics, not losses).
SOFT_COUNTS = 'relatedness_soft_counts'


@dataclasses.dataclass(frozen=True)
class Linearization:
  """The loss vector linearised at this step: ``rows_vjp`` through the heads (cotangent [T' + 1] → feature
  cotangent, head gradients) and ``encoder_pullback`` through the encoder (:func:`encoder_pass`)."""

  rows_vjp: Callable
  encoder_pullback: Callable
  features: Any
  num_combined: int
  has_additive: bool

  def grads(self, cotangent: jax.Array) -> dict:
    """Σ_r cotangent_r ∇(row r) w.r.t. every parameter: one pullback through the heads, one through the encoder."""
    d_features, d_heads = self.rows_vjp(cotangent)
    rows = jax.tree.map(lambda g: g[None], d_features)
    return {'encoder': jax.tree.map(lambda g: g[0], self.encoder_pullback(rows, 'rows')), 'heads': d_heads}

  def weighted_grads(self, weights: jax.Array) -> dict:
    """The gradient of Σ_t w_t L_t + the additive part (``weights`` held constant)."""
    return self.grads(jnp.concatenate([jax.lax.stop_gradient(weights), jnp.ones((1,), weights.dtype)]))

  def unit_cotangents(self) -> jax.Array:
    """One unit cotangent per Jacobian row: the combined losses, and the additive row only when there is an additive
    part (otherwise it is identically zero and would cost a whole backward pass)."""
    t = self.num_combined
    return jnp.eye(t + 1 if self.has_additive else t, t + 1, dtype=jnp.float32)


class PathResult(NamedTuple):
  grads: Any  # {'encoder': ..., 'heads': ...}
  weights: jax.Array  # [T] the method's effective weights
  weighting_state: Any
  metrics: dict  # the path's own metrics (cosines, meta step)
  finite: jax.Array  # bool: the path's own health check (True when it has none)


# ---------------------------------------------------------------------------------------------------------------
# Gradient paths: one per kind of information a weighting method needs (``method.needs``).


def losses_path(method, state, lin: Linearization, task_losses, rng, **_) -> PathResult:
  """Weights from the losses and the method's state; one backward pass of the weighted sum (G is not needed: the
  method sees a [T, 1] stand-in)."""
  _, weights, weighting_state = method.apply(
      state.weighting_state, jnp.zeros((task_losses.shape[0], 1), task_losses.dtype), task_losses, rng
  )
  return PathResult(lin.weighted_grads(weights), weights, weighting_state, {}, jnp.array(True))


def rows_path(method, state, lin: Linearization, task_losses, rng, *, jacobian: str = 'auto', **_) -> PathResult:
  """The method combines per-task gradient rows: w.r.t. the shared parameters (``'shared_rows'``: each feature row
  pulled back through the encoder, ``jacobian`` mode) or w.r.t. the shared features (``'feature_rows'``: the combined
  row is pulled back once). Heads: Σ_t w_t ∇L_t for a loss weighting (GradNorm, ExcessMTL, as their papers), else
  each head the sum of its rows (a head only receives gradient from the losses that use it)."""
  cotangents = lin.unit_cotangents()
  num_tasks = lin.num_combined
  # The rows w.r.t. the features and the heads (through the heads only): feature leaves [R, B, ...], heads [R, ...].
  # Same mode as the encoder's pullback ('auto': one VJP per row on XLA:CPU): dense heads are convolution stacks, and
  # a vmapped VJP through them on XLA:CPU is both slower and the path where wrong head gradients were once reported.
  d_features, d_heads = weighting.pullback_rows(lin.rows_vjp, cotangents, jacobian)
  wrt_features = method.needs == 'feature_rows'
  if wrt_features:
    flat_rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(d_features)
  else:
    encoder_rows = lin.encoder_pullback(d_features, jacobian)  # leaves [R, ...]; 'auto': rows on CPU
    flat_rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(encoder_rows)
  update, weights, weighting_state = method.apply(state.weighting_state, flat_rows[:num_tasks], task_losses, rng)
  if lin.has_additive:
    update = update + flat_rows[num_tasks]
  if wrt_features:
    unravel = ravel_pytree(lin.features)[1]
    combined = jax.tree.map(lambda g: g[None], unravel(update))
    encoder_grads = jax.tree.map(lambda g: g[0], lin.encoder_pullback(combined, 'rows'))
  else:
    encoder_grads = ravel_pytree(state.params['encoder'])[1](update)
  if method.kind == 'loss_weighting':
    head_coefficients = jnp.concatenate([jax.lax.stop_gradient(weights), jnp.ones((len(cotangents) - num_tasks,))])
  else:
    head_coefficients = jnp.ones((len(cotangents),))
  grads = {'encoder': encoder_grads, 'heads': jax.tree.map(lambda g: jnp.tensordot(head_coefficients, g, 1), d_heads)}
  cosine = weighting.cosine_similarity_matrix(flat_rows[:num_tasks])
  return PathResult(grads, weights, weighting_state, {'cosine': cosine}, jnp.array(True))


def meta_path(
    method, state, lin: Linearization, task_losses, rng, *, batch, val_losses, train_losses, schedule, names, **_
) -> PathResult:
  """The method first updates its weights in its ``meta_step`` (``weighting.MetaInputs``: the weighted training
  gradient, the training losses at other parameters, the per-task losses on ``batch['validation']`` when it reads one),
  then the loss-weighting step with the new weights; every number of the meta step and of the method's state is
  checked for finiteness too (an absent task has weight 0 this step)."""
  uses_validation = method.meta_uses_validation
  if uses_validation and 'validation' not in batch:
    raise ValueError(
        f"batch: got keys {sorted(batch)}, expected also 'validation' (weighting method {method.name!r} meta-learns "
        'on validation batches: Experiment.train_batches adds them)'
    )
  if schedule is None:
    raise ValueError(f'train_step schedule: got None, expected the learning-rate schedule ({method.name} looks ahead)')
  zero = jnp.zeros((1,), jnp.float32)
  inputs = weighting.MetaInputs(
      weighted_grad=lambda lam: lin.grads(jnp.concatenate([lam, zero])),
      params=state.params,
      task_losses=jax.lax.stop_gradient(task_losses),
      train_losses=train_losses,
      val_losses=(lambda params: val_losses(params, batch['validation'])) if uses_validation else None,
      schedule_lr=schedule(state.step),
  )
  weighting_state, meta = method.meta_step(state.weighting_state, inputs)
  meta_grad = meta.pop('meta/grad')
  meta.update({f'meta/grad/{n}': g for n, g in zip(names.combined, meta_grad)})
  _, weights, weighting_state = method.apply(
      weighting_state, jnp.zeros((task_losses.shape[0], 1), task_losses.dtype), task_losses, rng
  )
  leaves = jax.tree.leaves((meta, meta_grad, weighting_state))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]))
  return PathResult(lin.weighted_grads(weights), weights, weighting_state, meta, finite)


GRADIENT_PATHS: Mapping[str, Callable[..., PathResult]] = {
    'losses': losses_path,
    'shared_rows': rows_path,
    'feature_rows': rows_path,
    'meta': meta_path,
}
assert set(GRADIENT_PATHS) == set(weighting.NEEDS)


def validation_losses(params, val_batch, *, state, model, objective, names: LossNames) -> jax.Array:
  """[T]: each combined loss at ``params`` on a validation batch — the task losses (``task/<name>``), 0 for the
  terms trained as tasks (auxiliary) — forward in train mode (BatchNorm normalises with the validation batch's
  statistics; the running statistics it would produce are dropped: the train state keeps those of the training
  batch). What a ``'meta'`` method's look-ahead lowers (Auto-Lambda: their sum)."""
  features, _ = model.encode({'params': params, 'batch_stats': state.batch_stats}, val_batch['image'], train=True)
  outputs = {t: model.apply_head(t, params['heads'][t], features) for t in model.heads}
  named = objective.task_losses(outputs, val_batch['labels'])
  zero = jnp.zeros((), jnp.float32)
  return jnp.stack([named[n] if n.startswith('task/') else zero for n in names.combined])


# ---------------------------------------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    model,
    objective,
    tx,
    method,
    names: LossNames,
    skip_nonfinite: bool,
    objective_update: Callable = keep_objective_state,
    schedule: Optional[optax.Schedule] = None,
    jacobian: str = 'auto',
    accum_steps: int = 1,
):
  """One data-parallel step (module docstring). Pure: ``(state, batch) -> (state, metrics)``; metrics stay on device.

  ``objective_update(tables, counts, batch_counts, step) -> (tables, counts)``: the objective's state after this
  step (:func:`update_relatedness` with its options bound, or :func:`keep_objective_state`). ``schedule``: the
  optimizer's learning rate (a ``'meta'`` method looks ahead with it). ``jacobian``, ``accum_steps``: see
  :func:`rows_path`, :func:`encoder_pass`.
  """
  dummy_rng, term_rng, method_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  features, batch_stats, encoder_pullback = encoder_pass(
      model, state.params, state.batch_stats, batch['image'], accum_steps=accum_steps
  )
  shared = dict(state=state, model=model, objective=objective, names=names)
  rows_fn = functools.partial(loss_rows, batch=batch, dummy_rng=dummy_rng, term_rng=term_rng, **shared)
  rows, rows_vjp, named = jax.vjp(rows_fn, features, state.params['heads'], has_aux=True)
  lin = Linearization(rows_vjp, encoder_pullback, features, len(names.combined), bool(names.additive))
  task_losses = rows[:-1]
  val_losses = functools.partial(validation_losses, **shared)  # (params, val_batch) -> losses

  def train_losses(params):
    # The combined losses of this batch at other parameters: one forward in train mode (the whole batch at once,
    # also under gradient accumulation; BatchNorm's running statistics it would produce are dropped).
    encoded, _ = model.encode({'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True)
    return rows_fn(encoded, params['heads'])[0][:-1]

  path = GRADIENT_PATHS[method.needs](
      method,
      state,
      lin,
      task_losses,
      method_rng,
      jacobian=jacobian,
      batch=batch,
      val_losses=val_losses,
      train_losses=train_losses,
      schedule=schedule,
      names=names,
  )
  total = jnp.dot(jax.lax.stop_gradient(path.weights), task_losses) + rows[-1]
  updates, opt_state = tx.update(path.grads, state.opt_state, state.params)
  relatedness, relatedness_counts = objective_update(
      state.relatedness, state.relatedness_counts, named.pop(SOFT_COUNTS, {}), state.step
  )
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
      weighting_state=path.weighting_state,
      relatedness=relatedness,
      relatedness_counts=relatedness_counts,
  )
  grad_norm = optax.tree.norm(path.grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & path.finite
  if skip_nonfinite:  # keep everything but the step (and the data position) when this update is non-finite
    skipped = state.replace(step=state.step + 1, skipped=state.skipped + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, skipped)
  health = {'loss': total, 'grad_norm': grad_norm, 'param_norm': optax.tree.norm(new_state.params)}
  health['invalid_labels'] = invalid_labels(objective.tasks, batch['labels'])
  return new_state, step_metrics(health, finite, new_state.skipped, named, names, path)


def invalid_labels(tasks, labels) -> jax.Array:
  """int32: the batch's labels that are neither missing nor valid (each task kind's ``invalid_labels``). They weigh 0
  in the losses; the data layer refuses them before training, a custom stream may not, so the step counts them and
  the loop halts on them instead of training on silently dropped labels."""
  counts = (kind_of(t).invalid_labels(labels[name], t.num_classes) for name, t in tasks.items())
  return sum(counts, jnp.zeros((), jnp.int32))


def step_metrics(health, finite, skipped, named, names: LossNames, path: PathResult) -> dict:
  """The step's metrics: health scalars, every named loss, the method's weights, the path's own numbers (pairwise
  gradient cosines ``cosine/<a>|<b>`` of the rows paths, ``meta/...`` of the meta path)."""
  metrics = {
      **health,
      'finite': finite,
      'skipped': skipped,
      **{f'loss/{n}': v for n, v in named.items()},
      **{f'weight/{n}': w for n, w in zip(names.combined, path.weights)},
  }
  extra = dict(path.metrics)
  cosine = extra.pop('cosine', None)
  if cosine is not None:
    for i, a in enumerate(names.combined):
      for j in range(i + 1, len(names.combined)):
        metrics[f'cosine/{a}|{names.combined[j]}'] = cosine[i, j]
  return {**metrics, **extra}
