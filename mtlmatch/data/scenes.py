"""Generated indoor scenes (no download): an image with semantic segmentation, metric depth and surface normals.

The raw material of dense multi-task learning in the spirit of NYUv2 (13-class segmentation, depth, normals), drawn
by ray casting simple rooms in numpy. Each example is one room seen by a pinhole camera:

1. the room: a box ``x_left ≤ X ≤ x_right`` (each side 1.2–3.5 m from the camera), floor ``Y = 0``, ceiling
   ``Y ∈ [2.4, 3.2]`` m, back wall ``Z ∈ [3, 8]`` m; the camera at ``(0, h, 0)``, ``h ∈ [1.0, 1.8]`` m, pitched down
   by 5–20° and turned by ±15° about the vertical (no roll);
2. 2–:data:`MAX_OBJECTS` (5) objects standing on the floor in front of the camera, footprints not overlapping, each
   a box (half the time axis-aligned, otherwise turned about the vertical), a sphere or a vertical cylinder of random
   size;
3. for each pixel the nearest hit gives the class, the depth and the normal; the image is Lambertian shading
   (a random directional light from above, ambient 0.25–0.45) of a per-surface colour times a procedural texture
   (floor: checker tiles or planks; walls: plain or stripes; objects: smooth 3-D noise), times an exposure, plus
   sensor noise N(0, 0.02²); clipped, uint8;
4. sensor holes, like a Kinect's: depth and normal are invalid (0) inside 0–3 random ellipses, where the view is
   grazing (``|cos incidence| <`` :data:`GRAZING_COS`) and beyond :data:`MAX_RANGE`; the segmentation stays valid
   there. Separately, 0–2 small "unlabelled" ellipses (about 1 % of the pixels) have segmentation −1 (ignore), as
   NYUv2's unannotated pixels; depth and normal stay valid there.

Conventions: camera coordinates are x right, y down, z forward (OpenCV's; so *up* is −y and a level floor's normal is
(0, −1, 0), here (0, −cos θ, −sin θ) for a pitch θ). World coordinates are X right, Y up, Z forward.
``depth`` is the distance along the optical axis (z in camera coordinates, as NYUv2's depth), in metres; ``normal``
is the unit surface normal in camera coordinates, oriented toward the camera. Classes: :data:`CLASSES` (ids 0–5).
The field of view is fixed, 60° × 46.8° (NYUv2's 4:3), whatever the size: a larger size renders the same scene at a
higher resolution (pixels are square at 3:4 sizes such as 288 × 384; a 32 × 32 image is the same view, squeezed).

Randomness: example ``i`` of ``(seed, split)`` is drawn from ``numpy.random.default_rng([seed, split_id, i])``, so
the first ``k`` examples do not depend on ``n``, and the scene does not depend on the size; only the sensor noise is
drawn at render time, from the example's ``noise_seed``. Same arguments → bit-identical arrays (on one platform and
numpy version). ``split_id``: :data:`SPLIT_IDS` for ``train``, ``val``, ``test``; any other non-empty name gets the
stable id ``1000 + crc32(name)``.

Speed (numpy, measured on a shared 2-core VM): 100 images at 32 × 32 in 0.15–0.3 s; 288 × 384 at 6–8 images per
second. So :func:`mtlmatch.data.dense_benchmarks.scenes_benchmark` renders its splits once into a TFDS cache — the
builder :class:`MtlmatchScenes` (TFDS name ``mtlmatch_scenes``, one dataset per seed, split sizes and image size;
:func:`prepare`) — and reads them from there afterwards, as the project's other generated datasets. Record ``i`` of
a split is example ``i`` of :func:`generate_scenes`, bit for bit. The builder renders one chunk of about 2^18 rays
at a time (two images at 288 × 384): beyond that, memory grows only by what TFDS's writer buffers (the serialized
records, 0.88 MB each at 288 × 384, spilled to disk past 1 GB). Usage::

    data = generate_scenes(seed=0, split='train', n=100)                 # image, segmentation, depth, normal
    params = sample_rooms(seed=0, split='train', n=4)                      # the scenes themselves ...
    hi = render(params, 288, 384)                                          # ... rendered at NYUv2's size
    builder = prepare('/tmp/tfds', num_train=795, num_test=654, height=288, width=384)   # cached ahead of a run

``python -m mtlmatch.data.scenes [n height width]`` prints the timing and :func:`summarize` of a batch.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from mtlmatch.data._quiet import log_generation
from mtlmatch.data.sources import default_data_dir, generate_once

CLASSES = ('floor', 'wall', 'ceiling', 'box', 'sphere', 'cylinder')
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER = range(len(CLASSES))
OBJECT_KINDS = (BOX, SPHERE, CYLINDER)
IGNORE = -1
SPLIT_IDS = {'train': 1, 'val': 2, 'test': 3}
MAX_OBJECTS = 5
MAX_DEPTH_HOLES = 3
MAX_LABEL_HOLES = 2
HFOV_DEG = 60.0
VFOV_DEG = float(np.degrees(2 * np.arctan(0.75 * np.tan(np.radians(HFOV_DEG / 2)))))  # 46.8°: NYUv2's 4:3 aspect
GRAZING_COS = 0.12  # |cos(angle between the ray and the normal)| below this (beyond ~83°): no depth
MAX_RANGE = 8.0  # metres of z-depth beyond which the sensor gives no depth
NOISE_STD = 0.02
NUM_WAVES = 3  # sinusoids of an object's 3-D noise texture
MIN_SIZE, MAX_SIZE = 8, 2048
_CHUNK_RAYS = 1 << 18  # rays per rendering chunk (memory: a few hundred bytes per ray)


def split_id(split: str) -> int:
  """The stream id of a split: :data:`SPLIT_IDS`, or ``1000 + crc32(split)`` for any other non-empty name."""
  if not isinstance(split, str) or not split:
    raise ValueError(f'split: got {split!r}, expected a non-empty str (e.g. one of {sorted(SPLIT_IDS)})')
  return SPLIT_IDS.get(split, 1000 + zlib.crc32(split.encode()))


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
  ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= lo
  if not ok or (hi is not None and value > hi):
    bound = f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'
    raise ValueError(f'{name}: got {value!r}, expected an int {bound}')
  return int(value)


def _yaw(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_rotation(pitch: float, yaw: float) -> np.ndarray:
  """float64 ``[3, 3]``: camera → world rotation (columns: the camera's x right, y down, z forward in world X right,
  Y up, Z forward), for a camera pitched *down* by ``pitch`` and turned by ``yaw`` (radians, toward +X)."""
  c, s = np.cos(pitch), np.sin(pitch)
  pitch_down = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
  return _yaw(yaw) @ pitch_down @ np.diag([1.0, -1.0, 1.0])


def camera_rays(height: int, width: int) -> np.ndarray:
  """float32 ``[height, width, 3]``: each pixel centre's ray in camera coordinates, scaled to z = 1 (so a hit at ray
  parameter t has depth t). Fixed field of view :data:`HFOV_DEG` × :data:`VFOV_DEG` at any size."""
  fx = (width / 2) / np.tan(np.radians(HFOV_DEG / 2))
  fy = (height / 2) / np.tan(np.radians(VFOV_DEG / 2))
  x = (np.arange(width) + 0.5 - width / 2) / fx
  y = (np.arange(height) + 0.5 - height / 2) / fy
  rays = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.ones((height, width))), axis=-1)
  return rays.astype(np.float32)


def _place_objects(rng: np.random.Generator, room: np.ndarray, yaw: float) -> dict[str, np.ndarray]:
  """Up to :data:`MAX_OBJECTS` objects on the floor, in view and inside the room, footprints apart (a few tries)."""
  x_left, x_right, back = room[0], room[1], room[2]
  kind = np.full(MAX_OBJECTS, -1, np.int32)
  centre, size = np.zeros((MAX_OBJECTS, 3)), np.zeros((MAX_OBJECTS, 3))
  angle = np.zeros(MAX_OBJECTS)
  placed = []  # (X, Z, footprint radius)
  for k in range(int(rng.integers(2, MAX_OBJECTS + 1))):
    c = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
    if c == BOX:
      hx, hz, h = rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.6), rng.uniform(0.3, 1.2)
      size[k], rho = (hx, h, hz), float(np.hypot(hx, hz))
      angle[k] = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, np.pi / 2)
    elif c == SPHERE:
      r = rng.uniform(0.15, 0.5)
      size[k], rho = (r, 2 * r, r), r
    else:
      r, h = rng.uniform(0.1, 0.35), rng.uniform(0.3, 1.5)
      size[k], rho = (r, h, r), r
    for _ in range(10):
      z = rng.uniform(1.2 + rho, max(1.3 + rho, back - rho - 0.05))
      x = np.clip(z * np.tan(yaw + rng.uniform(-0.45, 0.45)), x_left + rho, x_right - rho)
      if all(np.hypot(x - px, z - pz) > rho + pr + 0.05 for px, pz, pr in placed):
        break
    else:
      continue  # no room left for it: the slot stays empty
    placed.append((x, z, rho))
    kind[k], centre[k] = c, (x, size[k, 1] / 2, z)
  return {'object_kind': kind, 'object_centre': centre, 'object_size': size, 'object_angle': angle}


def _ellipses(rng: np.random.Generator, count: int, max_count: int, radius: tuple[float, float]) -> np.ndarray:
  """float64 ``[max_count, 5]``: (centre row, centre column, row radius, column radius, active) in [0, 1] units."""
  out = np.zeros((max_count, 5))
  out[:, :2] = rng.uniform(0.05, 0.95, (max_count, 2))
  out[:, 2:4] = rng.uniform(*radius, (max_count, 2))
  out[:count, 4] = 1.0
  return out


def sample_room(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One scene's parameters (the keys of :func:`sample_rooms`, without the leading ``n`` axis)."""
  room = np.array([-rng.uniform(1.2, 3.5), rng.uniform(1.2, 3.5), rng.uniform(3.0, 8.0), rng.uniform(2.4, 3.2)])
  pitch, yaw = np.radians(rng.uniform(5.0, 20.0)), np.radians(rng.uniform(-15.0, 15.0))
  height = rng.uniform(1.0, min(1.8, room[3] - 0.4))
  light = np.array([rng.uniform(-1, 1), rng.uniform(0.5, 1.5), rng.uniform(-1, 0.5)])
  out = {
      'room': room,
      'position': np.array([0.0, height, 0.0]),
      'rotation': camera_rotation(pitch, yaw),
      'light': light / np.linalg.norm(light),
      'ambient': np.float64(rng.uniform(0.25, 0.45)),
      'exposure': np.float64(rng.uniform(0.8, 1.15)),
      # colours of floor, wall, ceiling; textures: floor 0 checker / 1 planks (with its scale), walls 0 plain / 1
      # stripes (with their period), and the textures' contrast.
      'surface_color': np.stack([rng.uniform(0.25, 0.75, 3), rng.uniform(0.45, 0.9, 3), rng.uniform(0.8, 0.95, 3)]),
      'floor_texture': np.array([rng.integers(2), rng.uniform(0.25, 0.6), rng.uniform(0.1, 0.35)]),
      'wall_texture': np.array([rng.integers(2), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)]),
  }
  out.update(_place_objects(rng, room, yaw))
  out['object_color'] = rng.uniform(0.1, 0.95, (MAX_OBJECTS, 3))
  # Noise texture: NUM_WAVES sinusoids (wave vector in 1/m, phase) per object, and its contrast.
  waves = np.concatenate(
      [rng.normal(0, 8.0, (MAX_OBJECTS, NUM_WAVES, 3)), rng.uniform(0, 2 * np.pi, (MAX_OBJECTS, NUM_WAVES, 1))], -1
  )
  out['object_waves'] = waves
  out['object_contrast'] = rng.uniform(0.05, 0.3, MAX_OBJECTS)
  out['depth_holes'] = _ellipses(rng, int(rng.integers(0, MAX_DEPTH_HOLES + 1)), MAX_DEPTH_HOLES, (0.02, 0.1))
  out['label_holes'] = _ellipses(rng, int(rng.integers(0, MAX_LABEL_HOLES + 1)), MAX_LABEL_HOLES, (0.03, 0.08))
  out['noise_seed'] = np.int64(rng.integers(0, 2**62))
  return out


def sample_rooms(seed: int, split: str, n: int) -> dict[str, np.ndarray]:
  """The parameters of ``n`` scenes, example ``i`` from ``default_rng([seed, split_id(split), i])``; arrays:

  ``room`` [n, 4] (x_left, x_right, back wall Z, ceiling Y; metres), ``position`` [n, 3] and ``rotation`` [n, 3, 3]
  (the camera in world coordinates: centre, camera → world), ``light`` [n, 3] (unit, toward the light), ``ambient``,
  ``exposure`` [n], ``surface_color`` [n, 3, 3] (floor, wall, ceiling RGB), ``floor_texture``, ``wall_texture``
  [n, 3] (kind, scale, contrast), ``object_kind`` int32 [n, K] (a class id of :data:`OBJECT_KINDS`, −1 = empty
  slot), ``object_centre`` [n, K, 3] (the centre of the object's bounding box: X, half its height, Z),
  ``object_size`` [n, K, 3] (box: half-width, height, half-depth in its own frame; sphere: r, 2r, r; cylinder: r,
  height, r), ``object_angle`` [n, K] (a box's turn about the vertical, radians), ``object_color`` [n, K, 3],
  ``object_waves`` [n, K, 3, 4], ``object_contrast`` [n, K], ``depth_holes`` [n, 3, 5], ``label_holes`` [n, 2, 5]
  (ellipses: centre row, column, radii in image units [0, 1], active), ``noise_seed`` int64 [n].
  K = :data:`MAX_OBJECTS`; all float arrays are float64.
  """
  seed, n, sid = _check_int('seed', seed, 0), _check_int('n', n, 0), split_id(split)
  rooms = [sample_room(np.random.default_rng([seed, sid, i])) for i in range(n)]
  if not rooms:  # n = 0: the keys and trailing shapes of one room, with a leading axis of 0
    return {
        k: np.zeros((0,) + np.shape(v), np.asarray(v).dtype) for k, v in sample_room(np.random.default_rng(0)).items()
    }
  return {k: np.stack([r[k] for r in rooms]) for k in rooms[0]}


# ----------------------------------------------------------------------------------------------------------------
# Ray casting: every function takes ray origins o [m, 1, 3] and directions d [m, P, 3] (world) and returns the ray
# parameter t [m, P] of the first hit in front of the camera (inf: none) and the world normal [m, P, 3].


def _dot(a, b):
  """a · b over the last axis (of size 3); elementwise, which is faster than einsum for 3-vectors."""
  return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _apply(matrix, x):
  """``matrix @ x`` for matrices [m, 3, 3] and vectors [m, P, 3] (or [P, 3]): [m, P, 3], elementwise."""
  return sum(x[..., j, None] * matrix[:, None, :, j] for j in range(3))


def _hit_sphere(o, d, centre, size, angle):
  del angle
  r = size[:, None, 0]
  oc = o - centre[:, None, :]
  a, b, c = _dot(d, d), _dot(d, oc), _dot(oc, oc) - r**2
  disc = b * b - a * c
  t = (-b - np.sqrt(np.maximum(disc, 0))) / a
  t = np.where((disc >= 0) & (t > 0), t, np.inf)
  normal = (o + np.where(np.isfinite(t), t, 0)[..., None] * d - centre[:, None, :]) / r[..., None]
  return t, normal


def _hit_cylinder(o, d, centre, size, angle):
  del angle
  r, h = size[:, None, 0], size[:, None, 1]
  ox, oz = o[..., 0] - centre[:, None, 0], o[..., 2] - centre[:, None, 2]
  dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
  a = dx * dx + dz * dz
  b = dx * ox + dz * oz
  c = ox * ox + oz * oz - r**2
  disc = b * b - a * c
  with np.errstate(divide='ignore', invalid='ignore'):
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
    y_side = o[..., 1] + t_side * dy
    t_side = np.where((disc >= 0) & (a > 0) & (t_side > 0) & (y_side >= 0) & (y_side <= h), t_side, np.inf)
    t_top = (h - o[..., 1]) / dy
    tx, tz = ox + t_top * dx, oz + t_top * dz
    t_top = np.where((t_top > 0) & (tx * tx + tz * tz <= r**2), t_top, np.inf)
  side = t_side <= t_top
  t = np.minimum(t_side, t_top)
  ts = np.where(np.isfinite(t_side), t_side, 0)
  side_normal = np.stack([(ox + ts * dx) / r, np.zeros_like(ts), (oz + ts * dz) / r], -1)
  normal = np.where(side[..., None], side_normal, np.array([0.0, 1.0, 0.0], np.float32))
  return t, normal


def _hit_box(o, d, centre, size, angle):
  rot = np.stack([_yaw(a) for a in angle])  # [m, 3, 3] box → world
  lo = o - centre[:, None, :] * np.array([1.0, 0.0, 1.0])  # box frame origin on the floor below its centre
  rot_t = rot.transpose(0, 2, 1)  # world → box
  ol, dl = _apply(rot_t, lo), _apply(rot_t, d)
  half = np.stack([size[:, 0], size[:, 1] / 2, size[:, 2]], -1)[:, None, :]
  mid = np.array([0.0, 1.0, 0.0]) * half  # the box spans Y in [0, height]: centred at half its height
  inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
  t1, t2 = (mid - half - ol) * inv, (mid + half - ol) * inv
  t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
  axis = np.argmax(t_near, axis=-1)
  tn, tf = np.max(t_near, -1), np.min(t_far, -1)
  t = np.where((tn <= tf) & (tn > 0), tn, np.inf)
  sign = -np.sign(np.take_along_axis(dl, axis[..., None], -1))
  normal_local = (np.arange(3) == axis[..., None]) * sign
  return t, _apply(rot, normal_local)


_HIT = {BOX: _hit_box, SPHERE: _hit_sphere, CYLINDER: _hit_cylinder}


def _cast(params: dict, rays: np.ndarray):
  """Nearest hits of rays [P, 3] (camera) in the scenes of ``params`` (m of them): t, class, object slot (−1 for the
  room), world normal, world direction."""
  rot = params['rotation'].astype(np.float32)
  d = _apply(rot, rays)  # [m, P, 3] world
  o = params['position'].astype(np.float32)[:, None, :]
  room = params['room'].astype(np.float32)
  dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
  with np.errstate(divide='ignore', invalid='ignore'):
    planes = (  # (t, class, world normal) of the floor, ceiling, back, left and right walls
        (np.where(dy < 0, -o[..., 1] / dy, np.inf), FLOOR, (0, 1, 0)),
        (np.where(dy > 0, (room[:, None, 3] - o[..., 1]) / dy, np.inf), CEILING, (0, -1, 0)),
        (np.where(dz > 0, (room[:, None, 2] - o[..., 2]) / dz, np.inf), WALL, (0, 0, -1)),
        (np.where(dx < 0, (room[:, None, 0] - o[..., 0]) / dx, np.inf), WALL, (1, 0, 0)),
        (np.where(dx > 0, (room[:, None, 1] - o[..., 0]) / dx, np.inf), WALL, (-1, 0, 0)),
    )
  t = np.full(dx.shape, np.inf, np.float32)
  cls = np.zeros(dx.shape, np.int32)
  normal = np.zeros(d.shape, np.float32)
  for tp, c, nrm in planes:
    closer = tp < t
    t = np.where(closer, tp, t)
    cls[closer] = c
    normal[closer] = nrm
  slot = np.full(dx.shape, -1, np.int32)
  kinds = params['object_kind']
  for k in range(kinds.shape[1]):
    for c, hit in _HIT.items():
      idx = np.nonzero(kinds[:, k] == c)[0]
      if not idx.size:
        continue
      args = (params[key][idx, k].astype(np.float32) for key in ('object_centre', 'object_size', 'object_angle'))
      tk, nk = hit(o[idx], d[idx], *args)
      closer = tk < t[idx]
      t[idx] = np.where(closer, tk, t[idx])
      cls[idx] = np.where(closer, c, cls[idx])
      slot[idx] = np.where(closer, k, slot[idx])
      normal[idx] = np.where(closer[..., None], nk.astype(np.float32), normal[idx])
  normal /= np.sqrt(_dot(normal, normal))[..., None]
  flip = _dot(normal, d) > 0  # orient toward the camera
  normal[flip] *= -1
  return t, cls, slot, normal, d


def _ellipse_mask(ellipses: np.ndarray, height: int, width: int) -> np.ndarray:
  """bool ``[m, height, width]``: inside any active ellipse (rows of :func:`_ellipses`, [m, E, 5])."""
  y = ((np.arange(height) + 0.5) / height)[None, None, :, None]
  x = ((np.arange(width) + 0.5) / width)[None, None, None, :]
  e = ellipses[..., None, None]
  inside = ((y - e[:, :, 0]) / e[:, :, 2]) ** 2 + ((x - e[:, :, 1]) / e[:, :, 3]) ** 2 <= 1
  return np.any(inside & (e[:, :, 4] > 0), axis=1)


def _albedo(params: dict, cls, slot, normal, point):
  """float32 [m, P, 3]: the surface colour times its texture at the hit points (world)."""
  m = cls.shape[0]
  rows = np.arange(m)[:, None]
  surface = params['surface_color'].astype(np.float32)
  color = surface[rows, np.minimum(cls, CEILING)]  # objects are overwritten below
  X, Z = point[..., 0], point[..., 2]
  ft, wt = params['floor_texture'].astype(np.float32), params['wall_texture'].astype(np.float32)
  scale, contrast = ft[:, None, 1], ft[:, None, 2]
  checker = (np.floor(X / scale) + np.floor(Z / scale)) % 2
  plank = np.floor(X / (0.5 * scale))
  plank = (np.sin(plank * 12.9898 + 78.233) * 43758.5453) % 1.0  # a per-plank brightness in [0, 1)
  floor = 1 - contrast * np.where(ft[:, None, 0] > 0, plank, checker)
  along = np.where(np.abs(normal[..., 0]) > 0.5, Z, X)  # the horizontal coordinate along a wall
  stripes = (np.sin(2 * np.pi * along / wt[:, None, 1]) > 0) * (wt[:, None, 0] > 0)
  wall = 1 - wt[:, None, 2] * stripes
  factor = np.where(cls == FLOOR, floor, np.where(cls == WALL, wall, 1.0))
  obj = slot >= 0
  k = np.maximum(slot, 0)
  waves = params['object_waves'].astype(np.float32)[rows, k]  # [m, P, NUM_WAVES, 4]
  noise = np.sin(_dot(waves[..., :3], point[..., None, :]) + waves[..., 3]).mean(-1)
  obj_factor = 1 + params['object_contrast'].astype(np.float32)[rows, k] * noise
  color = np.where(obj[..., None], params['object_color'].astype(np.float32)[rows, k], color)
  return color * np.where(obj, obj_factor, factor)[..., None]


def _render_chunk(params: dict, height: int, width: int) -> dict[str, np.ndarray]:
  m, p = params['room'].shape[0], height * width
  rays = camera_rays(height, width).reshape(p, 3)
  t, cls, slot, normal_w, d = _cast(params, rays)
  point = params['position'].astype(np.float32)[:, None, :] + t[..., None] * d
  light = params['light'].astype(np.float32)[:, None, :]
  lambert = np.maximum(_dot(normal_w, light), 0)
  ambient = params['ambient'].astype(np.float32)[:, None]
  shade = (ambient + (1 - ambient) * lambert) * params['exposure'].astype(np.float32)[:, None]
  image = _albedo(params, cls, slot, normal_w, point) * shade[..., None]
  noise = np.stack(
      [np.random.default_rng(int(s)).standard_normal((p, 3), np.float32) for s in params['noise_seed']]
  ).reshape(m, p, 3)
  image = np.round(np.clip(image + NOISE_STD * noise, 0, 1) * 255).astype(np.uint8)
  cos_incidence = np.abs(_dot(normal_w, d)) / np.sqrt(_dot(d, d))
  invalid = (cos_incidence < GRAZING_COS) | (t > MAX_RANGE) | ~np.isfinite(t)
  invalid |= _ellipse_mask(params['depth_holes'], height, width).reshape(m, p)
  normal_c = _apply(params['rotation'].astype(np.float32).transpose(0, 2, 1), normal_w)  # world → camera: R^T
  depth = np.where(invalid, 0, t).astype(np.float32)
  normal_c = np.where(invalid[..., None], 0, normal_c).astype(np.float32)
  segmentation = np.where(_ellipse_mask(params['label_holes'], height, width).reshape(m, p), IGNORE, cls)
  return {
      'image': image.reshape(m, height, width, 3),
      'segmentation': segmentation.astype(np.int32).reshape(m, height, width),
      'depth': depth.reshape(m, height, width, 1),
      'normal': normal_c.reshape(m, height, width, 3),
  }


def render(params: dict, height: int = 32, width: int = 32) -> dict[str, np.ndarray]:
  """The scenes of ``params`` (:func:`sample_rooms`) at ``height × width``: ``image`` uint8 [n, H, W, 3],
  ``segmentation`` int32 [n, H, W] (:data:`CLASSES` ids, −1 = ignore), ``depth`` float32 [n, H, W, 1] (z-depth in
  metres, 0 = invalid), ``normal`` float32 [n, H, W, 3] (unit, camera coordinates, toward the camera; 0 = invalid).

  Rendered in chunks of about 2^18 rays: the working memory stays under ~100 MB at any size, beside the output.
  """
  height = _check_int('height', height, MIN_SIZE, MAX_SIZE)
  width = _check_int('width', width, MIN_SIZE, MAX_SIZE)
  n = params['room'].shape[0]
  chunk = max(1, _CHUNK_RAYS // (height * width))
  parts = [
      _render_chunk({k: v[lo : lo + chunk] for k, v in params.items()}, height, width) for lo in range(0, n, chunk)
  ]
  if not parts:
    return {
        'image': np.zeros((0, height, width, 3), np.uint8),
        'segmentation': np.zeros((0, height, width), np.int32),
        'depth': np.zeros((0, height, width, 1), np.float32),
        'normal': np.zeros((0, height, width, 3), np.float32),
    }
  return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def generate_scenes(seed: int, split: str, n: int, height: int = 32, width: int = 32) -> dict[str, np.ndarray]:
  """``n`` scenes of ``(seed, split)`` rendered at ``height × width`` (8 to 2048 each): ``render(sample_rooms(seed,
  split, n), height, width)`` — keys ``image``, ``segmentation``, ``depth``, ``normal`` (see :func:`render`)."""
  for name, value, lo in (('height', height, MIN_SIZE), ('width', width, MIN_SIZE)):
    _check_int(name, value, lo, MAX_SIZE)
  return render(sample_rooms(seed, split, n), height, width)


def summarize(arrays: dict[str, np.ndarray]) -> dict[str, float]:
  """Fractions of pixels per class and ignored, of valid depth, and the depth range (metres) of a batch."""
  seg, depth = arrays['segmentation'], arrays['depth'][..., 0]
  out = {f'class_{name}': float(np.mean(seg == c)) for c, name in enumerate(CLASSES)}
  out['ignored'] = float(np.mean(seg == IGNORE))
  out['depth_valid'] = float(np.mean(depth > 0))
  valid = depth[depth > 0]
  out['depth_min'], out['depth_max'] = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 0.0)
  return out


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder (cached generation).


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 1000
  num_test: int = 200
  height: int = 32
  width: int = 32


def make_config(
    *, seed: int = 0, num_train: int = 1000, num_test: int = 200, height: int = 32, width: int = 32
) -> ScenesConfig:
  """A builder config whose name encodes every generation parameter (so each variant is cached separately)."""
  seed = _check_int('seed', seed, 0)
  num_train, num_test = _check_int('num_train', num_train, 1), _check_int('num_test', num_test, 1)
  height, width = _check_int('height', height, MIN_SIZE, MAX_SIZE), _check_int('width', width, MIN_SIZE, MAX_SIZE)
  return ScenesConfig(
      name=f's{seed}_tr{num_train}_te{num_test}_{height}x{width}',
      seed=seed,
      num_train=num_train,
      num_test=num_test,
      height=height,
      width=width,
  )


class MtlmatchScenes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the scenes' ``train`` and ``test`` splits: record ``i`` of a split is example ``i`` of
  :func:`generate_scenes` (``seed``, split, its size, ``height``, ``width``), bit for bit, with its dtypes and shapes.
  """

  # A cache is found by name and version only: bump the version with any change to what generate_scenes returns.
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # generated locally, no checksum or metadata files (see MtlmatchSyntheticAffect)
  _log_download_bytes = log_generation
  RELEASE_NOTES = {'1.0.0': 'Ray-cast rooms: image, segmentation, depth, normal (generate_scenes).'}

  def _info(self):
    h, w = self.builder_config.height, self.builder_config.width
    # Raw bytes, exact for every dtype. Segmentation and normals are piecewise constant: zlib takes them to 0.4 % and
    # 4 % of their size at 288 × 384, for 17 ms per image (rendering it took 240 ms, same machine); the image and
    # depth shrink little (78 %, 54 %), so they stay as they are: 0.88 MB per record instead of 2.5 MB.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Tensor(shape=(h, w, 3), dtype=np.uint8, encoding='bytes'),
                'segmentation': tfds.features.Tensor(shape=(h, w), dtype=np.int32, encoding='zlib'),
                'depth': tfds.features.Tensor(shape=(h, w, 1), dtype=np.float32, encoding='bytes'),
                'normal': tfds.features.Tensor(shape=(h, w, 3), dtype=np.float32, encoding='zlib'),
            }
        ),
        disable_shuffling=True,  # record i is example i, as generate_scenes orders them
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {split: self._generate_examples(split, n) for split, n in (('train', c.num_train), ('test', c.num_test))}

  def _generate_examples(self, split, n):
    c = self.builder_config
    params = sample_rooms(c.seed, split, n)  # a few hundred numbers per scene; the pixels come a chunk at a time
    chunk = max(1, _CHUNK_RAYS // (c.height * c.width))  # render's own chunk: one pass of the ray caster each
    for lo in range(0, n, chunk):
      part = render({k: v[lo : lo + chunk] for k, v in params.items()}, c.height, c.width)
      for i in range(part['image'].shape[0]):
        yield lo + i, {key: value[i] for key, value in part.items()}


def prepare(data_dir: Optional[str] = None, **config) -> MtlmatchScenes:
  """The prepared builder of :func:`make_config` ``(**config)``: rendered into ``data_dir`` (default
  ``$MTLMATCH_DATA_DIR`` or ``~/tensorflow_datasets``) on first use, read from there afterwards."""
  config = make_config(**config)
  return generate_once(
      lambda: MtlmatchScenes(config=config, data_dir=default_data_dir(data_dir)),
      lambda: tfds.download.DownloadConfig(try_download_gcs=False),
  )


if __name__ == '__main__':
  n_, h_, w_ = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (100, 32, 32)))
  start = time.perf_counter()
  batch = generate_scenes(0, 'train', n_, h_, w_)
  print(f'{n_} scenes at {h_}x{w_}: {time.perf_counter() - start:.3f} s')
  for key, value in summarize(batch).items():
    print(f'  {key}: {value:.4f}')
