"""Loss weighting and gradient methods for multi-task learning, as pure functions on arrays (docs/maths.md §6).

Every method is an object with ``init(num_tasks, **hparams) -> state`` and
``apply(state, grads, losses, key) -> (update, weights, new_state)``:

* ``grads`` [T, P]: per-task gradients of the shared parameters, flattened (`task_jacobian`, `flatten_grads`);
* ``losses`` [T]: per-task losses (0 for a task with no labelled example in the batch; its gradient row is 0 too);
* ``update`` [P]: the combined direction to DESCEND, scaled like the plain sum Σ_t G_t (EW's update);
* ``weights`` [T]: effective task weights, update = weights @ grads for every method with ``linear`` True (GradDrop,
  trimmed mean, MoCo and DB-MTL are not: their docstrings say what their weights report);
* ``state``: a dict of arrays (step counter, hyper-parameters as 0-d arrays, method variables) — a jit-friendly,
  orbax-checkpointable pytree; `apply` is jittable.

Usage, on two conflicting task gradients (G_0 · G_1 = −1): EW's plain sum makes no progress on task 0, PCGrad
removes each gradient's component along the other before summing, MGDA takes the min-norm point of the convex hull
(0.6 G_0 + 0.4 G_1, times T = 2 to be scaled like the sum), which improves both tasks equally:

>>> import jax, jax.numpy as jnp
>>> from mtlmatch import weighting
>>> G = jnp.array([[1.0, 0.0], [-1.0, 1.0]])                  # [T, P]: per-task gradients of the shared parameters
>>> losses = jnp.array([0.5, 0.7])
>>> for name in ('ew', 'pcgrad', 'mgda'):
...   method = weighting.get_method(name)                       # hparams by keyword: get_method('cagrad', c=0.4)
...   update, weights, state = jax.jit(method.apply)(method.init(2), G, losses, jax.random.key(0))
...   print(name, [round(float(u), 3) for u in update], 'G @ update:', [round(float(v), 3) for v in G @ update])
ew [0.0, 1.0] G @ update: [0.0, 1.0]
pcgrad [0.5, 1.5] G @ update: [0.5, 1.0]
mgda [0.4, 0.8] G @ update: [0.4, 0.4]

In a model, ``losses, G = weighting.task_jacobian(loss_fn, shared_params, batch)`` gives the inputs and
``weighting.unflatten_grads(update, shared_params)`` the gradient pytree to hand to the optimizer.

Every method class declares, once, what the train step must do for it (`base.KINDS`, `base.NEEDS`):

* ``kind``, how the heads are weighted: 'loss_weighting' (every head gets Σ_t w_t ∇L_t: the method weights losses)
  or 'gradient' (every head gets its own task's gradient; the method combines the shared-encoder rows);
* ``needs``, the gradient information `apply` reads: 'losses' (weights from the losses and the state only, G may be a
  [T, 1] stand-in, so the loop may differentiate Σ_t w_t L_t instead, see `jacobian`), 'shared_rows' (G [T, P], rows
  w.r.t. the shared parameters: the gradient methods, GradNorm, ExcessMTL), 'feature_rows' (rows w.r.t. the shared
  features: MGDA-UB) or 'meta' (Auto-Lambda, MOML, FORUM: a meta step sets the weights, `apply` only reads them; the
  train step feeds its ``meta_step`` a `MetaInputs`, with a validation batch where ``needs_validation``).

`METHODS` ({name: method}) is the registry: each class is listed once below and its ``name`` is its only spelling;
`LOSS_WEIGHTING` ('ew', 'sum', 'mean', 'constant', 'uw', 'dwa', 'rlw', 'gls', 'imtl_l', 'stch', 'cosmos', 'pbi',
'go4align', 'famo', 'gradnorm', 'excess_mtl', 'auto_lambda', 'moml', 'forum') and `GRADIENT_METHODS` ('mgda',
'mgda_ub', 'pcgrad', 'cagrad', 'nash_mtl', 'fairgrad', 'imtl', 'aligned_mtl', 'upgrad', 'dualproj', 'pcd', 'config',
'gradvac', 'graddrop', 'krum', 'trimmed_mean', 'rgw', 'moco', 'modo', 'sdmgrad', 'cr_mogm', 'db_mtl') are its names by
``kind``. `is_gradient_method(name)` says whether the train loop must compute gradient rows (``needs`` 'shared_rows'
or 'feature_rows'). MoCo, DB-MTL and ExcessMTL track gradients: their `init` needs ``num_params``; GradVac reads the
shared parameters' `param_layout` for its parameter groups (`init_state` passes each what it reads).
"""

from __future__ import annotations

from typing import Mapping

from mtlmatch.weighting.aggregators import (
    GRADVAC_GROUPS,
    PCD,
    RGW,
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    Krum,
    TrimmedMean,
    UPGrad,
    dual_cone_weights,
    gradvac_coefficients,
    gradvac_group_starts,
)
from mtlmatch.weighting.base import ABSENT_SQ_NORM, KINDS, NEEDS, HParam, MetaInputs, WeightingMethod, registry
from mtlmatch.weighting.bilevel import FORUM, MOML, forum_weights
from mtlmatch.weighting.gradient_methods import (
    CAGrad,
    FairGrad,
    IMTL,
    MGDA,
    MGDAUB,
    AlignedMTL,
    NashMTL,
    PCGrad,
    aligned_weights,
    cagrad_weights,
    fairgrad_weights,
    imtl_weights,
    min_norm_weights,
    nash_weights,
    nonneg_qp,
    pcgrad_weights,
    project_simplex,
)
from mtlmatch.weighting.jacobian import (
    JACOBIAN_MODES,
    cosine_similarity_matrix,
    flatten_grads,
    flatten_task_grads,
    param_layout,
    pullback_rows,
    resolve_jacobian,
    task_jacobian,
    unflatten_grads,
)
from mtlmatch.weighting.loss_weighting import (
    DWA,
    AutoLambda,
    EW,
    FAMO,
    GLS,
    IMTLL,
    RLW,
    STCH,
    UW,
    Constant,
    GO4Align,
    GradNorm,
    Mean,
    Sum,
    kmeans_1d,
)
from mtlmatch.weighting.scalarizations import COSMOS, PBI
from mtlmatch.weighting.stochastic_methods import CRMOGM, DBMTL, ExcessMTL, MoCo, MoDo, SDMGrad

# The registry: every method class once, loss weightings first (the order of `METHODS` and of the two tuples).
_CLASSES = (
    EW,
    Sum,
    Mean,
    Constant,
    UW,
    DWA,
    RLW,
    GLS,
    IMTLL,
    STCH,
    COSMOS,
    PBI,
    GO4Align,
    FAMO,
    GradNorm,
    ExcessMTL,
    AutoLambda,
    MOML,
    FORUM,
    MGDA,
    MGDAUB,
    PCGrad,
    CAGrad,
    NashMTL,
    FairGrad,
    IMTL,
    AlignedMTL,
    UPGrad,
    DualProj,
    PCD,
    ConFIG,
    GradVac,
    GradDrop,
    Krum,
    TrimmedMean,
    RGW,
    MoCo,
    MoDo,
    SDMGrad,
    CRMOGM,
    DBMTL,
)
METHODS: Mapping[str, WeightingMethod] = registry(_CLASSES)
LOSS_WEIGHTING = tuple(name for name, method in METHODS.items() if method.kind == 'loss_weighting')
GRADIENT_METHODS = tuple(name for name, method in METHODS.items() if method.kind == 'gradient')


def _check_name(name: str) -> str:
  if name not in METHODS:
    raise ValueError(f'weighting method name: got {name!r}, expected one of {sorted(METHODS)}')
  return name


def get_method(name: str, **hparams) -> WeightingMethod:
  """METHODS[name] with `hparams` bound (validated: unknown names or bad values raise a ValueError)."""
  return METHODS[_check_name(name)].bind(**hparams)


def is_gradient_method(name: str) -> bool:
  """True when the method reads per-task gradient rows (``needs`` 'shared_rows' or 'feature_rows': the gradient
  methods, GradNorm, ExcessMTL); False when its weights come from the losses (and a meta step) only (EW, UW, DWA, RLW,
  FAMO, Auto-Lambda, ...), so the train loop can skip the Jacobian."""
  return METHODS[_check_name(name)].needs in ('shared_rows', 'feature_rows')


def init_state(method: WeightingMethod, num_tasks: int, num_params: int, *, param_layout=None, **hparams):
  """`method.init` with ``num_params`` passed only to the methods that track gradients (``needs_num_params``) and
  ``param_layout`` (`param_layout` of the shared parameters) only to those that group them (``uses_param_layout``)."""
  layout = param_layout if method.uses_param_layout else None
  return method.init(num_tasks, num_params if method.needs_num_params else None, param_layout=layout, **hparams)


def needs_validation(method: str | WeightingMethod) -> bool:
  """True when the method (a name or a method) has a meta step that reads validation batches (``needs`` 'meta' and
  ``meta_uses_validation``: Auto-Lambda, MOML; not FORUM), so the loop must hold out a validation split and stream
  it beside the training batches."""
  method = METHODS[_check_name(method)] if isinstance(method, str) else method
  return method.needs == 'meta' and method.meta_uses_validation


def hparam_specs(name: str) -> Mapping[str, HParam]:
  """The hyper-parameters a method accepts, with defaults and the expected values."""
  return METHODS[_check_name(name)].HPARAMS


# The method classes (from the registry), then the rest of the public names.
__all__ = [cls.__name__ for cls in _CLASSES] + [
    'ABSENT_SQ_NORM',
    'GRADIENT_METHODS',
    'GRADVAC_GROUPS',
    'HParam',
    'JACOBIAN_MODES',
    'KINDS',
    'LOSS_WEIGHTING',
    'METHODS',
    'MetaInputs',
    'NEEDS',
    'WeightingMethod',
    'aligned_weights',
    'cagrad_weights',
    'cosine_similarity_matrix',
    'dual_cone_weights',
    'fairgrad_weights',
    'flatten_grads',
    'flatten_task_grads',
    'forum_weights',
    'get_method',
    'gradvac_coefficients',
    'gradvac_group_starts',
    'hparam_specs',
    'imtl_weights',
    'init_state',
    'is_gradient_method',
    'kmeans_1d',
    'min_norm_weights',
    'nash_weights',
    'needs_validation',
    'nonneg_qp',
    'pcgrad_weights',
    'param_layout',
    'project_simplex',
    'pullback_rows',
    'resolve_jacobian',
    'task_jacobian',
    'unflatten_grads',
]
