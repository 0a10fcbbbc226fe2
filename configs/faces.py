"""Your own face datasets: expressions from one manifest, action units from another, DM + co-annotation through the
expert prior (Du et al., PNAS 2014) restricted to the AUs your AU dataset annotates.

  python -m mtlmatch.main --config=configs/faces.py --workdir=workdirs/faces \
      --config.data.options.expression_manifest=/data/affectnet/train.csv \
      --config.data.options.au_manifest=/data/emotionet/train.csv \
      --config.data.options.expression_test_manifest=/data/affectnet/val.csv

A manifest is a CSV or JSON-lines table (``path,expression`` / ``path,AU1,AU2,...``) or the directory of the same
manifest prepared with ``python -m mtlmatch.data.prepare`` (read by index); the layout, the missing-value codes and
the checks are in ``mtlmatch/data/faces.py`` and docs/howto/faces.md. Images are decoded and resized to
``image_size`` (112) as batches need them; memory does not grow with the datasets.

Valence/arousal (optional; unset: the two tasks only): ``valence_column`` and ``arousal_column`` of the expression
manifests (AffectNet's ``valence,arousal``; -2 = not annotated) and/or a third manifest ``va_manifest`` (+
``va_test_manifest``) with the columns ``va_columns``; they add the regression task ``va`` (CCC loss, tanh head),
co-trained (DM and co-annotation stay on expression → AUs)::

  python -m mtlmatch.main --config=configs/faces.py --workdir=workdirs/faces_va ... \
      --config.data.options.valence_column=valence --config.data.options.arousal_column=arousal

Variants: as configs/affect.py (``mtl``, ``dm``, ``coann``, ``dgr`` joined with '+', ``single=<task>``,
``encoder=<name>``, ``weighting=<name>``, ``smoke``, ``cpu``); no variant = ``dm+coann``. The sizes (ResNet-18,
batch 256, 20,000 steps) are a starting point for an accelerator, not a tuned recipe: nothing here was measured on
real face data (this project has none offline); decide the step count and learning rate on your validation split.
"""

import ml_collections

from mtlmatch import config_lib
from mtlmatch import priors  # not mtlmatch.data.faces: loading a config imports neither TensorFlow nor JAX

RELATEDNESS = 'prior:expressions_to_aus'
WHERE = (
    'expression_manifest',
    'au_manifest',
    'expression_test_manifest',
    'au_test_manifest',
    'va_manifest',
    'va_test_manifest',
    'valence_column',
    'arousal_column',
    'image_root',
)


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = 'faces'
  config.data.options = ml_collections.ConfigDict()
  for key in WHERE:  # typed placeholders: set on the command line, --config.data.options.<key>=...
    config.data.options[key] = ml_collections.config_dict.placeholder(str)
  config.data.options.aus = priors.FACE_AUS
  config.data.options.va_columns = ('valence', 'arousal')  # of va_manifest
  config.data.options.image_size = 112
  config.data.augment = True  # random flips and pad-and-crops
  config.total_steps = 20000
  config.batch_size = 256
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.optimizer.warmup_steps = 500
  config_lib.set_encoder(config, 'resnet18')
  smoke_data = {'image_size': 32}
  return config_lib.apply_variant(
      config, arg or 'dm+coann', pairs=(('expression', 'aus'),), relatedness=RELATEDNESS, smoke_data=smoke_data
  )
