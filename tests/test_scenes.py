"""The generated indoor scenes (mtlmatch.data.scenes) and the NYUv2 / LibMTL file layout (mtlmatch.data.nyuv2_layout):
determinism, shapes, classes, sensor holes, the geometry against the scene parameters, and the layout's round trip
and validation errors. Numpy only; nothing is downloaded."""

import os

import numpy as np
import pytest

from mtlmatch.data import nyuv2_layout, scenes

KEYS = ('image', 'segmentation', 'depth', 'normal')


@pytest.fixture(scope='module')
def batch():
  params = scenes.sample_rooms(0, 'train', 64)
  return params, scenes.render(params, 32, 32)


def _valid(arrays):
  return arrays['depth'][..., 0] > 0


def _world_points(params, depth, height, width):
  """World coordinates [n, H, W, 3] of each pixel's hit, from its depth (the ray scaled to z = 1 times depth)."""
  rays = scenes.camera_rays(height, width).astype(np.float64)
  cam = rays[None] * depth.astype(np.float64)
  return np.einsum('nij,nhwj->nhwi', params['rotation'], cam) + params['position'][:, None, None, :]


def test_same_arguments_give_identical_arrays_and_others_differ():
  a, b = scenes.generate_scenes(3, 'val', 6), scenes.generate_scenes(3, 'val', 6)
  for key in KEYS:
    assert a[key].tobytes() == b[key].tobytes(), key
  prefix = scenes.generate_scenes(3, 'val', 2)  # example i depends on (seed, split, i) only
  for key in KEYS:
    np.testing.assert_array_equal(prefix[key], a[key][:2])
  for other in (scenes.generate_scenes(4, 'val', 6), scenes.generate_scenes(3, 'test', 6)):
    assert not np.array_equal(other['image'], a['image'])
    assert not np.array_equal(other['depth'], a['depth'])
  custom = scenes.generate_scenes(3, 'extra_split', 2)  # any other name: a stable id of its own
  assert not np.array_equal(custom['image'], a['image'][:2])
  assert scenes.split_id('extra_split') == scenes.split_id('extra_split') >= 1000


@pytest.mark.parametrize('height,width', [(32, 32), (48, 64)])
def test_shapes_and_dtypes(height, width):
  out = scenes.generate_scenes(1, 'train', 3, height, width)
  assert set(out) == set(KEYS)
  expected = {
      'image': ((3, height, width, 3), np.uint8),
      'segmentation': ((3, height, width), np.int32),
      'depth': ((3, height, width, 1), np.float32),
      'normal': ((3, height, width, 3), np.float32),
  }
  for key, (shape, dtype) in expected.items():
    assert out[key].shape == shape and out[key].dtype == dtype, key
  assert out['image'].std() > 10  # shaded and textured, not flat


def test_classes_floor_and_wall_in_most_images_objects_across_the_batch(batch):
  _, out = batch
  seg = out['segmentation']
  assert set(np.unique(seg)) <= set(range(-1, len(scenes.CLASSES)))
  for c in (scenes.FLOOR, scenes.WALL):
    assert np.mean([(s == c).any() for s in seg]) >= 0.9, scenes.CLASSES[c]
  for c in scenes.OBJECT_KINDS:
    assert (seg == c).sum() > 50, scenes.CLASSES[c]
  assert np.mean([np.isin(s, scenes.OBJECT_KINDS).any() for s in seg]) >= 0.8
  ignored = np.mean(seg == scenes.IGNORE)
  assert 0 < ignored < 0.05


def test_depth_and_normals_valid_or_zero_together(batch):
  _, out = batch
  depth, normal, valid = out['depth'][..., 0], out['normal'], _valid(out)
  assert np.all(np.isfinite(depth)) and np.all(np.isfinite(normal))
  assert np.all(depth >= 0) and np.all(depth[valid] <= scenes.MAX_RANGE)
  assert 0.85 < valid.mean() < 0.999  # a few holes, mostly valid
  norm = np.linalg.norm(normal, axis=-1)
  np.testing.assert_allclose(norm[valid], 1, atol=1e-5)
  assert np.all(normal[~valid] == 0)
  assert np.mean(out['segmentation'][~valid] >= 0) > 0.9  # the segmentation stays valid in the depth holes
  # Normals face the camera: the ray to the pixel and the normal point against each other.
  rays = scenes.camera_rays(32, 32)
  assert np.all(np.sum(normal * rays, -1)[valid] < 0)


def test_floor_normal_is_up_and_its_depth_grows_toward_the_horizon(batch):
  params, out = batch
  floor = (out['segmentation'] == scenes.FLOOR) & _valid(out)
  up_camera = np.einsum('nji,j->ni', params['rotation'], [0.0, 1.0, 0.0])  # R^T (0, 1, 0): world up, camera axes
  expected = np.broadcast_to(up_camera[:, None, None, :], out['normal'].shape)
  np.testing.assert_allclose(out['normal'][floor], expected[floor], atol=1e-5)
  assert np.all(out['normal'][floor][:, 1] < -0.9)  # y is down in camera coordinates: the floor's normal is -y
  assert np.all(out['normal'][floor][:, 0] == 0)  # no roll
  # The analytic depth of a floor pixel: the camera height over the ray's downward component (ray at z = 1).
  rays = scenes.camera_rays(32, 32).astype(np.float64)
  down = -np.einsum('nj,hwj->nhw', up_camera, rays)
  analytic = params['position'][:, 1, None, None] / down
  np.testing.assert_allclose(out['depth'][..., 0][floor], analytic[floor], rtol=1e-4)
  # Along each column, floor depth increases toward the top of the image (the horizon).
  depth = np.where(floor, out['depth'][..., 0], np.nan)
  for img in depth:
    for col in img.T:
      values = col[~np.isnan(col)][::-1]  # bottom to top
      assert np.all(np.diff(values) > 0)


def test_sphere_pixels_have_the_analytic_normal_from_the_sphere_centre(batch):
  params, out = batch
  points = _world_points(params, out['depth'], 32, 32)
  checked = 0
  for i in range(len(points)):
    mask = (out['segmentation'][i] == scenes.SPHERE) & _valid(out)[i]
    slots = np.nonzero(params['object_kind'][i] == scenes.SPHERE)[0]
    if not mask.any():
      continue
    p = points[i][mask]  # [k, 3]
    centres, radii = params['object_centre'][i, slots], params['object_size'][i, slots, 0]
    gap = np.abs(np.linalg.norm(p[:, None, :] - centres[None], axis=-1) - radii[None])  # [k, spheres]
    nearest = np.argmin(gap, axis=1)
    assert np.all(gap[np.arange(len(p)), nearest] < 1e-3)  # the point lies on a sphere
    world = (p - centres[nearest]) / radii[nearest, None]
    expected = world @ params['rotation'][i]  # R^T n: camera coordinates
    np.testing.assert_allclose(out['normal'][i][mask], expected, atol=2e-3)
    checked += len(p)
  assert checked > 50


def test_a_larger_size_renders_the_same_scene():
  params = scenes.sample_rooms(5, 'train', 4)
  low, high = scenes.render(params, 32, 32), scenes.render(params, 96, 96)
  # 96 = 3 × 32: the centre of low-resolution pixel (r, c) is the centre of high-resolution pixel (3r + 1, 3c + 1).
  assert np.mean(low['segmentation'] == high['segmentation'][:, 1::3, 1::3]) > 0.99
  both = _valid(low) & (high['depth'][:, 1::3, 1::3, 0] > 0)
  np.testing.assert_allclose(low['depth'][both], high['depth'][:, 1::3, 1::3][both], rtol=1e-4)


def test_rendering_in_chunks_and_empty_batches(monkeypatch):
  params = scenes.sample_rooms(6, 'val', 5)
  whole = scenes.render(params, 32, 32)
  monkeypatch.setattr(scenes, '_CHUNK_RAYS', 2 * 32 * 32)  # chunks of 2 images: the same bits
  chunked = scenes.render(params, 32, 32)
  for key in KEYS:
    assert whole[key].tobytes() == chunked[key].tobytes(), key
  empty = scenes.generate_scenes(0, 'train', 0, 16, 24)
  assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
      k: ((0,) + v.shape[1:], v.dtype) for k, v in scenes.generate_scenes(0, 'train', 1, 16, 24).items()
  }


@pytest.mark.parametrize(
    'kwargs,name',
    [
        (dict(seed=-1), 'seed'),
        (dict(seed=1.5), 'seed'),
        (dict(split=''), 'split'),
        (dict(split=None), 'split'),
        (dict(n=-1), 'n'),
        (dict(height=4), 'height'),
        (dict(width=True), 'width'),
        (dict(width=4096), 'width'),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
  args = dict(seed=0, split='train', n=2, height=16, width=16) | kwargs
  with pytest.raises(ValueError, match=f'^{name}: '):
    scenes.generate_scenes(**args)


# ----------------------------------------------------------------------------------------------------------------
# The NYUv2 / LibMTL layout.


@pytest.fixture(scope='module')
def small():
  return scenes.generate_scenes(2, 'train', 5, 16, 24)


def test_layout_round_trip(tmp_path, small):
  split_dir = nyuv2_layout.write_layout(str(tmp_path), 'train', small)
  for folder in ('image', 'label', 'depth', 'normal'):
    assert sorted(os.listdir(os.path.join(split_dir, folder))) == [f'{i}.npy' for i in range(5)]
  image = np.load(os.path.join(split_dir, 'image', '0.npy'))
  label = np.load(os.path.join(split_dir, 'label', '0.npy'))
  assert image.dtype == np.float32 and image.shape == (16, 24, 3) and 0 <= image.min() and image.max() <= 1
  assert label.dtype == np.float32 and label.shape == (16, 24)
  assert np.load(os.path.join(split_dir, 'depth', '0.npy')).shape == (16, 24, 1)
  back = nyuv2_layout.read_layout(str(tmp_path), 'train', num_classes=len(scenes.CLASSES))
  assert set(back) == set(KEYS)
  for key in KEYS:
    assert back[key].dtype == small[key].dtype and not np.isnan(back[key].astype(np.float64)).any(), key
    np.testing.assert_array_equal(back[key], small[key], err_msg=key)


def test_layout_without_normals_like_cityscapes_and_images_in_bytes(tmp_path, small):
  nyuv2_layout.write_layout(str(tmp_path), 'val', small, tasks=('segmentation', 'depth'))
  back = nyuv2_layout.read_layout(str(tmp_path), 'val')
  assert set(back) == {'image', 'segmentation', 'depth'}
  for i in range(5):  # images stored as uint8, and as floats in [0, 255], read the same
    np.save(tmp_path / 'val' / 'image' / f'{i}.npy', small['image'][i] if i % 2 else small['image'][i] * 1.0)
  np.testing.assert_array_equal(
      nyuv2_layout.read_layout(str(tmp_path), 'val', image_range='byte')['image'], small['image']
  )
  with pytest.raises(ValueError, match='already holds'):
    nyuv2_layout.write_layout(str(tmp_path), 'val', small)
  fewer = {key: small[key][:2] for key in ('image', 'depth')}
  nyuv2_layout.write_layout(str(tmp_path), 'val', fewer, tasks=('depth',), overwrite=True)
  assert sorted(os.listdir(tmp_path / 'val')) == ['depth', 'image']  # stale files and the emptied label/ removed
  back = nyuv2_layout.read_layout(str(tmp_path), 'val')
  assert set(back) == {'image', 'depth'} and back['image'].shape[0] == 2


def _corrupt(split_dir, case, small):
  """Changes one file of a written layout; returns the path that the error must name."""
  p = lambda folder, i: os.path.join(split_dir, folder, f'{i}.npy')
  if case == 'gap':
    for folder in ('image', 'label', 'depth', 'normal'):
      os.remove(p(folder, 2))
    return p('image', 2)
  if case == 'missing_last':
    os.remove(p('depth', 4))
    return p('depth', 4)
  if case == 'extra':
    np.save(p('normal', 5), small['normal'][0])
    return p('normal', 5)
  if case == 'bad_name':
    np.save(os.path.join(split_dir, 'label', '01.npy'), small['segmentation'][0].astype(np.float32))
    return os.path.join(split_dir, 'label', '01.npy')
  if case == 'shape':
    np.save(p('depth', 1), small['depth'][1][..., 0])
    return p('depth', 1)
  if case == 'image_shape':
    np.save(p('image', 3), np.zeros((8, 24, 3), np.float32))
    return p('image', 3)
  if case in ('label_value', 'label_fraction', 'label_below'):
    label = small['segmentation'][1].astype(np.float32)
    label[0, 0] = {'label_value': 6.0, 'label_fraction': 2.5, 'label_below': -2.0}[case]
    np.save(p('label', 1), label)
    return p('label', 1)
  if case in ('negative_depth', 'nan_depth'):
    depth = small['depth'][0].copy()
    depth[3, 3] = -0.5 if case == 'negative_depth' else np.nan
    np.save(p('depth', 0), depth)
    return p('depth', 0)
  if case == 'normal':
    np.save(p('normal', 2), small['normal'][2] * 0.5)
    return p('normal', 2)
  if case == 'image_range':
    image = small['image'][4] / np.float32(255)
    image[0, 0, 0] = 1.5
    np.save(p('image', 4), image)
    return p('image', 4)
  raise AssertionError(case)


CASES = (
    'gap missing_last extra bad_name shape image_shape label_value label_fraction label_below negative_depth '
    'nan_depth normal image_range'
).split()


@pytest.mark.parametrize('case', CASES)
def test_read_layout_names_the_bad_file(tmp_path, small, case):
  split_dir = nyuv2_layout.write_layout(str(tmp_path), 'train', small)
  path = _corrupt(split_dir, case, small)
  with pytest.raises(ValueError) as info:
    nyuv2_layout.read_layout(str(tmp_path), 'train', num_classes=len(scenes.CLASSES))
  assert str(info.value).startswith(path + ':'), str(info.value)
  assert 'expected' in str(info.value)


def test_layout_argument_errors(tmp_path, small):
  with pytest.raises(ValueError, match='^split: '):
    nyuv2_layout.write_layout(str(tmp_path), 'test', small)
  with pytest.raises(ValueError, match='^tasks: '):
    nyuv2_layout.write_layout(str(tmp_path), 'train', small, tasks=('semantic',))
  with pytest.raises(ValueError, match=r'^arrays\["image"\]: '):
    nyuv2_layout.write_layout(str(tmp_path), 'train', dict(small, image=small['image'] / 255.0))
  with pytest.raises(ValueError, match=r"^arrays\['depth'\]: "):
    nyuv2_layout.write_layout(str(tmp_path), 'train', dict(small, depth=-small['depth']))
  with pytest.raises(ValueError, match='image: no such folder'):
    nyuv2_layout.read_layout(str(tmp_path), 'train')
  for kwargs, name in ((dict(num_classes=0), 'num_classes'), (dict(image_range='pct'), 'image_range')):
    with pytest.raises(ValueError, match=f'^{name}: '):
      nyuv2_layout.read_layout(str(tmp_path), 'train', **kwargs)
