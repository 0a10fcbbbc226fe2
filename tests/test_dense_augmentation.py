"""Joint augmentation of an image and its dense labels (mtlmatch/data/pipeline.py: LibMTL's scale-crop and flip)
through the real training pipeline, against a numpy reference written here.

Every slot of a batch holds the same 8 × 8 scene, so what differs between slots is the augmentation alone; each
augmented slot must be exactly one of the finitely many outcomes (scale, window, flip) of the reference, the image
and all three labels the same outcome.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf

from mtlmatch import data
from mtlmatch.data import pipeline
from mtlmatch.tasks import TaskSpec, kind_of

H = W = 8
SCALES = (1.0, 1.2, 1.5)  # LibMTL's RandomScaleCrop
SIZE = {'size': (H, W)}
TASKS = {
    'segmentation': TaskSpec('segmentation', 'segmentation', 2 * H * W + 1, options=SIZE),
    'depth': TaskSpec('depth', 'depth', 1, options=SIZE),
    'normal': TaskSpec('normal', 'normals', 3, options=SIZE),
}
SEG_HOLES = [(0, 0), (3, 5)]  # -1: ignore
DEPTH_HOLES = [(7, 7), (4, 1), (2, 2)]  # 0: no depth and no normal (the sensor's holes)


def make_scene():
  """One scene: random image; segmentation 2·(pixel index)+1, so each source pixel is told by its label and the mean
  of any two labels (an interpolation) is even, a value absent from the source; depth 1 + index/16 m; unit normals."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  index = np.arange(H * W).reshape(H, W)
  seg = (2 * index + 1).astype(np.int32)
  depth = (1 + index / 16).astype(np.float32)[..., None]
  normal = rng.normal(size=(H, W, 3))
  normal = (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)
  for r, c in SEG_HOLES:
    seg[r, c] = -1
  for r, c in DEPTH_HOLES:
    depth[r, c] = 0
    normal[r, c] = 0
  return {'image': image, 'segmentation': seg, 'depth': depth, 'normal': normal}


SCENE = make_scene()


def benchmark(n=32, tasks=TASKS):
  labels = {t: np.repeat(SCENE[t][None], n, 0) for t in tasks}
  source = data.array_source('train', np.repeat(SCENE['image'][None], n, 0), labels)
  return data.make_benchmark('aug', tasks, [source])


def reference(scale, top, left, flip):
  """The outcome (scale, window at (top, left), flip) of SCENE, in numpy: the image normalised to [-1, 1] (float64),
  the labels as the pipeline's dtypes."""
  h, w = int(H / scale), int(W / scale)
  rows = top + np.arange(H) * (h - 1) / (H - 1)  # aligned corners: output row y samples this window row
  cols = left + np.arange(W) * (w - 1) / (W - 1)

  def bilinear(x, points, axis):
    low = np.floor(points).astype(int)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    frac = np.expand_dims(points - low, [a for a in range(x.ndim) if a != axis])
    return np.take(x, low, axis) * (1 - frac) + np.take(x, high, axis) * frac

  image = bilinear(bilinear(SCENE['image'].astype(np.float64), rows, 0), cols, 1) / 127.5 - 1
  near_r, near_c = np.floor(rows + 0.5).astype(int), np.floor(cols + 0.5).astype(int)  # nearest, ties up
  out = {'image': image}
  for t in TASKS:
    out[t] = SCENE[t][near_r][:, near_c]
  out['depth'] = out['depth'] / np.float32(scale)  # float32 ÷ float32, as the pipeline computes it
  if flip:
    out = {k: v[:, ::-1].copy() for k, v in out.items()}
    out['normal'][..., 0] = -out['normal'][..., 0]
  return out


OUTCOMES = [
    (s, top, left, flip)
    for s in SCALES
    for top, left in itertools.product(range(H - int(H / s) + 1), range(W - int(W / s) + 1))
    for flip in (False, True)
]


def matches(batch, i, outcome):
  ref = reference(*outcome)
  return np.allclose(batch['image'][i], ref['image'], rtol=0, atol=1e-5) and all(
      np.array_equal(batch['labels'][t][i], ref[t]) for t in TASKS
  )


def test_scale_crop_and_flip_move_the_labels_with_the_image_as_the_reference_says():
  (batch,) = [next(data.train_iterator(benchmark(), global_batch_size=32, seed=0, augment=True))]
  seen = []
  for i in range(32):
    found = [o for o in OUTCOMES if matches(batch, i, o)]
    assert len(found) == 1, (i, found)
    seen.append(found[0])
  assert {o[0] for o in seen} == set(SCALES) and {o[3] for o in seen} == {False, True}
  # A known pixel: at s = 1.5 (5 × 5 windows) the output's corners are the window's corners, after the flip.
  s, top, left, flip = next(o for o in seen if o[0] == 1.5)
  i = seen.index((s, top, left, flip))
  corner = batch['labels']['segmentation'][i][0, -1 if flip else 0]
  assert corner == SCENE['segmentation'][top, left] and batch['labels']['depth'][i][-1, 0 if flip else -1, 0] == (
      np.float32(SCENE['depth'][top + 4, left + 4, 0]) / np.float32(1.5)
  )
  seg = batch['labels']['segmentation']
  assert set(np.unique(seg)) <= set(np.unique(SCENE['segmentation']))  # never a value the source lacks
  # Holes stay holes: the invalid pixels of each output are those whose source pixel is invalid, none new.
  for i, (s, top, left, flip) in enumerate(seen):
    hole = reference(s, top, left, flip)['depth'][..., 0] == 0
    np.testing.assert_array_equal(batch['labels']['depth'][i][..., 0] == 0, hole)
    norms = np.linalg.norm(batch['labels']['normal'][i], axis=-1)
    np.testing.assert_array_equal(norms == 0, hole)
    np.testing.assert_allclose(norms[~hole], 1, rtol=1e-6)  # nearest: unit normals stay unit, none blended


def test_flip_negates_normal_x_exactly_and_is_an_involution():
  labels = {t: tf.constant(np.repeat(SCENE[t][None], 6, 0)) for t in TASKS}
  kinds = {t: kind_of(spec) for t, spec in TASKS.items()}
  images = tf.constant(np.repeat(SCENE['image'][None], 6, 0))
  seed = tf.constant([3, 4], tf.int64)
  once_images, once = pipeline._augment(images, seed, ('flip',), labels=labels, kinds=kinds)
  twice_images, twice = pipeline._augment(once_images, seed, ('flip',), labels=once, kinds=kinds)
  np.testing.assert_array_equal(twice_images.numpy(), images.numpy())
  flipped = set()
  for i in range(6):
    normal = once['normal'][i].numpy()
    if not np.array_equal(normal, SCENE['normal']):
      flipped.add(i)
      np.testing.assert_array_equal(normal[..., 0], -SCENE['normal'][:, ::-1, 0])
      np.testing.assert_array_equal(normal[..., 1:], SCENE['normal'][:, ::-1, 1:])
      np.testing.assert_array_equal(once['segmentation'][i].numpy(), SCENE['segmentation'][:, ::-1])
      assert np.all(normal[np.all(SCENE['normal'][:, ::-1] == 0, -1)] == 0)  # holes stay 0-vectors
    for t in TASKS:
      np.testing.assert_array_equal(twice[t][i].numpy(), SCENE[t])
  assert 0 < len(flipped) < 6


def test_augmentation_is_a_function_of_seed_and_step_and_hosts_make_slots_of_the_global_batch():
  bench = benchmark(n=16)
  kwargs = dict(global_batch_size=16, seed=2, augment=('flip', 'scale_crop'))
  run = [next(it) for it in [data.train_iterator(bench, **kwargs)] for _ in range(3)]
  again = next(data.train_iterator(bench, **kwargs, start_step=1))
  for key in ('image', 'labels'):
    jax.tree.map(np.testing.assert_array_equal, again[key], run[1][key])
  # Every slot holds the same scene: batches differ only by their draws, which change with the step and the seed.
  assert not np.array_equal(run[0]['labels']['segmentation'], run[1]['labels']['segmentation'])
  other = next(data.train_iterator(bench, **{**kwargs, 'seed': 3}))
  assert not np.array_equal(other['labels']['segmentation'], run[0]['labels']['segmentation'])
  hosts = [data.train_iterator(bench, **kwargs, process_index=h, process_count=2) for h in (0, 1)]
  for step in range(3):
    joined = jax.tree.map(lambda *x: np.concatenate(x), *[next(it) for it in hosts])
    for key in ('image', 'labels'):
      jax.tree.map(np.testing.assert_array_equal, joined[key], run[step][key])


def test_augmentations_that_do_not_apply_to_dense_labels_are_refused():
  bench = benchmark(n=4)
  with pytest.raises(ValueError, match=r"augment: got \('flip', 'crop'\) with the dense tasks \['segmentation', "):
    data.train_iterator(bench, global_batch_size=4, seed=0, augment=('flip', 'crop'))
  with pytest.raises(ValueError, match=r"augment: got 'rotate', expected a bool or a subset of \('flip', 'crop', "):
    data.train_iterator(bench, global_batch_size=4, seed=0, augment='rotate')
  small = {'depth': TaskSpec('depth', 'depth', 1, options={'size': (4, 4)})}
  source = data.array_source('train', np.zeros((4, H, W, 3), np.uint8), {'depth': np.ones((4, 4, 4, 1))})
  with pytest.raises(ValueError, match=r"dense task 'depth' at size \(4, 4\), expected the image size \(8, 8\)"):
    data.train_iterator(data.make_benchmark('s', small, [source]), global_batch_size=4, seed=0, augment=True)
