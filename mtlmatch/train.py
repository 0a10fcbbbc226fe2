"""The one train loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: build the experiment (``mtlmatch/experiment.py``: every check of the config and the data, before
anything is written) → the state, fresh or restored from the workdir's newest checkpoint (or warm-started from
``config.init_from``) → the loop: train step (``mtlmatch/step.py``), the evaluators of ``config.evals`` that are due
(``mtlmatch/evaluators.py``), the negative-transfer monitor's decisions, logs, checkpoints → every evaluator at the
last step → ``results.json`` (``mtlmatch/workdir.py``).

Preemption: SIGTERM (what a preempted cloud VM receives) or a first Ctrl-C (SIGINT) makes the loop checkpoint after the
current step and return; the next call resumes exactly where it stopped (batch t is a pure function of (seed, t)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from clu import periodic_actions

from mtlmatch import checkpoint as ckpt_lib
from mtlmatch import config_lib
from mtlmatch import data as data_lib
from mtlmatch import evaluators
from mtlmatch import experiment as experiment_lib
from mtlmatch import progress as progress_lib
from mtlmatch import warm_start
from mtlmatch import workdir as workdir_lib
from mtlmatch.data import fingerprint as fingerprint_lib


class Preemption:
  """Turns SIGTERM (what a preempted cloud VM receives) and a first Ctrl-C (SIGINT) into a flag the loop checks after
  each step: it checkpoints and returns, and the run resumes from there. A second Ctrl-C stops at once
  (``KeyboardInterrupt``; the work since the last checkpoint is lost). ``signal_name``: which one was received."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handler)
      except ValueError:  # not in the main thread (e.g. a notebook worker): no preemption handling
        pass
    return self

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      logging.warning('Ctrl-C: checkpointing after this step and stopping (press Ctrl-C again to stop at once).')

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def health_error(step: int, metrics: Mapping[str, Any], last_checkpoint: Optional[int] = None) -> str:
  """The FloatingPointError message: the step, every non-finite task loss and term by name, the norms, and which
  checkpoint is kept (none at or after ``step`` was written: the check runs before the save)."""
  bad = []
  for key, value in metrics.items():
    if key.startswith('loss/') and not np.all(np.isfinite(value)):
      kind, _, name = key[len('loss/') :].partition('/')  # 'task/expression' or 'term/dm'
      bad.append(f'{kind} {name!r} = {value}')
  norms = f'loss = {metrics["loss"]}, grad_norm = {metrics["grad_norm"]}, param_norm = {metrics["param_norm"]}'
  what = f'non-finite {", ".join(bad)} ({norms})' if bad else f'non-finite update ({norms})'
  kept = (
      f'the last good checkpoint, step {last_checkpoint}, is kept'
      if last_checkpoint is not None
      else 'no checkpoint had been written yet'
  )
  return (
      f'non-finite training at step {step}: {what}. Health is checked at log and checkpoint steps, so it may '
      f'have begun after the previous check; {kept}. Lower the learning rate, check the inputs, or set '
      "config.nonfinite='skip' to skip such updates."
  )


class IntervalMean:
  """Sums of the train metrics over the steps since the last :meth:`pop`, kept on device (one small jitted add per
  step; nothing leaves the device until the log step). ``finite`` and ``skipped`` are health counters, not averaged."""

  _COUNTERS = ('finite', 'skipped')

  def __init__(self):
    self._sums, self._count = None, 0
    self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def add(self, metrics: Mapping[str, Any]) -> None:
    values = {k: v.astype(jnp.float32) for k, v in metrics.items() if k not in self._COUNTERS}
    self._sums = values if self._sums is None else self._add(self._sums, values)
    self._count += 1

  def pop(self) -> dict[str, float]:
    if self._sums is None:
      return {}
    means = {k: float(v) / self._count for k, v in jax.device_get(self._sums).items()}
    self._sums, self._count = None, 0
    return means


def parameter_counts(params) -> dict[str, int]:
  """Parameters per module: ``{'encoder': n, 'head/<task>': n, ...}`` (what the run logs at its start)."""
  count = lambda tree: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))  # noqa: E731
  return {'encoder': count(params['encoder']), **{f'head/{t}': count(p) for t, p in params['heads'].items()}}


def relatedness_image(table, cell: int = 8) -> np.ndarray:
  """A relatedness table ``[C_A, C_B]`` in [0, 1] as a grey heat-map image ``[1, C_A·cell, C_B·cell, 3]`` (rows =
  A classes, columns = B labels, brighter = higher), for clu's ``write_images``."""
  t = np.clip(np.asarray(table, np.float32), 0.0, 1.0)
  pixels = np.kron(t, np.ones((cell, cell), np.float32))
  return np.repeat(pixels[None, :, :, None], 3, axis=-1)


def check_labels(step: int, invalid_labels: float) -> None:
  """One ValueError when labels neither missing nor valid reached the step (the step's count, or its mean over the
  steps since the last log)."""
  if invalid_labels:
    raise ValueError(
        f'training up to step {step}: labels neither missing (-1) nor valid for their task reached the train step '
        f"({invalid_labels:g} per step; they weigh 0 in the losses): expected labels in each task's range; the "
        'sources of data.make_benchmark are checked before training, so check a custom batch stream'
    )


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """One run of the loop in a workdir: the train state and what the loop keeps beside it (the evaluators' records,
  the monitor's record, the learned tables' history), with the writer and the checkpointer. Its methods are the
  loop's periodic actions."""

  exp: experiment_lib.Experiment
  workdir: str
  state: Any
  evals: dict
  records: dict
  monitor_record: Optional[dict]
  checkpointer: ckpt_lib.Checkpointer
  writer: Any
  config_json: dict
  data_fingerprint: Any
  learned_history: list

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def save(self, step: int) -> None:
    """Checkpoints the state with the metadata a resume needs (data position, config, data fingerprint, records)."""
    meta = {
        'step': step,
        'data_position': {'start_step': step},
        'config': self.config_json,
        'data': self.data_fingerprint,
        'evals': self.records,
    }
    if self.exp.monitor is not None:
      meta['monitor'] = self.monitor_record
    self.checkpointer.save(step, self.state, meta)

  def evaluate(self, chosen: Mapping[str, evaluators.Evaluator], step: int) -> dict:
    """Runs the ``chosen`` evaluators on the current state, writes their scalars, keeps their records; where they
    computed validation metrics, the negative-transfer monitor compares them with its references and the loop
    applies its decisions (:meth:`apply_monitor`)."""
    at = evaluators.At(self.exp.view, self.state, step)
    reports, self.records = evaluators.run(chosen, at, self.records)
    scalars = {k: v for report in reports.values() for k, v in report.scalars.items()}
    if self.exp.monitor is not None and at.computed('validation'):
      scalars.update(self.apply_monitor(step, at.classification('validation')['metrics']))
    self.writer.write_scalars(step, scalars)
    return reports

  def apply_monitor(self, step: int, validation: Mapping[str, Mapping[str, float]]) -> dict:
    """The negative-transfer monitor's decisions at a validation evaluation: its warnings logged, its record kept
    and, with ``nt_action='anneal'``, its term scales written into the state (the step reads them from
    ``state.term_scales``). Returns its scalars."""
    monitor = self.exp.monitor
    self.monitor_record, messages = monitor.update(self.monitor_record, step, validation)
    for message in messages:
      logging.warning(message)
    if self.monitor_record['scales']:
      scales = {t: np.float32(v) for t, v in self.monitor_record['scales'].items()}
      logging.info('Negative-transfer monitor: term scales at step %d: %s', step, self.monitor_record['scales'])
      self.state = self.state.replace(term_scales=jax.device_put(scales, self.exp.replicated))
    return monitor.scalars(self.monitor_record)

  def log_relatedness(self, step: int) -> None:
    """The learned tables as TensorBoard heat-maps (``relatedness/<a>-><b>``, brighter = higher; cells 8 px) and
    as ``<workdir>/relatedness_learned.json``: the latest tables and their step, and ``history``, every logged
    ``{step, tables}`` (a resumed run drops the entries from its own step on, which it logs again)."""
    tables = {k: np.asarray(v).tolist() for k, v in jax.device_get(self.state.relatedness).items()}
    self.writer.write_images(step, {f'relatedness/{k}': relatedness_image(t) for k, t in tables.items()})
    if self.is_main:
      self.learned_history[:] = [h for h in self.learned_history if h['step'] < step] + [
          {'step': step, 'tables': tables}
      ]
      workdir_lib.write_learned(self.workdir, step, tables, self.learned_history)

  def stop_reason(self) -> Optional[str]:
    return evaluators.stop_reason(self.evals, self.records)

  def check_health(self, step: int, fetched: Mapping[str, Any]) -> None:
    """Halts on invalid labels in the batch (``invalid_labels``, one ValueError), and with :func:`health_error` on a
    non-finite update (``config.nonfinite='halt'``), after the write in flight is committed (only a committed step
    counts as the last good checkpoint)."""
    check_labels(step, fetched['invalid_labels'])
    if (fetched['finite'] and np.isfinite(fetched['param_norm'])) or self.exp.config.nonfinite != 'halt':
      return
    try:
      last_checkpoint = self.checkpointer.latest_step()
    except ckpt_lib.CheckpointWriteError as e:  # still report the non-finite step, which is why the run stops
      logging.error('%s', e)
      last_checkpoint = self.checkpointer.latest_step()
    raise FloatingPointError(health_error(step, fetched, last_checkpoint))


def start_run(exp: experiment_lib.Experiment, workdir: str) -> Run:
  """The state of a run in ``workdir``, in this order: the newest restorable checkpoint there (a resume: config,
  layout and data fingerprint must match), else ``config.init_from`` (warm start), else a fresh initialisation."""
  config = exp.config
  data_fingerprint = fingerprint_lib.benchmark_fingerprint(exp.benchmark)
  config_json = json.loads(config_lib.to_json(config))
  workdir_lib.check_writable(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = exp.init_state()
  restored = checkpointer.restore_latest(
      ckpt_lib.abstract_like(state), check_meta=lambda meta: ckpt_lib.check_config_drift(meta['config'], config_json)
  )
  evals = evaluators.build(config, exp.view)
  records = {}  # the evaluators' records (e.g. the best-validation selection), continued from the checkpoint
  # The negative-transfer monitor's record (JSON, in checkpoint metadata; its scales are also in state.term_scales).
  monitor_record = exp.monitor.initial_record() if exp.monitor else None
  if restored is not None:
    # After the config and layout checks: a resume, or a cached result, of other data is refused too.
    fingerprint_lib.check(restored[1]['data'], data_fingerprint, where=f'the checkpoint in {workdir!r}')
    state, meta = restored
    records = evaluators.records_from_meta(evals, meta)
    monitor_record = meta['monitor'] if exp.monitor else None
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  elif config.init_from:
    state = warm_start.apply(state, config)
  is_main = jax.process_index() == 0
  if is_main:
    workdir_lib.write_atomically(os.path.join(workdir, workdir_lib.CONFIG_FILE), config_lib.to_json(config, indent=2))
    if exp.relatedness:
      workdir_lib.write_json(workdir, workdir_lib.RELATEDNESS_FILE, exp.relatedness)
  history = workdir_lib.learned_history(workdir) if exp.objective.learned_tables and is_main else []
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=False)
  return Run(
      exp, workdir, state, evals, records, monitor_record, checkpointer, writer, config_json, data_fingerprint, history
  )


def progress_hooks(config: ml_collections.ConfigDict, run: Run) -> list:
  """clu's ReportProgress (steps/s, ETA, uptime) and, with ``config.profile_steps``, a jax.profiler trace of that
  many steps from ``config.profile_first_step`` into ``<workdir>/profile`` (TensorBoard's profile tab)."""
  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=config.total_steps, writer=run.writer, every_steps=config.log_every, every_secs=None
      )
  ]
  if config.profile_steps and run.is_main:
    hooks.append(
        periodic_actions.Profile(
            logdir=os.path.join(run.workdir, 'profile'),
            num_profile_steps=config.profile_steps,
            profile_duration_ms=None,
            first_profile=config.profile_first_step,
            every_steps=None,
            every_secs=None,
        )
    )
  return hooks


def log_start(config: ml_collections.ConfigDict, run: Run, start_step: int) -> None:
  """Hyper-parameters (a fresh run) and the parameter count per module."""
  if start_step == 0:
    flat = config_lib.flat_keys(config)
    run.writer.write_hparams(
        {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in sorted(flat.items())}
    )
  sizes = parameter_counts(run.state.params)
  logging.info('Parameters: %s', ', '.join(f'{k} {v:,}' for k, v in sizes.items()))
  run.writer.write_scalars(start_step, {f'params/{k}': v for k, v in sizes.items()})
  if run.exp.objective.learned_tables and start_step == 0:
    run.log_relatedness(0)  # the initial tables


def train_loop(run: Run, start_step: int, preemption: Preemption, *, stop_at: Optional[int]) -> tuple[int, bool]:
  """Steps from ``start_step`` until the last step, an early stop or an interruption (SIGTERM, ``stop_at``): the
  step reached and whether the run was interrupted. After each step: the learned tables' log, progress, the due
  evaluators (before the step's checkpoint, so that its metadata holds their records), health at log and checkpoint
  steps, logs, checkpoints."""
  exp, config = run.exp, run.exp.config
  batches = exp.train_batches(start_step)
  schedule = experiment_lib.make_schedule(config)
  hooks = progress_hooks(config, run)
  interval = IntervalMean()
  progress = progress_lib.Progress(config.total_steps, start_step, enabled=run.is_main)
  # XLA:CPU meets the threads of all fake devices at each collective on a shared thread pool; with a second step
  # already dispatched, its blocked participants can starve the first step's (seen here as a rendezvous abort after
  # ~100 steps with 8 devices on 2 cores). Accelerators keep asynchronous dispatch.
  one_step_in_flight = jax.default_backend() == 'cpu' and exp.mesh.size > 1
  step = start_step
  with contextlib.closing(progress):
    while step < config.total_steps and not run.stop_reason():
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        run.state, metrics = exp.step_fn(run.state, next(batches))
      if one_step_in_flight:
        jax.block_until_ready(metrics['loss'])
      interval.add(metrics)
      step += 1
      if exp.objective.learned_tables and step % config.relatedness_every == 0:  # the step re-estimated the tables
        run.log_relatedness(step)
      progress.advance(step)
      for hook in hooks:
        hook(step)
      due = evaluators.due(run.evals, step, config.total_steps)
      if due:
        run.evaluate(due, step)
        if run.stop_reason():
          logging.info('Early stopping at step %d: %s.', step, run.stop_reason())
      log_now = step % config.log_every == 0 or step == config.total_steps
      interrupted = preemption.requested or step == stop_at
      ckpt_now = step % config.checkpoint_every == 0 or step == config.total_steps or interrupted or run.stop_reason()
      if log_now or ckpt_now:
        fetched = jax.device_get(metrics)  # health scalars leave the device only here
        run.check_health(step, fetched)
        if log_now:
          # Each train metric as its mean over the steps since the last log (health counters: their last value).
          means = {**_scalars(fetched), **interval.pop()}
          check_labels(step, means['invalid_labels'])
          run.writer.write_scalars(step, {**means, 'learning_rate': float(schedule(step - 1))})
          progress.log(step, config.total_steps, means['loss'])
        if ckpt_now:
          run.save(step)
      if interrupted and step < config.total_steps and not run.stop_reason():
        return step, True
  return step, False


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: Optional[int] = None,
    benchmark: Optional[data_lib.Benchmark] = None,
) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and returns the final results dict.

  ``stop_at``: checkpoint and return after that step, as a preemption would (to cut a long run into jobs of bounded
  length; the next call resumes exactly where this one stopped). ``benchmark``: see
  :func:`experiment.build_experiment`.
  """
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  progress_lib.quiet_libraries()
  # 1. Sources, relatedness, model, objective, compiled steps (all validation happens here, before any write).
  exp = experiment_lib.build_experiment(config, benchmark=benchmark)
  warning = experiment_lib.warn_if_no_eval(exp.benchmark)
  if warning:
    logging.warning(warning)
  # 2. The state: restored, warm-started or fresh.
  run = start_run(exp, workdir)
  start_step = int(run.state.step)
  log_start(exp.config, run, start_step)
  # 3. The loop. A checkpoint is written in the background while the next steps run (checkpoint.py); every exit waits
  # for it (closed_on_error: an error leaves no write in flight behind it).
  with Preemption() as preemption, run.checkpointer.closed_on_error():
    step, interrupted = train_loop(run, start_step, preemption, stop_at=stop_at)
  run.checkpointer.close()  # the last write is committed before the log says so and the process may exit
  if interrupted:
    reason = f'{preemption.signal_name} received' if preemption.requested else f'stop_at={stop_at}'
    logging.warning('%s: checkpoint saved at step %d; stopping so the run can resume.', reason, step)
    run.writer.flush()
    # A Ctrl-C is said so (the CLI exits 130 for it); SIGTERM and stop_at return {'step', 'interrupted'} alone.
    by_ctrl_c = {'signal': 'SIGINT'} if preemption.signal_name == 'SIGINT' else {}
    return {'step': step, 'interrupted': True, **by_ctrl_c}
  # 4. Every evaluator at the last step; results.json gathers their parts (test metrics at the last and at the
  # best-validation step, ...). A finished run called again returns its results.json.
  if step > start_step or not workdir_lib.exists(workdir, workdir_lib.RESULTS_FILE):
    results = final_results(run, step, t_start)
  else:
    results = workdir_lib.read_results(workdir)
  run.writer.flush()
  return results


def final_results(run: Run, step: int, t_start: float) -> dict:
  """Runs every evaluator at ``step`` and writes ``results.json`` (the main process): step, wall time, each
  evaluator's part, whether training stopped early, the learned tables and the monitor's record."""
  reports = run.evaluate(run.evals, step)
  results = {
      'step': step,
      'wall_time_s': time.time() - t_start,
      **{k: v for report in reports.values() for k, v in report.results.items()},
      'stopped_early': bool(run.stop_reason()),
  }
  if run.exp.objective.learned_tables:
    results['learned_relatedness'] = {
        k: np.asarray(v).tolist() for k, v in jax.device_get(run.state.relatedness).items()
    }
  if run.exp.monitor is not None:
    results['negative_transfer'] = run.monitor_record
  if run.is_main:
    workdir_lib.write_results(run.workdir, results)
  return results
