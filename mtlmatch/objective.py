"""The training objective, composed from ``config.objective``.

An objective is the per-task losses plus any number of named regularizer *terms*::

    config.objective.task_weights = {'aus': 2.0}             # default 1.0 per task
    config.objective.terms = {
        'dm': dict(kind='distribution_matching', weight=1.0, task_a='expression', task_b='aus',
                   relatedness='prior:expressions_to_aus', direction='both'),
        'coann': dict(kind='co_annotation', weight=1.0, task_a='expression', task_b='aus',
                      relatedness='estimate:coannotated'),
        'dgr': dict(kind='dgr', weight=0.1, tasks='all', num_dummies=1, mode='fixed'),
    }

``relatedness`` is ``'prior:<name>'`` (a table shipped in :mod:`mtlmatch.priors`), ``'estimate:<source>'``
(estimated once, before training, from a co-annotated source with :func:`mtlmatch.losses.estimate_relatedness`), a
literal nested list ``[C_A][C_B]`` (or its JSON text, as a command line gives it) or a ``.json`` / ``.csv`` file of
one (:func:`mtlmatch.priors.relatedness_table`); the train loop supplies the resolver, so this module knows no data.
``'learned:<init>'`` (init ``prior:<name>``, ``estimate:<source>`` or ``uniform``) makes the table a
:class:`LearnedTable`: the train state holds it, keyed by the pair ``'<a>-><b>'`` (DM and co-annotation on one pair
share it), the train step re-estimates it from the model's predictions (docs/maths.md §8) and passes it in
``tables=``; the term function sees a plain array either way.

**Adding a regularizer** = one pure function ``fn(ctx, **options) -> scalar`` plus one entry in :data:`TERMS`. The
function sees a :class:`Context` (features, logits, labels, task specs, this term's dummy parameters, a step key);
its options are the term's config entry minus ``kind`` and ``weight``, checked against the function's signature.

``scales=`` multiplies terms by name (the negative-transfer monitor's annealing, :mod:`mtlmatch.monitor`); which
tasks a term *feeds* (its targets move their heads) is the ``feeds`` of its :class:`Term`.

The objective returns *named, weighted* scalar losses (``task/<name>``, ``term/<name>``), so the train step can hand
them to a weighting method as separate "tasks" or add them up (``config.weighting.terms_as_tasks``). DGR is always
added on top of the combined gradient, as its authors do (Shin et al., ECCV 2024).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch import losses
from mtlmatch.tasks import TaskSpec, kind_of

Array = jax.Array
LEARNED_PREFIX = 'learned:'


def pair_key(task_a: str, task_b: str) -> str:
  """The key of a learned relatedness table in the train state: ``'<a>-><b>'``."""
  return f'{task_a}->{task_b}'


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedTable:
  """A relatedness option re-estimated during training (docs/maths.md §8); the objective swaps in the current table
  (``tables[key]``, or ``init`` without ``tables``) before calling the term function."""

  key: str  # pair_key(task_a, task_b)
  task_a: str
  task_b: str
  b_kind: str
  init: np.ndarray  # float32 [C_A, C_B], validated
  spec: str  # the config value, e.g. 'learned:prior:expressions_to_aus'


@dataclasses.dataclass(frozen=True)
class Context:
  """What a term function may read. ``logits[task]`` is [B, C]; ``labels[task]`` follows docs/maths.md §1."""

  tasks: Mapping[str, TaskSpec]
  features: Array  # [B, D] shared features
  logits: Mapping[str, Array]
  labels: Mapping[str, Array]
  dummies: Any  # this term's dummy parameters ({task: stacked params}) or None
  rng: Array  # this step's key for this term


def task_loss(task: TaskSpec, outputs: Array, labels: Array, select: Optional[Array] = None) -> Array:
  """The task's own loss over the (global) batch, as its kind defines it (``tasks.KINDS``): the masked mean of its
  per-example losses (softmax CE, masked sigmoid CE, MSE, ...), or its kind's ``reduce`` of the masked means (the
  CCC loss, from the batch's moments). ``select`` [B] (0/1) restricts it to a subset of the examples (DGR's halves).
  """
  kind = kind_of(task)
  per_example, weight = kind.loss(task, outputs, labels)
  means = losses.masked_mean(per_example, weight if select is None else weight * select)
  return means if kind.reduce is None else kind.reduce(task, means)


# ----------------------------------------------------------------------------------------------------------------
# Term functions: fn(ctx, **options) -> scalar (unweighted).


def distribution_matching_term(ctx: Context, *, task_a: str, task_b: str, relatedness, **options) -> Array:
  """Distribution matching between two tasks' predictions on every example (Kollias et al., AAAI 2024).

  ``options``: any of ``losses.matching.OPTIONS`` (direction, mode, stop_gradient_target, divergence, prior); the
  loss's own defaults apply to the others."""
  per_example, weight = losses.distribution_matching(
      ctx.logits[task_a], ctx.logits[task_b], relatedness, b_kind=ctx.tasks[task_b].kind, **options
  )
  return losses.masked_mean(per_example, weight)


def co_annotation_term(ctx: Context, *, task_a: str, task_b: str, relatedness, **options) -> Array:
  """Soft co-annotation: one task's label becomes a soft target for the other (Kollias et al., AAAI 2024).

  ``options``: ``prior`` (``losses.matching.CO_ANNOTATION_OPTIONS``)."""
  per_example, weight = losses.co_annotation(
      ctx.logits[task_a],
      ctx.logits[task_b],
      ctx.labels[task_a],
      ctx.labels[task_b],
      relatedness,
      b_kind=ctx.tasks[task_b].kind,
      **options,
  )
  return losses.masked_mean(per_example, weight)


def dgr_term(
    ctx: Context,
    *,
    heads: Mapping[str, Any],
    norm: str = 'sq_l2',
    num_dummies: int = 1,
    mode: str = 'fixed',
    init_scale: float = 1.0,
) -> Array:
  """Dummy Gradient norm Regularization (Shin et al., ECCV 2024), docs/maths.md §5.

  R = Σ_t (1/K) Σ_k ‖∇_φ L_t(φ_t^(k); f)‖², with never-trained dummy heads φ on the shared features f; JAX
  differentiates it exactly w.r.t. the encoder (grad of a grad). ``heads`` maps task → the dummy head module.
  """
  del num_dummies, mode, init_scale  # used when the dummies are drawn (Objective.draw_dummies)
  total = jnp.zeros((), jnp.float32)
  for task, head in heads.items():
    total = total + losses.dummy_gradient_norm(
        ctx.features,
        ctx.labels[task],
        ctx.dummies[task],
        head_apply=lambda phi, f, head=head: head.apply({'params': phi}, f),
        loss_fn=functools.partial(kind_of(ctx.tasks[task]).loss, ctx.tasks[task]),
        reduce=_reduce_of(ctx.tasks[task]),
        norm=norm,
    )
  return total


def _reduce_of(task: TaskSpec) -> Optional[Callable[[Array], Array]]:
  reduce = kind_of(task).reduce
  return None if reduce is None else functools.partial(reduce, task)


# ----------------------------------------------------------------------------------------------------------------
# Preparation: validate a term's options once, outside jit, and resolve what needs data or modules.


@dataclasses.dataclass(frozen=True)
class Env:
  """What preparation may use: the task specs, a relatedness resolver and a dummy-head builder."""

  tasks: Mapping[str, TaskSpec]
  resolve_relatedness: Callable[[Any, str, str], np.ndarray]  # (spec, task_a, task_b) -> R[C_A, C_B]
  build_dummy_head: Callable[[str, str], Any]  # (task, 'task' | 'linear') -> Linen head


def _check_task(name: str, value, env: Env) -> str:
  if value not in env.tasks:
    raise ValueError(
        f'objective term {name!r}: got task {value!r}, expected one of the trained tasks ' f'{list(env.tasks)}'
    )
  return value


def _prepare_pair(name: str, options: dict, env: Env) -> dict:
  for key in ('task_a', 'task_b'):
    if key not in options:
      raise ValueError(
          f'objective term {name!r}: missing option {key!r} (expected a task name from ' f'{list(env.tasks)})'
      )
    _check_task(name, options[key], env)
  for key in ('task_a', 'task_b'):
    task = env.tasks[options[key]]
    if task.kind not in losses.CLASSIFICATION_KINDS:
      raise ValueError(
          f'objective term {name!r}: {key}={task.name!r} is a {task.kind} task, expected a classification task '
          f'({" or ".join(losses.CLASSIFICATION_KINDS)}): distribution matching and co-annotation match class '
          'distributions through a relatedness table, which a regression task does not have (train it beside them; '
          'docs/maths.md §10)'
      )
  if env.tasks[options['task_a']].kind != 'multiclass':
    raise ValueError(
        f'objective term {name!r}: task_a={options["task_a"]!r} is '
        f'{env.tasks[options["task_a"]].kind}, expected a multiclass task'
    )
  if options['task_a'] == options['task_b']:
    raise ValueError(
        f'objective term {name!r}: task_a and task_b are both {options["task_a"]!r}, expected two ' 'different tasks'
    )
  if 'relatedness' not in options:
    raise ValueError(
        f"objective term {name!r}: missing option 'relatedness' (expected 'prior:<name>', "
        "'estimate:<source>', 'learned:<init>', a nested list [C_A][C_B] or a .json/.csv file of one)"
    )
  task_a, task_b = env.tasks[options['task_a']], env.tasks[options['task_b']]
  table = env.resolve_relatedness(options['relatedness'], task_a.name, task_b.name)
  try:
    table = losses.validate_relatedness(
        table, b_kind=task_b.kind, num_classes_a=task_a.num_classes, num_classes_b=task_b.num_classes
    )
  except ValueError as e:
    raise ValueError(f'objective term {name!r} (relatedness={_short(options["relatedness"])}): {e}') from None
  spec = options['relatedness']
  if isinstance(spec, str) and spec.startswith(LEARNED_PREFIX):
    learned = LearnedTable(pair_key(task_a.name, task_b.name), task_a.name, task_b.name, task_b.kind, table, spec)
    return {**options, 'relatedness': learned}
  return {**options, 'relatedness': jnp.asarray(table)}


def _signature_defaults(fn) -> dict:
  """``{parameter: default}`` of every parameter of ``fn`` that has one: the one table of a term's option defaults."""
  return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def _direction_default() -> str:
  return _signature_defaults(losses.distribution_matching)['direction']


def _dm_feeds(options: Mapping[str, Any]) -> tuple[str, ...]:
  """DM feeds the task whose head gets a target: a_to_b → B, b_to_a → A, both → both."""
  a, b = options['task_a'], options['task_b']
  return {'a_to_b': (b,), 'b_to_a': (a,), 'both': (a, b)}[options.get('direction', _direction_default())]


def _prepare_matching(name: str, options: dict, env: Env) -> dict:
  """A pair term plus its loss options (DM's or co-annotation's), checked here so that a typo fails before anything
  runs."""
  try:
    losses.matching.check_options(**{k: v for k, v in options.items() if k in losses.matching.OPTIONS})
  except ValueError as e:
    raise ValueError(f'objective term {name!r}: {e}') from None
  return _prepare_pair(name, options, env)


def _prepare_dgr(name: str, options: dict, env: Env) -> dict:
  tasks = options.pop('tasks', 'all')
  tasks = list(env.tasks) if tasks == 'all' else [_check_task(name, t, env) for t in _as_list(tasks)]
  if not tasks:
    raise ValueError(f"objective term {name!r}: got tasks=[], expected 'all' or a non-empty list of tasks")
  head = options.pop('head', 'task')
  if head not in ('task', 'linear'):
    raise ValueError(
        f"objective term {name!r}: got head={head!r}, expected 'task' (the task head's " "architecture) or 'linear'"
    )
  options = {**_signature_defaults(dgr_term), **options}  # the defaults of dgr_term's signature, stated once
  k = options['num_dummies']
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'objective term {name!r}: got num_dummies={k!r}, expected an int >= 1')
  if options['mode'] not in ('fixed', 'resample'):
    raise ValueError(f'objective term {name!r}: got mode={options["mode"]!r}, expected \'fixed\' or \'resample\'')
  if not options['init_scale'] > 0:
    raise ValueError(f'objective term {name!r}: got init_scale={options["init_scale"]!r}, expected > 0')
  if options['norm'] not in losses.dgr.NORMS:
    raise ValueError(f'objective term {name!r}: got norm={options["norm"]!r}, expected one of {losses.dgr.NORMS}')
  return {**options, 'heads': {t: env.build_dummy_head(t, head) for t in tasks}}


@dataclasses.dataclass(frozen=True)
class Term:
  """A regularizer kind: its function, its preparation, whether it has dummy heads, and the options it passes on
  to its loss through ``**options`` (accepted besides the function's named keywords)."""

  fn: Callable[..., Array]
  prepare: Callable[[str, dict, Env], dict] = lambda name, options, env: options
  has_dummies: bool = False
  options: tuple[str, ...] = ()
  # The tasks whose heads the term pulls toward a target (what the negative-transfer monitor anneals it for).
  feeds: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda options: ()


TERMS: dict[str, Term] = {
    'distribution_matching': Term(
        distribution_matching_term, _prepare_matching, options=losses.matching.OPTIONS, feeds=_dm_feeds
    ),
    'co_annotation': Term(
        co_annotation_term,
        _prepare_matching,
        options=losses.matching.CO_ANNOTATION_OPTIONS,
        feeds=lambda options: (options['task_a'], options['task_b']),  # a label of either task targets the other
    ),
    'dgr': Term(dgr_term, _prepare_dgr, has_dummies=True),
}


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoundTerm:
  name: str
  kind: str
  weight: float
  options: Mapping[str, Any]

  @property
  def term(self) -> Term:
    return TERMS[self.kind]


@dataclasses.dataclass(frozen=True)
class Objective:
  """Per-task losses + weighted terms. Call it on model outputs to get ``{loss name: weighted scalar}``."""

  tasks: Mapping[str, TaskSpec]
  task_weights: Mapping[str, float]
  terms: tuple[BoundTerm, ...]

  def __call__(
      self,
      outputs: Mapping[str, Any],
      labels: Mapping[str, Array],
      *,
      dummies: Mapping[str, Any],
      rng: Array,
      tables: Optional[Mapping[str, Array]] = None,
      scales: Optional[Mapping[str, Array]] = None,
  ) -> dict[str, Array]:
    """``{loss name: weighted scalar}``. ``tables``: the current learned relatedness tables by pair key (None: their
    initial tables); ``scales``: a multiplier per term name (absent: 1)."""
    named = self.task_losses(outputs['logits'], labels)
    scales = scales or {}
    for i, bound in enumerate(self.terms):
      ctx = Context(
          self.tasks,
          outputs['features'],
          outputs['logits'],
          labels,
          dummies.get(bound.name),
          jax.random.fold_in(rng, i),
      )
      options = {k: _current(v, tables) for k, v in bound.options.items()}
      named[f'term/{bound.name}'] = scales.get(bound.name, 1.0) * bound.weight * bound.term.fn(ctx, **options)
    return named

  @property
  def learned_tables(self) -> dict[str, LearnedTable]:
    """``{pair key: LearnedTable}`` of the terms whose relatedness is ``learned:`` (one per pair)."""
    return {v.key: v for b in self.terms for v in b.options.values() if isinstance(v, LearnedTable)}

  def soft_counts(self, logits: Mapping[str, Array], labels: Mapping[str, Array]) -> dict[str, dict[str, Array]]:
    """``{pair key: {'joint': N [C_A, C_B], 'marginal': n [C_A]}}`` of one batch for every learned table
    (:func:`mtlmatch.losses.relatedness_soft_counts`)."""
    out = {}
    for key, t in self.learned_tables.items():
      joint, marginal = losses.relatedness_soft_counts(
          logits[t.task_a], logits[t.task_b], labels[t.task_a], labels[t.task_b], b_kind=t.b_kind
      )
      out[key] = {'joint': joint, 'marginal': marginal}
    return out

  def feeds(self, name: str) -> tuple[str, ...]:
    """The tasks term ``name`` feeds (its :class:`Term`'s ``feeds``): DM by direction, co-annotation both."""
    bound = next(b for b in self.terms if b.name == name)
    return tuple(bound.term.feeds(bound.options))

  def task_losses(self, logits: Mapping[str, Array], labels: Mapping[str, Array]) -> dict[str, Array]:
    """``{'task/<name>': weighted task loss}`` only (no terms): what ``__call__`` returns for the tasks."""
    named = {}
    for name, task in self.tasks.items():
      named[f'task/{name}'] = self.task_weights[name] * task_loss(task, logits[name], labels[name])
    return named

  @property
  def dummy_terms(self) -> tuple[BoundTerm, ...]:
    return tuple(b for b in self.terms if b.term.has_dummies)

  def draw_dummies(self, rng: Array, features: Array, *, mode: str) -> dict[str, Any]:
    """K dummy parameter sets per task for every DGR term of the given ``mode`` ('fixed' or 'resample')."""
    out = {}
    for i, bound in enumerate(self.dummy_terms):
      if bound.options['mode'] != mode:
        continue
      keys = jax.random.split(jax.random.fold_in(rng, i), len(bound.options['heads']))
      out[bound.name] = {
          task: losses.init_dummy_params(
              head,
              key,
              features,
              num_dummies=bound.options['num_dummies'],
              scale=bound.options['init_scale'],
          )
          for key, (task, head) in zip(keys, bound.options['heads'].items())
      }
    return out

  def additive_names(self, terms_as_tasks: bool) -> tuple[str, ...]:
    """Loss names added on top of the weighted combination (DGR always; DM/co-annotation unless as tasks)."""
    return tuple(f'term/{b.name}' for b in self.terms if b.term.has_dummies or not terms_as_tasks)


def build_objective(config: Mapping[str, Any], env: Env) -> Objective:
  """Validates ``config.objective`` against the tasks and resolves every term (once, outside jit)."""
  config = dict(config or {})
  unknown = set(config) - {'task_weights', 'terms'}
  if unknown:
    raise ValueError(f'config.objective: unknown keys {sorted(unknown)}, expected task_weights and terms')
  task_weights = dict(config.get('task_weights') or {})
  for task, w in task_weights.items():
    if task not in env.tasks:
      raise ValueError(f'config.objective.task_weights: got task {task!r}, expected one of {list(env.tasks)}')
    if not (isinstance(w, (int, float)) and np.isfinite(w) and w >= 0):
      raise ValueError(f'config.objective.task_weights.{task}: got {w!r}, expected a finite number >= 0')
  task_weights = {t: float(task_weights.get(t, 1.0)) for t in env.tasks}
  bound = []
  for name, term_config in dict(config.get('terms') or {}).items():
    options = dict(term_config)
    kind = options.pop('kind', None)
    if kind not in TERMS:
      raise ValueError(f'config.objective.terms.{name}.kind: got {kind!r}, expected one of {sorted(TERMS)}')
    weight = options.pop('weight', 1.0)
    if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight >= 0):
      raise ValueError(f'config.objective.terms.{name}.weight: got {weight!r}, expected a finite number >= 0')
    options = {k: _plain(v) for k, v in options.items()}
    accepted = set(inspect.signature(TERMS[kind].fn).parameters) - {'ctx', 'heads', 'options'}
    accepted |= set(TERMS[kind].options)
    accepted |= {'tasks', 'head'} if TERMS[kind].has_dummies else set()
    if set(options) - accepted:
      raise ValueError(
          f'config.objective.terms.{name}: unknown options {sorted(set(options) - accepted)} for '
          f'kind {kind!r}, expected some of {sorted(accepted)}'
      )
    bound.append(BoundTerm(name, kind, float(weight), TERMS[kind].prepare(name, options, env)))
  learned = {}
  for b in bound:
    for value in b.options.values():
      if isinstance(value, LearnedTable):
        other = learned.setdefault(value.key, (b.name, value))
        if not np.array_equal(other[1].init, value.init):
          raise ValueError(
              f'objective terms {other[0]!r} and {b.name!r}: both learn the relatedness of {value.key} but start '
              f'from different tables ({other[1].spec!r}, {value.spec!r}); expected one initial table per pair '
              '(they share one learned table)'
          )
  return Objective(dict(env.tasks), task_weights, tuple(bound))


def _current(value, tables: Optional[Mapping[str, Array]]):
  """A term option as the term function sees it: a :class:`LearnedTable` becomes its current table."""
  if not isinstance(value, LearnedTable):
    return value
  if tables is None:
    return jnp.asarray(value.init)
  if value.key not in tables:
    raise ValueError(f'tables: got keys {sorted(tables)}, expected the learned relatedness table {value.key!r}')
  return tables[value.key]


def _plain(value):
  """ConfigDict/tuple values → plain Python containers."""
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  return value


def _as_list(value) -> list:
  return [value] if isinstance(value, str) else list(value)


def _short(value) -> str:
  text = repr(value)
  return text if len(text) < 60 else text[:57] + '...'
