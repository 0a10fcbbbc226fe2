"""The preprocessed NYUv2 / Cityscapes layout of LibMTL, MTAN and Auto-Lambda: one ``.npy`` file per example and
task, ``{root}/{split}/{image,label,depth,normal}/{i}.npy``.

``split`` is ``train`` or ``val`` (the two folders those loaders read), ``i`` runs over 0 … N−1 without gaps (the
loaders count the files in ``image/`` and load ``{i}.npy`` for i below that count). Per file, as in the NYUv2
archive that MTAN prepared (288 × 384) and LibMTL's ``examples/nyu/create_dataset.py`` loads:

* ``image/{i}.npy``: float [H, W, 3], RGB in [0, 1] (the loaders move the channels first; Auto-Lambda maps
  ``2x − 1`` to [−1, 1], which needs [0, 1]);
* ``label/{i}.npy``: float [H, W], the class index, −1 = ignore (loaded as float, then ``long``; the losses use
  ``ignore_index=-1``); NYUv2 has 13 classes, Cityscapes 7 or 19;
* ``depth/{i}.npy``: float [H, W, 1], 0 = invalid (the losses mask pixels whose depth sums to 0; NYUv2 in metres,
  Cityscapes an inverse depth);
* ``normal/{i}.npy``: float [H, W, 3], unit, 0 = invalid (NYUv2 only; Cityscapes has no normals).

Task names follow LibMTL: ``segmentation`` (folder ``label``), ``depth``, ``normal``. :func:`write_layout` writes
arrays (e.g. :func:`mtlmatch.data.scenes.generate_scenes`) in this layout, for side-by-side runs with those
libraries; :func:`read_layout` reads it back into arrays, validating every file. Usage::

    write_layout('/tmp/scenes', 'train', generate_scenes(0, 'train', 795, 288, 384))
    data = read_layout('/tmp/scenes', 'train', num_classes=6)   # image, segmentation, depth, normal
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

SPLITS = ('train', 'val')
TASKS = ('segmentation', 'depth', 'normal')
FOLDERS = {'segmentation': 'label', 'depth': 'depth', 'normal': 'normal'}  # task -> folder (besides image/)
IMAGE_RANGES = ('auto', 'unit', 'byte')
_NAME = re.compile(r'(0|[1-9][0-9]*)\.npy')
# An example's trailing shape per key (H, W filled in), and the dtype read_layout returns.
_TRAILING = {'image': (3,), 'segmentation': (), 'depth': (1,), 'normal': (3,)}
_DTYPES = {'image': np.uint8, 'segmentation': np.int32, 'depth': np.float32, 'normal': np.float32}


def _check_split(split) -> str:
  if split not in SPLITS:
    raise ValueError(f'split: got {split!r}, expected one of {SPLITS} (the folders LibMTL and MTAN read)')
  return split


def _check_values(key: str, x: np.ndarray, where: str, *, num_classes=None, normal_tol=None, image_max=None) -> None:
  """One ValueError naming ``where`` unless the values of one example (or of a whole array) are valid for ``key``."""
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{where}: got dtype {x.dtype}, expected real numbers')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{where}: {int(np.sum(~np.isfinite(x)))} values are NaN or infinite, expected finite {key}')
  if key == 'image' and x.size and (x.min() < 0 or x.max() > image_max):
    raise ValueError(
        f'{where}: image values in [{x.min():g}, {x.max():g}], expected values in [0, {image_max}] '
        + ("(image_range='byte')" if image_max == 255 else "(image_range='unit'; 'byte' reads images in [0, 255])")
    )
  if key == 'segmentation' and x.size:
    if np.any(x != np.round(x)):
      raise ValueError(f'{where}: label {x[x != np.round(x)].flat[0]} is not an integer, expected class indices')
    top = np.inf if num_classes is None else num_classes
    if x.min() < -1 or x.max() >= top:
      bad = x[(x < -1) | (x >= top)].flat[0]
      classes = 'a class >= 0' if num_classes is None else f'a class in [0, {num_classes - 1}] ({num_classes=})'
      raise ValueError(f'{where}: label {bad:g}, expected -1 (ignore) or {classes}')
  if key == 'depth' and x.size and x.min() < 0:
    raise ValueError(f'{where}: depth {x.min():g} < 0, expected depth >= 0 (0 = invalid)')
  if key == 'normal' and normal_tol is not None and x.size:
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=-1))
    bad = (np.abs(norm - 1) > normal_tol) & (norm > normal_tol)
    if np.any(bad):
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f'{where}: {int(bad.sum())} normals are neither unit nor 0 (e.g. norm {norm[idx]:.4f} at {idx}), expected '
          f'norms within normal_tol={normal_tol} of 1 (valid) or 0 (invalid)'
      )


def write_layout(
    root: str,
    split: str,
    arrays: Mapping[str, np.ndarray],
    *,
    tasks: Sequence[str] = TASKS,
    overwrite: bool = False,
) -> str:
  """Writes ``arrays`` as ``{root}/{split}/{image,label,depth,normal}/{i}.npy``; returns the split's folder.

  ``arrays``: ``image`` uint8 [N, H, W, 3] (written float32 in [0, 1], x / 255), and per task of ``tasks``:
  ``segmentation`` integers [N, H, W] (−1 = ignore; written float32 to ``label/``), ``depth`` [N, H, W, 1] (≥ 0,
  0 = invalid) and ``normal`` [N, H, W, 3] (written float32). Other keys are ignored. A split folder that already
  holds ``.npy`` files is refused unless ``overwrite``, which first deletes the ``.npy`` files of all four folders
  (so that no stale file of a larger or fuller dataset stays behind) and the folders of tasks not written if that
  leaves them empty.
  """
  split = _check_split(split)
  tasks = tuple(tasks)
  if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(TASKS):
    raise ValueError(f'tasks: got {tasks!r}, expected distinct names from {TASKS}')
  for key in ('image',) + tasks:
    if key not in arrays:
      raise ValueError(f'arrays: no {key!r} (have {sorted(arrays)}), expected image and the tasks {tasks}')
  image = np.asarray(arrays['image'])
  if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3 or not image.shape[0]:
    raise ValueError(f'arrays["image"]: got {image.dtype} {image.shape}, expected uint8 [N, H, W, 3] with N >= 1')
  n, h, w = image.shape[:3]
  data = {'image': image.astype(np.float32) / np.float32(255)}
  for task in tasks:
    x = np.asarray(arrays[task])
    expected = (n, h, w) + _TRAILING[task]
    if x.shape != expected:
      raise ValueError(f'arrays[{task!r}]: got shape {x.shape}, expected {expected} (as the image)')
    _check_values(task, x, f'arrays[{task!r}]', normal_tol=0.1)
    data[task] = x.astype(np.float32)
  split_dir = os.path.join(root, split)
  folders = {'image': 'image', **FOLDERS}
  existing = [
      os.path.join(split_dir, f, name)
      for f in folders.values()
      if os.path.isdir(os.path.join(split_dir, f))
      for name in os.listdir(os.path.join(split_dir, f))
      if name.endswith('.npy')
  ]
  if existing and not overwrite:
    raise ValueError(f'{split_dir}: already holds {len(existing)} .npy files, expected none (or overwrite=True)')
  for path in existing:
    os.remove(path)
  for key, f in folders.items():  # a task's folder not written now, left empty: removed, as if never written
    folder = os.path.join(split_dir, f)
    if key not in data and os.path.isdir(folder) and not os.listdir(folder):
      os.rmdir(folder)
  for key, x in data.items():
    folder = os.path.join(split_dir, folders[key])
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
      np.save(os.path.join(folder, f'{i}.npy'), x[i])
  return split_dir


def _list_examples(folder: str) -> int:
  """The number of examples in ``folder``, whose ``.npy`` files must be named 0.npy … (N−1).npy."""
  names = sorted(name for name in os.listdir(folder) if name.endswith('.npy'))
  for name in names:
    if not _NAME.fullmatch(name):
      raise ValueError(f'{os.path.join(folder, name)}: unexpected file name, expected <i>.npy with i = 0, 1, …')
  found = {int(name[:-4]) for name in names}
  for i in range(len(found)):
    if i not in found:
      raise ValueError(
          f'{os.path.join(folder, f"{i}.npy")}: missing, expected files 0.npy … {len(found) - 1}.npy without gaps '
          f'({len(found)} files, the largest index {max(found)})'
      )
  return len(found)


def _load(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable ({e}), expected a .npy array') from e


def read_layout(
    root: str,
    split: str,
    *,
    num_classes: Optional[int] = None,
    image_range: str = 'auto',
    normal_tol: Optional[float] = 0.1,
    label_folder: str = 'label',
) -> dict[str, np.ndarray]:
  """Reads ``{root}/{split}`` back: ``image`` uint8 [N, H, W, 3], ``segmentation`` int32 [N, H, W] (−1 = ignore),
  ``depth`` float32 [N, H, W, 1], ``normal`` float32 [N, H, W, 3]; a task whose folder is absent has no key
  (Cityscapes: no ``normal``). ``image/`` is required. Everything is loaded into memory (about 2 GB for NYUv2's 795
  training examples at 288 × 384; these datasets hold hundreds to a few thousand examples).

  Images: ``image_range`` ``'unit'`` (float in [0, 1], as NYUv2's files: → round(255 x)), ``'byte'`` (in [0, 255],
  uint8 or float: → round(x)), or ``'auto'``: ``'byte'`` if ``0.npy`` is uint8 or has a value above 1, else
  ``'unit'``; every file must then be in that range. Any H × W, the same in every file and folder.

  Validation, one ValueError naming the file and what was expected: the folders hold the same number of files,
  named 0.npy … (N−1).npy without gaps; the shapes agree across files and folders; values finite; labels integral
  in [−1, ``num_classes``) (without ``num_classes``: ≥ −1); depth ≥ 0; each normal's norm within ``normal_tol`` of 1
  or 0 (None: not checked). ``label_folder``: the folder of the labels (default ``label``, LibMTL's name).
  """
  split = _check_split(split)
  if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))):
    raise ValueError(f'num_classes: got {num_classes!r}, expected an int >= 1 or None')
  if num_classes is not None and num_classes < 1:
    raise ValueError(f'num_classes: got {num_classes!r}, expected an int >= 1 or None')
  if image_range not in IMAGE_RANGES:
    raise ValueError(f'image_range: got {image_range!r}, expected one of {IMAGE_RANGES}')
  if normal_tol is not None and not 0 < normal_tol < 1:
    raise ValueError(f'normal_tol: got {normal_tol!r}, expected a float in (0, 1) or None')
  if not isinstance(label_folder, str) or not label_folder or os.sep in label_folder:
    raise ValueError(f'label_folder: got {label_folder!r}, expected a folder name such as "label"')
  split_dir = os.path.join(root, split)
  folders = {'image': 'image', **FOLDERS, 'segmentation': label_folder}
  folders = {k: os.path.join(split_dir, f) for k, f in folders.items() if os.path.isdir(os.path.join(split_dir, f))}
  if 'image' not in folders:
    raise ValueError(f'{os.path.join(split_dir, "image")}: no such folder, expected the layout {{root}}/{split}/image/')
  counts = {k: _list_examples(folder) for k, folder in folders.items()}
  n = counts['image']
  if not n:
    raise ValueError(f'{folders["image"]}: no .npy files, expected 0.npy … (N−1).npy')
  for key, count in counts.items():
    if count != n:
      first_odd = os.path.join(folders[key], f'{min(count, n)}.npy')
      state = 'missing' if count < n else 'unexpected'
      raise ValueError(
          f'{first_odd}: {state} ({os.path.basename(folders[key])}/ holds {count} files), expected {n} files '
          f'0.npy … {n - 1}.npy, as many as {folders["image"]}'
      )
  first = _load(os.path.join(folders['image'], '0.npy'))
  if first.ndim != 3 or first.shape[-1] != 3:
    raise ValueError(f'{os.path.join(folders["image"], "0.npy")}: shape {first.shape}, expected [H, W, 3]')
  h, w = first.shape[:2]
  if image_range == 'auto':
    image_range = 'byte' if first.dtype == np.uint8 or (first.size and np.nanmax(first) > 1) else 'unit'
  scale = 255 if image_range == 'unit' else 1
  out = {}
  for key, folder in folders.items():
    expected = (h, w) + _TRAILING[key]
    out[key] = np.empty((n,) + expected, _DTYPES[key])
    for i in range(n):
      path = os.path.join(folder, f'{i}.npy')
      x = first if (key, i) == ('image', 0) else _load(path)
      if x.shape != expected:
        raise ValueError(f'{path}: shape {x.shape}, expected {expected} (as {os.path.join(folders["image"], "0.npy")})')
      _check_values(key, x, path, num_classes=num_classes, normal_tol=normal_tol, image_max=255 // scale)
      if key == 'image':
        x = np.round(x.astype(np.float64) * scale)
      out[key][i] = x  # labels are integral (checked): the cast to int32 is exact
  return out
