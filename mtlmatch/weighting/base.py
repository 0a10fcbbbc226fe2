"""The common shape of every loss-weighting / gradient method: hyper-parameters, state and the `apply` contract.

A method is a frozen dataclass instance (hashable, so it can be closed over by `jax.jit`) with

* ``init(num_tasks, num_params=None, **hparams) -> state``: a dict of arrays (orbax-checkpointable). It always holds
  ``'step'`` (int32 scalar, the number of `apply` calls so far) and, when the method has hyper-parameters,
  ``'hparams'``: every hyper-parameter as an array (floats float32, ints int32, a choice among strings as the int32
  index of the choice in the spec, a 'floats' vector as a float32 vector). Keeping them in the state makes `apply` a
  pure function of its arguments, lets one compiled step serve a sweep, and makes a restored checkpoint resume with the
  values it was trained with. Methods that track gradients across steps (``needs_num_params``: MoCo, DB-MTL,
  ExcessMTL) keep [T, P] arrays and need ``num_params``; methods that read the shared parameters' structure
  (``uses_param_layout``: GradVac's parameter groups) take ``param_layout`` (`jacobian.param_layout`).
* ``apply(state, grads, losses, key=None) -> (update, weights, new_state)`` with ``grads`` ``[T, P]`` (per-task
  gradients of the shared parameters, flattened), ``losses`` ``[T]``, ``update`` ``[P]``: the direction to DESCEND,
  scaled like the plain sum of task gradients Σ_t G_t (what EW returns), and ``weights`` ``[T]``: the effective task
  weights (``update = weights @ grads`` for every method with ``linear = True``; the few others — coordinate-wise
  rules and directions built from tracked gradients — say in their docstring what their weights report).

Hyper-parameters come from three places, later ones winning: the spec's defaults, the values bound by
``get_method(name, **hparams)`` (see ``__init__``), and the keywords of ``init``. Unknown names or bad values raise
one ``ValueError`` naming the hyper-parameter, the value and what was expected. `apply` reads them from the state
only (so ``METHODS[name].apply`` serves a state made by any bound copy of the method).

Missing labels: a task with no labelled example in the batch arrives as a zero gradient row and a zero loss. Methods
that look at gradients call such a task *absent* (``‖G_t‖² ≤ 1e-30``), methods that only look at losses call it
absent when ``L_t == 0``; each method's docstring says what it then does. No method divides by an unguarded norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

# ‖g‖² at or below this is an absent task (a zero row from missing labels); far below any float32 gradient that
# carries signal, well above 0 so that denormal noise does not count as a task.
ABSENT_SQ_NORM = 1e-30
# Smallest denominator used by the safe divisions below.
_EPS = 1e-30

# The values of the two declarations every method class makes (`WeightingMethod.kind`, `WeightingMethod.needs`).
KINDS = ('loss_weighting', 'gradient')
NEEDS = ('losses', 'shared_rows', 'feature_rows', 'meta')

State = dict
HIGHEST = jax.lax.Precision.HIGHEST


class MetaInputs(NamedTuple):
  """What the train step hands a 'meta' method's ``meta_step(state, inputs)`` (``mtlmatch/step.py``'s meta path), for
  the T combined losses of one training batch at the parameters θ (``params``, every parameter: encoder and heads):

  * ``weighted_grad(λ)`` = Σ_t λ_t ∇L_t(θ) (a params tree), linear in λ [T]: the transpose of the training VJP, so
    ``jax.linear_transpose`` of it gives J v = [⟨∇L_t(θ), v⟩]_t without a second forward pass;
  * ``task_losses`` [T]: L(θ) on the training batch (constants);
  * ``train_losses(params) -> [T]``: the same losses at other parameters (a fresh forward pass on the training batch,
    e.g. after inner gradient steps);
  * ``val_losses(params) -> [T]``: each combined loss on ``batch['validation']`` (0 for the losses that are not task
    losses: terms trained as tasks are auxiliary), or None when the method reads no validation batch
    (``meta_uses_validation`` False);
  * ``schedule_lr``: the optimizer's learning rate at this step.
  """

  weighted_grad: Callable[[jax.Array], Any]
  params: Any
  task_losses: jax.Array
  train_losses: Callable[[Any], jax.Array]
  val_losses: Optional[Callable[[Any], jax.Array]]
  schedule_lr: jax.Array


def _is_scalar_array(value: Any) -> bool:
  return hasattr(value, 'dtype') and getattr(value, 'ndim', 1) == 0


def to_int(value: Any) -> Optional[int]:
  """`value` as a Python int when it is an integer: an int, a numpy integer or a 0-d integer array; else None.

  A bool (Python or numpy) is not an integer here.
  """
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return int(value)
  if _is_scalar_array(value) and jnp.issubdtype(value.dtype, jnp.integer):
    return int(value)
  return None


@dataclasses.dataclass(frozen=True)
class HParam:
  """Spec of one hyper-parameter: default, kind ('float' | 'int' | a tuple of string choices), a check and its text."""

  default: Any
  kind: Any
  check: Optional[Callable[[Any], bool]] = None
  expected: str = ''
  doc: str = ''

  def validate(self, method: str, name: str, value: Any) -> Any:
    where = f'{method} hparam {name!r}'
    if self.kind == 'floats':  # a vector of finite floats (e.g. fixed task weights); its length is checked at init
      try:
        value = tuple(float(v) for v in value)
        ok = all(math.isfinite(v) for v in value)
      except (TypeError, ValueError):
        ok = False
      if not ok or (self.check is not None and not self.check(value)):
        raise ValueError(
            f'{where}: got {value!r}, expected a sequence of finite floats'
            f'{" " + self.expected if self.expected else ""}'
        )
      return value
    if isinstance(self.kind, tuple):
      if value not in self.kind:
        raise ValueError(f'{where}: got {value!r}, expected one of {self.kind}')
      return value
    if self.kind == 'int':
      as_int = to_int(value)
      ok = as_int is not None
      value = as_int if ok else value
    else:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
      if not ok and _is_scalar_array(value) and not jnp.issubdtype(value.dtype, jnp.bool_):
        value = float(value)
        ok = math.isfinite(value)
      value = float(value) if ok else value
    if not ok or (self.check is not None and not self.check(value)):
      raise ValueError(
          f'{where}: got {value!r}, expected {"an int" if self.kind == "int" else "a finite float"}'
          f'{" " + self.expected if self.expected else ""}'
      )
    return value

  def to_array(self, value: Any) -> jax.Array:
    if self.kind == 'floats':
      return jnp.asarray(value, jnp.float32).reshape(-1)
    if isinstance(self.kind, tuple):
      return jnp.asarray(self.kind.index(value), jnp.int32)
    return jnp.asarray(value, jnp.int32 if self.kind == 'int' else jnp.float32)


def positive(expected='> 0'):
  return dict(check=lambda v: v > 0, expected=expected)


def non_negative(expected='>= 0'):
  return dict(check=lambda v: v >= 0, expected=expected)


@dataclasses.dataclass(frozen=True)
class WeightingMethod:
  """Base class. Subclasses set `name`, `kind`, `needs`, `HPARAMS` and implement `_init` and `_apply`.

  ``bound`` holds the hyper-parameters bound by `get_method` as sorted ``(name, value)`` pairs (hashable).
  """

  bound: tuple = ()

  name: ClassVar[str] = ''
  # How the train step weights the heads (one of `KINDS`): 'loss_weighting' gives every head Σ_t w_t ∇L_t (the
  # method weights the losses); 'gradient' gives every head its own task's gradient (the method combines rows).
  kind: ClassVar[str] = ''
  # The gradient information `apply` reads (one of `NEEDS`): 'losses' (weights from the losses and the state only;
  # ``grads`` may be a [T, 1] stand-in, so the train step differentiates Σ_t w_t L_t once), 'shared_rows' (G [T, P],
  # per-task gradient rows w.r.t. the shared parameters), 'feature_rows' (per-task rows w.r.t. the shared features,
  # MGDA-UB's cheap bound) or 'meta' (weights set by a meta step on validation batches, Auto-Lambda: the train step
  # reads ``batch['validation']``, computes a meta-gradient and calls the method's ``meta_update`` before `apply`,
  # which only reads the weights). Every registered class declares both itself (`check_declarations`).
  needs: ClassVar[str] = ''
  # False when the update is not ``weights @ grads`` (coordinate-wise rules, directions built from tracked state):
  # the method then implements `_apply_update`. The train loop only ever uses the returned update for such methods.
  linear: ClassVar[bool] = True
  # True when the state holds per-parameter arrays [T, P] (tracked gradients): `init` then needs ``num_params`` = P.
  needs_num_params: ClassVar[bool] = False
  # True when `init` accepts ``param_layout`` (the shared parameters' leaves in the order of a gradient row,
  # `jacobian.param_layout`): the method groups the columns of G by parameter (GradVac's group types).
  uses_param_layout: ClassVar[bool] = False
  # State entries without a leading task axis (e.g. GradVac's group offsets [K]); every other array entry of the
  # state has leading dimension T, which `apply` checks.
  TASK_FREE_STATE: ClassVar[tuple[str, ...]] = ()
  # 'floats' hyper-parameters with one value per task: {name: (value when empty, what empty means)}. `init` checks
  # that each holds 0 or T values and stores an empty one as T copies of the value (zero-size arrays cannot be
  # checkpointed), so `apply` always reads a [T] vector.
  PER_TASK_FLOATS: ClassVar[Mapping[str, tuple[float, str]]] = {}
  # 'meta' methods only: True when the meta step reads ``batch['validation']`` (Auto-Lambda, MOML), False when it
  # runs on the training batch alone (FORUM), so the loop needs no validation split for it.
  meta_uses_validation: ClassVar[bool] = True
  HPARAMS: ClassVar[Mapping[str, HParam]] = {}

  # ---- hyper-parameters -------------------------------------------------------------------------------------------
  def resolve_hparams(self, **overrides) -> dict:
    """Defaults, then bound values, then `overrides`; each validated. Unknown names raise a ValueError."""
    unknown = sorted(set(overrides) - set(self.HPARAMS))
    if unknown:
      raise ValueError(f'{self.name} hparams: got unknown {unknown}, expected a subset of {sorted(self.HPARAMS)}')
    values = {k: spec.default for k, spec in self.HPARAMS.items()}
    values.update(dict(self.bound))
    values.update(overrides)
    return {k: self.HPARAMS[k].validate(self.name, k, v) for k, v in values.items()}

  def bind(self, **hparams) -> 'WeightingMethod':
    """A copy with `hparams` bound (validated); `init` then uses them unless overridden."""
    self.resolve_hparams(**hparams)
    merged = dict(self.bound)
    merged.update(hparams)
    return dataclasses.replace(self, bound=tuple(sorted(merged.items())))

  def choice(self, name: str, value: str) -> int:
    """The int32 code under which the choice `value` of hyper-parameter `name` is stored in the state."""
    return self.HPARAMS[name].kind.index(value)

  # ---- contract -----------------------------------------------------------------------------------------------------
  def init(self, num_tasks: int, num_params: Optional[int] = None, *, param_layout=None, **hparams) -> State:
    """Initial state for `num_tasks` tasks: a dict of arrays (see the module docstring).

    ``num_params`` (P, the length of a gradient row) is required by the methods with ``needs_num_params`` (their
    state tracks gradients) and ignored by the others. ``param_layout`` (`jacobian.param_layout` of the shared
    parameters) is read by the methods with ``uses_param_layout`` and refused by the others.
    """
    if to_int(num_tasks) is None or to_int(num_tasks) < 1:
      raise ValueError(f'{self.name}.init num_tasks: got {num_tasks!r}, expected an int >= 1')
    num_tasks = to_int(num_tasks)
    if self.needs_num_params:
      if to_int(num_params) is None or to_int(num_params) < 1:
        raise ValueError(
            f'{self.name}.init num_params: got {num_params!r}, expected an int >= 1 (the length P of a '
            f'gradient row: the method tracks gradients in its state)'
        )
      num_params = to_int(num_params)
    if param_layout is not None and not self.uses_param_layout:
      raise ValueError(
          f'{self.name}.init param_layout: got a layout, expected None (the method does not group parameters)'
      )
    hp = self.resolve_hparams(**hparams)
    for k, (_, meaning) in self.PER_TASK_FLOATS.items():
      if len(hp[k]) not in (0, num_tasks):
        raise ValueError(
            f'{self.name} hparam {k!r}: got {len(hp[k])} values {hp[k]}, expected num_tasks={num_tasks} (or none, '
            f'for {meaning})'
        )
    state = {'step': jnp.zeros((), jnp.int32)}
    if hp:
      state['hparams'] = {k: self.HPARAMS[k].to_array(v) for k, v in hp.items()}
      for k, (fill, _) in self.PER_TASK_FLOATS.items():
        if not hp[k]:
          state['hparams'][k] = jnp.full((num_tasks,), fill, jnp.float32)
    if self.uses_param_layout:
      state.update(self._init_layout(num_tasks, hp, param_layout))
    elif self.needs_num_params:
      state.update(self._init_tracked(num_tasks, num_params, hp))
    else:
      state.update(self._init(num_tasks, hp))
    return state

  def apply(
      self, state: State, grads: jax.Array, losses: jax.Array, key: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array, State]:
    """Combine the task gradients: returns (update [P] to descend, weights [T], new state). Jittable."""
    grads = jnp.asarray(grads)
    losses = jnp.asarray(losses)
    if grads.ndim != 2:
      raise ValueError(f'{self.name}.apply grads: got shape {grads.shape}, expected [T, P]')
    num_tasks = grads.shape[0]
    if losses.shape != (num_tasks,):
      raise ValueError(f'{self.name}.apply losses: got shape {losses.shape}, expected [T] = ({num_tasks},)')
    if not isinstance(state, Mapping) or 'step' not in state:
      raise ValueError(
          f'{self.name}.apply state: got {type(state).__name__} without "step", expected the dict ' f'returned by init'
      )
    for k, v in state.items():
      if k in self.TASK_FREE_STATE:
        continue
      if k not in ('step', 'hparams') and getattr(v, 'ndim', 0) >= 1 and v.shape[0] != num_tasks:
        raise ValueError(
            f'{self.name}.apply state[{k!r}]: got shape {v.shape}, expected leading dim T='
            f'{num_tasks} (state was initialised for another number of tasks)'
        )
      if (
          k not in ('step', 'hparams')
          and getattr(v, 'ndim', 0) == 2
          and self.needs_num_params
          and v.shape[1] != grads.shape[1]
      ):
        raise ValueError(
            f'{self.name}.apply state[{k!r}]: got shape {v.shape}, expected [T, P] = '
            f'{grads.shape} (state was initialised for another num_params)'
        )
    hp = state.get('hparams', {})
    missing = sorted(set(self.HPARAMS) - set(hp))
    if missing:
      raise ValueError(f'{self.name}.apply state["hparams"]: got no {missing}, expected the state returned by init')
    g32 = grads.astype(jnp.float32)
    l32 = jax.lax.stop_gradient(losses.astype(jnp.float32))
    if self.linear:
      weights, new = self._apply(state, hp, g32, l32, key)
      weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
      update = combine(weights, g32).astype(grads.dtype)
    else:
      update, weights, new = self._apply_update(state, hp, g32, l32, key)
      weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
      update = jax.lax.stop_gradient(update).astype(grads.dtype)
    new = dict(new)
    new['step'] = state['step'] + 1
    if 'hparams' in state:
      new['hparams'] = state['hparams']
    return update, weights, new

  # ---- to implement -------------------------------------------------------------------------------------------------
  def _init(self, num_tasks: int, hp: dict) -> dict:
    return {}

  def _init_tracked(self, num_tasks: int, num_params: int, hp: dict) -> dict:
    """`_init` of the methods with ``needs_num_params``."""
    raise NotImplementedError

  def _init_layout(self, num_tasks: int, hp: dict, param_layout) -> dict:
    """`_init` of the methods with ``uses_param_layout`` (``param_layout`` may be None: no layout given)."""
    raise NotImplementedError

  def _apply(
      self, state: State, hp: Mapping[str, jax.Array], grads: jax.Array, losses: jax.Array, key: Optional[jax.Array]
  ) -> tuple[jax.Array, dict]:
    """Returns (weights [T], method-specific part of the new state). The update is weights @ grads."""
    raise NotImplementedError

  def _apply_update(
      self, state: State, hp: Mapping[str, jax.Array], grads: jax.Array, losses: jax.Array, key: Optional[jax.Array]
  ) -> tuple[jax.Array, jax.Array, dict]:
    """Methods with ``linear = False``: returns (update [P], weights [T], method-specific part of the new state)."""
    raise NotImplementedError

  def _require_key(self, key):
    if key is None:
      raise ValueError(f'{self.name}.apply key: got None, expected a PRNG key (the method is random)')
    return key


def check_declarations(cls: type) -> type:
  """`cls` if it declares a valid ``name``, ``kind`` and ``needs`` itself (not inherited), else a ValueError.

  A gradient method combines gradient rows, so it needs 'shared_rows' or 'feature_rows'; a method whose state tracks
  gradients (``needs_num_params``) needs 'shared_rows'.
  """
  where = f'weighting method class {cls.__name__}'
  if not (isinstance(cls, type) and issubclass(cls, WeightingMethod)):
    raise ValueError(f'{where}: got {cls!r}, expected a WeightingMethod subclass')
  for attr, allowed in (('kind', KINDS), ('needs', NEEDS)):
    if attr not in vars(cls):
      raise ValueError(f'{where}: got no {attr!r} of its own, expected one of {allowed} declared on the class')
    if vars(cls)[attr] not in allowed:
      raise ValueError(f'{where}.{attr}: got {vars(cls)[attr]!r}, expected one of {allowed}')
  if 'name' not in vars(cls) or not isinstance(cls.name, str) or not cls.name:
    raise ValueError(f'{where}.name: got {vars(cls).get("name")!r}, expected a non-empty str declared on the class')
  if cls.kind == 'gradient' and cls.needs not in ('shared_rows', 'feature_rows'):
    raise ValueError(f"{where}.needs: got {cls.needs!r}, expected 'shared_rows' or 'feature_rows' (kind 'gradient')")
  if cls.needs_num_params and cls.needs != 'shared_rows':
    raise ValueError(f"{where}.needs: got {cls.needs!r}, expected 'shared_rows' (its state tracks gradients)")
  return cls


def registry(classes) -> dict:
  """{name: instance} of the method `classes` in order, each checked by `check_declarations`; a name repeats: error."""
  methods = {}
  for cls in classes:
    check_declarations(cls)
    if cls.name in methods:
      raise ValueError(
          f'weighting method class {cls.__name__}.name: got {cls.name!r}, expected a name no other method has '
          f'({type(methods[cls.name]).__name__} has it)'
      )
    methods[cls.name] = cls()
  return methods


# ---- shared maths -------------------------------------------------------------------------------------------------
def combine(weights: jax.Array, grads: jax.Array) -> jax.Array:
  """Σ_t w_t G_t in full float32 precision (TPU/GPU default matmul precision would round to bf16/tf32)."""
  return jnp.matmul(weights, grads, precision=HIGHEST)


def gram(grads: jax.Array) -> jax.Array:
  """G Gᵀ [T, T] in full precision."""
  return jnp.matmul(grads, grads.T, precision=HIGHEST)


def present_from_sq_norms(sq_norms: jax.Array) -> jax.Array:
  """Bool [T]: the task has a non-zero gradient row (labelled examples in the batch)."""
  return sq_norms > ABSENT_SQ_NORM


def present_from_losses(losses: jax.Array) -> jax.Array:
  """Bool [T]: the task has a non-zero, finite loss (a task with no labelled example has loss exactly 0)."""
  return (losses != 0) & jnp.isfinite(losses)


def safe_div(num: jax.Array, den: jax.Array, fallback: float = 0.0) -> jax.Array:
  """num / den where |den| > tiny, else `fallback`; the unused branch never produces NaN gradients."""
  ok = jnp.abs(den) > _EPS
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)
