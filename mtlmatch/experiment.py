"""The experiment builder: ``build_experiment(config) -> Experiment``, everything a config determines but the state.

Reads top to bottom: validate the config → sources (the benchmark, its trained tasks, the validation hold-out; every
source read and checked) → model → relatedness tables → objective → weighting method and optimizer → the compiled
train step (``mtlmatch/step.py``) and the evaluation view (``mtlmatch/evaluators.py``). Every check of user input
happens here, before the loop (``mtlmatch/train.py``) writes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mtlmatch import config_checks
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import evaluators
from mtlmatch import losses
from mtlmatch import models
from mtlmatch import monitor as monitor_lib
from mtlmatch import objective as objective_lib
from mtlmatch import priors
from mtlmatch import step as step_lib
from mtlmatch import warm_start
from mtlmatch import weighting


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: with jax 0.10.2 the grad-of-grad (DGR) step failed with a ShardingTypeError under Explicit axes.
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the step: linear warmup, then cosine decay or constant."""
  opt = config.optimizer
  if opt.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0,
        opt.learning_rate,
        opt.warmup_steps,
        max(config.total_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.final_lr_fraction,
    )
  if opt.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), optax.constant_schedule(opt.learning_rate)],
        [opt.warmup_steps],
    )
  raise ValueError(f"config.optimizer.schedule: got {opt.schedule!r}, expected 'cosine' or 'constant'")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """adam / adamw / sgd (+momentum) with :func:`make_schedule`'s learning rate and optional global-norm clipping."""
  opt = config.optimizer
  lr = make_schedule(config)
  if opt.name == 'adam':
    base = optax.adam(lr)
  elif opt.name == 'adamw':
    base = optax.adamw(lr, weight_decay=opt.weight_decay)
  elif opt.name == 'sgd':
    base = optax.sgd(lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
  else:
    raise ValueError(f"config.optimizer.name: got {opt.name!r}, expected one of ['adam', 'adamw', 'sgd']")
  return optax.chain(optax.clip_by_global_norm(opt.clip_norm), base) if opt.clip_norm else base


# ---------------------------------------------------------------------------------------------------------------
# Sources.


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


def with_task_options(benchmark: data_lib.Benchmark, options) -> data_lib.Benchmark:
  """The benchmark with ``options`` {task: {option: value}} over its tasks' options (``config.task_options``;
  checked by each task's kind: an unknown task, option or value raises one ValueError)."""
  options = {t: dict(o) for t, o in dict(options or {}).items()}
  unknown = sorted(set(options) - set(benchmark.tasks))
  if unknown:
    raise ValueError(f'config.task_options: got tasks {unknown}, expected some of {list(benchmark.tasks)}')
  tasks = {
      name: dataclasses.replace(spec, options={**dict(spec.options), **options[name]}) if name in options else spec
      for name, spec in benchmark.tasks.items()
  }
  return dataclasses.replace(benchmark, tasks=tasks)


def build_sources(config: ml_collections.ConfigDict, benchmark: Optional[data_lib.Benchmark]) -> data_lib.Benchmark:
  """The benchmark of ``config.data`` (or the given one) with ``config.task_options`` applied, restricted to
  ``config.tasks``, with the validation split held out, every source read and checked."""
  if benchmark is None:
    benchmark = data_lib.get_benchmark(
        config.data.name,
        data_dir=config.data.data_dir,
        seed=config.data.seed,
        on_bad_image=config.data.on_bad_image,
        **config.data.options,
    )
  benchmark = select_tasks(with_task_options(benchmark, config.task_options.to_dict()), config.tasks)
  benchmark = data_lib.with_validation(benchmark, config.data.validation_fraction, seed=config.data.seed)
  if weighting.needs_validation(config.weighting.name) and not benchmark.validation_sources:
    raise ValueError(
        f'weighting.name={config.weighting.name!r} meta-learns its task weights on validation batches, but '
        f'config.data.validation_fraction={config.data.validation_fraction!r} holds out no validation '
        'split: expected config.data.validation_fraction in (0, 1), e.g. 0.1'
    )
  validate_sources(benchmark)
  return benchmark


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


def warn_if_no_eval(benchmark: data_lib.Benchmark) -> Optional[str]:
  """A benchmark without eval sources would end with ``metrics: {}``: the warning to give before training (None:
  it has eval sources)."""
  if benchmark.eval_sources:
    return None
  return (
      f'Benchmark {benchmark.name!r} has no eval source for the trained tasks {list(benchmark.tasks)}: the run will '
      'end with no metrics (results.json "metrics": {}). Pass eval_sources=[...] to data.make_benchmark to evaluate.'
  )


def validation_seed(seed: int) -> int:
  """The seed of the validation-batch stream (Auto-Lambda) of a run with ``config.seed = seed``: a fixed function
  of it, distinct from it, so the two streams draw independent mixing counts and permutations."""
  return int(np.random.SeedSequence([seed, 0x76616C]).generate_state(1, np.uint32)[0])


# ---------------------------------------------------------------------------------------------------------------
# Relatedness tables.

LEARNED_INITS = "'prior:<name>', 'estimate:<source>' or 'uniform'"


def make_relatedness_resolver(benchmark: data_lib.Benchmark, log: dict):
  """``(spec, task_a, task_b) -> R``: 'prior:<name>', 'estimate:<source>', a literal nested list, or
  'learned:<init>' (the initial table of a learned one, docs/maths.md §8: init 'prior:<name>', 'estimate:<source>' or
  'uniform' = 0.5 per entry for multilabel B, 1/C_B for multiclass B). Every resolved table is recorded in ``log``."""

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
      table = prior_table(spec, ta, tb)
    elif isinstance(spec, str) and spec.startswith('estimate:'):
      table = estimated_table(spec, benchmark, ta, tb)
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


def prior_table(spec: str, ta, tb) -> np.ndarray:
  """The shipped prior ``'prior:<name>'`` for tasks ``ta`` → ``tb``: restricted to their classes by name when both
  have class names (e.g. the AUs a face dataset annotates), else as shipped (its size must match)."""
  prior = priors.load_prior(spec[len('prior:') :])
  names = (ta.class_names, tb.class_names)
  if all(names) and names != (prior.task_a.class_names, prior.task_b.class_names):
    return prior.restricted(ta.class_names, tb.class_names)
  if (prior.task_a.num_classes, prior.task_b.num_classes) != (ta.num_classes, tb.num_classes):
    raise ValueError(
        f'relatedness {spec!r}: the prior relates {prior.task_a.num_classes} x {prior.task_b.num_classes} classes, '
        f'expected {ta.num_classes} x {tb.num_classes} for tasks {ta.name!r} -> {tb.name!r}'
    )
  return prior.relatedness


def estimated_table(spec: str, benchmark: data_lib.Benchmark, ta, tb) -> np.ndarray:
  """``'estimate:<source>'``: the table estimated from a source labelled for both tasks (docs/maths.md §3)."""
  name = spec[len('estimate:') :]
  sources = {**{s.name: s for s in benchmark.train_sources}, **dict(benchmark.aux_sources)}
  if name not in sources:
    raise ValueError(f'relatedness {spec!r}: no source {name!r}, expected one of {sorted(sources)}')
  labels = data_lib.source_labels(sources[name], benchmark.tasks)
  return losses.estimate_relatedness(
      labels[ta.name], labels[tb.name], num_classes_a=ta.num_classes, num_classes_b=tb.num_classes, b_kind=tb.kind
  )


# ---------------------------------------------------------------------------------------------------------------


def loss_names(objective: objective_lib.Objective, config) -> step_lib.LossNames:
  """(names of the losses the weighting method combines, names added on top)."""
  additive = objective.additive_names(config.weighting.terms_as_tasks)
  combined = tuple(
      [f'task/{t}' for t in objective.tasks]
      + [f'term/{b.name}' for b in objective.terms if f'term/{b.name}' not in additive]
  )
  return step_lib.LossNames(combined, additive)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a config determines besides the train state: sources, model, objective, optimizer, weighting
  method, the compiled step over ``mesh`` and the evaluators' view."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  benchmark: data_lib.Benchmark
  model: models.MultiTaskModel
  objective: objective_lib.Objective
  method: Any
  tx: optax.GradientTransformation
  names: step_lib.LossNames
  relatedness: dict  # the resolved tables, for the record
  step_fn: Any  # jitted (state, batch) -> (state, metrics), state donated
  view: evaluators.EvalView  # what the evaluators read (never the Experiment itself)
  monitor: Optional[monitor_lib.Monitor] = None  # the negative-transfer monitor (config.nt_reference), or None

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P('data'))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def init_state(self) -> step_lib.TrainState:
    """The fresh train state, created directly with a replicated sharding (works across hosts)."""
    return jax.jit(
        functools.partial(
            step_lib.init_state,
            self.model,
            self.objective,
            self.method,
            self.tx,
            len(self.names.combined),
            self.benchmark.image_shape,
            term_scales=self.monitor.annealed_terms if self.monitor else (),
        ),
        out_shardings=self.replicated,
    )(jax.random.PRNGKey(self.config.seed))

  def train_batches(self, start_step: int):
    """The training stream from ``start_step`` (batch t is a pure function of (seed, t): resume is exact).

    A method whose meta step reads validation batches (`weighting.needs_validation`: Auto-Lambda, MOML) gets
    ``batch['validation']`` too: batch t of a second stream of the same size over ``benchmark.validation_sources``,
    with its own seed (:func:`validation_seed`), so it resumes exactly as well. Those batches only move the method's
    weights, never the model's parameters directly.
    """
    train = self._stream(self.benchmark, self.config.seed, start_step)
    if not weighting.needs_validation(self.method):
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


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Batch sizes divisible by the device count, and by ``grad_accum_steps`` × devices."""
  if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(
        f'config.batch_size={config.batch_size} / eval_batch_size={config.eval_batch_size}: expected '
        f'multiples of the device count {mesh.size}'
    )
  accum_steps = config.grad_accum_steps
  if config.batch_size % (mesh.size * accum_steps):
    raise ValueError(
        f'config.grad_accum_steps={accum_steps} with config.batch_size={config.batch_size} on {mesh.size} devices: '
        f'expected a batch size divisible by grad_accum_steps x devices = {accum_steps * mesh.size} (each device '
        'splits its share of the batch into grad_accum_steps microbatches)'
    )


def build_model(config: ml_collections.ConfigDict, benchmark: data_lib.Benchmark) -> models.MultiTaskModel:
  """The encoder and task heads of ``config`` (``config.precision`` / ``config.remat`` applied,
  ``config_lib.model_kwargs``), composed by the architecture ``config.arch``."""
  encoder_kwargs, head_kwargs = config_lib.model_kwargs(config)
  return models.build_model(
      benchmark.tasks,
      encoder=config.encoder.name,
      encoder_kwargs=encoder_kwargs,
      head=config.head.name,
      head_kwargs=head_kwargs,
      arch=config.arch.name,
      arch_kwargs=dict(config.arch.kwargs),
  )


def build_objective(config, benchmark, model, relatedness_log: dict) -> objective_lib.Objective:
  """``config.objective`` bound to the tasks: relatedness tables resolved (and logged), DGR's dummy heads built
  (the task's own head, or a linear one in the heads' dtype)."""
  _, head_kwargs = config_lib.model_kwargs(config)
  head_dtype = {'dtype': head_kwargs['dtype']} if 'dtype' in head_kwargs else {}
  env = objective_lib.Env(
      benchmark.tasks,
      make_relatedness_resolver(benchmark, relatedness_log),
      lambda task, kind: model.heads[task]
      if kind == 'task'
      else models.build_task_head(benchmark.tasks[task], 'linear', **head_dtype),
  )
  return objective_lib.build_objective(config.objective.to_dict(), env)


def objective_update(config: ml_collections.ConfigDict, objective: objective_lib.Objective):
  """How the step advances the objective's state: the learned relatedness tables' re-estimation (docs/maths.md §8)
  with ``config.relatedness_*`` bound, or :func:`step.keep_objective_state` without a learned table."""
  if not objective.learned_tables:
    return step_lib.keep_objective_state
  if config.relatedness_every < 1:
    raise ValueError(
        f'config.relatedness_every: got {config.relatedness_every!r}, expected an int >= 1 (steps between '
        f're-estimations of the learned relatedness tables {sorted(objective.learned_tables)})'
    )
  return functools.partial(
      step_lib.update_relatedness,
      objective=objective,
      every=config.relatedness_every,
      rate=float(config.relatedness_rate),
      smoothing=float(config.relatedness_smoothing),
  )


def build_experiment(
    config: ml_collections.ConfigDict,
    mesh: Optional[jax.sharding.Mesh] = None,
    *,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> Experiment:
  """Validates ``config`` and builds sources → model → relatedness → objective → optimizer → step → eval view.

  ``benchmark``: your own (``data.make_benchmark`` of in-memory or TFDS sources) instead of ``config.data.name``.
  """
  config_checks.validate_config(config)
  config = config_lib.resolved(config)  # every field of the chosen encoder and weighting method
  if config.init_from:  # resolved once, here: orbax needs an absolute path, and a bad one fails before any write
    config.init_from = os.path.abspath(config.init_from)
    warm_start.resolve(config.init_from)
  mesh = mesh or make_mesh()
  check_batch_sizes(config, mesh)
  benchmark = build_sources(config, benchmark)
  model = build_model(config, benchmark)
  relatedness = {}
  objective = build_objective(config, benchmark, model, relatedness)
  update = objective_update(config, objective)
  monitor = monitor_lib.build(config, benchmark.tasks, {b.name: objective.feeds(b.name) for b in objective.terms})
  if monitor is not None:
    check_monitor_schedule(config, benchmark)
  names = loss_names(objective, config)
  method = weighting.get_method(config.weighting.name, **config.weighting.hparams)
  tx = make_optimizer(config)
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  step_fn = jax.jit(
      functools.partial(
          step_lib.train_step,
          model=model,
          objective=objective,
          tx=tx,
          method=method,
          names=names,
          skip_nonfinite=config.nonfinite == 'skip',
          objective_update=update,
          schedule=make_schedule(config),
          jacobian=config.weighting.jacobian,
          accum_steps=config.grad_accum_steps,
      ),
      in_shardings=(replicated, data_sharding),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )
  view = evaluators.make_view(benchmark, model, batch_size=config.eval_batch_size, mesh=mesh)
  return Experiment(config, mesh, benchmark, model, objective, method, tx, names, relatedness, step_fn, view, monitor)


def check_monitor_schedule(config: ml_collections.ConfigDict, benchmark: data_lib.Benchmark) -> None:
  """The negative-transfer monitor compares validation metrics during training: it needs a validation split and an
  evaluator that computes them at an interval (the validation or selection evaluator with ``every`` > 0)."""
  if not benchmark.validation_sources:
    raise ValueError(
        f'config.nt_reference={dict(config.nt_reference)!r} compares validation metrics, but '
        f'config.data.validation_fraction={config.data.validation_fraction!r} holds out no validation '
        'split: expected config.data.validation_fraction in (0, 1), e.g. 0.1'
    )
  periodic = [
      name
      for name, entry in evaluators.entries(config).items()
      if entry['enabled']
      and (entry['kind'] == 'selection' or (entry['kind'] == 'classification' and entry['split'] == 'validation'))
      and entry['every'] > 0
  ]
  if not periodic:
    raise ValueError(
        f'config.nt_reference={dict(config.nt_reference)!r} acts at validation evaluations during training, but none '
        f'is scheduled (config.eval_every={config.eval_every}): expected config.eval_every > 0 or '
        'config.evals.validation.every > 0'
    )
