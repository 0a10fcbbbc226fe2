"""Generated indoor scenes (no download): semantic segmentation, depth and surface normals of ray-cast rooms.

Tasks (LibMTL's names): ``segmentation`` (6 classes: floor, wall, ceiling, box, sphere, cylinder; −1 = ignore),
``depth`` (metres, 0 = a sensor hole) and ``normal`` (camera-space unit vectors, 0 = a hole), every label at the
image's resolution (``mtlmatch/data/scenes.py``, ``mtlmatch/data/dense_benchmarks.py``). The images are rendered
once into the TFDS cache (``--config.data.data_dir``, default ``$MTLMATCH_DATA_DIR`` or ``~/tensorflow_datasets``)
and read from there by later runs of the same sizes.

  python -m mtlmatch.main --config=configs/scenes.py --workdir=workdirs/scenes

Network: the SegNet encoder and one SegNet decoder per task (CPU-sized; ``encoder=dilated_resnet`` with
``--config.head.name=aspp`` is DeepLabV3's "split" network, ``--config.head.name=mtan`` MTAN's task attention).
Label protocols: ``--config.data.options.labels=one-label`` (each training image keeps one task, balanced) or
``random-label`` (each label kept with probability ``label_probability``). ``--config.data.augment=True``: LibMTL's
NYUv2 scale-crop and flip of the image with its labels (off by default). Variants: ``mtl`` (default), ``dgr``,
``single=<task>``, ``encoder=<name>``, ``weighting=<name>``, ``smoke``. DM and co-annotation are for classification
tasks and are refused. Nothing here is tuned: the sizes are a CPU starting point.
"""

from mtlmatch import config_lib

# The decoder has one step per encoder stage: its widths mirror the encoder's.
SEGNET = {'widths': (16, 32, 64), 'convs_per_stage': (1, 1, 1)}
DECODER = {'widths': (64, 32, 16)}


def get_config(arg=None):
  parsed = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.data.name = 'scenes'
  config.data.options.num_train = 1000
  config.data.options.num_test = 200
  config.data.options.height = 32
  config.data.options.width = 32
  config.data.options.labels = 'full'
  config.data.options.label_probability = 0.5
  config.total_steps = 1000
  config.batch_size = 32
  config.eval_batch_size = 40  # a multiple of 8 devices that divides the 100 validation and 200 test images
  config.log_every = 100
  config.checkpoint_every = 500
  config_lib.set_encoder(config, 'segnet', **SEGNET)
  config.head.name = 'segnet_decoder'
  config.head.kwargs = dict(DECODER)
  smoke_data = {'num_train': 64, 'num_test': 32, 'height': 16, 'width': 16, 'labels': 'full', 'label_probability': 0.5}
  config = config_lib.apply_variant(config, arg, pairs=(), relatedness='', smoke_data=smoke_data)
  if parsed.get('size') == 'smoke' and config.encoder.name == 'segnet':
    config.head.kwargs = {'widths': tuple(reversed(config_lib.SMOKE_ENCODERS['segnet']['widths']))}
  return config
