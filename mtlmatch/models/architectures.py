"""LibMTL's eight multi-task architectures as (encoder, heads) pairs: ``ARCHITECTURES`` and :func:`build_architecture`.

Every architecture is a :class:`~mtlmatch.models.multitask.MultiTaskModel`: one ``encoder`` module and one head per
task, split by one rule, which is what the train step's gradient methods, MGDA-UB's feature rows, DGR's dummy heads
and gradient accumulation rely on (docs/maths.md §12):

* the **encoder** holds every parameter that more than one task's output depends on, and all BatchNorm state; its
  output (the *features*) is any pytree of ``[B, ...]`` arrays;
* the **head** of task t holds what only task t uses: its gates, its task-specific experts at the last level (when
  the base encoder is stateless; a BatchNorm expert stays in the encoder, heads being stateless), its tower (the
  task head of ``config.head``). A head is a pure function of (its parameters, the features).

Notation: x the images [B, H, W, C]; f the base encoder (``config.encoder``); f^(k) its k-th copy (own parameters,
same form); f_ℓ level ℓ of f (:func:`~mtlmatch.models.encoders.levels_of`: ``cnn`` its conv stages, the last with
the flatten → Dense readout; ``resnet18``/``resnet50`` the stem, then the stages, the last with the global average
pooling), ℓ = 0..L-1; h_t task t's tower; flat(·) the flattening of every axis but the batch.

=============  ==========================================================================================  ===========
name           forward (per task t)                                                                        levels
=============  ==========================================================================================  ===========
hps            y_t = h_t(f(x))  (hard parameter sharing: the plain model, bit-identical)                   no
mmoe           y_t = h_t(Σ_e g_t,e(x) f^(e)(x)),  g_t = softmax(W_t flat(x) + b_t)  over E experts       no
cgc            as mmoe over E_s shared experts and task t's own E_t experts: g_t over E_s + E_t             no
ple            cgc stacked over the levels: each task's representation passes level ℓ of the shared       yes
               experts and of its own, mixed by its gate on flat(its representation)
dselect_k      as mmoe with DSelect-k's gate: k selectors, each a smooth-step binary code over E experts   no
cross_stitch   one column f^(t) per task; between levels, z_t ← Σ_j α_ℓ,t,j z_j (learned α, [L-1, T, T])    yes
ltb            as cross_stitch with α_ℓ,t,· a hard Gumbel-softmax sample (train) or an argmax (eval)       yes
mtan           MTAN's task attention over f's stage maps (``dense.MTANHead``), a task's own readout, h_t      yes
=============  ==========================================================================================  ===========

Usage::

    model = build_architecture('mmoe', build_encoder('cnn'), heads, num_experts=4)   # a MultiTaskModel
    variables = model.init(rng, images)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch.models import dense
from mtlmatch.models.encoders import levels_of
from mtlmatch.models.multitask import MultiTaskModel

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces.


def stack_trees(trees):
  """[tree with leaves [B, ...]] × E → one tree with leaves [E, B, ...]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def mix(experts, weights: jax.Array):
  """Σ_e weights[b, e] · experts[e, b, ...] for every leaf: experts [E, B, ...], weights [B, E] → [B, ...]."""
  return jax.tree.map(lambda e: jnp.einsum('eb...,be->b...', e, weights.astype(e.dtype)), experts)


def flat(x: jax.Array) -> jax.Array:
  """[B, ...] → [B, prod(...)] float32."""
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def gate_input(features) -> jax.Array:
  """flat(images) for the gates that read the input (LibMTL's MMoE, CGC, DSelect-k). The images are not
  trainable: the stop keeps their cotangent (a feature row's 'input' leaf, e.g. MGDA-UB's) exactly zero."""
  return flat(jax.lax.stop_gradient(features['input']))


def run_block(encoder: nn.Module, x, level: int, train: bool):
  """Block ``level`` of ``encoder`` (a bound copy with levels): level ℓ < L-1 is f_ℓ, the last is f_{L-1} then
  the readout, so blocks 0..L-1 in turn are the whole encoder and the last block gives the features [B, D]."""
  last = levels_of(encoder) - 1
  y = encoder(x, train=train, level=level)
  return encoder(y, train=train, level=last + 1) if level == last else y


def softmax_gate(x: jax.Array, num: int, name: str) -> jax.Array:
  """softmax(W x + b) [B, num] (a Dense with LeCun-normal init, as every Dense here)."""
  return jax.nn.softmax(nn.Dense(num, name=name)(x), axis=-1)


def uniform_init(bound: float) -> Callable:
  """U(−bound, bound), DSelect-k's initialisation of its gate's kernel and bias."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def smooth_step(t: jax.Array, gamma: float) -> jax.Array:
  """DSelect-k's smooth step: 0 for t ≤ −γ/2, 1 for t ≥ γ/2, else −2t³/γ³ + 3t/(2γ) + 1/2 (C¹, values in [0, 1])."""
  cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
  """[E, m] bool, row e the m = ⌈log₂ E⌉ bits of e, most significant first (DSelect-k's expert codes)."""
  m = max(math.ceil(math.log2(num_experts)), 0)
  return np.array([[(e >> (m - 1 - i)) & 1 for i in range(m)] for e in range(num_experts)], bool).reshape(-1, m)


# ---------------------------------------------------------------------------------------------------------------
# Encoders (every parameter more than one task depends on, all BatchNorm state).


class ExpertsEncoder(nn.Module):
  """E copies of the base encoder on the images: ``{'experts': [E, B, ...], 'input': images}`` (mmoe, cgc,
  dselect_k), plus ``'specific': {task: [E_t, B, ...]}``: the task-specific experts (cgc) when the base has
  BatchNorm state (which heads may not hold)."""

  base: nn.Module
  num_experts: int
  specific: tuple = ()  # ((task, E_t), ...) of task-specific experts run here

  @nn.compact
  def __call__(self, images, *, train: bool):
    run = lambda name: self.base.clone(parent=self, name=name)(images, train=train)  # noqa: E731
    out = {'experts': stack_trees([run(f'expert_{k}') for k in range(self.num_experts)]), 'input': images}
    if self.specific:
      out['specific'] = {t: stack_trees([run(f'{t}_expert_{k}') for k in range(n)]) for t, n in self.specific}
    return out


class PLEEncoder(nn.Module):
  """PLE's levels but the last one's task-specific parts. With z_t^0 = x, at level ℓ = 0..L-2 for every task t::

      z_t^{ℓ+1} = Σ_e g_t,e^ℓ(z_t^ℓ) u_e^ℓ(z_t^ℓ),   g_t^ℓ = softmax(W_t^ℓ flat(z_t^ℓ) + b_t^ℓ)

  over the E_s shared experts' level ℓ (s^(k)_ℓ, k < E_s) and task t's E_t own ones; everything here feeds level
  ℓ + 1 of every task through the shared experts, so it is all encoder. Output: ``{'rep': {t: z_t^{L-1}},
  'shared': {t: [E_s, B, ...] the shared experts' last block on z_t^{L-1}}}`` (plus ``'specific'`` for a
  BatchNorm base, as :class:`ExpertsEncoder`)."""

  base: nn.Module
  tasks: tuple
  num_shared: int
  num_specific: int
  specific_here: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    num_levels = levels_of(self.base)
    shared = [self.base.clone(parent=self, name=f'shared_{k}') for k in range(self.num_shared)]
    own = {
        t: [self.base.clone(parent=self, name=f'{t}_expert_{k}') for k in range(self.num_specific)] for t in self.tasks
    }
    reps = {t: images for t in self.tasks}
    for level in range(num_levels - 1):
      new = {}
      for t in self.tasks:
        outs = stack_trees([run_block(e, reps[t], level, train) for e in shared + own[t]])
        new[t] = mix(outs, softmax_gate(flat(reps[t]), self.num_shared + self.num_specific, f'{t}_gate_{level}'))
      reps = new
    last = num_levels - 1
    out = {'rep': reps, 'shared': {t: stack_trees([run_block(e, reps[t], last, train) for e in shared]) for t in reps}}
    if self.specific_here:
      out['specific'] = {t: stack_trees([run_block(e, reps[t], last, train) for e in own[t]]) for t in reps}
    return out


def mixing_init(key, shape, dtype=jnp.float32):
  """Cross-stitch units [L-1, T, T] at Misra et al.'s initialisation: 0.9 on the diagonal, 0.1 spread over the other
  T-1 columns (each row sums to 1; LibMTL starts from all ones, which multiplies the scale by T per level)."""
  del key
  t = shape[-1]
  unit = np.full((t, t), 0.1 / max(t - 1, 1)) + np.eye(t) * (0.9 - 0.1 / max(t - 1, 1)) if t > 1 else np.ones((1, 1))
  return jnp.broadcast_to(jnp.asarray(unit, dtype), shape)


class ColumnsEncoder(nn.Module):
  """One column (copy of the base) per task, mixed between blocks (cross_stitch; ltb with ``branching``).

  z_t^0 = f^(t)_0(x); for ℓ = 1..L-1: z_t^ℓ = f^(t)_ℓ(Σ_j A_ℓ-1,t,j z_j^ℓ-1); output ``{t: z_t^{L-1}}`` [B, D].
  Cross-stitch: A = α, learned (``cross_stitch`` [L-1, T, T], :func:`mixing_init`). LTB (Guo et al. 2020,
  as LibMTL): logits α (``branching`` [L-1, T, T], ones) and A_ℓ,t = onehot(argmax_j(α_ℓ,t,j + G_ℓ,t,j)) with
  a straight-through softmax((α + G)/τ) gradient, G Gumbel(0, 1) noise drawn from
  ``fold_in(PRNGKey(seed), n)``, n the count of train passes so far (``batch_stats['ltb_step']``, so a pure
  function of (seed, step)); A = 1/T (every branch alike) for the first ``warmup_steps`` passes (LibMTL: all
  ones); at eval A = onehot(argmax_j α_ℓ,t,j), the deterministic path."""

  base: nn.Module
  tasks: tuple
  branching: bool = False
  tau: float = 1.0
  warmup_steps: int = 0
  seed: int = 0

  @nn.compact
  def __call__(self, images, *, train: bool):
    num_levels, num_tasks = levels_of(self.base), len(self.tasks)
    columns = [self.base.clone(parent=self, name=f'column_{t}') for t in self.tasks]
    shape = (num_levels - 1, num_tasks, num_tasks)
    if self.branching:
      mixing = self.ltb_mixing(self.param('branching', nn.initializers.ones, shape, jnp.float32), train)
    else:
      mixing = self.param('cross_stitch', mixing_init, shape, jnp.float32)
    reps = [run_block(c, images, 0, train) for c in columns]
    for level in range(1, num_levels):
      stacked = jnp.stack(reps)  # [T, B, ...]
      mixed = [
          jnp.einsum('j,jb...->b...', mixing[level - 1, t].astype(stacked.dtype), stacked) for t in range(num_tasks)
      ]
      reps = [run_block(c, z, level, train) for c, z in zip(columns, mixed)]
    return dict(zip(self.tasks, reps))

  def ltb_mixing(self, logits: jax.Array, train: bool) -> jax.Array:
    step = self.variable('batch_stats', 'ltb_step', lambda: jnp.zeros((), jnp.int32))
    if not train:
      return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=logits.dtype)
    n = step.value
    noise = jax.random.gumbel(jax.random.fold_in(jax.random.PRNGKey(self.seed), n), logits.shape, logits.dtype)
    soft = jax.nn.softmax((logits + noise) / self.tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, -1), logits.shape[-1], dtype=logits.dtype)
    sample = hard + soft - jax.lax.stop_gradient(soft)
    if not self.is_initializing():
      step.value = n + 1
    return jnp.where(n < self.warmup_steps, jnp.full_like(sample, 1.0 / logits.shape[-1]), sample)


class StagesEncoder(nn.Module):
  """The base's level maps for MTAN: ``{'out': z^{L-1}, 'stages': (z^0, ..., z^{L-1})}``, z^ℓ = f_ℓ(z^{ℓ-1}),
  z^{-1} = x (the readout is not run here: each task runs its own copy on its attended map)."""

  base: nn.Module

  @nn.compact
  def __call__(self, images, *, train: bool):
    maps, x = [], images
    for level in range(levels_of(self.base)):
      x = self.base(x, train=train, level=level)  # its parameters under 'base'
      maps.append(x.astype(jnp.float32))
    return {'out': maps[-1], 'stages': tuple(maps)}


# ---------------------------------------------------------------------------------------------------------------
# Heads (what only one task uses; stateless).


class MoEHead(nn.Module):
  """MMoE / CGC head of one task: y_t = h_t(Σ_e g_e u_e), g = softmax(W flat(x) + b) over the shared experts
  ``features['experts']`` [E_s, B, ...] and then the task's ``num_specific`` own experts (copies of ``expert`` run
  here on the images, or ``features['specific'][task]`` when the encoder runs them). Parameters: ``gate``,
  ``expert_k``, ``tower``."""

  tower: nn.Module
  task: str
  num_shared: int
  num_specific: int = 0
  expert: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, features):
    experts = features['experts']
    if self.num_specific:
      if 'specific' in features:
        own = features['specific'][self.task]
      else:
        x = jax.lax.stop_gradient(features['input'])
        own = stack_trees(
            [self.expert.clone(parent=self, name=f'expert_{k}')(x, train=False) for k in range(self.num_specific)]
        )
      experts = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), experts, own)
    gate = softmax_gate(gate_input(features), self.num_shared + self.num_specific, 'gate')
    return self.tower(mix(experts, gate))


class DSelectKHead(nn.Module):
  """DSelect-k head of one task (Hazimeh et al. 2021, as LibMTL's port of the official code), m = ⌈log₂ E⌉::

      Z = reshape(W_z flat(x) + b_z, [B, k, m]);      s = smooth_step(Z; γ)
      q_b,i,e = Π_j (s_b,i,j if bit j of e else 1 − s_b,i,j)            # selector i's weight of expert e
      w = softmax(W_w flat(x) + b_w) [B, k];          g_b,e = Σ_i w_b,i q_b,i,e;    y_t = h_t(Σ_e g_e u_e)

  (W_z, b_z) ~ U(±γ/100), (W_w, b_w) ~ U(±0.05). LibMTL's entropy regulariser of q is not added."""

  tower: nn.Module
  num_experts: int
  num_nonzeros: int
  gamma: float = 1.0

  @nn.compact
  def __call__(self, features):
    x = gate_input(features)
    codes = binary_codes(self.num_experts)
    m = codes.shape[1]
    init = uniform_init(self.gamma / 100)
    z = nn.Dense(self.num_nonzeros * m, kernel_init=init, bias_init=init, name='z_logits')(x)
    s = smooth_step(z.reshape(-1, self.num_nonzeros, 1, m), self.gamma)  # [B, k, 1, m]
    q = jnp.prod(jnp.where(jnp.asarray(codes)[None, None], s, 1.0 - s), axis=-1)  # [B, k, E]
    init = uniform_init(0.05)
    w = jax.nn.softmax(nn.Dense(self.num_nonzeros, kernel_init=init, bias_init=init, name='w_logits')(x), axis=-1)
    return self.tower(mix(features['experts'], jnp.einsum('bk,bke->be', w, q)))


class PLEHead(nn.Module):
  """PLE's last level for one task: y_t = h_t(Σ_e g_e u_e), g = softmax(W flat(z_t) + b) over the shared experts'
  last block on z_t (``features['shared'][task]``) and the task's own (here, or ``features['specific'][task]``),
  z_t = ``features['rep'][task]``."""

  tower: nn.Module
  task: str
  num_shared: int
  num_specific: int
  expert: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, features):
    rep = features['rep'][self.task]
    if 'specific' in features:
      own = features['specific'][self.task]
    else:
      last = levels_of(self.expert) - 1
      clones = [self.expert.clone(parent=self, name=f'expert_{k}') for k in range(self.num_specific)]
      own = stack_trees([run_block(e, rep, last, False) for e in clones])
    experts = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), features['shared'][self.task], own)
    return self.tower(mix(experts, softmax_gate(flat(rep), self.num_shared + self.num_specific, 'gate')))


class TaskFeatureHead(nn.Module):
  """y_t = h_t(features[task]): the task's own column (cross_stitch, ltb)."""

  tower: nn.Module
  task: str

  @nn.compact
  def __call__(self, features):
    return self.tower(features[self.task])


class MTANTaskHead(nn.Module):
  """y_t = h_t(r_t(a_t)), a_t the task's last attended map of MTAN's attention modules over the encoder's stage
  maps (:class:`~mtlmatch.models.dense.MTANHead` with ``decode=False``), r_t the task's own copy of the encoder's
  readout (``cnn``: flatten → Dense → ReLU; ``resnet``: the global average, no parameters), so that each task reads
  its attended map the way hard sharing reads the shared one. Parameters: ``attention``, ``readout``, ``tower``."""

  tower: nn.Module
  attention: nn.Module
  encoder: nn.Module  # the base encoder: a copy of its readout level runs here, under 'readout'

  @nn.compact
  def __call__(self, features):
    readout = self.encoder.clone(parent=self, name='readout')
    return self.tower(readout(self.attention(features), train=False, level=levels_of(self.encoder)))


# ---------------------------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One registry entry: ``build(encoder, heads, **kwargs) -> (encoder, heads)``; ``defaults`` its kwargs."""

  summary: str
  paper: str
  defaults: Mapping[str, Any]
  needs_levels: bool
  build: Callable


def has_state(encoder: nn.Module) -> bool:
  """Whether ``encoder`` keeps BatchNorm statistics (an abstract init: nothing is computed)."""
  shapes = jax.eval_shape(
      lambda: encoder.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3), jnp.float32), train=False)
  )
  return bool(jax.tree.leaves(shapes.get('batch_stats', {})))


def _hps(encoder, heads):
  return encoder, dict(heads)


def _mmoe(encoder, heads, num_experts):
  return ExpertsEncoder(encoder, num_experts), {t: MoEHead(h, t, num_experts) for t, h in heads.items()}


def _cgc(encoder, heads, num_shared, num_specific):
  here = has_state(encoder)
  enc = ExpertsEncoder(encoder, num_shared, tuple((t, num_specific) for t in heads) if here else ())
  expert = None if here else encoder
  return enc, {t: MoEHead(h, t, num_shared, num_specific, expert) for t, h in heads.items()}


def _ple(encoder, heads, num_shared, num_specific):
  here = has_state(encoder)
  enc = PLEEncoder(encoder, tuple(heads), num_shared, num_specific, here)
  return enc, {t: PLEHead(h, t, num_shared, num_specific, None if here else encoder) for t, h in heads.items()}


def _dselect_k(encoder, heads, num_experts, num_nonzeros, gamma):
  enc = ExpertsEncoder(encoder, num_experts)
  return enc, {t: DSelectKHead(h, num_experts, num_nonzeros, float(gamma)) for t, h in heads.items()}


def _cross_stitch(encoder, heads):
  return ColumnsEncoder(encoder, tuple(heads)), {t: TaskFeatureHead(h, t) for t, h in heads.items()}


def _ltb(encoder, heads, tau, warmup_steps, seed):
  enc = ColumnsEncoder(encoder, tuple(heads), True, float(tau), warmup_steps, seed)
  return enc, {t: TaskFeatureHead(h, t) for t, h in heads.items()}


def _mtan(encoder, heads, norm):
  num_levels = levels_of(encoder)
  impl = getattr(encoder, 'conv_impl', 'auto')
  attention = dense.MTANHead(1, norm=norm, conv_impl=impl, widths=(1,) * num_levels, decode=False)
  return StagesEncoder(encoder), {t: MTANTaskHead(h, attention.clone(), encoder) for t, h in heads.items()}


ARCHITECTURES: dict[str, Architecture] = {
    'hps': Architecture('hard parameter sharing: one encoder, a head per task', 'Caruana 1993', {}, False, _hps),
    'mmoe': Architecture(
        'E shared expert encoders, a softmax gate per task on the input',
        'Ma et al. 2018',
        {'num_experts': 4},
        False,
        _mmoe,
    ),
    'cgc': Architecture(
        'shared and task-specific experts, a softmax gate per task',
        'Tang et al. 2020',
        {'num_shared': 2, 'num_specific': 1},
        False,
        _cgc,
    ),
    'ple': Architecture(
        'CGC stacked over the encoder levels', 'Tang et al. 2020', {'num_shared': 2, 'num_specific': 1}, True, _ple
    ),
    'dselect_k': Architecture(
        'shared experts, a DSelect-k gate (k smooth-step selectors) per task',
        'Hazimeh et al. 2021',
        {'num_experts': 4, 'num_nonzeros': 2, 'gamma': 1.0},
        False,
        _dselect_k,
    ),
    'cross_stitch': Architecture(
        'a column per task, mixed between levels by learned units', 'Misra et al. 2016', {}, True, _cross_stitch
    ),
    'ltb': Architecture(
        'a column per task, each level reading one branch (Gumbel-softmax)',
        'Guo et al. 2020',
        {'tau': 1.0, 'warmup_steps': 0, 'seed': 0},
        True,
        _ltb,
    ),
    'mtan': Architecture(
        "task attention modules over the encoder's stage maps", 'Liu et al. 2019', {'norm': 'group'}, True, _mtan
    ),
}


def check_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict:
  """``name``'s kwargs (its defaults updated with ``kwargs``), each checked; one ValueError for a bad one."""
  if name not in ARCHITECTURES:
    raise ValueError(f'arch name: got {name!r}, expected one of {sorted(ARCHITECTURES)}')
  defaults = ARCHITECTURES[name].defaults
  unknown = sorted(set(kwargs) - set(defaults))
  if unknown:
    raise ValueError(f'arch {name!r} kwargs: got unknown {unknown}, expected a subset of {sorted(defaults)}')
  kw = {**defaults, **kwargs}
  for key in ('num_experts', 'num_shared', 'num_nonzeros'):
    if key in kw and not (isinstance(kw[key], (int, np.integer)) and not isinstance(kw[key], bool) and kw[key] >= 1):
      raise ValueError(f'arch {name!r} kwargs.{key}: got {kw[key]!r}, expected an int >= 1')
  if 'num_specific' in kw and not (isinstance(kw['num_specific'], (int, np.integer)) and kw['num_specific'] >= 1):
    raise ValueError(f"arch {name!r} kwargs.num_specific: got {kw['num_specific']!r}, expected an int >= 1")
  for key in ('warmup_steps', 'seed'):
    if key in kw and not (isinstance(kw[key], (int, np.integer)) and not isinstance(kw[key], bool) and kw[key] >= 0):
      raise ValueError(f'arch {name!r} kwargs.{key}: got {kw[key]!r}, expected an int >= 0')
  for key in ('gamma', 'tau'):
    if key in kw and not (isinstance(kw[key], (int, float)) and not isinstance(kw[key], bool) and kw[key] > 0):
      raise ValueError(f'arch {name!r} kwargs.{key}: got {kw[key]!r}, expected a number > 0')
  if name == 'dselect_k' and kw['num_nonzeros'] > kw['num_experts']:
    raise ValueError(
        f"arch 'dselect_k' kwargs.num_nonzeros: got {kw['num_nonzeros']}, expected at most num_experts="
        f"{kw['num_experts']}"
    )
  if 'norm' in kw and kw['norm'] not in dense.HEAD_NORMS:
    raise ValueError(f"arch {name!r} kwargs.norm: got {kw['norm']!r}, expected one of {list(dense.HEAD_NORMS)}")
  return kw


def build_architecture(name: str, encoder: nn.Module, heads: Mapping[str, nn.Module], **kwargs) -> MultiTaskModel:
  """The ``MultiTaskModel`` of architecture ``name`` over the base ``encoder`` and the task towers ``heads``
  (``'hps'``: ``MultiTaskModel(encoder, heads)`` itself). Raises one ValueError for an unknown name, a bad kwarg or
  an encoder without levels where the architecture needs them (``levels`` column of the module docstring)."""
  kw = check_kwargs(name, kwargs)
  arch = ARCHITECTURES[name]
  if arch.needs_levels and levels_of(encoder) is None:
    raise ValueError(
        f'arch {name!r}: got encoder {type(encoder).__name__}, expected one that runs by levels (cnn, resnet18, '
        'resnet50): this architecture interleaves per-level copies'
    )
  enc, arch_heads = arch.build(encoder, dict(heads), **kw)
  return MultiTaskModel(enc, arch_heads)
