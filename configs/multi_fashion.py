"""Multi-Fashion: two Fashion-MNIST items per 36×36 image, tasks ``left`` and ``right`` (10-way each), fully labelled.

The classic two-task benchmark for loss-weighting and gradient methods (``--config.weighting.name=pcgrad`` …) and
for DGR. ``dm``/``coann`` relate left → right through a table estimated from the training labels (the two items are
drawn independently, so the table is near uniform: a control where matching should neither help nor hurt).

Needs Debian's Fashion-MNIST files (``apt-get install dataset-fashion-mnist``) or ``--config.data.options.idx_dir``.

  python -m mtlmatch.main --config=configs/multi_fashion.py:mtl --workdir=workdirs/mf_ew --config.weighting.name=ew

Variants: ``mtl``, ``dm``, ``coann``, ``dgr`` (combine with '+'), ``single=left``, ``single=right``,
``encoder=<name>``, ``weighting=<name>``, ``smoke``, ``cpu``.
"""

from mtlmatch import config_lib

RELATEDNESS = 'estimate:both'  # the fully labelled train source; 'estimate:coannotated' with annotation='disjoint'


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = 'multi_fashion'
  config.data.options = {'num_train': 60000, 'num_test': 10000, 'annotation': 'full', 'num_coannotated': 1000}
  config.data.options.idx_dir = config_lib.idx_dir_option()  # None: $MTLMATCH_FASHION_MNIST_DIR or Debian's
  config.total_steps = 2000
  config.batch_size = 128
  config_lib.set_encoder(config, 'cnn')

  smoke_data = {'num_train': 256, 'num_test': 96, 'annotation': 'full', 'num_coannotated': 64}
  return config_lib.apply_variant(
      config,
      arg,
      pairs=(('left', 'right'),),
      relatedness=RELATEDNESS,
      smoke_data=smoke_data,
      cpu_data={'num_train': 20000, 'num_test': 2000},
  )
