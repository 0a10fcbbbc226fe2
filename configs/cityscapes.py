"""Cityscapes (segmentation into 7 classes, depth) in the preprocessed layout of LibMTL, MTAN and Auto-Lambda:
``{root}/{train,val}/{image,label,depth}/{i}.npy`` (128 × 256 in those codes; ``label_7``-style folders: rename to
``label``). Everything else as configs/nyuv2.py.

  python -m mtlmatch.main --config=configs/cityscapes.py --workdir=workdirs/cityscapes \
      --config.data.options.root=/data/cityscapes
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location('_nyuv2_config', os.path.join(os.path.dirname(__file__), 'nyuv2.py'))
_nyuv2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nyuv2)


def get_config(arg=None):
  return _nyuv2.get_config(arg, name='cityscapes', num_classes=7, tasks=('segmentation', 'depth'))
