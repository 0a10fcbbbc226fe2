"""The benchmark registry: ``get_benchmark(name, data_dir=..., seed=..., **options) -> Benchmark``.

Names: ``synthetic_affect`` (the embedded default, generated, no download), ``shopping`` (Fashion-MNIST item vs
group/attributes on disjoint slices) and ``multi_fashion`` (two items per image) — both from Debian's offline
Fashion-MNIST IDX files; ``faces`` (expressions from one manifest of image files, action units from another: your own
face datasets, see :mod:`mtlmatch.data.faces`); ``utkface`` (age, age group, gender and race from the names of a
directory of UTKFace images, :mod:`mtlmatch.data.utkface`); the dense benchmarks ``scenes`` (generated rooms:
segmentation, depth, normals; no download) and ``nyuv2`` (NYUv2 or Cityscapes in LibMTL's preprocessed layout),
:mod:`mtlmatch.data.dense_benchmarks`. ``options`` are the keyword arguments of the builder
function named in :data:`BUILDERS`; ``data_dir=None`` means ``$MTLMATCH_DATA_DIR`` or ``~/tensorflow_datasets``
(:func:`default_data_dir`), where the generated TFDS datasets are cached. User data: ``make_benchmark`` with
``array_source`` / ``files_source`` / ``tfds_source``.
"""

from __future__ import annotations

import inspect
from typing import Optional

from mtlmatch.data.dense_benchmarks import nyuv2_benchmark, scenes_benchmark
from mtlmatch.data.faces import faces_benchmark
from mtlmatch.data.fashion_mnist import multi_fashion_benchmark, shopping_benchmark
from mtlmatch.data.sources import Benchmark
from mtlmatch.data.synthetic_affect import synthetic_affect_benchmark
from mtlmatch.data.utkface import utkface_benchmark

BUILDERS = {
    'synthetic_affect': synthetic_affect_benchmark,
    'shopping': shopping_benchmark,
    'multi_fashion': multi_fashion_benchmark,
    'faces': faces_benchmark,
    'utkface': utkface_benchmark,
    'scenes': scenes_benchmark,
    'nyuv2': nyuv2_benchmark,
}


def get_benchmark(
    name: str, *, data_dir: Optional[str] = None, seed: int = 0, on_bad_image: str = 'raise', **options
) -> Benchmark:
  """The named benchmark, its TFDS data prepared in ``data_dir`` on first use (seconds; cached afterwards).

  ``on_bad_image`` goes to the builders that read image files (``faces``, ``utkface``); generated data has no bad
  images."""
  if name not in BUILDERS:
    raise ValueError(f'benchmark name: got {name!r}, expected one of {sorted(BUILDERS)}')
  builder = BUILDERS[name]
  parameters = inspect.signature(builder).parameters
  accepted = [p for p in parameters if p not in ('data_dir', 'seed', 'on_bad_image')]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f'options of benchmark {name!r}: got unknown {unknown}, expected some of {accepted}')
  if 'on_bad_image' in parameters:
    options['on_bad_image'] = on_bad_image
  return builder(data_dir=data_dir, seed=seed, **options)
