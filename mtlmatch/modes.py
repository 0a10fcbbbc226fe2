"""The CLI's other modes on a trained workdir: ``--mode=eval`` and ``--mode=predict`` (training: ``train.py``).

* :func:`evaluate_checkpoint` evaluates the workdir's newest checkpoint on every eval source and writes
  ``results.json`` afresh; it never trains. The config must match the one the checkpoint was trained with (the
  resume rule, ``checkpoint.SAFE_TO_CHANGE``), the data may differ: evaluating on a new test set is the point.
* :func:`predict` writes ``predictions/<source>.npz`` per source: ``positions`` (each example's position in the
  source's read order), ``<task>`` (probabilities ``[N, C]``: softmax for multiclass, sigmoid for multilabel) and
  ``labels/<task>`` (``-1`` = missing), for any training, eval or auxiliary source.
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
from mtlmatch.tasks import kind_of


def _restore(exp: experiment_lib.Experiment, workdir: str):
  """The newest restorable train state of ``workdir`` under ``exp``'s config; a ValueError if there is none."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(
        f'workdir {workdir!r}: got no checkpoints/, expected the workdir of a trained run ' '(--mode=train first)'
    )
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=exp.config.keep_checkpoints)
  try:
    current = json.loads(config_lib.to_json(exp.config))
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_like(exp.init_state()),
        check_meta=lambda meta: ckpt_lib.check_config_drift(meta['config'], current),
    )
  finally:
    checkpointer.close()
  if restored is None:
    raise ValueError(f'workdir {workdir!r}: got no restorable checkpoint, expected the workdir of a trained run')
  return restored[0]


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, benchmark: Optional[data_lib.Benchmark] = None
) -> dict:
  """Metrics of the newest checkpoint on every eval source, written to ``results.json`` (replacing it)."""
  t_start = time.time()
  exp = experiment_lib.build_experiment(config, benchmark=benchmark)
  warning = experiment_lib.warn_if_no_eval(exp.benchmark)
  if warning:
    logging.warning(warning)
  state = _restore(exp, workdir)
  evaluation = evaluators.classification_metrics(exp.view, state, 'test')
  results = {'step': int(state.step), 'wall_time_s': time.time() - t_start, **evaluation}
  if jax.process_index() == 0:
    workdir_lib.write_results(workdir, results)
  return results


def _probabilities(params, batch_stats, batch, *, model, tasks):
  """Each task's prediction (its kind's ``predict``: softmax or sigmoid probabilities), the mask and the labels."""
  outputs, _ = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  probs = {t: kind_of(spec).predict(outputs['logits'][t]) for t, spec in tasks.items()}
  return {'probs': probs, 'mask': batch['mask'], 'labels': batch['labels']}


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    source: Optional[str] = None,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> list[str]:
  """Writes ``<workdir>/predictions/<source>.npz`` for ``source`` (default: every eval source); returns the paths."""
  exp = experiment_lib.build_experiment(config, benchmark=benchmark)
  bench = exp.benchmark
  every = {
      **{s.name: s for s in bench.train_sources},
      **dict(bench.aux_sources),
      **{s.name: s for s in bench.eval_sources},
  }
  if source is None:
    chosen: Sequence = bench.eval_sources
    if not chosen:
      raise ValueError(
          f'--source: benchmark {bench.name!r} has no eval source, expected a source name from ' f'{sorted(every)}'
      )
  elif source in every:
    chosen = (every[source],)
  else:
    raise ValueError(f'--source: got {source!r}, expected one of {sorted(every)}')
  state = _restore(exp, workdir)
  fn = jax.jit(
      functools.partial(_probabilities, model=exp.model, tasks=bench.tasks),
      in_shardings=(exp.replicated, exp.replicated, exp.data_sharding),
      out_shardings=exp.replicated,
  )
  out_dir = os.path.join(workdir, 'predictions')
  paths = []
  for src in chosen:
    hosts = jax.process_count()
    slices = [data_lib.host_slice(src.num_examples(), h, hosts) for h in range(hosts)]
    per_host = exp.config.eval_batch_size // hosts
    probs, labels, positions = {t: [] for t in bench.tasks}, {t: [] for t in bench.tasks}, []
    for k, batch in enumerate(
        data_lib.eval_iterator(
            src, bench.tasks, global_batch_size=exp.config.eval_batch_size, sharding=exp.data_sharding
        )
    ):
      got = jax.device_get(fn(state.params, state.batch_stats, batch))  # replicated: the whole global batch
      mask = np.asarray(got['mask']) > 0
      rows = np.concatenate([start + k * per_host + np.arange(per_host) for start, _ in slices])
      positions.append(rows[mask])
      for t in bench.tasks:
        probs[t].append(np.asarray(got['probs'][t])[mask])
        labels[t].append(np.asarray(got['labels'][t])[mask])
    arrays = {'positions': np.concatenate(positions).astype(np.int64)}
    order = np.argsort(arrays['positions'], kind='stable')
    arrays['positions'] = arrays['positions'][order]
    for t in bench.tasks:
      arrays[t] = np.concatenate(probs[t])[order]
      arrays[f'labels/{t}'] = np.concatenate(labels[t])[order]
    path = os.path.join(out_dir, f'{src.name}.npz')
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      np.savez(path, **arrays)
    paths.append(path)
  return paths
