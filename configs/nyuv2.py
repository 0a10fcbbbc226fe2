"""NYUv2 (segmentation into 13 classes, depth, surface normals) in the preprocessed layout of LibMTL, MTAN and
Auto-Lambda: ``{root}/{train,val}/{image,label,depth,normal}/{i}.npy`` (``mtlmatch/data/nyuv2_layout.py``; any image
size, 288 × 384 in those codes). ``train`` trains, ``val`` is the test set (as in those codes); model selection uses
the validation part held out of ``train``.

  python -m mtlmatch.main --config=configs/nyuv2.py --workdir=workdirs/nyuv2 --config.data.options.root=/data/nyuv2

Network: MTAN's and LibMTL's SegNet baseline (``segnet`` encoder, one ``segnet_decoder`` per task);
``encoder=dilated_resnet`` with ``--config.head.name=aspp`` is the DGR code's DeepLabV3 "split" network,
``--config.head.name=mtan`` MTAN. Label protocols: ``--config.data.options.labels=one-label`` or ``random-label``.
``--config.data.augment=True``: LibMTL's ``--aug`` (random scale-crop and flip of the image with its labels; off by
default, as there).
Variants: ``mtl`` (default), ``dgr``, ``single=<task>``, ``encoder=<name>``, ``weighting=<name>``, ``smoke`` (a tiny
network; the tests train it on small files written in this layout). Nothing here was measured on NYUv2 (this
project has no copy offline): the sizes are LibMTL's starting point (batch 8, Adam 1e-4), not a tuned recipe.
"""

import ml_collections

from mtlmatch import config_lib

NAME, NUM_CLASSES, TASKS = 'nyuv2', 13, ('segmentation', 'depth', 'normal')


def get_config(arg=None, *, name=NAME, num_classes=NUM_CLASSES, tasks=TASKS):
  parsed = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.data.name = 'nyuv2'
  config.data.options.root = ml_collections.config_dict.placeholder(str)  # --config.data.options.root=...
  config.data.options.dataset = name
  config.data.options.num_classes = num_classes
  config.data.options.tasks = tasks
  config.data.options.labels = 'full'
  config.data.options.label_probability = 0.5
  config.total_steps = 40000
  config.batch_size = 8
  config.eval_batch_size = 8
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.optimizer.learning_rate = 1e-4
  config_lib.set_encoder(config, 'segnet')
  config.head.name = 'segnet_decoder'
  smoke_data = {'dataset': name, 'num_classes': num_classes, 'tasks': tasks, 'labels': 'full', 'label_probability': 0.5}
  config = config_lib.apply_variant(
      config, arg, pairs=(), relatedness='', smoke_data=smoke_data, where=f'configs/{name}.py'
  )
  if parsed.get('size') == 'smoke':
    config.head.kwargs = {'widths': tuple(reversed(config_lib.SMOKE_ENCODERS['segnet']['widths']))}
    config.data.options.root = ml_collections.config_dict.placeholder(str)
  return config
