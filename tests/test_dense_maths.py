"""Dense-task losses and metrics (mtlmatch/losses/dense.py, mtlmatch/metrics_dense.py) against independent numpy
references in float64: values with ignored / invalid pixels (NaN and inf in invalid targets), an image without a
valid pixel, gradients (finite everywhere, central finite differences), metrics accumulated over batches with a
padded example equal to the metric of the concatenated set (and not to the mean of per-batch metrics), the median's
bound, and jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlmatch import metrics_dense as md
from mtlmatch.losses import dense
from mtlmatch.losses.classification import masked_mean
from mtlmatch.metrics import accumulate
from mtlmatch.tasks import TaskSpec

B, H, W, C = 2, 5, 6, 4
SEG = TaskSpec('seg', 'multiclass', C)
DEPTH = TaskSpec('depth', 'regression', 1)
NORMALS = TaskSpec('normal', 'regression', 3)


# --- data: every batch has invalid pixels of every sort and its last image has none valid -----------------------


def seg_batch(rng, b=B):
  logits = rng.normal(size=(b, H, W, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, size=(b, H, W))
  labels[rng.random((b, H, W)) < 0.3] = -1
  labels[-1] = -1
  return logits, labels


def depth_batch(rng, b=B):
  x = rng.uniform(0.5, 5, size=(b, H, W, 1)).astype(np.float32)
  y = rng.uniform(0.5, 5, size=(b, H, W, 1)).astype(np.float32)
  u = rng.random((b, H, W, 1))
  y[u < 0.15] = 0.0
  y[(u >= 0.15) & (u < 0.25)] = np.nan
  y[(u >= 0.25) & (u < 0.3)] = np.inf
  y[-1] = 0.0
  return x, y


def unit_vectors(rng, shape):
  v = rng.normal(size=shape + (3,))
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def normals_batch(rng, b=B):
  y = unit_vectors(rng, (b, H, W))
  x = 0.6 * y + rng.normal(size=y.shape) * 0.4  # angles spread over ~0..90°, not unit
  x *= rng.uniform(0.5, 3, size=x.shape[:-1] + (1,))
  x[0, 0, 0] = 0.0  # a zero prediction at a valid pixel
  u = rng.random((b, H, W))
  y[u < 0.15] = 0.0
  y[(u >= 0.15) & (u < 0.25)] = np.nan
  y[(u >= 0.25) & (u < 0.3), 1] = np.inf
  y[0, 0, 0] = unit_vectors(rng, ())
  y[-1] = 0.0
  return x.astype(np.float32), y.astype(np.float32)


# --- numpy references (float64, written from the definitions) -----------------------------------------------------


def ref_seg_valid(labels):
  return (labels >= 0) & (labels < C)


def ref_xent(logits, labels):
  logits, out = logits.astype(np.float64), np.zeros(labels.shape)
  for idx in np.ndindex(labels.shape):
    if ref_seg_valid(labels[idx]):
      z = logits[idx]
      out[idx] = np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[labels[idx]]
  return out


def ref_depth_valid(y):
  return np.isfinite(y[..., 0]) & (y[..., 0] != 0)


def ref_normal_valid(y):
  finite = np.all(np.isfinite(y), -1)
  return finite & (np.linalg.norm(np.where(finite[..., None], y, 0), axis=-1) > 0)


def ref_cosine(x, y):
  """cos(x̂, ŷ) per pixel in float64, 0 where x = 0 (x̂ = 0), NaN-free only where the target is valid."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(nx > 0, np.sum(x * y, -1) / np.where(nx > 0, nx, 1) / ny, 0.0)


def ref_loss(kind, x, y):
  """The mean over valid pixels of the per-pixel loss (LibMTL's Σ loss·mask / num_valid), float64."""
  if kind == 'seg':
    valid, per_pixel = ref_seg_valid(y), ref_xent(x, y)
  elif kind == 'depth':
    valid = ref_depth_valid(y)
    per_pixel = np.where(valid, np.abs(x.astype(np.float64) - np.where(valid[..., None], y, 0))[..., 0], 0)
  else:
    valid = ref_normal_valid(y)
    per_pixel = np.where(valid, 1 - ref_cosine(x, np.where(valid[..., None], y, 1)), 0)
  return per_pixel[valid].sum() / max(valid.sum(), 1), per_pixel, valid


LOSSES = {'seg': dense.pixel_softmax_xent, 'depth': dense.depth_l1, 'normals': dense.normal_cosine}
BATCHES = {'seg': seg_batch, 'depth': depth_batch, 'normals': normals_batch}


# --- losses --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', sorted(LOSSES))
def test_loss_matches_numpy_and_an_image_without_labels_contributes_nothing(kind):
  x, y = BATCHES[kind](np.random.default_rng(0))
  per_pixel, weight = LOSSES[kind](x, y)
  want, want_per_pixel, valid = ref_loss(kind, x, y)
  assert per_pixel.shape == weight.shape == (B, H, W)
  assert np.all(np.isfinite(per_pixel))
  np.testing.assert_array_equal(np.asarray(weight), valid.astype(np.float32))
  np.testing.assert_allclose(per_pixel, want_per_pixel, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(per_pixel)[~valid] == 0)
  loss = masked_mean(per_pixel, weight)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert not valid[-1].any()  # the last image has no label: the loss is the first image's alone
  np.testing.assert_allclose(float(masked_mean(*LOSSES[kind](x[:1], y[:1]))), float(loss), rtol=1e-6)


def test_normal_cosine_of_aligned_opposite_and_zero_predictions():
  y = np.zeros((1, 1, 4, 3), np.float32)
  y[..., 2] = 1
  x = np.array([[[[0, 0, 5], [0, 0, -0.1], [3, 0, 0], [0, 0, 0]]]], np.float32)
  per_pixel, weight = dense.normal_cosine(x, y)
  np.testing.assert_allclose(np.asarray(per_pixel).ravel(), [0, 2, 1, 1], atol=1e-6)
  assert np.asarray(weight).ravel().tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize('kind', sorted(LOSSES))
def test_loss_gradient_is_finite_zero_on_invalid_pixels_and_matches_finite_differences(kind):
  rng = np.random.default_rng(1)
  x, y = BATCHES[kind](rng)
  _, _, valid = ref_loss(kind, x, y)
  x = x.copy()
  x[~valid] = np.nan  # garbage predictions where there is no target: no NaN may leak
  grad = np.asarray(jax.jit(jax.grad(lambda v: masked_mean(*LOSSES[kind](v, y))))(jnp.asarray(x)))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~valid] == 0)
  assert np.abs(grad[valid]).max() > 0
  step = 1e-6
  smooth = np.broadcast_to(valid[..., None], x.shape).copy()
  smooth[0, 0, 0] = False  # normals: the zero prediction there, where x / ‖x‖ is not differentiable
  for flat in rng.choice(np.flatnonzero(smooth), size=5, replace=False):
    idx = np.unravel_index(flat, x.shape)
    plus, minus = x.astype(np.float64), x.astype(np.float64)
    plus[idx] += step
    minus[idx] -= step
    numeric = (ref_loss(kind, plus, y)[0] - ref_loss(kind, minus, y)[0]) / (2 * step)
    np.testing.assert_allclose(grad[idx], numeric, rtol=2e-3, atol=1e-6, err_msg=f'{kind} {idx}')


def test_normal_cosine_has_zero_gradient_at_a_zero_prediction_and_the_true_one_above_eps():
  # x = 0 has no direction: loss 1, gradient 0 (torch's x / max(‖x‖, eps) gives −ŷ / eps = 1e12 there, which set the
  # direction of whole clipped updates). Just above eps the gradient is the cosine's own: −(ŷ − (x̂·ŷ) x̂) / ‖x‖.
  y = np.zeros((1, 1, 1, 3), np.float32)
  y[..., 0] = 1
  for eps in (dense.NORMAL_EPS, 1e-3):

    def loss(v, eps=eps):
      return masked_mean(*dense.normal_cosine(v, y, eps=eps))

    grad = jax.jit(jax.grad(loss))(jnp.zeros((1, 1, 1, 3)))
    np.testing.assert_array_equal(np.asarray(grad).ravel(), [0, 0, 0])
    assert float(loss(jnp.zeros((1, 1, 1, 3)))) == 1.0
  x = np.array([0.0, 2e-3, 0.0])  # ‖x‖ = 2e-3 > eps = 1e-3
  grad = jax.grad(lambda v: masked_mean(*dense.normal_cosine(v, y, eps=1e-3)))(jnp.asarray(x.reshape(1, 1, 1, 3)))
  x_hat, y_hat = x / np.linalg.norm(x), np.array([1.0, 0.0, 0.0])
  expected = -(y_hat - (x_hat @ y_hat) * x_hat) / np.linalg.norm(x)
  np.testing.assert_allclose(np.asarray(grad).ravel(), expected, rtol=1e-5)
  with pytest.raises(ValueError, match='eps: got 0, expected a number > 0'):
    dense.normal_cosine(np.ones((1, 1, 1, 3)), y, eps=0)


def test_losses_are_jittable_and_weigh_out_of_range_labels_zero_under_jit():
  logits, labels = seg_batch(np.random.default_rng(2))
  bad = labels.copy()
  bad[0, 0, :3] = [C, 255, -7]
  kept = bad.copy()
  kept[0, 0, :3] = -1
  per_pixel, weight = jax.jit(dense.pixel_softmax_xent)(logits, bad)
  want, want_weight = dense.pixel_softmax_xent(logits, kept)
  np.testing.assert_allclose(per_pixel, want, rtol=1e-6)
  np.testing.assert_array_equal(weight, want_weight)
  for fn, kind in ((dense.depth_l1, 'depth'), (dense.normal_cosine, 'normals')):
    x, y = BATCHES[kind](np.random.default_rng(3))
    np.testing.assert_allclose(jax.jit(fn)(x, y)[0], fn(x, y)[0], rtol=1e-5, atol=1e-6)


def test_losses_refuse_bad_shapes_dtypes_and_labels_naming_the_argument():
  logits, labels = seg_batch(np.random.default_rng(4))
  with pytest.raises(ValueError, match=r'labels: got value 4, expected values in \[-1, 4\)'):
    dense.pixel_softmax_xent(logits, np.where(labels == 1, C, labels))
  with pytest.raises(ValueError, match=r'labels: got shape \(2, 6, 5\), expected \(2, 5, 6\)'):
    dense.pixel_softmax_xent(logits, labels.transpose(0, 2, 1))
  with pytest.raises(ValueError, match='labels: got dtype float32, expected integer labels'):
    dense.pixel_softmax_xent(logits, labels.astype(np.float32))
  x, y = depth_batch(np.random.default_rng(4))
  with pytest.raises(ValueError, match=r'predictions: got shape \(2, 5, 6, 3\), expected \[B, H, W, 1\]'):
    dense.depth_l1(np.repeat(x, 3, -1), np.repeat(y, 3, -1))
  with pytest.raises(ValueError, match=r'targets: got shape \(2, 5, 6\), expected \(2, 5, 6, 1\)'):
    dense.depth_l1(x, y[..., 0])
  with pytest.raises(ValueError, match=r'predictions: got shape \(2, 5, 6, 1\), expected \[B, H, W, 3\]'):
    dense.normal_cosine(x, y)


# --- metrics: references ---------------------------------------------------------------------------------------------


def ref_seg_metrics(logits, labels):
  valid = ref_seg_valid(labels)
  pred = np.argmax(logits, -1)
  confusion = np.zeros((C, C), np.int64)
  for t, p in zip(labels[valid], pred[valid]):
    confusion[t, p] += 1
  iou = {}
  for k in range(C):
    tp = confusion[k, k]
    union = confusion[k].sum() + confusion[:, k].sum() - tp
    iou[k] = tp / union if union else np.nan
  defined = [v for v in iou.values() if not np.isnan(v)]
  return {
      'miou': np.mean(defined),
      'pixel_accuracy': np.trace(confusion) / confusion.sum(),
      'count': int(valid.any(axis=(1, 2)).sum()),
      **{f'iou_{k}': v for k, v in iou.items()},
  }


def ref_depth_metrics(x, y):
  valid = ref_depth_valid(y)
  xv, yv = x[..., 0][valid].astype(np.float64), y[..., 0][valid].astype(np.float64)
  return {
      'abs_err': np.mean(np.abs(xv - yv)),
      'rel_err': np.mean(np.abs(xv - yv) / yv),
      'count': int(valid.any(axis=(1, 2)).sum()),
  }


def ref_angles(x, y):
  valid = ref_normal_valid(y)
  cosine = ref_cosine(x, np.where(valid[..., None], y, 1))
  return np.degrees(np.arccos(np.clip(cosine[valid], -1, 1))), valid


def ref_normal_metrics(x, y):
  theta, valid = ref_angles(x, y)
  return {
      'mean_angle': theta.mean(),
      'median_angle': np.median(theta),
      **{f'within_{t:g}': np.mean(theta < t) for t in md.NORMAL_THRESHOLDS},
      'count': int(valid.any(axis=(1, 2)).sum()),
  }


KINDS = {
    'seg': (SEG, seg_batch, md.segmentation_statistics, md.segmentation_zero_statistics, md.segmentation_finalize),
    'depth': (DEPTH, depth_batch, md.depth_statistics, md.depth_zero_statistics, md.depth_finalize),
    'normals': (NORMALS, normals_batch, md.normals_statistics, md.normals_zero_statistics, md.normals_finalize),
}
REFERENCES = {'seg': ref_seg_metrics, 'depth': ref_depth_metrics, 'normals': ref_normal_metrics}
# The median is off by at most half a bin (histogram_median), plus the float32 rounding of the angles.
MEDIAN_TOL = md.ANGLE_BIN_WIDTH / 2 + 1e-4


def assert_metrics_close(got, want, *, median_tol=MEDIAN_TOL):
  assert set(got) == set(want), (sorted(got), sorted(want))
  for key, value in want.items():
    if key == 'count':
      assert got[key] == value
    elif key == 'median_angle':
      assert abs(got[key] - value) <= median_tol, (got[key], value)
    else:
      np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


# --- metrics ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_metrics_accumulated_over_batches_with_padding_equal_the_metric_of_the_concatenated_set(kind):
  task, batch, statistics, zero, finalize = KINDS[kind]
  rng = np.random.default_rng(5)
  batches = [batch(rng, b) for b in (2, 3, 3)]
  x, y = batches[-1]
  x, y = x.copy(), y.copy()
  real = batch(rng, 2)
  x[-1], y[-1] = real[0][0], real[1][0]  # the padded example: valid targets, masked out below
  batches[-1] = (x, y)
  masks = [None, np.ones(3), np.array([1, 1, 0])]
  jitted = jax.jit(functools.partial(statistics, task))
  total = zero(task)
  for (x, y), mask in zip(batches, masks):
    stats = jitted(x, y, mask) if mask is not None else jitted(x, y)
    assert all(v.dtype in (jnp.int32, jnp.float32) for v in jax.tree.leaves(stats))
    total = accumulate(total, jax.device_get(stats))
  assert all(v.dtype in (np.int64, np.float64) for v in jax.tree.leaves(total))
  real_x = np.concatenate([b[0] for b in batches])[:-1]  # drops the padded example
  real_y = np.concatenate([b[1] for b in batches])[:-1]
  want = REFERENCES[kind](real_x, real_y)
  got = finalize(task, total)
  assert_metrics_close(got, want)
  assert all(np.isfinite(v) for v in got.values())
  # The padded example would have changed the metrics (it has valid pixels).
  padded = REFERENCES[kind](np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
  main = {'seg': 'pixel_accuracy', 'depth': 'abs_err', 'normals': 'mean_angle'}[kind]
  assert padded['count'] == want['count'] + 1 and abs(padded[main] - want[main]) > 1e-4


def _merged_and_per_batch(kind, batches):
  task, _, statistics, zero, finalize = KINDS[kind]
  jitted = jax.jit(functools.partial(statistics, task))
  per_batch = [jax.device_get(jitted(x, y)) for x, y in batches]
  total = functools.reduce(accumulate, per_batch, zero(task))
  return finalize(task, total), [finalize(task, s) for s in per_batch]


def test_metrics_of_the_set_are_not_the_mean_of_per_batch_metrics():
  # Segmentation: batch 1 has one pixel of class 0, right; batch 2 nine pixels of class 1, predicted 0.
  logits = np.zeros((1, 1, 10, C), np.float32)
  labels = np.full((1, 1, 10), -1)
  labels[0, 0, 0] = 0
  labels2 = np.full((1, 1, 10), -1)
  labels2[0, 0, 1:] = 1
  seg = [(logits, labels), (logits, labels2)]
  merged, per_batch = _merged_and_per_batch('seg', seg)
  assert merged['pixel_accuracy'] == pytest.approx(0.1)  # 1 of 10 pixels
  assert merged['miou'] == pytest.approx(0.05)  # IoU_0 = 1 / 10, IoU_1 = 0
  assert np.mean([m['pixel_accuracy'] for m in per_batch]) == pytest.approx(0.5)
  assert np.mean([m['miou'] for m in per_batch]) == pytest.approx(0.5)
  assert_metrics_close(merged, ref_seg_metrics(np.concatenate([logits] * 2), np.concatenate([labels, labels2])))
  # Depth: one valid pixel off by 10, then nine exact ones.
  x = np.ones((1, 1, 10, 1), np.float32)
  y1, y2 = np.zeros_like(x), np.ones_like(x)
  y1[0, 0, 0] = 11
  y2[0, 0, 0] = 0
  merged, per_batch = _merged_and_per_batch('depth', [(x, y1), (x, y2)])
  assert merged['abs_err'] == pytest.approx(1.0) and np.mean([m['abs_err'] for m in per_batch]) == pytest.approx(5)

  # Normals: angles {10°} then {50°, 50°, 50°}: the set's median is 50°, the mean of the medians 30°.
  def rotated(deg, n):
    t = np.radians(deg)
    x = np.tile(np.array([np.sin(t), 0, np.cos(t)], np.float32), (1, 1, n, 1))
    return x, np.tile(np.array([0, 0, 1], np.float32), (1, 1, n, 1))

  merged, per_batch = _merged_and_per_batch('normals', [rotated(10, 1), rotated(50, 3)])
  assert abs(merged['median_angle'] - 50) <= MEDIAN_TOL
  assert merged['mean_angle'] == pytest.approx(40, rel=1e-5)
  assert np.mean([m['median_angle'] for m in per_batch]) == pytest.approx(30, abs=0.01)


def test_normals_within_counts_are_exact_and_the_test_data_keep_clear_of_the_thresholds():
  x, y = normals_batch(np.random.default_rng(6), 4)
  theta, _ = ref_angles(x, y)
  assert np.min(np.abs(theta[:, None] - np.asarray(md.NORMAL_THRESHOLDS))) > 1e-3  # no float32 tie possible
  stats = jax.device_get(jax.jit(functools.partial(md.normals_statistics, NORMALS))(x, y))
  assert stats['within'].tolist() == [int(np.sum(theta < t)) for t in md.NORMAL_THRESHOLDS]
  assert int(stats['n']) == theta.size == int(stats['histogram'].sum())
  assert all(0 < int(c) < theta.size for c in stats['within'])  # the thresholds split the data


@pytest.mark.parametrize(
    'values',
    [
        [1.0, 100.0],  # even n, the two middle values far apart: the n/2-crossing bin alone would be 49.5° off
        [37.123],
        [0.0, 180.0, 180.0],
        list(np.random.default_rng(7).uniform(0, 180, 1001)),
        list(np.random.default_rng(8).exponential(8, 2000)),
        [5.0] * 7 + [5.004] * 6,
    ],
)
def test_histogram_median_is_within_half_a_bin_of_the_exact_median(values):
  values = np.clip(np.asarray(values, np.float64), 0, 180)
  bins = np.clip(np.floor(values / md.ANGLE_BIN_WIDTH), 0, md.ANGLE_BINS - 1).astype(int)
  histogram = np.bincount(bins, minlength=md.ANGLE_BINS)
  assert abs(md.histogram_median(histogram) - np.median(values)) <= md.ANGLE_BIN_WIDTH / 2 + 1e-12


def test_median_of_many_pixels_is_within_the_bound_of_numpys_median():
  rng = np.random.default_rng(9)
  x, y = normals_batch(rng, 8)
  theta, _ = ref_angles(x, y)
  got = md.normals_finalize(NORMALS, jax.device_get(jax.jit(functools.partial(md.normals_statistics, NORMALS))(x, y)))
  assert abs(got['median_angle'] - np.median(theta)) <= MEDIAN_TOL


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_zero_statistics_are_the_identity_and_an_empty_set_gives_nan(kind):
  task, batch, statistics, zero, finalize = KINDS[kind]
  x, y = batch(np.random.default_rng(10))
  jitted = jax.jit(functools.partial(statistics, task))
  stats = jax.device_get(jitted(x, y))
  np.testing.assert_equal(finalize(task, accumulate(zero(task), stats)), finalize(task, stats))
  assert jax.tree.structure(zero(task)) == jax.tree.structure(stats)
  empty = finalize(task, zero(task))
  assert empty['count'] == 0
  assert all(np.isnan(v) for k, v in empty.items() if k != 'count')
  nothing_valid = jax.device_get(jitted(x, y, np.zeros(B)))
  assert finalize(task, nothing_valid).keys() == empty.keys() and finalize(task, nothing_valid)['count'] == 0


def test_metric_names_directions_and_refusals():
  logits, labels = seg_batch(np.random.default_rng(11))
  named = TaskSpec('seg', 'multiclass', C, ('floor', 'wall', 'table', 'chair'))
  keys = md.segmentation_finalize(named, jax.device_get(md.segmentation_statistics(named, logits, labels)))
  assert set(keys) == {'miou', 'pixel_accuracy', 'count', 'iou_floor', 'iou_wall', 'iou_table', 'iou_chair'}
  normals = md.normals_finalize(NORMALS, md.normals_zero_statistics(NORMALS))
  assert set(normals) == {'mean_angle', 'median_angle', 'within_11.25', 'within_22.5', 'within_30', 'count'}
  assert md.DEPTH_LOWER_IS_BETTER == ('abs_err', 'rel_err')
  assert md.NORMALS_LOWER_IS_BETTER == ('mean_angle', 'median_angle')
  assert md.SEGMENTATION_LOWER_IS_BETTER == ()
  with pytest.raises(ValueError, match=r"logits of task 'seg': got shape \(2, 5, 6, 3\), expected \[B, H, W, 4\]"):
    md.segmentation_statistics(SEG, logits[..., :3], labels)
  with pytest.raises(ValueError, match=r'mask: got shape \(3,\), expected \[2\]'):
    md.segmentation_statistics(SEG, logits, labels, np.ones(3))
  x, y = depth_batch(np.random.default_rng(11))
  with pytest.raises(ValueError, match=r"targets of task 'depth': got shape \(2, 5, 6, 2\)"):
    md.depth_statistics(DEPTH, x, np.repeat(y, 2, -1))
  with pytest.raises(ValueError, match=r"stats of task 'normal': got keys \['abs_err', 'count', 'n', 'rel_err'\]"):
    md.normals_finalize(NORMALS, md.depth_zero_statistics(DEPTH))
