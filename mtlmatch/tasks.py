"""Task specifications, task kinds and the label conventions every module shares (docs/maths.md §1).

A task has a name, a ``kind`` and a number of classes (outputs). A *kind* is one entry of :data:`KINDS`: a
:class:`TaskKind` that says what its labels look like, how its loss and its metrics are computed and what its head
outputs — everything the data layer, the objective, the evaluators and ``--mode=predict`` need to know about it, so a
new kind of task is one :func:`register_kind` call, not a branch in every module. The built-in kinds:

* ``multiclass``: labels are int32 ``[B]`` with values in ``[0, C)``; ``-1`` means missing. Loss: softmax
  cross-entropy; metrics: accuracy, macro F1, per-class recall; primary metric ``accuracy``.
* ``multilabel``: labels are int32 ``[B, C]`` with values in ``{0, 1}``; ``-1`` marks a missing entry (e.g. an AU a
  dataset does not annotate). Loss: masked sigmoid cross-entropy; metrics: per-label F1, mean F1 (primary).
* ``regression``: targets are float32 ``[B, d]`` (d = ``num_classes`` named outputs, e.g. valence and arousal);
  NaN marks a missing target, per output. Options (``TaskSpec.options``): ``loss`` ``'mse'`` (default), ``'l1'``,
  ``'huber'`` (with ``huber_delta``) or ``'ccc'`` (1 − the concordance correlation of the global batch);
  ``bound`` None or ``'tanh'`` (the head's outputs squashed into (−1, 1), for VA); ``range`` None or ``(lo, hi)``,
  the values a target may take (checked at the data boundary); ``metric`` the primary metric (``'ccc'`` by default;
  ``'mae'`` or ``'rmse'``, lower is better, for e.g. age). Metrics: MAE, RMSE, Pearson r and CCC per output and
  their means (docs/maths.md §10).

A source that does not annotate a task fills it entirely with its kind's missing value (``-1``, or NaN).

Usage::

    expr = TaskSpec('expression', 'multiclass', 7)
    validate_labels(expr, np.array([0, 6, -1]))      # ok
    missing_labels(expr, 4)                          # array([-1, -1, -1, -1], dtype=int32)
    kind_of(expr).loss(expr, logits, labels)         # (per-example loss [B], weight [B])
    va = TaskSpec('va', 'regression', 2, ('valence', 'arousal'), options={'loss': 'ccc', 'bound': 'tanh'})
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtlmatch import losses
from mtlmatch import metrics as metrics_lib
from mtlmatch import metrics_dense
from mtlmatch.losses import dense as dense_losses
from mtlmatch.losses import regression as regression_losses

MISSING = losses.MISSING


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """How one kind of task is learned and measured. Every function is pure; the jittable ones are marked.

  * ``label_shape(num_classes) -> tuple``: the shape of one example's label (``()`` or ``(C,)``);
  * ``label_dtype``, ``missing``: the labels' dtype and the value that marks a missing label (``-1``, or NaN);
  * ``label_range``: ``(lo, hi)`` for integer labels: valid values are ``missing`` and ``lo <= y < hi`` (``hi``
    None: C); None for float labels: valid values are finite (within the task's ``range`` option, if it has one);
  * ``min_classes``: the smallest number of classes (outputs) a task of this kind may have;
  * ``loss(task, outputs [B, C], labels) -> (per_example [B, ...], weight [B])`` (jittable; weight 0 where missing)
    and ``reduce``: None when the task's loss is ``masked_mean(per_example, weight)``, else ``reduce(task, means)
    -> scalar`` of those means (the CCC: a function of the batch's moments; docs/maths.md §10);
  * ``statistics(task, outputs, labels, mask) -> {name: sums}`` (jittable, additive over examples and devices),
    ``zero_statistics(task)`` their identity, ``finalize(task, sums) -> {metric: float}`` on the host;
  * ``primary_metric``: the metric that model selection and the negative-transfer monitor read (a task's ``metric``
    option may choose another), ``lower_is_better``: the metrics (and ``<metric>_`` prefixes of per-output ones)
    where lower is better — every other metric is higher-is-better;
  * ``predict(outputs) -> array``: what ``--mode=predict`` writes for the task (jittable);
  * ``invalid_labels(labels, num_classes) -> int32``: how many labels of a batch are neither missing nor valid
    (jittable): the loss gives them weight 0, the train step reports their count and the loop halts on it;
  * ``head_outputs(num_classes) -> int``: the width of the task's head (and of DGR's dummy heads);
  * ``options``: the task options the kind reads and their defaults (``TaskSpec.options``), ``check_options(name,
    options)`` raises one ValueError for a bad value;
  * ``spatial``: a dense (per-pixel) kind: its labels are ``[B, H, W, *label_shape(C)]`` with ``(H, W)`` the task's
    ``size`` option, and its losses return per-pixel values and weights ``[B, H, W]`` (docs/maths.md §11);
  * ``flip_signs``, ``zoom_power``: what the joint augmentation of a spatial kind (``config.data.augment``,
    ``mtlmatch/data/pipeline.py``) does to a label's *values* once its pixels have moved with the image: a
    left-right flip multiplies channel k by ``flip_signs[k]`` (None: unchanged; normals ``(-1, 1, 1)``, x is
    negated), a zoom by s (a crop of 1/s of the image resized back) multiplies the values by ``s ** zoom_power``
    (depth −1: the view is as if the camera came s times closer). Label pixels move by nearest neighbour, never
    interpolated, so a missing pixel stays missing (−1 and 0 are kept by both rules).
  """

  name: str
  label_shape: Callable[[int], tuple[int, ...]]
  label_range: Optional[tuple[int, Optional[int]]]
  min_classes: int
  loss: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  statistics: Callable[..., dict]
  zero_statistics: Callable[[Any], dict]
  finalize: Callable[[Any, Mapping], dict]
  primary_metric: str
  predict: Callable[[jax.Array], jax.Array]
  invalid_labels: Callable[[jax.Array, int], jax.Array]
  head_outputs: Callable[[int], int] = lambda num_classes: num_classes
  label_dtype: type = np.int32
  missing: Any = MISSING
  reduce: Optional[Callable[[Any, jax.Array], jax.Array]] = None
  lower_is_better: tuple[str, ...] = ()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check_options: Callable[[str, Mapping[str, Any]], None] = lambda name, options: None
  spatial: bool = False
  flip_signs: Optional[tuple[float, ...]] = None
  zoom_power: int = 0

  def higher_is_better(self, metric: str) -> bool:
    """Whether a larger value of ``metric`` (e.g. ``'accuracy'``, ``'mae_valence'``) is better: every metric but
    those named in ``lower_is_better`` (a name ending in ``_`` covers the per-output metrics it prefixes)."""
    return not any(metric == m or (m.endswith('_') and metric.startswith(m)) for m in self.lower_is_better)


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
  """Adds ``kind`` to :data:`KINDS` (a name already registered is refused); returns it."""
  if not isinstance(kind, TaskKind):
    raise ValueError(f'register_kind: got {type(kind).__name__}, expected a TaskKind')
  if kind.name in KINDS:
    raise ValueError(f'register_kind: got kind {kind.name!r}, which is already registered ({sorted(KINDS)})')
  KINDS[kind.name] = kind
  return kind


register_kind(
    TaskKind(
        'multiclass',
        label_shape=lambda num_classes: (),
        label_range=(0, None),
        min_classes=2,
        loss=lambda task, logits, labels: losses.softmax_xent(logits, labels),
        statistics=metrics_lib.task_statistics,
        zero_statistics=metrics_lib.zero_statistics,
        finalize=metrics_lib.finalize,
        primary_metric='accuracy',
        predict=jax.nn.softmax,
        invalid_labels=functools.partial(losses.invalid_label_count, 'multiclass'),
    )
)
register_kind(
    TaskKind(
        'multilabel',
        label_shape=lambda num_classes: (num_classes,),
        label_range=(0, 2),
        min_classes=1,
        loss=lambda task, logits, labels: losses.sigmoid_xent(logits, labels),
        statistics=metrics_lib.task_statistics,
        zero_statistics=metrics_lib.zero_statistics,
        finalize=metrics_lib.finalize,
        primary_metric='mean_f1',
        predict=jax.nn.sigmoid,
        invalid_labels=functools.partial(losses.invalid_label_count, 'multilabel'),
    )
)


REGRESSION_LOSSES = ('mse', 'l1', 'huber', 'ccc')
BOUNDS = (None, 'tanh')
REGRESSION_METRICS = ('ccc', 'pearson', 'mae', 'rmse')


def _regression_loss(task, outputs, targets):
  loss = task.option('loss')
  if loss == 'ccc':
    return regression_losses.ccc_moments(outputs, targets)
  if loss == 'huber':
    return regression_losses.huber(outputs, targets, delta=float(task.option('huber_delta')))
  return {'mse': regression_losses.mse, 'l1': regression_losses.l1}[loss](outputs, targets)


def _regression_reduce(task, means):
  return regression_losses.ccc_loss_from_moments(means) if task.option('loss') == 'ccc' else means


def _check_regression_options(name: str, options: Mapping[str, Any]) -> None:
  where = f'TaskSpec({name!r}).options'
  if options['loss'] not in REGRESSION_LOSSES:
    raise ValueError(f"{where}['loss']: got {options['loss']!r}, expected one of {REGRESSION_LOSSES}")
  delta = options['huber_delta']
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
    raise ValueError(f"{where}['huber_delta']: got {delta!r}, expected a number > 0")
  if options['bound'] not in BOUNDS:
    raise ValueError(f"{where}['bound']: got {options['bound']!r}, expected one of {BOUNDS}")
  bounds = options['range']
  if bounds is not None and not (
      isinstance(bounds, (tuple, list))
      and len(bounds) == 2
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bounds)
      and bounds[0] < bounds[1]
  ):
    raise ValueError(f"{where}['range']: got {bounds!r}, expected None or (lo, hi) with finite lo < hi")
  if options['metric'] not in REGRESSION_METRICS:
    raise ValueError(f"{where}['metric']: got {options['metric']!r}, expected one of {REGRESSION_METRICS}")


register_kind(
    TaskKind(
        'regression',
        label_shape=lambda num_classes: (num_classes,),
        label_range=None,
        min_classes=1,
        loss=_regression_loss,
        reduce=_regression_reduce,
        statistics=metrics_lib.regression_statistics,
        zero_statistics=metrics_lib.regression_zero_statistics,
        finalize=metrics_lib.regression_finalize,
        primary_metric='ccc',
        lower_is_better=('mae', 'rmse', 'mae_', 'rmse_'),
        predict=lambda outputs: outputs,
        invalid_labels=lambda targets, num_classes: regression_losses.invalid_target_count(targets),
        label_dtype=np.float32,
        missing=np.nan,
        options={'loss': 'mse', 'huber_delta': 1.0, 'bound': None, 'range': None, 'metric': 'ccc'},
        check_options=_check_regression_options,
    )
)


# ---------------------------------------------------------------------------------------------------------------
# Dense (per-pixel) kinds: labels [B, H, W, ...] at the task's `size` (H, W); losses per pixel (docs/maths.md §11).


def _check_dense_options(metrics: tuple[str, ...]):
  def check(name: str, options: Mapping[str, Any]) -> None:
    size = options['size']
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
      raise ValueError(f"TaskSpec({name!r}).options['size']: got {size!r}, expected (H, W), the labels' resolution")
    if options['metric'] not in metrics:
      raise ValueError(f"TaskSpec({name!r}).options['metric']: got {options['metric']!r}, expected one of {metrics}")

  return check


def _dense_invalid(valid_or_missing):
  return lambda labels, num_classes: jnp.sum(valid_or_missing(labels, num_classes), dtype=jnp.int32)


# The primary metrics (what model selection averages) are on comparable scales: mIoU and the fraction of normals
# within 22.5° in [0, 1], depth's absolute error in the depth's unit (metres); `metric` chooses another.
register_kind(
    TaskKind(
        'segmentation',
        label_shape=lambda num_classes: (),
        label_range=(0, None),
        min_classes=2,
        loss=lambda task, logits, labels: dense_losses.pixel_softmax_xent(logits, labels),
        statistics=metrics_dense.segmentation_statistics,
        zero_statistics=metrics_dense.segmentation_zero_statistics,
        finalize=metrics_dense.segmentation_finalize,
        primary_metric='miou',
        predict=jax.nn.softmax,
        invalid_labels=_dense_invalid(lambda y, c: (y != MISSING) & ((y < 0) | (y >= c))),
        spatial=True,
        options={'size': None, 'metric': 'miou'},
        check_options=_check_dense_options(('miou', 'pixel_accuracy')),
    )
)
register_kind(
    TaskKind(
        'depth',
        label_shape=lambda num_classes: (1,),
        label_range=None,
        min_classes=1,
        loss=lambda task, predictions, targets: dense_losses.depth_l1(predictions, targets),
        statistics=metrics_dense.depth_statistics,
        zero_statistics=metrics_dense.depth_zero_statistics,
        finalize=metrics_dense.depth_finalize,
        primary_metric='abs_err',
        lower_is_better=metrics_dense.DEPTH_LOWER_IS_BETTER,
        predict=lambda outputs: outputs,
        invalid_labels=_dense_invalid(lambda y, c: (y < 0) | jnp.isinf(y)),
        label_dtype=np.float32,
        missing=0.0,
        spatial=True,
        zoom_power=-1,
        options={'size': None, 'metric': 'abs_err', 'range': (0.0, float('inf'))},
        check_options=_check_dense_options(('abs_err', 'rel_err')),
    )
)
register_kind(
    TaskKind(
        'normals',
        label_shape=lambda num_classes: (3,),
        label_range=None,
        min_classes=3,
        loss=lambda task, predictions, targets: dense_losses.normal_cosine(predictions, targets),
        statistics=metrics_dense.normals_statistics,
        zero_statistics=metrics_dense.normals_zero_statistics,
        finalize=metrics_dense.normals_finalize,
        primary_metric='within_22.5',
        lower_is_better=metrics_dense.NORMALS_LOWER_IS_BETTER,
        predict=dense_losses.unit,
        invalid_labels=_dense_invalid(lambda y, c: jnp.isinf(y)),
        label_dtype=np.float32,
        missing=0.0,
        spatial=True,
        flip_signs=(-1.0, 1.0, 1.0),  # camera x (right) reverses; y (down) and z (forward) do not
        options={'size': None, 'metric': 'within_22.5'},
        check_options=_check_dense_options(('within_22.5', 'within_11.25', 'within_30', 'mean_angle', 'median_angle')),
    )
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task: ``name``, ``kind`` (a key of :data:`KINDS`), ``num_classes`` C (a regression task's number of
  outputs d), optional ``class_names`` (C unique non-empty strings, e.g. the expressions, the AU names or
  ``('valence', 'arousal')``), which name the per-class metrics (``recall_happy``, ``f1_AU12``, ``ccc_valence``;
  :meth:`class_keys`), and ``options``: the kind's task options (``TaskKind.options``; the kind's defaults fill the
  others; an unknown key or a bad value is refused). Read one with :meth:`option`."""

  name: str
  kind: str
  num_classes: int
  class_names: Optional[tuple[str, ...]] = None
  options: Any = ()

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'TaskSpec.name: got {self.name!r}, expected a non-empty string')
    check_kind(self.kind, arg=f'TaskSpec({self.name!r}).kind')
    least = KINDS[self.kind].min_classes
    if (
        not isinstance(self.num_classes, (int, np.integer))
        or isinstance(self.num_classes, bool)
        or (self.num_classes < least)
    ):
      raise ValueError(f'TaskSpec({self.name!r}).num_classes: got {self.num_classes!r}, expected an int >= {least}')
    if self.class_names is not None:
      object.__setattr__(self, 'class_names', tuple(self.class_names))
      if len(self.class_names) != self.num_classes:
        raise ValueError(
            f'TaskSpec({self.name!r}).class_names: got {len(self.class_names)} names, expected '
            f'num_classes={self.num_classes}'
        )
      if not all(isinstance(c, str) and c.strip() for c in self.class_names):
        raise ValueError(f'TaskSpec({self.name!r}).class_names: got {self.class_names!r}, expected non-empty strings')
      keys = self.class_keys()
      if len(set(keys)) != len(keys):
        raise ValueError(
            f'TaskSpec({self.name!r}).class_names: got {self.class_names!r}, which name metrics {keys} with '
            'repeats, expected names that stay distinct as metric keys (letters, digits, _ . -)'
        )
    self._set_options()

  def _set_options(self) -> None:
    """Stores ``options`` as sorted ``(key, value)`` pairs (hashable: a spec is part of static jit arguments), with the
    kind's defaults filled in and checked."""
    given = dict(self.options or {})
    defaults = KINDS[self.kind].options
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(
          f'TaskSpec({self.name!r}).options: got unknown keys {unknown} for kind {self.kind!r}, expected some of '
          f'{sorted(defaults)}'
      )
    options = {**defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}}
    KINDS[self.kind].check_options(self.name, options)
    object.__setattr__(self, 'options', tuple(sorted(options.items())))

  def option(self, key: str):
    """The value of task option ``key`` (the kind's default when the spec does not set it)."""
    options = dict(self.options)
    if key not in options:
      raise ValueError(f'TaskSpec({self.name!r}).option: got {key!r}, expected one of {sorted(options)}')
    return options[key]

  def class_keys(self) -> tuple[str, ...]:
    """How the per-class metrics name each class (``recall_<key>``, ``f1_<key>``): the class names made safe as
    results.json keys and TensorBoard tags (every run of characters other than letters, digits, ``_ . -`` becomes
    ``_``), or the indices ``'0' … 'C-1'`` for a task without class names.

    >>> TaskSpec('aus', 'multilabel', 2, ('AU12', 'AU 25')).class_keys()
    ('AU12', 'AU_25')
    >>> TaskSpec('t', 'multiclass', 2).class_keys()
    ('0', '1')
    """
    if self.class_names is None:
      return tuple(str(k) for k in range(self.num_classes))
    return tuple(re.sub(r'[^A-Za-z0-9_.-]+', '_', c.strip()) for c in self.class_names)

  def label_shape(self, batch_size: int) -> tuple[int, ...]:
    """The labels' shape for a batch: ``[B, *per-example shape]``, with the ``(H, W)`` of a dense kind first."""
    kind = KINDS[self.kind]
    size = tuple(dict(self.options)['size']) if kind.spatial else ()
    return (batch_size, *size, *kind.label_shape(self.num_classes))

  @property
  def primary_metric(self) -> str:
    """The metric that model selection and the negative-transfer monitor read, in the direction
    :meth:`higher_is_better` gives; the task's ``metric`` option where its kind has one, else the kind's."""
    return dict(self.options).get('metric', KINDS[self.kind].primary_metric)

  def higher_is_better(self, metric: str) -> bool:
    """Whether a larger value of ``metric`` (e.g. ``'accuracy'``, ``'mae_valence'``) is better for this task (its
    kind's :meth:`TaskKind.higher_is_better`)."""
    return KINDS[self.kind].higher_is_better(metric)


def check_kind(kind: str, *, arg: str = 'kind') -> str:
  if kind not in KINDS:
    raise ValueError(f'{arg}: got {kind!r}, expected one of {tuple(KINDS)}')
  return kind


def kind_of(task: TaskSpec) -> TaskKind:
  """The :class:`TaskKind` of ``task``."""
  return KINDS[task.kind]


def missing_labels(task: TaskSpec, batch_size: int) -> np.ndarray:
  """All-missing labels for a task a source does not annotate (its kind's ``missing`` value: -1, or NaN)."""
  kind = KINDS[task.kind]
  return np.full(task.label_shape(batch_size), kind.missing, dtype=kind.label_dtype)


def bad_labels(task: TaskSpec, labels: np.ndarray) -> tuple[np.ndarray, str]:
  """``(bad, expected)``: a bool mask of the labels (numpy, the task's shape) that are neither missing nor valid,
  and what valid values are, in words. The one rule of the data boundary (:func:`validate_labels`, the data layer's
  messages that name a row)."""
  kind = KINDS[task.kind]
  if kind.label_range is None:  # float labels: finite (in the task's range), NaN = missing
    values = labels.astype(np.float64)
    bounds = dict(task.options).get('range')
    bad = np.isinf(values)
    if bounds is not None:
      bad |= (values < bounds[0]) | (values > bounds[1])
      return bad, f'values in [{bounds[0]}, {bounds[1]}] (NaN = missing)'
    return bad, 'finite values (NaN = missing)'
  lo, hi = kind.label_range
  hi = task.num_classes if hi is None else hi
  bad = ((labels < lo) & (labels != kind.missing)) | (labels >= hi)
  if not np.issubdtype(labels.dtype, np.integer):
    bad |= np.mod(labels, 1) != 0
  expected = f'[-1, {hi})' if (lo, hi) != (0, 2) else '{-1, 0, 1}'
  return bad, f'values in {expected} (-1 = missing)'


def validate_labels(task: TaskSpec, labels, *, where: str = '') -> np.ndarray:
  """Checks labels of one task against its kind's conventions; returns them as numpy of the kind's dtype (int32, or
  float32 with NaN = missing). Raises one ValueError."""
  ctx = f' in {where}' if where else ''
  labels = np.asarray(labels)
  want = task.label_shape(labels.shape[0] if labels.ndim else 0)
  if labels.ndim == 0 or labels.shape != want:
    expected = '[B' + ''.join(f', {d}' for d in want[1:]) + ']'
    raise ValueError(
        f'labels of task {task.name!r}{ctx}: got shape {labels.shape}, expected {expected} ' f'({task.kind})'
    )
  kind = KINDS[task.kind]
  if labels.size and not np.issubdtype(labels.dtype, np.number):
    raise ValueError(f'labels of task {task.name!r}{ctx}: got dtype {labels.dtype}, expected numbers')
  if kind.label_range is not None and labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(
          f'labels of task {task.name!r}{ctx}: got non-integer values (dtype {labels.dtype}), ' 'expected integers'
      )
  bad, expected = bad_labels(task, labels)
  if np.any(bad):
    raise ValueError(f'labels of task {task.name!r}{ctx}: got value {labels[bad].flat[0]}, expected {expected}')
  return labels.astype(kind.label_dtype)


def tasks_by_name(tasks: Sequence[TaskSpec]) -> Mapping[str, TaskSpec]:
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ValueError(f'tasks: got duplicate names {names}, expected unique names')
  return {t.name: t for t in tasks}
