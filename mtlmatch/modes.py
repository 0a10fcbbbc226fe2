"""The CLI's other modes on a trained workdir: ``--mode=eval`` and ``--mode=predict`` (training: ``train.py``).

* :func:`evaluate_checkpoint` evaluates the workdir's newest checkpoint on every eval source and writes
  ``eval/<step>-<time>.json`` (never ``results.json``, which is training's); it never trains. The model and its
  training must be the ones the checkpoint was trained with (the config, as the resume rule
  ``checkpoint.SAFE_TO_CHANGE`` says, and the training data, by their fingerprints); the evaluation data may differ:
  evaluating on a new test set is the point. Without ``--config`` the workdir's ``config.json`` is used.
* :func:`predict` writes ``predictions/<source>.npz`` per source, for any training (both its parts), eval or
  auxiliary source: ``rows``, ``paths`` (file sources), ``part``, ``<task>`` and ``labels/<task>`` (see there).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import evaluators
from mtlmatch import experiment as experiment_lib
from mtlmatch import workdir as workdir_lib
from mtlmatch.data import fingerprint as fingerprint_lib
from mtlmatch.tasks import kind_of


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a trained workdir was run with (its ``config.json``), for ``--mode=eval|predict`` without
  ``--config`` (JSON lists become tuples, as the config files write them)."""
  if not workdir_lib.exists(workdir, workdir_lib.CONFIG_FILE):
    raise ValueError(
        f'workdir {workdir!r}: got no {workdir_lib.CONFIG_FILE}, expected the workdir of a trained run '
        '(--mode=train first), or pass --config'
    )
  as_tuples = lambda v: (  # noqa: E731
      tuple(as_tuples(x) for x in v)
      if isinstance(v, list)
      else {k: as_tuples(x) for k, x in v.items()}
      if isinstance(v, dict)
      else v
  )
  return ml_collections.ConfigDict(as_tuples(workdir_lib.read_json(workdir, workdir_lib.CONFIG_FILE)))


# The config keys evaluation may change besides the resume rule's (checkpoint.SAFE_TO_CHANGE): where the data come
# from. That the *training* data are the same is checked on the data themselves (the fingerprints of the training and
# validation sources); the evaluation and auxiliary sources may be new — evaluating on a new test set is the point.
EVAL_MAY_CHANGE = ('data',)
TRAINING_GROUPS = ('train/', 'validation/')


def _restore(exp: experiment_lib.Experiment, workdir: str):
  """The newest restorable train state of ``workdir`` under ``exp``'s model; a ValueError if there is none, if the
  model or its training differ (config keys outside the resume rule's and :data:`EVAL_MAY_CHANGE`) or if the
  training data differ (their fingerprints)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(
        f'workdir {workdir!r}: got no checkpoints/, expected the workdir of a trained run (--mode=train first)'
    )
  current = _without(json.loads(config_lib.to_json(exp.config)), EVAL_MAY_CHANGE)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=exp.config.keep_checkpoints)
  try:
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_like(exp.init_state()),
        check_meta=lambda meta: ckpt_lib.check_config_drift(_without(meta['config'], EVAL_MAY_CHANGE), current),
    )
  finally:
    checkpointer.close()
  if restored is None:
    raise ValueError(f'workdir {workdir!r}: got no restorable checkpoint, expected the workdir of a trained run')
  state, meta = restored
  training = lambda fp: {k: v for k, v in fp.items() if k.startswith(TRAINING_GROUPS)}  # noqa: E731
  current_fp = fingerprint_lib.benchmark_fingerprint(exp.benchmark)
  fingerprint_lib.check(training(meta['data']), training(current_fp), where=f'the checkpoint in {workdir!r}')
  return state


def _without(config: dict, keys) -> dict:
  return {k: v for k, v in config.items() if k not in keys}


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, benchmark: Optional[data_lib.Benchmark] = None
) -> dict:
  """Metrics of the newest checkpoint on every eval source, written to ``<workdir>/eval/<step>-<time>.json``: its
  own file, next to training's ``results.json``, which it never touches. Returns the results with their ``path``."""
  t_start = time.time()
  exp = experiment_lib.build_experiment(config, benchmark=benchmark)
  warning = experiment_lib.warn_if_no_eval(exp.benchmark)
  if warning:
    logging.warning(warning)
  state = _restore(exp, workdir)
  evaluation = evaluators.classification_metrics(exp.view, state, 'test')
  step = int(state.step)
  results = {
      'step': step,
      'wall_time_s': time.time() - t_start,
      'sources': [s.name for s in exp.benchmark.eval_sources],
      **evaluation,
  }
  path = os.path.join(workdir, EVAL_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = _unused(path)
    workdir_lib.write_atomically(path, json.dumps(results, indent=1, default=workdir_lib.jsonable))
  return {**results, 'path': path}


EVAL_DIR = 'eval'


def _unused(path: str) -> str:
  """``path``, or ``<stem>-<n>.json`` with the first n that is not taken (two evaluations in one second)."""
  stem, n = path[: -len('.json')], 1
  while os.path.exists(path):
    path, n = f'{stem}-{n}.json', n + 1
  return path


def _probabilities(params, batch_stats, batch, *, model, tasks):
  """Each task's prediction (its kind's ``predict``: softmax or sigmoid probabilities, regression values), the mask
  and the labels."""
  outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  probs = {t: kind_of(spec).predict(outputs['logits'][t]) for t, spec in tasks.items()}
  return {'probs': probs, 'mask': batch['mask'], 'labels': batch['labels'], 'position': batch['position']}


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    source: Optional[str] = None,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> list[str]:
  """Writes ``<workdir>/predictions/<source>.npz`` for ``source`` (default: every eval source); returns the paths.

  Each file holds, per example of the source (a training source: both its training and its held-out validation
  part), in the source's order: ``rows`` (the 0-based manifest data row of a file source, the index in the given
  arrays of an array source, the index in the split of a TFDS source), ``paths`` (a file source's image files),
  ``part`` ('train', 'validation', 'test' or 'aux'), ``<task>`` (what the task's kind predicts: probabilities
  ``[N, C]``, softmax for multiclass, sigmoid for multilabel; a regression task's values ``[N, d]``) and
  ``labels/<task>`` (``-1`` = missing; NaN for a regression target)."""
  exp = experiment_lib.build_experiment(config, benchmark=benchmark)
  bench = exp.benchmark
  parts = {}  # source name -> [(part, Source)]
  for part_name, sources in (
      ('train', bench.train_sources),
      ('validation', bench.validation_sources),
      ('test', bench.eval_sources),
      ('aux', tuple(bench.aux_sources.values())),
  ):
    for s in sources:
      parts.setdefault(s.name, []).append((part_name, s))
  if source is None:
    chosen = [s.name for s in bench.eval_sources]
    if not chosen:
      raise ValueError(
          f'--source: benchmark {bench.name!r} has no eval source, expected a source name from ' f'{sorted(parts)}'
      )
  elif source in parts:
    chosen = [source]
  else:
    raise ValueError(f'--source: got {source!r}, expected one of {sorted(parts)}')
  state = _restore(exp, workdir)
  fn = jax.jit(
      functools.partial(_probabilities, model=exp.model, tasks=bench.tasks),
      in_shardings=(exp.replicated, exp.replicated, exp.data_sharding),
      out_shardings=exp.replicated,
  )
  out_dir = os.path.join(workdir, 'predictions')
  paths = []
  for name in chosen:
    arrays = _concat([_predict_part(fn, state, exp, part, src) for part, src in parts[name]])
    path = os.path.join(out_dir, f'{name}.npz')
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      np.savez(path, **arrays)
    paths.append(path)
  return paths


def _predict_part(fn, state, exp, part: str, src) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(positions in the split, arrays)`` of one part of a source, in read order, its examples identified in the
  user's terms (``Reader.identify``)."""
  tasks = exp.benchmark.tasks
  probs, labels, positions = {t: [] for t in tasks}, {t: [] for t in tasks}, []
  for batch in data_lib.eval_iterator(
      src, tasks, global_batch_size=exp.config.eval_batch_size, sharding=exp.data_sharding
  ):
    got = jax.device_get(fn(state.params, state.batch_stats, batch))  # replicated: the whole global batch
    mask = np.asarray(got['mask']) > 0
    positions.append(np.asarray(got['position'])[mask])
    for t in tasks:
      probs[t].append(np.asarray(got['probs'][t])[mask])
      labels[t].append(np.asarray(got['labels'][t])[mask])
  position = np.concatenate(positions).astype(np.int64)
  arrays = dict(src.reader.identify(src.split, position))
  arrays['part'] = np.full(len(position), part)
  for t in tasks:
    arrays[t] = np.concatenate(probs[t])
    arrays[f'labels/{t}'] = np.concatenate(labels[t])
  return position, arrays


def _concat(parts: Sequence[tuple[np.ndarray, dict]]) -> dict[str, np.ndarray]:
  """The parts of one source as one set of arrays, ordered by the examples' positions in the split (one sort)."""
  order = np.argsort(np.concatenate([position for position, _ in parts]), kind='stable')
  return {k: np.concatenate([arrays[k] for _, arrays in parts])[order] for k in parts[0][1]}
