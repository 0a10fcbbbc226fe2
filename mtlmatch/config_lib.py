"""Shared config defaults and the variant grammar used by every file in ``configs/``.

A config file defines ``get_config(arg=None)``: it starts from :func:`base_config`, sets its benchmark, tasks and
relatedness, then calls :func:`apply_variant`. The ``arg`` after the colon is a comma-separated list of tokens:

* a ``+``-joined method set from ``mtl`` (plain multi-task, equal weights), ``dm`` (distribution matching),
  ``coann`` (soft co-annotation), ``dgr`` (dummy gradient norm regularization) — e.g. ``dm+coann+dgr``;
* ``single=<task>`` — the single-task baseline for one task;
* ``smoke`` — shrink everything so the run takes seconds (tests, CI).

``python -m mtlmatch.main --config=configs/affect.py:dm+coann,smoke --workdir=/tmp/x``. Any key can then be
overridden on the command line, e.g. ``--config.total_steps=300``.
"""
from __future__ import annotations

import inspect
from typing import Mapping, Optional, Sequence

import ml_collections

from mtlmatch import losses

METHOD_TOKENS = ('mtl', 'dm', 'coann', 'dgr')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128                 # global, over all devices and hosts
  c.eval_batch_size = 512
  c.log_every = 100
  c.eval_every = 0                   # 0: evaluate only at the end
  c.early_stopping_patience = 0      # stop after this many evaluations without a better validation score; 0 = never
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.nonfinite = 'halt'               # or 'skip': skip (and count) non-finite updates
  c.tasks = ()                       # the tasks to train: () = all of the benchmark's, or a tuple of names

  c.data = ml_collections.ConfigDict()
  c.data.name = ''
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.seed = 0                    # generation seed of synthetic data / annotation splits / validation hold-out
  c.data.validation_fraction = 0.1   # held out of every training source for model selection; 0 = none
  c.data.options = ml_collections.ConfigDict()
  c.data.mixing = 'weights'          # or 'equal_per_task'
  c.data.augment = False

  c.encoder = ml_collections.ConfigDict({'name': 'cnn', 'kwargs': ml_collections.ConfigDict()})
  # How convolutions and max-pools are differentiated (models.cpu_ops): 'auto' = a GEMM backward on CPU, the lax ops
  # on GPU/TPU; 'native' / 'gemm' force one. Same values and gradients, so it may change on resume.
  c.encoder.conv_impl = 'auto'
  c.head = ml_collections.ConfigDict({'name': 'linear', 'kwargs': ml_collections.ConfigDict()})

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 50
  c.optimizer.final_lr_fraction = 0.01
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9
  c.optimizer.clip_norm = 1.0

  c.objective = ml_collections.ConfigDict()
  c.objective.task_weights = ml_collections.ConfigDict()
  c.objective.terms = ml_collections.ConfigDict()

  c.weighting = ml_collections.ConfigDict()
  c.weighting.name = 'ew'
  c.weighting.hparams = ml_collections.ConfigDict()
  c.weighting.terms_as_tasks = False  # DM / co-annotation: extra "tasks" for the method, or added on top
  return c


def dgr_term(weight: float = 0.01, num_dummies: int = 1, mode: str = 'fixed') -> dict:
  return dict(kind='dgr', weight=weight, tasks='all', num_dummies=num_dummies, mode=mode, norm='sq_l2',
              head='task', init_scale=1.0)


def shrink_for_smoke(config: ml_collections.ConfigDict, data_options: Mapping[str, object]) -> None:
  """A seconds-long run: 6 steps of 16, a tiny CNN, logs and checkpoints every few steps, tiny data."""
  config.total_steps = 6
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every = 2
  config.checkpoint_every = 3
  config.optimizer.warmup_steps = 2
  config.encoder.kwargs = {'widths': (8, 16), 'features': 32}
  config.data.options = dict(data_options)


TERM_KINDS = {'dm': 'distribution_matching', 'coann': 'co_annotation'}


def _defaults(fn, names: Sequence[str]) -> dict:
  parameters = inspect.signature(fn).parameters
  return {n: parameters[n].default for n in names}


# Every option of a term kind, with the loss's default (docs/maths.md), so that each can be set with --config.<key>=...
TERM_OPTIONS = {'dm': _defaults(losses.distribution_matching, losses.matching.OPTIONS),
                'coann': _defaults(losses.co_annotation, losses.matching.CO_ANNOTATION_OPTIONS)}


def pair_terms(token: str, pairs: Sequence[tuple[str, str]], relatedness: str) -> dict:
  """The ``token`` ('dm' or 'coann') terms for each (task_a, task_b) pair: named ``token`` for a single pair, else
  ``<token>_<task_b>`` (e.g. 'dm_group', 'dm_attributes')."""
  return {token if len(pairs) == 1 else f'{token}_{b}': dict(kind=TERM_KINDS[token], weight=1.0, task_a=a, task_b=b,
                                                               relatedness=relatedness, **TERM_OPTIONS[token])
          for a, b in pairs}


def apply_variant(config: ml_collections.ConfigDict, arg: Optional[str], *, pairs: Sequence[tuple[str, str]],
                  relatedness: str, smoke_data: Mapping[str, object]) -> ml_collections.ConfigDict:
  """Applies the tokens of ``arg`` (see module docstring). ``dm``/``coann`` relate each (task_a, task_b) of
  ``pairs`` through ``relatedness``; ``smoke`` shrinks the run and uses ``smoke_data`` as the data options."""
  for token in [t for t in (arg or '').split(',') if t]:
    if token == 'smoke':
      shrink_for_smoke(config, smoke_data)
    elif token.startswith('single='):
      config.tasks = (token[len('single='):],)
    else:
      parts = token.split('+')
      unknown = [p for p in parts if p not in METHOD_TOKENS]
      if unknown:
        raise ValueError(f'config variant: got {token!r}, expected \'smoke\', \'single=<task>\' or a +-joined set '
                         f'of {METHOD_TOKENS}')
      for part in parts:
        if part in TERM_KINDS:
          config.objective.terms.update(pair_terms(part, pairs, relatedness))
        elif part == 'dgr':
          config.objective.terms.dgr = dgr_term()
  return config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/affect.py:dm,smoke'`` → that file's ``get_config('dm,smoke')``, as ``--config=`` does."""
  import importlib.util
  import os
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file: got {path!r}, expected an existing file such as configs/affect.py')
  module_spec = importlib.util.spec_from_file_location(f'_mtlmatch_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
