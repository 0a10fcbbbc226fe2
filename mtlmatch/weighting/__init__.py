"""Loss weighting and gradient methods for multi-task learning, as pure functions on arrays (docs/maths.md §6).

Every method is an object with ``init(num_tasks, **hparams) -> state`` and
``apply(state, grads, losses, key) -> (update, weights, new_state)``:

* ``grads`` [T, P]: per-task gradients of the shared parameters, flattened (`task_jacobian`, `flatten_grads`);
* ``losses`` [T]: per-task losses (0 for a task with no labelled example in the batch; its gradient row is 0 too);
* ``update`` [P]: the combined direction to DESCEND, scaled like the plain sum Σ_t G_t (EW's update);
* ``weights`` [T]: effective task weights, update = weights @ grads for every method here;
* ``state``: a dict of arrays (step counter, hyper-parameters as 0-d arrays, method variables) — a jit-friendly,
  orbax-checkpointable pytree; `apply` is jittable.

Usage::

    from mtlmatch import weighting
    method = weighting.get_method('cagrad', c=0.4)          # or weighting.METHODS['cagrad'] with defaults
    state = method.init(num_tasks=3)                        # hparams may also be given here
    losses, G = weighting.task_jacobian(loss_fn, shared_params, batch)
    update, weights, state = jax.jit(method.apply)(state, G, losses, key)
    shared_grad = weighting.unflatten_grads(update, shared_params)

Names: loss weighting 'ew', 'uw', 'dwa', 'rlw', 'gradnorm', 'famo'; gradient methods 'mgda', 'mgda_ub', 'pcgrad',
'cagrad', 'nash_mtl', 'imtl', 'aligned_mtl' ('mgda_ub' combines gradients w.r.t. the shared features: its
``grads_wrt`` is 'features'). `is_gradient_method(name)` says whether the train loop must compute G (True for
the gradient methods and GradNorm, which needs per-task gradient norms); for the others the weights depend on the
losses only and the loop may differentiate Σ_t w_t L_t instead (see `jacobian`).
"""
from __future__ import annotations

from typing import Mapping

from mtlmatch.weighting.base import ABSENT_SQ_NORM, HParam, WeightingMethod
from mtlmatch.weighting.gradient_methods import (CAGrad, IMTL, MGDA, MGDAUB, AlignedMTL, NashMTL, PCGrad,
                                                 aligned_weights,
                                                 cagrad_weights, imtl_weights, min_norm_weights, nash_weights,
                                                 pcgrad_weights)
from mtlmatch.weighting.jacobian import (cosine_similarity_matrix, flatten_grads, flatten_task_grads, task_jacobian,
                                         unflatten_grads)
from mtlmatch.weighting.loss_weighting import DWA, EW, FAMO, RLW, UW, GradNorm

LOSS_WEIGHTING = ('ew', 'uw', 'dwa', 'rlw', 'gradnorm', 'famo')
GRADIENT_METHODS = ('mgda', 'mgda_ub', 'pcgrad', 'cagrad', 'nash_mtl', 'imtl', 'aligned_mtl')

METHODS: Mapping[str, WeightingMethod] = {
    cls.name: cls() for cls in (EW, UW, DWA, RLW, GradNorm, FAMO, MGDA, MGDAUB, PCGrad, CAGrad, NashMTL, IMTL,
                                AlignedMTL)
}


def _check_name(name: str) -> str:
  if name not in METHODS:
    raise ValueError(f'weighting method name: got {name!r}, expected one of {sorted(METHODS)}')
  return name


def get_method(name: str, **hparams) -> WeightingMethod:
  """METHODS[name] with `hparams` bound (validated: unknown names or bad values raise a ValueError)."""
  return METHODS[_check_name(name)].bind(**hparams)


def is_gradient_method(name: str) -> bool:
  """True when the method needs the per-task gradient matrix G (gradient methods and GradNorm); False when its
  weights depend on the losses only (EW, UW, DWA, RLW, FAMO), so the train loop can skip the Jacobian."""
  return METHODS[_check_name(name)].needs_grads


def hparam_specs(name: str) -> Mapping[str, HParam]:
  """The hyper-parameters a method accepts, with defaults and the expected values."""
  return METHODS[_check_name(name)].HPARAMS


__all__ = [
    'ABSENT_SQ_NORM', 'AlignedMTL', 'CAGrad', 'DWA', 'EW', 'FAMO', 'GRADIENT_METHODS', 'GradNorm', 'HParam', 'IMTL',
    'LOSS_WEIGHTING', 'MGDA', 'MGDAUB', 'METHODS', 'NashMTL', 'PCGrad', 'RLW', 'UW', 'WeightingMethod',
    'aligned_weights',
    'cagrad_weights', 'cosine_similarity_matrix', 'flatten_grads', 'flatten_task_grads', 'get_method',
    'hparam_specs', 'imtl_weights', 'is_gradient_method', 'min_norm_weights', 'nash_weights', 'pcgrad_weights',
    'task_jacobian', 'unflatten_grads',
]
