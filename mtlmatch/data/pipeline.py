"""Training and evaluation input pipelines: seeded mixing of sources, per-host slices, exact resume, padded eval.

Every batch is ``{'image': float32 [B,H,W,C] in [-1, 1], 'labels': {task: int32 [B] or [B,C] (float32 [B,d] for
regression)}, 'source': int32 [B]}``
(``source`` indexes ``benchmark.train_sources``; eval batches carry ``'mask'`` float32 ``[B]`` instead). Usage::

    bench = get_benchmark('synthetic_affect', data_dir=d)
    for batch in train_iterator(bench, global_batch_size=128, seed=0, start_step=step, sharding=sharding): ...
    for batch in eval_iterator(bench.eval_sources[0], bench.tasks, global_batch_size=256, sharding=sharding): ...

**What a training stream is.** Every host draws the same *global* batch of ``B`` slots for step ``t`` and makes
the slots ``[h·b, (h+1)·b)`` of it (``b = B/P``), so the union of the hosts' examples at a step is the batch one
process would draw, whatever the number of hosts. A global batch is drawn as follows:

* *mixing* — the number of examples from each source is ``Multinomial(B, p)`` with ``p`` the normalised source
  weights (``mixing='weights'``) or an equal share per task (``mixing='equal_per_task'``: task ``k`` gets ``1/T``,
  split equally among the sources annotating it, a source's share is the sum over its tasks); the slots are then
  randomly permuted. This is exactly the law of ``tf.data.Dataset.sample_from_datasets(weights)`` (i.i.d.
  categorical choices per example), drawn from a generator seeded by ``(seed, ⌊t/64⌋)``;
* *shuffle → repeat* — each source is read in a fresh random permutation per epoch (keyed by ``(seed, source,
  epoch)``); the ``m``-th example a source contributes is element ``m mod n`` of epoch ``⌊m/n⌋``'s permutation;
* *batch (drop_remainder) → preprocess → prefetch* — a tf.data pipeline over the steps: the rows are gathered into
  a full batch (``tf.numpy_function``; for sources read by row — files, ArrayRecord — only the paths or encoded
  records of this host's slots are fetched, and decoded and resized in the next, parallel map), normalised to
  float32 (``x/127.5 − 1``), optionally augmented with stateless randomness keyed by ``(seed, step)`` and the slot
  (parallel ``map`` on whole batches; below), and prefetched.

**Augmentation** (``augment``, training only): a pure function of ``(seed, step)`` and the slot — each draw is made
for the global batch and a host keeps its slots' draws, so hosts augment as one process would. Names, applied in
this order whatever order they are given in:

* ``'scale_crop'`` — LibMTL's NYUv2 ``RandomScaleCrop`` (``examples/nyu/create_dataset.py``, after MTAN): a scale
  s uniform over :data:`SCALES` (1.0, 1.2, 1.5), a window of ``h = int(H/s)`` × ``w = int(W/s)`` pixels (Python's
  ``int``, as LibMTL) at an offset uniform over ``[0, H − h] × [0, W − w]``, resized back to H × W. The image is
  resampled bilinearly with aligned corners (output row y reads the window's row ``y (h − 1)/(H − 1)``; LibMTL's
  ``align_corners=True``) and kept in float (not re-quantised). Each dense label takes, by nearest neighbour, the
  window pixel nearest to the image's sample point (ties to the larger index), so a label is never interpolated
  and a hole (−1, 0) stays a hole; its values then change as its kind's ``zoom_power`` says (depth ÷ s, LibMTL's
  ``depth / sc``; segmentation and normals unchanged);
* ``'flip'`` — a left-right flip with probability 1/2 of the image and every dense label, whose values change as
  its kind's ``flip_signs`` says (a normal's x is negated, as LibMTL's flip; a 0-vector stays 0);
* ``'crop'`` — pad by ``max(1, H//8)`` black pixels and crop back to H × W at a uniform offset: images only.

``augment=True`` is ``('flip', 'crop')`` for a benchmark without dense tasks and :data:`DENSE_AUGMENTATIONS`
``('flip', 'scale_crop')`` — LibMTL's NYUv2 augmentation — for one with them; ``'crop'`` is refused with dense tasks
(it would need padding values for labels; ``'scale_crop'`` is their crop). Where this differs from LibMTL:
LibMTL resizes the labels with PyTorch's ``'nearest'``, which reads row ``⌊y h/H⌋`` — a grid up to 0.83 of a
pixel away from the one its image is resampled on (NYUv2's 288 × 384 at s = 1.2) — and resizes the normals
bilinearly, which blends the 0-vector holes into their neighbours as short, non-unit normals; here every label
follows the image's grid by nearest neighbour. Flip after scale-crop and the three scales equally likely, as
LibMTL.

Memory: in-memory sources hold their images (every host all of them: small data); sources read by row hold only
their labels and keys, so a run's memory is bounded by the batches in flight, not by the dataset.

Why not ``sample_from_datasets`` itself: its choice stream and each source's shuffle buffer can only be resumed by
replaying them element by element (measured here: ~15 s to skip 2,000 steps of 256 on 2 cores) or by checkpointing
the iterator (the buffers are big). Here the batch of step ``t`` is a pure function of ``(seed, t)``: resuming at
``t`` re-derives each source's position from the per-step counts (one vectorised multinomial draw per 64 steps;
the first batch at step 100,000 came in ≈0.2 s here), so **the checkpoint only stores the step**
(:func:`checkpoint_state`). Same seed → same batches; ``train_iterator(start_step=s)`` yields batch ``s + k`` of the
uninterrupted run as its ``k``-th batch.
"""

from __future__ import annotations

import math
import threading
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding

from mtlmatch.data import files as files_lib
from mtlmatch.data import sharding as sharding_lib
from mtlmatch.data.readers import Examples, LazyImages, image_shape_of
from mtlmatch.data.sources import Benchmark, Source, load_examples
from mtlmatch.tasks import TaskKind, TaskSpec, kind_of, missing_labels

MIXING = ('weights', 'equal_per_task')
AUGMENTATIONS = ('flip', 'crop', 'scale_crop')
IMAGE_AUGMENTATIONS = ('flip', 'crop')  # augment=True without dense tasks
DENSE_AUGMENTATIONS = ('flip', 'scale_crop')  # augment=True with dense tasks: LibMTL's NYUv2 augmentation
SCALES = (1.0, 1.2, 1.5)  # scale_crop's zoom factors (LibMTL's RandomScaleCrop)
CHUNK_STEPS = 64  # steps drawn together by the mixing schedule (one generator per chunk)
_END_STEP = 2**62
# Distinct stream tags so the mixing, permutation and augmentation randomness never share a key.
_MIX, _PERM, _AUG = 0x6D6978, 0x7065726D, 0x617567


def checkpoint_state(step: int) -> dict:
  """What a checkpoint must store to resume the training stream: only the step (seed and sources are config)."""
  return {'step': int(step)}


def _check_int(value, *, arg: str, low: int = 0, high: int = 2**63) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value < high:
    raise ValueError(f'{arg}: got {value!r}, expected an int in [{low}, {high})')
  return int(value)


def _task_specs(tasks) -> dict[str, TaskSpec]:
  if isinstance(tasks, Mapping):
    specs = dict(tasks)
  else:
    specs = {t.name: t for t in tasks} if all(isinstance(t, TaskSpec) for t in tasks) else None
  if not specs or not all(isinstance(s, TaskSpec) for s in specs.values()):
    raise ValueError(f'tasks: got {tasks!r}, expected benchmark.tasks ({{name: TaskSpec}}) or a sequence of TaskSpec')
  return specs


def mixing_probabilities(
    sources: Sequence[Source], tasks: Mapping[str, TaskSpec], mixing: str = 'weights'
) -> np.ndarray:
  """Normalised mixture ``p`` float64 ``[S]``.

  ``'weights'``: ``p_s = w_s / Σ w``. ``'equal_per_task'``: with ``T`` the tasks annotated by some source and
  ``n_k`` the number of sources annotating task ``k``, ``p_s = Σ_{k ∈ tasks(s)} 1 / (T · n_k)``.
  """
  if mixing not in MIXING:
    raise ValueError(f'mixing: got {mixing!r}, expected one of {MIXING}')
  if not sources:
    raise ValueError('sources: got none, expected at least one Source')
  if mixing == 'weights':
    w = np.array([s.weight for s in sources], np.float64)
    if not np.all(np.isfinite(w) & (w > 0)):
      raise ValueError(f'source weights: got {w.tolist()}, expected finite numbers > 0')
  else:
    covered = [t for t in tasks if any(t in s.tasks for s in sources)]
    n_sources = {t: sum(t in s.tasks for s in sources) for t in covered}
    w = np.array([sum(1.0 / (len(covered) * n_sources[t]) for t in s.tasks if t in n_sources) for s in sources])
  return w / w.sum()


class MixingSchedule:
  """Which example of which source fills each slot of a host's batch at step ``t``: a pure function of ``t``.

  ``sizes`` [S]: the host's number of examples per source; ``probs`` [S]: mixture; ``batch_size``: per-host batch.
  ``step(t) -> (source int32 [b], example int64 [b])``, ``example`` indexing the host's slice of that source. The
  memo (cumulative counts per chunk, the current chunk, recent permutations) only saves work: a fresh schedule gives
  the same answer for any ``t``.
  """

  def __init__(self, sizes: Sequence[int], probs: Sequence[float], batch_size: int, seed: int, process_index: int = 0):
    self.sizes = np.asarray(sizes, np.int64)
    self.probs = np.asarray(probs, np.float64)
    if self.sizes.ndim != 1 or self.sizes.shape != self.probs.shape or np.any(self.sizes < 1):
      raise ValueError(
          f'MixingSchedule sizes: got {self.sizes.tolist()} for probs {self.probs.tolist()}, expected '
          'one size >= 1 per source'
      )
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self._starts = [np.zeros(len(self.sizes), np.int64)]  # position of each source before chunk c
    self._chunk = (None, None)
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self._lock = threading.Lock()  # the memo may be reached from tf.data threads

  def _rng(self, chunk: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.process_index, chunk, _MIX])

  def _counts(self, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(self.batch_size, self.probs, size=CHUNK_STEPS)  # [CHUNK_STEPS, S]

  def start(self, chunk: int) -> np.ndarray:
    """How many examples each source has contributed before ``chunk`` (replays only the per-step counts)."""
    while len(self._starts) <= chunk:
      c = len(self._starts) - 1
      self._starts.append(self._starts[c] + self._counts(self._rng(c)).sum(0))
    return self._starts[chunk]

  def permutation(self, source: int, epoch: int) -> np.ndarray:
    key = (source, epoch)
    if key not in self._perms:
      rng = np.random.default_rng([self.seed, self.process_index, source, epoch, _PERM])
      self._perms[key] = rng.permutation(int(self.sizes[source]))
    return self._perms[key]

  def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source int32 [CHUNK_STEPS, b], example int64 [CHUNK_STEPS, b])`` of chunk ``c``."""
    with self._lock:
      if self._chunk[0] != c:
        self._chunk = (c, self._draw_chunk(c))
      return self._chunk[1]

  def _draw_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = self._rng(c)
    counts = self._counts(rng)
    num_sources = len(self.sizes)
    # Step-major, source-sorted slots; each source's slots take consecutive positions in its stream.
    src = np.repeat(np.tile(np.arange(num_sources, dtype=np.int32), CHUNK_STEPS), counts.reshape(-1))
    example = np.empty(src.shape, np.int64)
    start = self.start(c)
    for s in range(num_sources):
      where = np.flatnonzero(src == s)
      pos = start[s] + np.arange(where.size, dtype=np.int64)
      epoch, offset = np.divmod(pos, self.sizes[s])
      for e in np.unique(epoch):
        sel = epoch == e
        example[where[sel]] = self.permutation(s, int(e))[offset[sel]]
      if where.size:  # forget permutations of finished epochs
        for key in [k for k in self._perms if k[0] == s and k[1] < epoch[-1]]:
          del self._perms[key]
    src, example = src.reshape(CHUNK_STEPS, -1), example.reshape(CHUNK_STEPS, -1)
    order = np.argsort(rng.random(src.shape), axis=1)  # sources in random slots, as i.i.d. choices would be
    return np.take_along_axis(src, order, 1), np.take_along_axis(example, order, 1)

  def step(self, t: int) -> tuple[np.ndarray, np.ndarray]:
    src, example = self.chunk(t // CHUNK_STEPS)
    return src[t % CHUNK_STEPS], example[t % CHUNK_STEPS]


def check_augment(augment, dense: Sequence[str] = (), *, arg: str = 'augment') -> tuple[str, ...]:
  """The augmentations that ``augment`` names (module docstring); ``dense``: the benchmark's spatial tasks; ``arg``
  names the value in the error (the config checks pass ``config.data.augment``)."""
  if augment is False or augment is None:
    return ()
  if augment is True:
    return DENSE_AUGMENTATIONS if dense else IMAGE_AUGMENTATIONS
  names = (augment,) if isinstance(augment, str) else tuple(augment) if isinstance(augment, (list, tuple)) else None
  if names is None or not set(names) <= set(AUGMENTATIONS):
    raise ValueError(f'{arg}: got {augment!r}, expected a bool or a subset of {AUGMENTATIONS}')
  if dense and not set(names) <= set(DENSE_AUGMENTATIONS):
    raise ValueError(
        f'{arg}: got {augment!r} with the dense tasks {list(dense)}, expected True or a subset of '
        f"{DENSE_AUGMENTATIONS} ('crop' pads the image and does not move per-pixel labels; 'scale_crop' does)"
    )
  return names


def _per_example(values: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  """``values`` [b] shaped to broadcast against ``x`` [b, ...]."""
  return tf.reshape(values, [-1] + [1] * (x.shape.rank - 1))


def _take_pixels(x: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
  """``x[i][rows[i]][:, cols[i]]`` for each example: ``x`` [b, H, W, ...], ``rows`` int32 [b, H'], ``cols`` [b, W']
  → [b, H', W', ...]."""
  return tf.gather(tf.gather(x, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def _window_grid(start: tf.Tensor, size: tf.Tensor, out: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Where output pixel ``y < out`` samples a window of ``size`` pixels from ``start`` (both int32 [b]), resized to
  ``out`` with aligned corners: the point ``start + y (size − 1)/(out − 1)`` (float32 [b, out]) and the pixel
  nearest to it, ties to the larger index (int32 [b, out], exact integer arithmetic)."""
  num = tf.range(out)[None] * (size - 1)[:, None]
  den = max(out - 1, 1)
  points = tf.cast(start[:, None], tf.float32) + tf.cast(num, tf.float32) / den
  return points, start[:, None] + (2 * num + den) // (2 * den)


def _bilinear(images: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
  """``images`` [b, H, W, C] read at the float points ``rows`` [b, H'] × ``cols`` [b, W'] (inside the image) by
  bilinear interpolation (separable: along H, then along W) → float32 [b, H', W', C]."""
  x = tf.cast(images, tf.float32)
  for axis, points in ((1, rows), (2, cols)):
    low = tf.floor(points)
    frac = points - low
    low = tf.cast(low, tf.int32)
    high = tf.minimum(low + 1, x.shape[axis] - 1)  # only where frac = 0: the window's last row or column
    shape = [-1, 1, 1, 1]
    shape[axis] = points.shape[1]
    frac = tf.reshape(frac, shape)
    a, b = tf.gather(x, low, axis=axis, batch_dims=1), tf.gather(x, high, axis=axis, batch_dims=1)
    x = a + frac * (b - a)  # exactly a where frac = 0 (scale 1 is the identity)
  return x


def _scale_windows(seed: tf.Tensor, height: int, width: int, first: int, b: int, total: int):
  """scale_crop's draws for slots ``[first, first + b)`` of a global batch of ``total``: the scale s float32 [b]
  (uniform over :data:`SCALES`) and the window's top, height, left and width, int32 [b] each (``int(H/s)`` rows
  from a top uniform over ``[0, H − int(H/s)]``, and likewise for the columns)."""
  u = tf.random.stateless_uniform([3, total], seed=seed + 2)[:, first : first + b]
  k = tf.minimum(tf.cast(u[0] * len(SCALES), tf.int32), len(SCALES) - 1)
  scale = tf.gather(tf.constant(SCALES, tf.float32), k)
  window = []
  for n, draw in ((height, u[1]), (width, u[2])):
    size = tf.gather(tf.constant([max(1, int(n / s)) for s in SCALES], tf.int32), k)
    room = n - size  # the offsets 0 … room, equally likely
    start = tf.minimum(tf.cast(draw * tf.cast(room + 1, tf.float32), tf.int32), room)
    window += [start, size]
  return (scale, *window)


def _augment(
    images: tf.Tensor,
    seed: tf.Tensor,
    augmentations: tuple[str, ...],
    first: int = 0,
    total: Optional[int] = None,
    labels: Optional[Mapping[str, tf.Tensor]] = None,
    kinds: Optional[Mapping[str, TaskKind]] = None,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """``augmentations`` (module docstring: scale-crop, flip, pad-and-crop, in this order) of a uint8 batch [b, H, W, C]
  and of its dense ``labels`` {task: [b, H, W, ...]}, whose values change as their ``kinds`` {task: TaskKind} say.

  The draws are made for a global batch of ``total`` slots and this batch takes ``[first, first + b)`` of them, so a
  host's augmentations are those of the same slots in a one-process run. Returns ``(images, labels)``; the images
  are float32 (in [0, 255]) after a scale-crop, else uint8."""
  b, h, w = images.shape[0], images.shape[1], images.shape[2]
  total = b if total is None else total
  labels = dict(labels or {})
  if 'scale_crop' in augmentations:
    scale, top, rows, left, cols = _scale_windows(seed, h, w, first, b, total)
    row_points, row_pixels = _window_grid(top, rows, h)
    col_points, col_pixels = _window_grid(left, cols, w)
    images = _bilinear(images, row_points, col_points)
    for t, y in labels.items():
      y = _take_pixels(y, row_pixels, col_pixels)
      power = kinds[t].zoom_power
      factor = _per_example(scale ** abs(power), y)
      labels[t] = y if power == 0 else (y * factor if power > 0 else y / factor)
  if 'flip' in augmentations:
    flip = tf.random.stateless_uniform([total], seed=seed)[first : first + b] < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    for t, y in labels.items():
      flipped = tf.reverse(y, axis=[2])
      if kinds[t].flip_signs is not None:
        flipped = flipped * tf.constant(kinds[t].flip_signs, y.dtype)
      labels[t] = tf.where(_per_example(flip, y), flipped, y)
  if 'crop' in augmentations:
    pad = max(1, h // 8)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform([2, total], seed=seed + 1, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    offsets = offsets[:, first : first + b]
    rows = offsets[0][:, None] + tf.range(h)[None]  # [b, H] rows of the padded image to keep
    cols = offsets[1][:, None] + tf.range(w)[None]
    images = _take_pixels(padded, rows, cols)
  return images, labels


def normalize(images: tf.Tensor) -> tf.Tensor:
  """uint8 → float32 in [-1, 1]: ``x / 127.5 − 1``."""
  return tf.cast(images, tf.float32) / 127.5 - 1.0


def _concat_labels(examples: Sequence[Examples], tasks: Sequence[str]):
  labels = {t: np.concatenate([e.labels[t] for e in examples]) for t in tasks}
  offsets = np.cumsum([0] + [len(e) for e in examples[:-1]]).astype(np.int64)
  return labels, offsets


def _label_specs(tasks: Mapping[str, TaskSpec], b: int):
  return [tf.TensorSpec(spec.label_shape(b), tf.as_dtype(kind_of(spec).label_dtype)) for spec in tasks.values()]


class _Slots:
  """A batch's images from several stores (in-memory arrays or :class:`LazyImages`), slot by slot.

  In Python (``gather``): each slot's store index, the fetched string of a lazy store's row (a path or a record) and,
  only if some store is in memory, the pixels of in-memory rows. In TF (``decode``, inside the parallel map):
  uint8 ``[b, H, W, C]``, each lazy slot decoded by its store's ``decode``. Store index ``-1`` is a black padding slot.
  With every store in memory there is nothing to decode and ``gather`` returns the pixels directly (the fast path).
  """

  def __init__(self, stores: Sequence, shape: Sequence[int]):
    self.stores = list(stores)
    self.shape = tuple(int(d) for d in shape)
    self.lazy = [isinstance(x, LazyImages) for x in self.stores]
    self.any_lazy = any(self.lazy)
    self.any_dense = not all(self.lazy)
    if not self.any_lazy:
      self._dense = np.concatenate(self.stores) if len(self.stores) > 1 else self.stores[0]
      self._offsets = np.cumsum([0] + [len(x) for x in self.stores[:-1]]).astype(np.int64)

  def specs(self, b: int) -> list[tf.TensorSpec]:
    if not self.any_lazy:
      return [tf.TensorSpec((b,) + self.shape, tf.uint8)]
    dense = [tf.TensorSpec((b,) + self.shape, tf.uint8)] if self.any_dense else []
    return [tf.TensorSpec((b,), tf.string)] + dense

  def gather(self, src: np.ndarray, example: np.ndarray) -> list[np.ndarray]:
    if not self.any_lazy:
      return [self._dense[self._offsets[src] + example]]
    strings = np.full(len(src), b'', object)
    dense = np.zeros((len(src),) + self.shape, np.uint8) if self.any_dense else None
    for s in np.unique(src[src >= 0]):
      sel = src == s
      store = self.stores[s]
      if self.lazy[s]:
        strings[sel] = store.fetch(store.keys[example[sel]])
      else:
        dense[sel] = store[example[sel]]
    return [strings] + ([dense] if dense is not None else [])

  def decode(self, src: tf.Tensor, images: Sequence[tf.Tensor]) -> tf.Tensor:
    if not self.any_lazy:
      return images[0]
    black = tf.zeros(self.shape, tf.uint8)

    def one(args):
      s, string = args[0], args[1]
      dense = args[2] if self.any_dense else black
      branches = [
          (lambda x=x: x.decode(string)) if lazy else (lambda: dense) for x, lazy in zip(self.stores, self.lazy)
      ]
      index = tf.where(s < 0, len(branches), s)
      return tf.switch_case(index, branches + [lambda: black])

    elems = (src, images[0]) + ((images[1],) if self.any_dense else ())
    return tf.map_fn(one, elems, fn_output_signature=tf.TensorSpec(self.shape, tf.uint8))

  def explain(self, src: np.ndarray, example: np.ndarray) -> Optional[str]:
    """Names the first lazy slot whose image fails to fetch or decode (for a batch TF refused), or None."""
    for s in np.unique(src[src >= 0]):
      if self.lazy[s]:
        message = files_lib.bad_image_message(self.stores[s], example[src == s])
        if message:
          return message
    return None


def _explained(batches: Iterator, first_step: int, explain) -> Iterator:
  """``batches`` unchanged, but a TF error while making batch ``first_step + k`` becomes one ValueError naming the
  image that caused it (``explain(step)``), e.g. an undecodable file of an unprepared manifest."""
  step = first_step
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      message = explain(step)
      if message is None:
        raise
      raise ValueError(
          f'{message}, expected a decodable image (at batch {step}; prepare the data with python -m '
          "mtlmatch.data.prepare, which checks every row, or set config.data.on_bad_image='skip')"
      ) from e
    yield batch
    step += 1


def train_iterator(
    benchmark: Benchmark,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    sharding: Optional[NamedSharding] = None,
    mixing: str = 'weights',
    augment: Union[bool, Sequence[str]] = False,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
    threads: Optional[int] = None,
) -> Iterator[dict]:
  """Endless iterator of training batches (see the module docstring for the exact law and resume contract).

  ``threads``: the size of the pipeline's private thread pool (decoding, augmentation); None = tf.data's default.
  ``augment``: False, True or augmentation names (the module docstring); the labels of dense tasks move with the
  image (the task's label ``size`` must be the image's).

  Without ``sharding``: host-local numpy batches of ``global_batch_size / process_count`` examples. With a
  ``NamedSharding`` over a 1-D ``'data'`` mesh: global ``jax.Array``s of ``global_batch_size``, prefetched to device
  (2 in flight). Every source is loaded and validated before the first batch (one ValueError for each problem).
  """
  if not isinstance(benchmark, Benchmark):
    raise ValueError(f'benchmark: got {type(benchmark).__name__}, expected a Benchmark (see get_benchmark)')
  seed = _check_int(seed, arg='seed')
  start_step = _check_int(start_step, arg='start_step', high=_END_STEP)
  dense = {t: kind_of(spec) for t, spec in benchmark.tasks.items() if kind_of(spec).spatial}
  augmentations = check_augment(augment, tuple(dense))
  for t in dense if augmentations else ():
    size, image_size = tuple(benchmark.tasks[t].option('size')), tuple(benchmark.image_shape[:2])
    if size != image_size:  # the labels move pixel for pixel with the image
      raise ValueError(
          f'augment: got the dense task {t!r} at size {size}, expected the image size {image_size} (or augment=False)'
      )
  index, count = sharding_lib.resolve_process(process_index, process_count)
  b = sharding_lib.per_host_batch_size(global_batch_size, count, sharding)
  tasks = benchmark.tasks
  probs = mixing_probabilities(benchmark.train_sources, tasks, mixing)
  # Every host holds every source's labels and image stores and draws the same global schedule; host h then makes
  # the slots [h·b, (h+1)·b) of each global batch (lazy stores read only those rows).
  examples = [load_examples(s, tasks, image_shape=benchmark.image_shape) for s in benchmark.train_sources]
  labels, offsets = _concat_labels(examples, list(tasks))
  slots = _Slots([e.images for e in examples], benchmark.image_shape)
  schedule = MixingSchedule([len(e) for e in examples], probs, b * count, seed)
  mine = slice(index * b, (index + 1) * b)

  def host_slots(step):
    src, example = schedule.step(int(step))
    return src[mine], example[mine]

  def host_batch(step):
    src, example = host_slots(step)
    rows = offsets[src] + example
    return slots.gather(src, example) + [src] + [labels[t][rows] for t in tasks]

  image_specs = slots.specs(b)
  out_specs = image_specs + [tf.TensorSpec((b,), tf.int32)] + _label_specs(tasks, b)

  def read(step):
    out = tf.numpy_function(host_batch, [step], [s.dtype for s in out_specs])
    for x, spec in zip(out, out_specs, strict=True):
      x.set_shape(spec.shape)
    return (step,) + tuple(out)

  def preprocess(step, *parts):
    images, (source, *task_labels) = parts[: len(image_specs)], parts[len(image_specs) :]
    image = slots.decode(source, images)
    labels = dict(zip(tasks, task_labels, strict=True))
    if augmentations:
      key = tf.stack([tf.constant(seed ^ _AUG, tf.int64), step])
      image, moved = _augment(
          image, key, augmentations, first=index * b, total=b * count, labels={t: labels[t] for t in dense}, kinds=dense
      )
      labels.update(moved)
    return {'image': normalize(image), 'labels': labels, 'source': source}

  dataset = tf.data.Dataset.range(start_step, _END_STEP)
  # Sequential (numpy holds the GIL anyway); numpy_function is stateful, so tf.data never parallelises this map.
  # Decoding (lazy stores) happens in the parallel map, several steps at once.
  dataset = dataset.map(read)
  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.prefetch(prefetch)
  if threads is not None:
    options = tf.data.Options()
    options.threading.private_threadpool_size = _check_int(threads, arg='threads', low=1)
    dataset = dataset.with_options(options)
  batches = dataset.as_numpy_iterator()
  if slots.any_lazy:
    batches = _explained(batches, start_step, lambda step: slots.explain(*host_slots(step)))
  return batches if sharding is None else sharding_lib.prefetch_to_device(batches, sharding, size=2)


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
  """``⌈⌈N/P⌉ / (B/P)⌉``: the same on every host, so every host runs the same number of eval steps."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) / (global_batch_size // process_count)))


def eval_iterator(
    source: Source,
    tasks,
    *,
    global_batch_size: int,
    sharding: Optional[NamedSharding] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    image_shape: Optional[Sequence[int]] = None,
) -> Iterator[dict]:
  """Finite iterator over ``source`` once, in order, padded so no example is dropped or counted twice.

  Batches: ``{'image', 'labels', 'mask', 'position'}``; ``mask`` float32 ``[B]`` is 1 for real examples and 0 for
  padding (whose image is black and labels all ``-1``); ``position`` int32 ``[B]`` is each example's position in the
  split's read order (``Examples.positions``; -1 for padding), which ``Reader.identify`` turns into rows and paths.
  Each host reads its own slice; every host yields :func:`num_eval_batches` batches. ``tasks`` = ``benchmark.tasks``
  so the tasks ``source`` lacks are ``-1``.
  """
  if not isinstance(source, Source):
    raise ValueError(f'source: got {type(source).__name__}, expected a Source (e.g. benchmark.eval_sources[0])')
  tasks = _task_specs(tasks)
  index, count = sharding_lib.resolve_process(process_index, process_count)
  b = sharding_lib.per_host_batch_size(global_batch_size, count, sharding)
  examples = load_examples(source, tasks, image_shape=image_shape, process_index=index, process_count=count)
  num_batches = max(1, math.ceil(source.max_host_examples(count) / b))
  slots = _Slots([examples.images], image_shape_of(examples.images))

  def batch_slots(k):
    lo, hi = min(int(k) * b, len(examples)), min((int(k) + 1) * b, len(examples))
    src = np.where(np.arange(b) < hi - lo, 0, -1).astype(np.int32)
    return src, np.minimum(lo + np.arange(b), max(len(examples) - 1, 0))

  def host_batch(k):
    src, example = batch_slots(k)
    real = src >= 0
    images = slots.gather(src, example)
    if not slots.any_lazy:
      images[0][~real] = 0
    position = np.where(real, examples.positions[example], -1).astype(np.int32)
    out = images + [src, real.astype(np.float32), position]
    for t, spec in tasks.items():
      y = missing_labels(spec, b)
      y[real] = examples.labels[t][example[real]]
      out.append(y)
    return out

  image_specs = slots.specs(b)
  out_specs = image_specs + [tf.TensorSpec((b,), tf.int32), tf.TensorSpec((b,), tf.float32)]
  out_specs += [tf.TensorSpec((b,), tf.int32)] + _label_specs(tasks, b)

  def read(k):
    out = tf.numpy_function(host_batch, [k], [s.dtype for s in out_specs])
    for x, spec in zip(out, out_specs, strict=True):
      x.set_shape(spec.shape)
    return tuple(out)

  def preprocess(*parts):
    images, (src, mask, position, *task_labels) = parts[: len(image_specs)], parts[len(image_specs) :]
    image = slots.decode(src, images)
    labels = dict(zip(tasks, task_labels, strict=True))
    return {'image': normalize(image), 'labels': labels, 'mask': mask, 'position': position}

  dataset = tf.data.Dataset.range(num_batches).map(read)
  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
  batches = dataset.as_numpy_iterator()
  if slots.any_lazy:
    batches = _explained(batches, 0, lambda k: slots.explain(*batch_slots(k)))
  return batches if sharding is None else sharding_lib.prefetch_to_device(batches, sharding, size=2)
