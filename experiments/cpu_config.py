"""CPU-sized case-study configs: ``get_config('<study>:<variant>')`` = ``configs/<study>.py:<variant>`` shrunk.

The case studies in ``experiments/`` run on a 2-core CPU; this file keeps everything of the study's own config (data,
tasks, relatedness, objective terms) and overrides only the size: a small CNN encoder (another encoder keeps its
defaults), batch 64, fewer steps, and (for the Fashion-MNIST studies) fewer test images. Every other key stays overridable on the command line::

  python -m mtlmatch.main --config=experiments/cpu_config.py:affect:dm+coann --workdir=/tmp/x \\
      --config.total_steps=300 --config.seed=1

``<variant>`` follows ``mtlmatch.config_lib`` (``mtl``, ``dm``, ``coann``, ``dgr`` joined by '+', ``single=<task>``,
``smoke``), e.g. ``affect:single=aus`` or ``shopping:dm+coann+dgr``.
"""
from __future__ import annotations

import os

from mtlmatch import config_lib

STUDIES = ('affect', 'shopping', 'multi_fashion')
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def get_config(arg=None):
  study, _, variant = (arg or '').partition(':')
  if study not in STUDIES:
    raise ValueError(f'experiments/cpu_config.py arg: got {arg!r}, expected \'<study>:<variant>\' with study in '
                     f'{STUDIES}')
  config = config_lib.load_config(f'{os.path.join(_CONFIGS, study)}.py:{variant}')
  if 'smoke' in variant.split(','):
    return config
  config.total_steps = 300
  config.batch_size = 64
  config.eval_batch_size = 512
  config.log_every = 25
  config.checkpoint_every = 300
  config.keep_checkpoints = 1
  config.optimizer.warmup_steps = 20
  if config.encoder.name == 'cnn':
    config_lib.set_encoder(config, 'cnn', widths=(16, 32), features=64)
  if study == 'multi_fashion':
    config.data.options.num_train = 20000
    config.data.options.num_test = 2000
  return config
