"""What data a run was trained on, in a few numbers per source, so a workdir is never resumed on other data.

:func:`benchmark_fingerprint` gives, per training, eval and auxiliary source: its name, split, tasks, example count,
a hash of all its labels and a hash of a sample of its images (every ``⌈N/256⌉``-th example by position). The
hashes are sums of per-example hashes that include the example's position, so they do not depend on how the
examples are sliced over hosts (hosts add theirs). This costs one pass over the labels held in memory and a few
hundred images (decoded, for sources read by row).

:func:`check` compares a saved fingerprint with the current one and raises one ValueError naming the first source
that differs and how.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import jax
import numpy as np
import tensorflow as tf

from mtlmatch.data import files as files_lib
from mtlmatch.data.readers import LazyImages, decode_rows
from mtlmatch.data.sources import Benchmark, Source, load_examples

IMAGE_SAMPLE = 256
_MASK = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x.astype(np.uint64)
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _labels_hash(positions: np.ndarray, labels: np.ndarray) -> int:
  if np.issubdtype(labels.dtype, np.floating):
    # Float targets (regression): their float32 bits, every NaN alike. A cast to int would truncate them (0.3 and
    # 0.4 alike) and turn NaN into a platform-dependent integer.
    bits = np.where(np.isnan(labels), np.nan, labels).astype(np.float32).view(np.uint32)
    rows = bits.reshape(len(labels), -1).astype(np.int64) + 2
  else:
    rows = labels.reshape(len(labels), -1).astype(np.int64) + 2
  weights = _mix(np.arange(1, rows.shape[1] + 1, dtype=np.uint64))
  with np.errstate(over='ignore'):
    per_example = _mix((rows.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64) ^ _mix(positions + 1))
  return int(per_example.sum(dtype=np.uint64))


def _images_hash(positions: np.ndarray, images, stride: int) -> int:
  chosen = np.flatnonzero(positions % stride == 0)
  # Pixels, also for sources read by row (a few hundred decoded): the same data gives the same hash either way.
  pixels = _decoded(images, chosen) if isinstance(images, LazyImages) else images[chosen]
  total = 0
  for i, image in zip(chosen, pixels):
    digest = hashlib.blake2b(image.tobytes() + int(positions[i]).to_bytes(8, 'little'), digest_size=8)
    total = (total + int.from_bytes(digest.digest(), 'little')) & _MASK
  return total


def _decoded(images: LazyImages, chosen: np.ndarray) -> np.ndarray:
  """``decode_rows``, but an image that fails to fetch or decode is one ValueError naming its row and file (the
  message of the training stream's first bad batch), not TF's."""
  try:
    return decode_rows(images, chosen)
  except tf.errors.OpError as e:
    message = files_lib.bad_image_message(images, chosen)
    if message is None:
      raise
    raise ValueError(
        f'{message}, expected a decodable image (found while fingerprinting the data before training; prepare the '
        "data with python -m mtlmatch.data.prepare, which checks every row, or set config.data.on_bad_image='skip')"
    ) from e


def _host_sums(source: Source, tasks, image_shape) -> list[int]:
  examples = load_examples(
      source, tasks, image_shape=image_shape, process_index=jax.process_index(), process_count=jax.process_count()
  )
  stride = max(1, -(-source.num_examples() // IMAGE_SAMPLE))
  sums = [_labels_hash(examples.positions, examples.labels[t]) for t in source.tasks]
  return sums + [_images_hash(examples.positions, examples.images, stride)]


def _sum_over_hosts(sums: list[int]) -> list[int]:
  """Adds every host's sums (mod 2^64), carried as 16-bit limbs in int32 (JAX has no uint64 without x64)."""
  if jax.process_count() == 1:
    return sums
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  limbs = np.array([[(s >> (16 * k)) & 0xFFFF for k in range(4)] for s in sums], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(limbs)).astype(np.int64).sum(axis=0)
  return [sum(int(v) << (16 * k) for k, v in enumerate(row)) & _MASK for row in gathered]


def benchmark_fingerprint(benchmark: Benchmark) -> dict:
  """``{'<group>/<source>': {split, tasks, examples, labels, images}}`` over every source of ``benchmark``."""
  groups = (
      ('train', benchmark.train_sources),
      ('validation', benchmark.validation_sources),
      ('eval', benchmark.eval_sources),
      ('aux', tuple(benchmark.aux_sources.values())),
  )
  entries, sums = [], []
  for group, sources in groups:
    for source in sources:
      entries.append((f'{group}/{source.name}', source))
      sums.append(_host_sums(source, benchmark.tasks, benchmark.image_shape))
  flat = _sum_over_hosts([s for row in sums for s in row])
  out, k = {}, 0
  for (key, source), row in zip(entries, sums):
    values = flat[k : k + len(row)]
    k += len(row)
    out[key] = {
        'split': source.split,
        'tasks': list(source.tasks),
        'examples': source.num_examples(),
        'labels': {t: f'{v:016x}' for t, v in zip(source.tasks, values)},
        'images': f'{values[-1]:016x}',
    }
  return out


def check(saved: Optional[Mapping], current: Mapping, *, where: str) -> None:
  """Refuses ``current`` data when it differs from the ``saved`` fingerprint (None: an older run, not checked)."""
  if saved is None:
    return
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key), current.get(key)
    if old == new:
      continue
    if old is None or new is None:
      what = 'absent when saved' if old is None else 'absent now'
    else:
      fields = [f for f in ('split', 'tasks', 'examples', 'labels', 'images') if old.get(f) != new.get(f)]
      what = '; '.join(f'{f}: saved {old.get(f)}, now {new.get(f)}' for f in fields)
    raise ValueError(
        f'{where} was trained on other data: source {key!r} differs ({what}). Expected the data it was '
        'trained on; resume or evaluate with those, or use a new --workdir for a new run.'
    )
