"""UTKFace: age (regression, MAE), age group (7 bins), gender and race of every face, read from the names of a
directory of UTKFace images (``[age]_[gender]_[race]_[date&time].jpg``, the cropped set's ``....jpg.chip.jpg``).

  python -m mtlmatch.main --config=configs/utkface.py --workdir=workdirs/utkface \
      --config.data.options.image_dir=/data/UTKFace

There is no official split: ``test_fraction`` (0.2) of the sorted file names, drawn with ``config.data.seed``, is the
test set, and ``config.data.validation_fraction`` of the rest is held out for model selection. A malformed name
follows ``config.data.on_bad_image`` (``'raise'``: one error naming the file; ``'skip'``: left out and logged).
Layout, tasks and checks: ``mtlmatch/data/utkface.py`` and docs/howto/utkface.md.

Variants: ``mtl`` (the default: plain multi-task learning), ``dgr``, ``single=<task>`` (``age``, ``age_group``,
``gender``, ``race``), ``encoder=<name>``, ``weighting=<name>``, ``nt=<sweep root>`` (the negative-transfer monitor
for all four tasks), ``smoke``, ``cpu``. ``dm`` and ``coann`` are refused: they relate two classification tasks
through a relatedness table that UTKFace has no prior for, and every image is labelled for every task, so there is no
unlabelled task for them to transfer to. The sizes (ResNet-18 at 112 px, batch 256, 5,000 steps: about 75 epochs of
the training part) are a starting point for an accelerator, not a tuned recipe: nothing here was measured on UTKFace
(this project has no real face data offline).
"""

import ml_collections

from mtlmatch import config_lib  # not mtlmatch.data.utkface: loading a config imports neither TensorFlow nor JAX

TASKS = ('age', 'age_group', 'gender', 'race')


def get_config(arg=None):
  parsed = config_lib.parse_variant(arg)
  config = config_lib.base_config()
  config.data.name = 'utkface'
  config.data.options = ml_collections.ConfigDict()
  config.data.options.image_dir = ml_collections.config_dict.placeholder(str)  # --config.data.options.image_dir=...
  config.data.options.pattern = '*.jpg'  # also matches the cropped set's .jpg.chip.jpg
  config.data.options.test_fraction = 0.2
  config.data.options.image_size = 112
  config.data.augment = True  # random flips and pad-and-crops
  config.total_steps = 5000
  config.batch_size = 256
  config.eval_every = 500
  config.checkpoint_every = 500
  config.optimizer.warmup_steps = 250
  config_lib.set_encoder(config, 'resnet18')
  # The age task's options as the benchmark defines them (mtlmatch/data/utkface.py; a test checks they agree), stated
  # so that the command line can change them, e.g. --config.task_options.age.metric=ccc (docs/howto/utkface.md).
  config.task_options.age = {'loss': 'l1', 'metric': 'mae'}
  smoke_data = {'image_size': 32, 'pattern': '*.jpg', 'test_fraction': 0.2}
  config = config_lib.apply_variant(config, arg, pairs=(), relatedness='', smoke_data=smoke_data)
  if 'nt' in parsed:  # apply_variant monitors the tasks of the pairs; here there are none: all four tasks
    root = parsed['nt'].partition('=')[2].rstrip('/')
    config.nt_reference = {t: f'{root}/st_{t}/seed_{{seed}}' for t in TASKS}
  return config
