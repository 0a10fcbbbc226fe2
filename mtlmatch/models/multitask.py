"""A multi-task model: one shared encoder and one head per task, composed as plain functions (not one Linen module).

Keeping the encoder and heads as separate Linen modules, glued by a small frozen dataclass, makes shared and
per-task parameters separate subtrees, which is what the loss-weighting / gradient methods (shared parameters θ vs
each task's head φ_t) and DGR (re-applying a head with dummy parameters) need.

Variables layout (always the same two top-level keys)::

    {'params':      {'encoder': <encoder params>, 'heads': {task: <head params>, ...}},
     'batch_stats': {'encoder': <BatchNorm statistics>}}     # when the encoder has BatchNorm (resnet18)
     'batch_stats': {}                                       # otherwise (mlp, cnn, vit_tiny): no leaves

Heads never have state, so ``batch_stats`` only ever holds the encoder's statistics.

Usage::

    model = build_model({'expr': TaskSpec('expr', 'multiclass', 7)}, encoder='resnet18', encoder_kwargs={'width': 8})
    variables = model.init(rng, images)
    outputs, batch_stats = model.apply(variables, images, train=True)     # outputs['logits']['expr']: [B, 7]
    # per-task losses from shared features:
    feats, batch_stats = model.encode({'params': params, 'batch_stats': batch_stats}, images, train=True)
    logits = model.apply_head('expr', params['heads']['expr'], feats)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax

from mtlmatch.models.encoders import build_encoder
from mtlmatch.models.heads import build_task_head
from mtlmatch.tasks import TaskSpec

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MultiTaskModel:
  """Shared ``encoder`` (images[B,H,W,C] → features: one [B, D] array, or any pytree of [B, ...] arrays) and
  ``heads[task]`` (features → outputs[B, C_task]; a head reads what it needs of the features)."""

  encoder: nn.Module
  heads: Mapping[str, nn.Module]

  def __post_init__(self):
    if not isinstance(self.encoder, nn.Module):
      raise ValueError(f'MultiTaskModel.encoder: got {type(self.encoder).__name__}, expected a flax.linen.Module')
    if (
        not isinstance(self.heads, Mapping)
        or not self.heads
        or not all(isinstance(k, str) and isinstance(v, nn.Module) for k, v in self.heads.items())
    ):
      raise ValueError(
          f'MultiTaskModel.heads: got {self.heads!r}, expected a non-empty dict of task name -> ' 'flax.linen.Module'
      )
    object.__setattr__(self, 'heads', dict(self.heads))

  def __hash__(self):
    # Hashable (Linen modules are), so the model can be a static argument of jax.jit.
    return hash((self.encoder, tuple(sorted(self.heads.items()))))

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.heads)

  def init(self, rng: jax.Array, images: jax.Array) -> Variables:
    """Initial variables (layout in the module docstring). Keys: encoder from split 0, task t's head from split
    1 + (index of t in sorted task names), so a head's init does not depend on the order of the dict."""
    keys = jax.random.split(rng, len(self.heads) + 1)
    features, enc_vars = self.encoder.init_with_output(keys[0], images, train=False)
    heads = {}
    for i, task in enumerate(sorted(self.heads)):
      heads[task] = self.heads[task].init(keys[i + 1], features)['params']
    batch_stats = {'encoder': enc_vars['batch_stats']} if 'batch_stats' in enc_vars else {}
    return {
        'params': {'encoder': enc_vars['params'], 'heads': {t: heads[t] for t in self.heads}},
        'batch_stats': batch_stats,
    }

  def encode(self, variables: Variables, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
    """Shared features [B, D] float32 and the new ``batch_stats`` (updated from this batch when ``train`` and the
    encoder has BatchNorm; otherwise the given ones, unchanged). ``variables['params']['heads']`` is not read."""
    self._check_variables(variables)
    batch_stats = variables['batch_stats']
    enc_vars = {'params': variables['params']['encoder']}
    if batch_stats:
      enc_vars['batch_stats'] = batch_stats['encoder']
    if batch_stats and train:
      features, updates = self.encoder.apply(enc_vars, images, train=True, mutable=['batch_stats'])
      return features, {'encoder': updates['batch_stats']}
    return self.encoder.apply(enc_vars, images, train=train), batch_stats

  def apply_head(self, task: str, head_params, features: jax.Array) -> jax.Array:
    """Logits [B, C_task] of task ``task``'s head with parameters ``head_params`` (its ``params['heads'][task]``
    subtree, or any parameters of the same structure, e.g. DGR's dummies)."""
    if task not in self.heads:
      raise ValueError(f'task: got {task!r}, expected one of {sorted(self.heads)}')
    return self.heads[task].apply({'params': head_params}, features)

  def apply(self, variables: Variables, images: jax.Array, *, train: bool) -> tuple[dict, dict]:
    """``({'features': [B, D], 'logits': {task: [B, C_task]}}, new_batch_stats)``; see ``encode``."""
    features, batch_stats = self.encode(variables, images, train=train)
    logits = {t: self.apply_head(t, variables['params']['heads'][t], features) for t in self.heads}
    return {'features': features, 'logits': logits}, batch_stats

  def _check_variables(self, variables) -> None:
    if (
        not isinstance(variables, Mapping)
        or set(variables) != {'params', 'batch_stats'}
        or not isinstance(variables['params'], Mapping)
        or set(variables['params']) != {'encoder', 'heads'}
    ):
      got = (
          {k: (sorted(v) if isinstance(v, Mapping) else type(v).__name__) for k, v in variables.items()}
          if isinstance(variables, Mapping)
          else type(variables).__name__
      )
      raise ValueError(
          f"variables: got {got}, expected {{'params': {{'encoder', 'heads'}}, 'batch_stats': ...}} "
          '(from MultiTaskModel.init)'
      )


def build_model(
    tasks: Mapping[str, TaskSpec],
    *,
    encoder: str = 'cnn',
    encoder_kwargs: Optional[Mapping] = None,
    head: str = 'linear',
    head_kwargs: Optional[Mapping] = None,
    arch: str = 'hps',
    arch_kwargs: Optional[Mapping] = None,
) -> MultiTaskModel:
  """A ``MultiTaskModel`` with encoder ``ENCODERS[encoder](**encoder_kwargs)`` and, for each task, the head
  ``HEADS[head](outputs, **head_kwargs)`` with its kind's number of outputs (``TaskKind.head_outputs``: C for the
  classification kinds; :func:`~mtlmatch.models.heads.build_task_head`, bounded where the task says so); heads keep
  the order of ``tasks``. ``arch`` (:data:`~mtlmatch.models.architectures.ARCHITECTURES`, ``arch_kwargs``) composes
  them into another architecture; the default ``'hps'`` is that encoder and those heads as they are."""
  if (
      not isinstance(tasks, Mapping)
      or not tasks
      or not all(isinstance(spec, TaskSpec) and spec.name == name for name, spec in tasks.items())
  ):
    raise ValueError(f'tasks: got {tasks!r}, expected a non-empty dict of name -> TaskSpec with that name')
  enc = build_encoder(encoder, **dict(encoder_kwargs or {}))
  heads = {name: build_task_head(spec, head, **dict(head_kwargs or {})) for name, spec in tasks.items()}
  if arch == 'hps' and not arch_kwargs:
    return MultiTaskModel(enc, heads)
  from mtlmatch.models import architectures  # pylint: disable=g-import-not-at-top  (it imports this module)

  return architectures.build_architecture(arch, enc, heads, **dict(arch_kwargs or {}))
