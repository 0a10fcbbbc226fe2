"""The top-level checks of a config (:func:`validate_config`), before anything is built or written.

Loading a config (``mtlmatch/config_lib.py``) imports neither JAX nor TensorFlow; these checks import the real
registries (encoders, heads, weighting methods, the pipeline's options), so they run where an experiment is built
(``mtlmatch/experiment.py``): for the CLI, notebooks and the sweep driver alike.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from mtlmatch.config_lib import PRECISIONS

REQUIRED_KEYS = (
    'seed',
    'total_steps',
    'batch_size',
    'eval_batch_size',
    'log_every',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
    'data',
    'tasks',
    'encoder',
    'head',
    'optimizer',
    'objective',
    'weighting',
    'nonfinite',
    'evals',
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Top-level checks of the config, before anything is built or written: the one place a config is checked, for
  the CLI, `train.build_experiment` (notebooks) and the sweep driver alike. Term options, encoder kwargs and
  weighting hparams are checked where they are bound (`objective`, `models`, `weighting`)."""
  # pylint: disable=g-import-not-at-top  (JAX, Flax and TensorFlow: only when validating, not to load a config)
  from mtlmatch import models
  from mtlmatch import weighting
  from mtlmatch.data import pipeline

  for key in REQUIRED_KEYS:
    if key not in config:
      raise ValueError(f'config.{key}: missing, expected it to be set (see configs/affect.py for a full config)')
  for key in ('total_steps', 'batch_size', 'eval_batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f'config.{key}: got {config[key]!r}, expected an int >= 1')
  patience = config.early_stopping_patience
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
    raise ValueError(
        f'config.early_stopping_patience: got {patience!r}, expected an int >= 0 (evaluations without '
        'a better validation score before stopping; 0 = never stop early)'
    )
  if not isinstance(config.eval_every, int) or config.eval_every < 0:
    raise ValueError(f'config.eval_every: got {config.eval_every!r}, expected an int >= 0 (0 = only at the end)')
  from mtlmatch import evaluators  # pylint: disable=g-import-not-at-top  (JAX and the data layer: only when validating)

  evaluators.validate(config.evals)
  if config.nonfinite not in ('halt', 'skip'):
    raise ValueError(f"config.nonfinite: got {config.nonfinite!r}, expected 'halt' or 'skip'")
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f'config.seed: got {config.seed!r}, expected an int >= 0')
  for key in ('profile_steps', 'profile_first_step'):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'config.{key}: got {value!r}, expected an int >= 0')
  if config.data.on_bad_image not in ('raise', 'skip'):
    raise ValueError(f"config.data.on_bad_image: got {config.data.on_bad_image!r}, expected 'raise' or 'skip'")
  if config.data.mixing not in pipeline.MIXING:
    raise ValueError(f'config.data.mixing: got {config.data.mixing!r}, expected one of {pipeline.MIXING}')
  pipeline.check_augment(config.data.augment, arg='config.data.augment')  # the dense-task rule: at the pipeline
  if config.encoder.name not in models.ENCODERS:
    raise ValueError(f'config.encoder.name: got {config.encoder.name!r}, expected one of {sorted(models.ENCODERS)}')
  if config.head.name not in models.HEADS:
    raise ValueError(f'config.head.name: got {config.head.name!r}, expected one of {sorted(models.HEADS)}')
  models.architectures.check_kwargs(config.arch.name, dict(config.arch.kwargs))
  if config.weighting.name not in weighting.METHODS:
    raise ValueError(
        f'config.weighting.name: got {config.weighting.name!r}, expected one of ' f'{sorted(weighting.METHODS)}'
    )
  if config.weighting.jacobian not in weighting.JACOBIAN_MODES:
    raise ValueError(
        f'config.weighting.jacobian: got {config.weighting.jacobian!r}, expected one of '
        f"{list(weighting.JACOBIAN_MODES)} ('auto': rows on CPU, vmap on GPU/TPU)"
    )
  precision = config.precision
  if precision not in PRECISIONS:
    raise ValueError(
        f'config.precision: got {precision!r}, expected one of {list(PRECISIONS)} (bfloat16: bfloat16 compute in '
        'the encoder and heads, float32 parameters, optimizer state and losses)'
    )
  encoder_dtype = config.encoder.kwargs.dtype if 'dtype' in config.encoder.kwargs else None  # a field of some
  if precision == 'bfloat16' and encoder_dtype is not None and str(encoder_dtype) not in PRECISIONS:
    raise ValueError(
        f"config.precision='bfloat16' with config.encoder.kwargs.dtype={encoder_dtype!r}: expected the encoder's "
        "dtype 'float32' (its default) or 'bfloat16'; precision sets the compute dtype of encoder and heads"
    )
  remat = config.remat
  if not isinstance(remat, bool):
    raise ValueError(f'config.remat: got {remat!r}, expected True or False')
  accum = config.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(f'config.grad_accum_steps: got {accum!r}, expected an int >= 1 (1: no accumulation)')
  validate_relatedness_and_monitor(config)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def validate_relatedness_and_monitor(config: ml_collections.ConfigDict) -> None:
  """The learned-relatedness and negative-transfer keys (docs/maths.md §8-§9). Whether a learned table needs
  ``relatedness_every >= 1`` and which tasks the references name are checked by `train.build_experiment`."""
  every = config.relatedness_every
  if isinstance(every, bool) or not isinstance(every, int):
    raise ValueError(f'config.relatedness_every: got {every!r}, expected an int (steps between re-estimations)')
  rate = config.relatedness_rate
  if not (_number(rate) and 0 < rate <= 1):
    raise ValueError(
        f'config.relatedness_rate: got {rate!r}, expected a number in (0, 1] (the weight of the new estimate: '
        'R <- (1 - rate) R + rate R^)'
    )
  smoothing = config.relatedness_smoothing
  if not (_number(smoothing) and smoothing >= 0):
    raise ValueError(f'config.relatedness_smoothing: got {smoothing!r}, expected a finite number >= 0')
  reference = config.nt_reference
  if not isinstance(reference, (Mapping, ml_collections.ConfigDict)):
    raise ValueError(
        f'config.nt_reference: got {reference!r}, expected {{task: a number or the path of a single-task '
        "run's results.json}} ({} = off)"
    )
  margin = config.nt_margin
  if not (_number(margin) and margin >= 0):
    raise ValueError(f'config.nt_margin: got {margin!r}, expected a finite number >= 0')
  patience = config.nt_patience
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
    raise ValueError(f'config.nt_patience: got {patience!r}, expected an int >= 1 (evaluations)')
  if config.nt_action not in ('warn', 'anneal'):
    raise ValueError(f"config.nt_action: got {config.nt_action!r}, expected 'warn' or 'anneal'")
  anneal = config.nt_anneal
  if not (_number(anneal) and 0 < anneal < 1):
    raise ValueError(f'config.nt_anneal: got {anneal!r}, expected a number in (0, 1) (the factor per window below)')
