"""Shopping (Fashion-MNIST): ``item`` labelled on 1,000 images, ``group``/``attributes`` on a disjoint 50,000.

The "big discrepancy in labelled data per task" setting of the distribution-matching paper: the scarce ``item`` task
can borrow from the plentiful ``group``/``attributes`` labels through the item → group and item → attributes
relatedness, estimated from a small co-annotated subset (``estimate:coannotated``).

Needs Debian's Fashion-MNIST files (``apt-get install dataset-fashion-mnist``) or ``--config.data.options.idx_dir``.

  python -m mtlmatch.main --config=configs/shopping.py:dm+coann --workdir=workdirs/shopping_dm_coann

Variants: ``mtl``, ``dm``, ``coann``, ``dgr`` (combine with '+'), ``single=item``, ``single=group``,
``single=attributes``, ``encoder=<name>``, ``weighting=<name>``, ``smoke``, ``cpu``.
"""

from mtlmatch import config_lib

RELATEDNESS = 'estimate:coannotated'


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = 'shopping'
  config.data.options = {'num_item': 1000, 'num_group': 50000, 'num_coannotated': 1000}
  config.data.options.idx_dir = config_lib.idx_dir_option()  # None: $MTLMATCH_FASHION_MNIST_DIR or Debian's
  config.total_steps = 2000
  config.batch_size = 128
  config_lib.set_encoder(config, 'cnn')

  smoke_data = {'num_item': 64, 'num_group': 128, 'num_coannotated': 48}
  return config_lib.apply_variant(
      config, arg, pairs=(('item', 'group'), ('item', 'attributes')), relatedness=RELATEDNESS, smoke_data=smoke_data
  )
