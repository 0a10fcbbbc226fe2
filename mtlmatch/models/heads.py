"""Task heads (Flax Linen): ``features[B, D] -> logits[B, C]``, logits always float32.

Heads are stateless on purpose: no BatchNorm, no Dropout, no mutable collections, only ``'params'``. DGR (docs/maths.md
§4) re-applies a task's head with never-trained dummy parameters, ``head.apply({'params': phi}, features)``, and
draws those dummies from the head's own initialiser, ``head.init(rng, features)['params']``; both need a head that
is a pure function of (params, features). ``dtype`` is the compute dtype (float32 by default; bfloat16 under
``config.precision='bfloat16'``); parameters are float32 and the logits are cast to float32 before any loss.

Usage::

    head = MLPHead(num_classes=7, hidden=256)
    params = head.init(rng, features)['params']
    logits = head.apply({'params': params}, features)        # [B, 7]
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mtlmatch.models import dense
from mtlmatch.models.encoders import Dtype, check_dtype, check_positive_ints, construct
from mtlmatch.tasks import kind_of


class LinearHead(nn.Module):
  """logits = f W + b, W [D, C] (LeCun-normal init), b [C] (zeros)."""

  num_classes: int
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_positive_ints('LinearHead', num_classes=self.num_classes)
    check_dtype('LinearHead', self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='out')(features.astype(jnp.float32))
    return logits.astype(jnp.float32)


class MLPHead(nn.Module):
  """logits = ReLU(f W₁ + b₁) W₂ + b₂ with one hidden layer of ``hidden`` units."""

  num_classes: int
  hidden: int = 256
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_positive_ints('MLPHead', num_classes=self.num_classes, hidden=self.hidden)
    check_dtype('MLPHead', self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='hidden')(features.astype(jnp.float32)))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='out')(x).astype(jnp.float32)


class Bounded(nn.Module):
  """A head whose outputs are squashed into a range: ``tanh(head(f))`` in (−1, 1) (``bound='tanh'``, e.g. valence
  and arousal). Stateless like every head, so DGR's dummies of a bounded task are bounded too."""

  head: nn.Module
  bound: str = 'tanh'

  def __post_init__(self):
    if self.bound not in BOUNDS:
      raise ValueError(f'Bounded.bound: got {self.bound!r}, expected one of {tuple(BOUNDS)}')
    super().__post_init__()

  def __call__(self, features):
    return BOUNDS[self.bound](self.head(features))


BOUNDS = {'tanh': jnp.tanh}

HEADS: dict[str, type[nn.Module]] = {
    'linear': LinearHead,
    'mlp': MLPHead,
    'aspp': dense.ASPPHead,
    'segnet_decoder': dense.SegNetDecoder,
    'mtan': dense.MTANHead,
}


def build_head(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The task head ``HEADS[name](num_classes=num_classes, **kwargs)``, e.g. ``build_head('mlp', 7, hidden=128)``.

  Raises one ValueError for an unknown name, an unknown keyword or a bad value.
  """
  if 'num_classes' in kwargs:
    raise ValueError(f'head {name!r} kwargs: got num_classes twice, expected it only as the positional argument')
  return construct(HEADS, 'head', name, {'num_classes': num_classes, **kwargs})


def build_task_head(task, name: str, **kwargs) -> nn.Module:
  """The head of ``task`` (a ``TaskSpec``): ``build_head(name, <its kind's head width>, **kwargs)``, wrapped in
  :class:`Bounded` when the task's ``bound`` option is set (regression)."""
  head = build_head(name, kind_of(task).head_outputs(task.num_classes), **kwargs)
  bound = dict(task.options).get('bound')
  return head if bound is None else Bounded(head, bound)
