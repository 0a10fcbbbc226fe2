"""Case-study report: mean ± std over seeds, Δm vs single-task baselines, negative-transfer flags, linear probes of
the frozen shared features, PNG plots, written as ``REPORT.md`` with the commands, package versions and machine.

Conventions (also stated in every report):

* **Primary metric per task** (:data:`PRIMARY`, each kind's ``TaskKind.primary_metric``): ``accuracy`` for a
  multiclass task, ``mean_f1`` (mean over labels of per-label F1) for a multilabel task — entry accuracy of sparse
  AUs is dominated by the all-absent prediction — and ``ccc`` (mean over outputs) for a regression task. Each
  metric's direction is its kind's (``TaskKind.lower_is_better``: MAE and RMSE are lower-is-better).
* **Δm** (Maninis et al. 2019; Vandenhende et al. 2021): Δm = (1/T) Σ_t (−1)^{l_t} (M_t − M_ST,t) / M_ST,t × 100,
  l_t = 1 where lower is better, else 0; M_t is the variant's seed-mean of task t's primary metric and M_ST,t the
  seed-mean of the single-task baseline ``st_<t>``.
* **Negative transfer** on task t: the variant is worse than the single-task model (M_ST,t − M_t, or M_t − M_ST,t
  where lower is better) by more than one standard deviation (sample std over seeds, ddof = 1) of either.
* **Linear probe**: features of the final checkpoint's encoder (frozen, eval mode) on up to ``probe_train`` training
  examples labelled for the task (from the train sources that annotate it) and ``probe_test`` test examples;
  standardised, then an L2-regularised logistic regression (one per label for multilabel tasks) scored with the
  task's primary metric: the library's linear probe (``mtlmatch/probe.py``, JAX; the
  objective of scikit-learn's ``LogisticRegression(C=1)``, which reports before this change used). This is the
  representation-quality measure of the DGR paper.

  python experiments/case_studies.py affect --report-only     # re-table and re-plot the finished runs
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import sweep  # noqa: E402
from mtlmatch import tasks as tasks_lib  # noqa: E402

PRIMARY = {kind: tasks_lib.KINDS[kind].primary_metric for kind in ('multiclass', 'multilabel', 'regression')}


def lower_is_better(kind: str, metric: str) -> bool:
  """Whether lower is better for ``metric`` of a task of ``kind`` (``TaskKind.higher_is_better``)."""
  return not tasks_lib.KINDS[kind].higher_is_better(metric)


# Result folders SUMMARY.md reads.
STUDY_DIRS = ('affect', 'shopping', 'multi_fashion')
PACKAGES = (
    'jax',
    'jaxlib',
    'flax',
    'optax',
    'orbax-checkpoint',
    'tensorflow-cpu',
    'tensorflow-datasets',
    'ml-collections',
    'clu',
    'numpy',
    'matplotlib',
)


# ---------------------------------------------------------------------------------------------------------------
# Statistics (pure; tested against hand numbers).


# Run-level columns of sweep.collect shown in the convergence table, not among the metrics.
CONVERGENCE_COLUMNS = ('validation/late_gain', 'validation/stopped_early', 'validation/best_at_end')


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample std with ddof=1 (0 for a single value), n) of the finite values."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return float('nan'), float('nan'), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def aggregate(rows: Sequence[Mapping]) -> dict[str, dict[str, tuple[float, float, int]]]:
  """``{variant name: {column: (mean, std, n)}}`` over seeds, for every numeric ``<task>/<metric>`` column."""
  by_name: dict[str, list[Mapping]] = {}
  for row in rows:
    by_name.setdefault(row['name'], []).append(row)
  out = {}
  for name, group in by_name.items():
    columns = dict.fromkeys(k for r in group for k in r if '/' in k and k != 'workdir')
    out[name] = {c: mean_std([r.get(c) for r in group]) for c in columns}
  return out


def delta_m(
    means: Mapping[str, float], baselines: Mapping[str, float], lower_is_better: Optional[Mapping[str, bool]] = None
) -> float:
  """Δm (%) = (1/T) Σ_t (−1)^{l_t} (M_t − M_ST,t) / M_ST,t × 100 over the tasks of ``baselines``."""
  lower_is_better = lower_is_better or {}
  missing = sorted(set(baselines) - set(means))
  if missing:
    raise ValueError(f'means: got no value for tasks {missing}, expected one per baseline task {sorted(baselines)}')
  terms = [(-1.0 if lower_is_better.get(t, False) else 1.0) * (means[t] - b) / b for t, b in baselines.items()]
  return float(100.0 * np.mean(terms))


def negative_transfer(mtl: tuple[float, float], st: tuple[float, float], *, lower_is_better: bool = False) -> bool:
  """True when the MTL (mean, std) is worse than the single-task (mean, std) by more than max(std_MTL, std_ST)."""
  gap = (mtl[0] - st[0]) if lower_is_better else (st[0] - mtl[0])
  return bool(gap > max(mtl[1], st[1]))


# ---------------------------------------------------------------------------------------------------------------
# Linear probes of the frozen shared features.


def _restore_raw(workdir: str):
  """The newest checkpoint's state as plain nested dicts (no target tree needed)."""
  import orbax.checkpoint as ocp

  steps = sorted(
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
      if os.path.basename(p).isdigit()
  )
  if not steps:
    raise ValueError(f'workdir {workdir!r}: got no checkpoint, expected checkpoints/<step>/ from a finished run')
  import jax

  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  # The run saved arrays replicated over its mesh (e.g. 8 fake devices); read them onto this process's first device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
      meta,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'),
  )
  return checkpointer.restore(path, target)


def linear_probes(
    runs: Sequence[sweep.Run], *, probe_train: int = 2000, probe_test: int = 2000, echo=print
) -> dict[str, dict[str, float]]:
  """``{workdir: {task: probe score}}`` (workdir as ``sweep.display_path``) for every finished run with a
  checkpoint, every task of the benchmark.

  The probe is the library's (``mtlmatch/probe.py``, the ``linear_probe`` evaluator's code): up to
  ``probe_train`` / ``probe_test`` labelled examples per task (``probe_sources``: the benchmark's training sources →
  its eval sources, a seeded draw), the final checkpoint's frozen encoder features, and an L2-regularised logistic
  regression in JAX (``fit_logistic``: scikit-learn's ``LogisticRegression(C=1)`` objective, standardised features,
  LBFGS) scored with the task's primary metric (``probe_metrics``).
  """
  import functools
  import jax
  import ml_collections
  from mtlmatch import data as data_lib
  from mtlmatch import probe as probe_lib
  from mtlmatch import models

  cache: dict[str, tuple] = {}
  out = {}
  for run in runs:
    if not run.finished:
      continue
    with open(os.path.join(run.workdir, 'config.json')) as f:
      config = ml_collections.ConfigDict(json.load(f))
    key = json.dumps(config.data.to_dict(), sort_keys=True)
    if key not in cache:  # the probe examples of one benchmark configuration, drawn once for all its runs
      bench = data_lib.get_benchmark(
          config.data.name, data_dir=config.data.data_dir, seed=config.data.seed, **config.data.options.to_dict()
      )
      cache[key] = bench.tasks, probe_lib.probe_sources(bench, train_examples=probe_train, test_examples=probe_test)
    tasks, sources = cache[key]
    state = _restore_raw(run.workdir)
    trained = {t: tasks[t] for t in (config.tasks or tasks)}
    model = models.build_model(
        trained,
        encoder=config.encoder.name,
        encoder_kwargs=config.encoder.kwargs.to_dict(),
        head=config.head.name,
        head_kwargs=config.head.kwargs.to_dict(),
    )
    outputs = jax.jit(functools.partial(probe_lib.probe_outputs, model=model))
    fn = functools.partial(outputs, state['params'], state.get('batch_stats') or {})
    key = sweep.display_path(run.workdir)
    out[key] = {}
    for task, (train_source, test_source) in sources.items():
      train, test = (probe_lib.probe_features(fn, s, tasks[task], batch_size=500) for s in (train_source, test_source))
      out[key][task] = probe_lib.probe_metrics(tasks[task], train, test)[tasks[task].primary_metric]
    echo(f'  probe {run.variant.name} seed {run.seed}: ' + ', '.join(f'{t} {v:.3f}' for t, v in out[key].items()))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Curves from the TensorBoard event files.


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{tag: (steps, values)}`` from every event file in ``workdir`` (clu writes tensor summaries)."""
  import tensorflow as tf

  series: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor'):
          array = tf.make_ndarray(value.tensor)
          if array.ndim or array.dtype.kind not in 'fiub':  # e.g. the hparams plugin's summary: not a scalar
            continue
          x = float(array)
        elif value.HasField('simple_value'):
          x = float(value.simple_value)
        else:
          continue
        series.setdefault(value.tag, {})[int(event.step)] = x
  return {tag: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for tag, d in series.items()}


def plot_curves(runs: Sequence[sweep.Run], tasks: Sequence[str], path: str) -> None:
  """One panel per task: the training loss ``loss/task/<t>`` vs step, seed-mean per variant (band = ± std)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
  names = list(dict.fromkeys(r.variant.name for r in runs))
  scalars = {r.workdir: read_scalars(r.workdir) for r in runs if r.finished}
  for ax, task in zip(axes[0], tasks):
    for name in names:
      curves = [
          scalars[r.workdir][f'loss/task/{task}']
          for r in runs
          if r.variant.name == name and r.workdir in scalars and f'loss/task/{task}' in scalars[r.workdir]
      ]
      if not curves:
        continue
      n = min(len(c[0]) for c in curves)
      steps, values = curves[0][0][:n], np.stack([c[1][:n] for c in curves])
      (line,) = ax.plot(steps, values.mean(0), label=name)
      ax.fill_between(
          steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.15, color=line.get_color()
      )
    ax.set_title(f'training loss: {task}')
    ax.set_xlabel('step')
    ax.set_yscale('log')
  for ax in axes[0]:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc='upper right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_validation_curves(runs: Sequence[sweep.Run], path: str) -> None:
  """The validation score (mean primary metric over tasks, from ``results.json``'s selection history) vs step,
  seed-mean per variant; a marker at each run's best step. Shows where each cell converged and stopped."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 5))
  names = list(dict.fromkeys(r.variant.name for r in runs))
  for name in names:
    histories = []
    for r in runs:
      if r.variant.name == name and r.finished:
        with open(r.results_path) as f:
          selection = json.load(f).get('selection') or {}
        if selection.get('history'):
          histories.append(selection)
    if not histories:
      continue
    steps = sorted({h['step'] for s in histories for h in s['history']})
    table = np.full((len(histories), len(steps)), np.nan)
    for i, s in enumerate(histories):
      for h in s['history']:
        table[i, steps.index(h['step'])] = h['score'] if h['score'] is not None else np.nan
    (line,) = ax.plot(steps, np.nanmean(table, 0), label=name, lw=1.2)
    for s in histories:
      ax.plot([s['best_step']], [s['best_score']], 'o', ms=3, color=line.get_color())
  ax.set_xlabel('step')
  ax.set_ylabel('validation score (mean primary metric)')
  ax.set_title("validation curves (seed mean; dots: each run's best step)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Method families, one colour each (checked in order: a name with `dgr` is a DGR variant whatever else it has).
FAMILIES = (
    ('DGR', lambda parts: 'dgr' in parts, 'tab:purple'),
    ('DM + co-annotation', lambda parts: 'dm' in parts and 'coann' in parts, 'tab:red'),
    ('DM', lambda parts: 'dm' in parts, 'tab:orange'),
    ('co-annotation', lambda parts: 'coann' in parts, 'tab:green'),
    ('plain MTL', lambda parts: True, 'tab:blue'),
)


def family(name: str) -> tuple[str, str]:
  """``(family, colour)`` of a variant name, from its ``_``-separated parts (``scarce_dm_coann`` → DM + co-ann.)."""
  parts = set(name.split('_'))
  return next((label, colour) for label, test, colour in FAMILIES if test(parts))


def plot_differences(summary: Mapping, tasks: Sequence[str], path: str, title: str, *, key: str = 'metrics') -> None:
  """A forest plot: one panel per task, one row per variant, the dot at (variant − its single-task baseline) of the
  task's primary metric (seed means), the bar ± the two stds combined (√(s_v² + s_b²)), a zero line, one colour per
  method family. ``key='probe'`` plots the linear-probe scores instead. The absolute numbers are REPORT.md's tables."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  variants = summary['variants']
  names = [n for n in variants if not is_baseline(n, tasks) and variants[n].get('baselines')]
  fig, axes = plt.subplots(
      1, len(tasks), figsize=(3.6 * len(tasks) + 2.6, 0.32 * len(names) + 1.6), sharey=True, squeeze=False
  )
  for ax, task in zip(axes[0], tasks):
    column = summary['primary'][task] if key == 'metrics' else task
    for row, name in enumerate(names):
      base = variants[name]['baselines'].get(task)
      mine = variants[name].get(key, {}).get(column)
      ref = variants.get(base, {}).get(key, {}).get(column) if base else None
      if mine is None or ref is None:
        continue
      ax.errorbar(
          mine[0] - ref[0], row, xerr=np.hypot(mine[1], ref[1]), fmt='o', color=family(name)[1], capsize=2, markersize=5
      )
    ax.axvline(0.0, color='0.4', linestyle='--', linewidth=1)
    ax.set_title(f'{task}: Δ {summary["primary"][task].split("/")[1]} vs single-task', fontsize=9)
    ax.grid(axis='x', alpha=0.3)
  axes[0][0].set_yticks(range(len(names)))
  axes[0][0].set_yticklabels(names, fontsize=8)
  axes[0][0].invert_yaxis()
  seen = dict.fromkeys(family(n) for n in names)
  handles = [plt.Line2D([], [], marker='o', linestyle='', color=colour, label=label) for label, colour in seen]
  fig.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The report.


def machine_description() -> str:
  model = ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
  except OSError:
    pass
  return (
      f'{platform.platform()}; Python {platform.python_version()}; {os.cpu_count()} CPU cores visible '
      f'({model or platform.processor()}), shared with other jobs; JAX backend of this process: {_jax_backend()} '
      '(each CPU run gets one fake device per core from mtlmatch.main unless XLA_FLAGS sets a count)'
  )


def _jax_backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  return f'{jax.default_backend()} ({jax.device_count()} devices)'


def package_versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def _fmt(ms, seeds: int = 0) -> str:
  """'mean ± std', with '(n=k)' when fewer than ``seeds`` runs finished."""
  mean, std, n = ms
  if n == 0:
    return '—'
  return f'{mean:.4f} ± {std:.4f}' + (f' (n={n})' if n < seeds else '')


def is_baseline(name: str, tasks) -> bool:
  """``st_<task>`` or ``<prefix>_st_<task>``: a single-task baseline."""
  return any(name == f'st_{t}' or name.endswith(f'_st_{t}') for t in tasks)


def baseline_prefix(name: str, prefixes: Sequence[str]) -> str:
  """The longest of ``prefixes`` (the ``<prefix>`` of the ``<prefix>st_<task>`` baselines present) that ``name``
  starts with: ``cnn_ew`` is compared with ``cnn_st_<task>``, ``mtl`` with ``st_<task>`` (prefix '')."""
  return max((p for p in prefixes if name.startswith(p)), key=len, default='')


def summarize(
    rows: Sequence[Mapping], task_kinds: Mapping[str, str], probes: Optional[Mapping[str, Mapping[str, float]]] = None
) -> dict:
  """Aggregated numbers the report prints: per variant the seed mean ± std of every metric, Δm, negative-transfer
  flags per task and probe scores. Variants ``<prefix>st_<task>`` are the baselines of the variants named
  ``<prefix>…`` (e.g. ``cnn_st_left`` for ``cnn_ew``; prefix '' for ``st_aus``)."""
  agg = aggregate(rows)
  primary = {t: f'{t}/{PRIMARY[k]}' for t, k in task_kinds.items()}
  # Per task, the prefixes that have its baseline: `scarce_mtl` uses `scarce_st_item` and, for the tasks without a
  # `scarce_` baseline, `st_<t>`.
  prefixes = {t: {n[: -len(f'st_{t}')] for n in agg if n == f'st_{t}' or n.endswith(f'_st_{t}')} for t in task_kinds}
  out = {'primary': primary, 'variants': {}}
  for name, cols in agg.items():
    entry = {'metrics': {c: list(v) for c, v in cols.items()}}
    baseline_names = {t: f'{baseline_prefix(name, prefixes[t])}st_{t}' for t in task_kinds if prefixes[t]}
    baselines = {t: agg[b][primary[t]] for t, b in baseline_names.items() if primary[t] in agg.get(b, {})}
    if (
        not is_baseline(name, task_kinds)
        and len(baselines) == len(task_kinds)
        and all(primary[t] in cols for t in task_kinds)
    ):
      entry['baselines'] = {t: baseline_names[t] for t in task_kinds}
      lower = {t: lower_is_better(k, PRIMARY[k]) for t, k in task_kinds.items()}
      entry['delta_m'] = delta_m(
          {t: cols[primary[t]][0] for t in task_kinds}, {t: b[0] for t, b in baselines.items()}, lower
      )
      # A std from one seed is 0, which would flag any difference: no flag (None) unless both have >= 2 seeds.
      entry['negative_transfer'] = {
          t: negative_transfer(cols[primary[t]][:2], baselines[t][:2], lower_is_better=lower[t])
          if cols[primary[t]][2] >= 2 and baselines[t][2] >= 2
          else None
          for t in task_kinds
      }
    if probes:
      by_task = {}
      for row in rows:
        if row['name'] == name and row['workdir'] in probes:
          for t, v in probes[row['workdir']].items():
            by_task.setdefault(t, []).append(v)
      entry['probe'] = {t: list(mean_std(v)) for t, v in by_task.items()}
    out['variants'][name] = entry
  return out


def render_markdown(
    study: str,
    summary: dict,
    task_kinds: Mapping[str, str],
    *,
    command: str,
    notes: str = '',
    seeds: Sequence[int] = (),
    sweep_seconds: Optional[float] = None,
    run_seconds: Sequence[float] = (),
    run_commands: Mapping[str, str] = {},
) -> str:
  primary = summary['primary']
  variants = summary['variants']
  lines = [
      f'# Case study: {study}',
      '',
      "Generated by `experiments/report.py` from the runs' `results.json`, event files "
      'and checkpoints; no number here is edited by hand.',
      '',
      '## Command',
      '',
      f'```\n{command}\n```',
      '',
  ]
  if notes:
    lines += ['## What ran (and what was cut)', '', notes, '']
  lines += [
      '## Definitions',
      '',
      '* Primary metric per task: '
      + ', '.join(f'`{t}` → `{primary[t].split("/")[1]}`' for t in task_kinds)
      + ' (multiclass: accuracy; multilabel: mean over labels of per-label F1'
      + ('; regression: CCC, mean over outputs' if 'regression' in task_kinds.values() else '')
      + '). '
      + (
          'Lower is better for '
          + ', '.join(f'`{t}`' for t, k in task_kinds.items() if lower_is_better(k, PRIMARY[k]))
          + ' (l_t = 1 below), higher for the others.'
          if any(lower_is_better(k, PRIMARY[k]) for k in task_kinds.values())
          else 'All higher is better.'
      ),
      '* Δm (%) = (1/T) Σ_t (−1)^{l_t} (M_t − M_ST,t) / M_ST,t × 100, l_t = 0 (higher is better) for every '
      'primary metric; M = seed mean; M_ST,t from the variant `st_<t>` (`<encoder>_st_<t>` for `<encoder>_…`).',
      '* NT (negative transfer) on t: M_ST,t − M_t > max(std_ST,t, std_t) (sample std over seeds).',
      "* Probe: L2-regularised logistic regression (mtlmatch.evaluators, JAX; scikit-learn's C=1 objective) on "
      'the frozen encoder features of the final checkpoint, '
      'train examples labelled for t → test set, scored by the primary metric.',
      "* **Model selection**: every test metric here is the one at the run's best-validation step (the mean "
      'over tasks of the primary metric on the validation parts held out of the training sources); the test '
      'set never chooses anything. `best_step` and `step` (where training stopped) are in the tables.',
      f'* Seeds: {list(seeds)} (config.seed: initialisation and data order; the data set is fixed).',
      '',
  ]
  tasks = list(task_kinds)
  header = ['variant'] + [primary[t] for t in tasks] + ['Δm (%)'] + [f'NT {t}' for t in tasks]
  lines += [
      '## Primary metrics (mean ± std over seeds)',
      '',
      '| ' + ' | '.join(header) + ' |',
      '|' + '---|' * len(header),
  ]
  for name, v in variants.items():
    m = v['metrics']
    cells = [name] + [_fmt(tuple(m[primary[t]]), len(seeds)) if primary[t] in m else '—' for t in tasks]
    cells.append(f'{v["delta_m"]:+.2f}' if 'delta_m' in v else 'baseline' if is_baseline(name, tasks) else '—')
    cells += [
        ('n<2' if v['negative_transfer'][t] is None else '**yes**' if v['negative_transfer'][t] else 'no')
        if 'negative_transfer' in v
        else '—'
        for t in tasks
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      '## Convergence (validation, every run)',
      '',
      'Each run follows a cosine schedule that decays the learning rate to 0 at its step cap and stops early when '
      'its validation score has not improved for the patience in "What ran". Per variant, over seeds: the '
      f'validation score gained in the last {sweep.LATE_STEPS} steps (best score minus the best up to '
      f'{sweep.LATE_STEPS} steps before the end; near 0 = it had stopped improving), the fraction of runs whose best '
      'validation step was their last, and the fraction stopped early. The curves are in validation_curves.png.',
      '',
      f'| variant | gain in the last {sweep.LATE_STEPS} steps | best at the last step | stopped early |',
      '|---|---|---|---|',
  ]
  for name, v in variants.items():
    m = v['metrics']
    gain = m.get('validation/late_gain')
    lines.append(
        f'| {name} | '
        + (f'{gain[0]:+.4f} ± {gain[1]:.4f}' if gain and gain[2] else '—')
        + ' | '
        + ' | '.join(
            f'{m[c][0]:.2f}' if c in m and m[c][2] else '—'
            for c in ('validation/best_at_end', 'validation/stopped_early')
        )
        + ' |'
    )
  columns = [
      c
      for c in dict.fromkeys(c for v in variants.values() for c in v['metrics'])
      if '/recall_' not in c and not c.endswith('/mean_entropy') and c not in CONVERGENCE_COLUMNS
  ]
  lines += [
      '',
      '## Every metric (mean ± std over seeds)',
      '',
      '| variant | ' + ' | '.join(columns) + ' |',
      '|' + '---|' * (len(columns) + 1),
  ]
  for name, v in variants.items():
    lines.append(
        f'| {name} | '
        + ' | '.join(_fmt(tuple(v['metrics'][c]), len(seeds)) if c in v['metrics'] else '—' for c in columns)
        + ' |'
    )
  if any('probe' in v for v in variants.values()):
    lines += [
        '',
        '## Linear probe of the frozen shared features (mean ± std over seeds)',
        '',
        '| variant | ' + ' | '.join(f'probe {primary[t]}' for t in tasks) + ' |',
        '|' + '---|' * (len(tasks) + 1),
    ]
    for name, v in variants.items():
      p = v.get('probe', {})
      lines.append(f'| {name} | ' + ' | '.join(_fmt(tuple(p[t]), len(seeds)) if t in p else '—' for t in tasks) + ' |')
  lines += [
      '',
      '## Collapse check: prediction entropy and confusion-matrix diagonal (test, seed means)',
      '',
      'Mean entropy of the predictions (nats; multilabel: mean binary entropy per label) and, for multiclass '
      'tasks, the recall of each class (the diagonal of the row-normalised confusion matrix). A collapsed head '
      'shows near-zero recalls for most classes; a head pulled toward uniform shows a high entropy.',
      '',
      '| variant | '
      + ' | '.join(f'{t} entropy' for t in tasks)
      + ' | '
      + ' | '.join(f'{t} diagonal' for t in tasks if task_kinds[t] == 'multiclass')
      + ' |',
      '|' + '---|' * (1 + len(tasks) + sum(task_kinds[t] == 'multiclass' for t in tasks)),
  ]
  for name, v in variants.items():
    m = v['metrics']
    cells = [f'{m[f"{t}/mean_entropy"][0]:.3f}' if f'{t}/mean_entropy' in m else '—' for t in tasks]
    for t in tasks:
      if task_kinds[t] == 'multiclass':
        recalls = [(c.split('/recall_', 1)[1], m[c][0]) for c in m if c.startswith(f'{t}/recall_')]
        if all(k.isdigit() for k, _ in recalls):  # a task without class names: by index, values only
          cells.append(' '.join(f'{r:.2f}' for _, r in sorted(recalls, key=lambda kr: int(kr[0]))) or '—')
        else:  # named classes, in the task's class order
          cells.append(' '.join(f'{k} {r:.2f}' for k, r in recalls))
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      '## Plots',
      '',
      '![validation curves](validation_curves.png)',
      '',
      '![training curves](curves.png)',
      '',
      '![difference to the single-task model per task](differences.png)',
      '',
  ]
  if any('probe' in v for v in variants.values()):
    lines += ['![linear probes: difference to the single-task model](probe_differences.png)', '']
  if run_commands:
    lines += [
        '## The command of each row',
        '',
        "Run from the repository root, these reproduce a row's first seed "
        'exactly (its config file and overrides, which may differ in size from `configs/*.py`); the other '
        "seeds differ only in `--config.seed` and `--workdir`. Each run's workdir keeps `command.txt`, "
        '`log.txt`, `config.json`, event files, checkpoints and `results.json`.',
        '',
        '| variant | command |',
        '|---|---|',
    ]
    lines += [f'| {name} | `{command}` |' for name, command in run_commands.items()]
    lines.append('')
  lines += [
      '## Environment',
      '',
      f'* Machine: {machine_description()}',
      '* Packages: ' + ', '.join(f'{k} {v}' for k, v in package_versions().items()),
  ]
  if sweep_seconds is not None:
    lines.append(
        f'* Wall time of the command that wrote this report: {sweep_seconds / 60:.1f} min '
        '(runs already finished were skipped).'
    )
  if run_seconds:
    lines.append(
        f"* The runs' own wall times (start-up and compilation included) sum to {sum(run_seconds) / 60:.1f} "
        f'min over {len(run_seconds)} runs; median {float(np.median(run_seconds)):.0f} s per run.'
    )
  lines += ["* Per-run command lines: `command.txt` in each run's workdir; every run is listed in `runs.csv`.", '']
  return '\n'.join(lines)


def write_report(
    study: str,
    runs: Sequence[sweep.Run],
    out: str,
    *,
    tasks: Sequence[str],
    command: str,
    probe: bool = True,
    notes: str = '',
    sweep_seconds: Optional[float] = None,
    probe_dgr_only: bool = False,
) -> dict:
  """Tables + plots + REPORT.md (+ summary.json) for ``runs`` in ``out``; returns the summary."""
  os.makedirs(out, exist_ok=True)
  rows = sweep.collect(runs)
  if not rows:
    raise ValueError(f'runs: got no finished run among {len(runs)}, expected at least one results.json')
  kinds = {}
  for row in rows:
    kinds.update(_task_kinds(sweep.resolve_path(row['workdir'])))
  missing = sorted(set(tasks) - set(kinds))
  if missing:
    raise ValueError(f'tasks: got {missing} that no finished run evaluated, expected tasks of {sorted(kinds)}')
  kinds = {t: kinds[t] for t in tasks}
  if probe and probe_dgr_only:  # the probe is what the DGR claim reads: only the pairs without → with DGR need it
    names = {r.variant.name for r in runs}
    paired = {n for pair in _dgr_pairs({'variants': dict.fromkeys(names)}) for n in pair}
    runs_to_probe = [r for r in runs if r.variant.name in paired]
  else:
    runs_to_probe = runs
  probes = linear_probes(runs_to_probe) if probe else None
  summary = summarize(rows, kinds, probes)
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot_curves(runs, tasks, os.path.join(out, 'curves.png'))
  plot_validation_curves(runs, os.path.join(out, 'validation_curves.png'))
  plot_differences(
      summary,
      tasks,
      os.path.join(out, 'differences.png'),
      f'{study}: test metric at the best-validation step, minus the single-task model (seed means)',
  )
  if probes:
    plot_differences(
        summary,
        tasks,
        os.path.join(out, 'probe_differences.png'),
        f'{study}: linear probe of the shared features, minus the single-task model',
        key='probe',
    )
  distances = learned_relatedness_distances(runs)
  if distances:
    plot_relatedness_distances(distances, os.path.join(out, 'relatedness_distance.png'))
    summary['learned_relatedness'] = {
        name: {pair: {str(seed): d[1].tolist() for seed, d in by_seed.items()} for pair, by_seed in by_pair.items()}
        for name, by_pair in distances.items()
    }
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  seeds = sorted({r.seed for r in runs})
  with open(os.path.join(out, 'REPORT.md'), 'w') as f:
    import shlex

    first = {}
    for r in runs:
      first.setdefault(r.variant.name, r)
    f.write(
        render_markdown(
            study,
            summary,
            kinds,
            command=command,
            notes=notes,
            seeds=seeds,
            sweep_seconds=sweep_seconds,
            run_seconds=[r['wall_time_s'] for r in rows if r.get('wall_time_s')],
            run_commands={
                n: shlex.join([f'XLA_FLAGS={_XLA_FLAGS}', 'python'] + r.command()[1:]) for n, r in first.items()
            },
        )
    )
    f.write(unfound_labels_markdown(unfound_labels(runs, kinds)))
    f.write(learned_and_monitor_markdown(runs, distances, 'relatedness_distance.png' if distances else None))
  return summary


def unfound_labels(runs: Sequence[sweep.Run], kinds: Mapping[str, str]) -> dict[str, list[str]]:
  """``{multilabel task: [label, ...]}``: the labels whose F1 is 0 (or undefined) on the validation set and on the
  test set, at the best-validation step of every finished run (the final step's metrics for a run without a
  selection record). Labels are named as the runs' results name them (``AU23`` for a task with class names, else
  the index). Such a label is never found by any variant: the mean F1 averages a 0 in for it everywhere."""
  found: dict[str, dict[str, None]] = {}
  for run in runs:
    if not run.finished:
      continue
    with open(run.results_path) as f:
      results = json.load(f)
    selection = results.get('selection') or {}
    test = selection.get('metrics', results.get('metrics', {}))
    validation = selection.get('validation', results.get('validation', {}))
    for task, kind in kinds.items():
      if kind != 'multilabel' or task not in test:
        continue
      parts = (test[task], validation.get(task, {}))
      zero = {
          k[len('f1_') :]: None for k in test[task] if k.startswith('f1_') and not any(p.get(k, 0) > 0 for p in parts)
      }
      found[task] = zero if task not in found else {k: None for k in found[task] if k in zero}
  return {task: list(labels) for task, labels in found.items() if labels}


def unfound_labels_markdown(unfound: Mapping[str, Sequence[str]]) -> str:
  """A REPORT.md section naming :func:`unfound_labels` ('' when there are none)."""
  if not unfound:
    return ''
  lines = [
      '',
      '## Labels no variant finds',
      '',
      'Per-label F1 is 0 (or undefined) on both the validation and the test set, at the best-validation step of '
      'every run of every variant:',
      '',
  ]
  lines += [f'* `{task}`: ' + ', '.join(f'`{label}`' for label in labels) for task, labels in unfound.items()]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------------------
# Learned relatedness and the negative-transfer monitor (docs/maths.md §8-§9).


def coannotated_estimates(workdir: str, pairs: Sequence[str]) -> dict[str, np.ndarray]:
  """``{'<a>-><b>': R}`` estimated from the benchmark's co-annotated source (``estimate:coannotated``, §2) of the
  run in ``workdir`` (its config.json names the data; the data set does not depend on the run's seed)."""
  from mtlmatch import data  # pylint: disable=g-import-not-at-top
  from mtlmatch import experiment as experiment_lib

  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  d = config['data']
  benchmark = data.get_benchmark(d['name'], data_dir=d.get('data_dir'), seed=d['seed'], **d.get('options', {}))
  resolve = experiment_lib.make_relatedness_resolver(benchmark, {})
  return {pair: resolve('estimate:coannotated', *pair.split('->')) for pair in pairs}


def learned_relatedness_distances(runs: Sequence[sweep.Run]) -> dict:
  """``{variant: {pair: {seed: (steps, mean |R_step − R_coannotated|)}}}`` for the finished runs that learned a
  table (``relatedness_learned.json``'s history), against the co-annotated estimate."""
  from mtlmatch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  histories = []
  for r in runs:
    path = os.path.join(r.workdir, workdir_lib.LEARNED_RELATEDNESS_FILE)
    if r.finished and os.path.exists(path):
      with open(path) as f:
        histories.append((r, json.load(f)['history']))
  if not histories:
    return {}
  pairs = sorted({p for _, h in histories for p in h[0]['tables']})
  reference = coannotated_estimates(histories[0][0].workdir, pairs)
  out = {}
  for r, history in histories:
    for pair in history[0]['tables']:
      steps = np.array([h['step'] for h in history])
      dist = np.array([np.abs(np.asarray(h['tables'][pair]) - reference[pair]).mean() for h in history])
      out.setdefault(r.variant.name, {}).setdefault(pair, {})[r.seed] = (steps, dist)
  return out


def plot_relatedness_distances(distances: Mapping, path: str) -> None:
  """One panel per task pair: mean |R − R_coannotated| over the training steps, seed-mean per variant (band =
  min–max over seeds)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  pairs = sorted({p for v in distances.values() for p in v})
  fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
  for ax, pair in zip(axes[0], pairs):
    for name, by_pair in distances.items():
      if pair not in by_pair:
        continue
      curves = list(by_pair[pair].values())
      n = min(len(c[0]) for c in curves)
      steps, values = curves[0][0][:n], np.stack([c[1][:n] for c in curves])
      (line,) = ax.plot(steps, values.mean(0), marker='.', label=name)
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15, color=line.get_color())
    ax.set_title(f'{pair}: mean |R − R_coannotated|')
    ax.set_xlabel('step')
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def learned_and_monitor_markdown(runs: Sequence[sweep.Run], distances: Mapping, plot: Optional[str]) -> str:
  """REPORT.md's section on the learned tables (distance to the co-annotated estimate at the start, the best step
  and the end) and on the monitor's actions, per variant (seed means; every number read from the runs' files)."""
  lines = []
  if distances:
    lines += [
        '## Learned relatedness',
        '',
        'Distance of the learned table to the table estimated from the co-annotated source (`estimate:coannotated`, '
        'docs/maths.md §2): mean over entries of |R − R_coannotated|, seed mean ± std, at the start (step 0), at '
        "the run's best-validation step (the last re-estimation at or before it) and where training stopped. "
        'The table is re-estimated every `relatedness_every` steps (docs/maths.md §8).',
        '',
        '| variant | pair | start | best step | end | re-estimations |',
        '|---|---|---|---|---|---|',
    ]
    best = {}
    for row in sweep.collect(runs):
      best[(row['name'], row['seed'])] = row.get('best_step')
    for name, by_pair in distances.items():
      for pair, by_seed in sorted(by_pair.items()):
        start, at_best, end, counts = [], [], [], []
        for seed, (steps, dist) in by_seed.items():
          start.append(dist[0])
          end.append(dist[-1])
          counts.append(len(steps) - 1)
          b = best.get((name, seed))
          at_best.append(dist[steps <= b][-1] if b is not None else np.nan)
        cell = lambda v: f'{np.nanmean(v):.4f} ± {np.nanstd(v, ddof=1) if len(v) > 1 else 0.0:.4f}'  # noqa: E731
        lines.append(
            f'| {name} | {pair} | {cell(start)} | {cell(at_best)} | {cell(end)} | {min(counts)}–{max(counts)} |'
        )
    if plot:
      lines += ['', f'![learned relatedness]({plot})', '']
  monitored = []
  for r in runs:
    if not r.finished:
      continue
    with open(r.results_path) as f:
      record = json.load(f).get('negative_transfer')
    if record:
      monitored.append((r, record))
  if monitored:
    lines += [
        '## Negative-transfer monitor',
        '',
        "Per run: the single-task references (validation, the same seed's `st_<task>` run), the warnings and "
        'anneals (step: task), and the term scales at the end (docs/maths.md §9).',
        '',
        '| variant | seed | references | anneals / warnings | recoveries | final scales |',
        '|---|---|---|---|---|---|',
    ]
    for r, rec in monitored:
      refs = ', '.join(f'{t} {v:.4f}' for t, v in rec['references'].items())
      acts = [e for e in rec['events'] if e['action'] in ('anneal', 'warn')]
      acted = ', '.join(f'{e["step"]}: {e["task"]}' for e in acts) or 'none'
      recovered = sum(e['action'] == 'recover' for e in rec['events'])
      scales = ', '.join(f'{t} {v:.3g}' for t, v in rec['scales'].items()) or '—'
      lines.append(f'| {r.variant.name} | {r.seed} | {refs} | {acted} | {recovered} | {scales} |')
    lines.append('')
  return '\n'.join(lines) + ('\n' if lines else '')


# What sweep.launch runs with when JAX is on the CPU (8 fake devices); it does nothing on a GPU/TPU backend.
_XLA_FLAGS = '--xla_force_host_platform_device_count=8'


def _task_kinds(workdir: str) -> dict[str, str]:
  """Task kinds of a run's benchmark, read from its evaluation (multilabel tasks report ``mean_f1``, regression tasks
  ``ccc``)."""
  with open(os.path.join(workdir, 'results.json')) as f:
    metrics = json.load(f)['metrics']
  return {
      t: 'regression' if 'ccc' in m else 'multilabel' if 'mean_f1' in m else 'multiclass' for t, m in metrics.items()
  }


# ---------------------------------------------------------------------------------------------------------------
# SUMMARY.md: each paper's claim checked by a fixed rule against the studies' summary.json (no number typed by hand).


def _get(summary: dict, name: str) -> Optional[dict]:
  return summary['variants'].get(name)


def _nt_list(v: dict) -> str:
  bad = [t for t, flag in v.get('negative_transfer', {}).items() if flag]
  return ', '.join(bad) if bad else 'none'


def _dm_claim(study: str, summary: dict, plain: str, matched: Sequence[str]) -> tuple[list[str], list[str]]:
  """Kollias et al.: plain MTL shows negative transfer on some task; DM / co-annotation removes it. Returns the
  lines and one verdict key per judged variant ('HELD', 'PARTLY', 'NOT', 'no NT to prevent')."""
  mtl = _get(summary, plain)
  if mtl is None or 'delta_m' not in mtl:
    return [f'* {study}: plain MTL or a single-task baseline did not finish; no verdict.'], []
  lines = [
      f'* {study}: plain MTL (`{plain}`) Δm = {mtl["delta_m"]:+.2f} %, negative transfer on: {_nt_list(mtl)}'
      + (' (fewer than 2 seeds somewhere: flags incomplete).' if None in mtl['negative_transfer'].values() else '.')
  ]
  control = _get(summary, f'{plain}_equal_exposure')
  if control and 'delta_m' in control:
    lines.append(
        f'  * control `{plain}_equal_exposure` (plain MTL trained until each task has seen as many labelled '
        f'examples as its single-task run): Δm = {control["delta_m"]:+.2f} %, negative transfer on: '
        f'{_nt_list(control)}.'
    )
  keys = []
  for name in matched:
    v = _get(summary, name)
    if v is None or 'delta_m' not in v:
      continue
    if None in mtl['negative_transfer'].values() or None in v['negative_transfer'].values():
      lines.append(
          f'  * `{name}`: Δm = {v["delta_m"]:+.2f} % — fewer than 2 seeds of it, plain MTL or a baseline '
          'finished: no verdict.'
      )
      continue
    nt_before = {t for t, f in mtl['negative_transfer'].items() if f}
    nt_after = {t for t, f in v['negative_transfer'].items() if f}
    if not nt_before:
      key, verdict = 'no NT to prevent', (
          'no negative transfer to prevent here; Δm '
          + ('higher' if v['delta_m'] > mtl['delta_m'] else 'not higher')
          + ' than plain MTL'
      )
    elif not nt_after:
      key, verdict = 'HELD', 'claim HELD: the negative transfer of plain MTL is gone'
    elif nt_after <= nt_before and (nt_after < nt_before or v['delta_m'] > mtl['delta_m']):
      key, verdict = 'PARTLY', 'claim held PARTLY: less negative transfer / higher Δm, but some remains'
    else:
      key, verdict = 'NOT', 'claim did NOT hold: negative transfer remains' + (
          f' and appears on {", ".join(sorted(nt_after - nt_before))}' if nt_after - nt_before else ''
      )
    keys.append(key)
    lines.append(f'  * `{name}`: Δm = {v["delta_m"]:+.2f} %, negative transfer on: {_nt_list(v)} — {verdict}.')
  return lines, keys


def _compare(before: Mapping, after: Mapping) -> tuple[str, str]:
  """Per-task ``mean → mean (diff, beyond/within 1 std)`` for {task: (mean, std, n)} and a verdict by the rule of
  the DGR section: better = higher by more than max(std) on some task and lower beyond it on none."""
  parts, better, worse = [], 0, 0
  for t, (mb, sb, _) in before.items():
    if t not in after:
      continue
    md, sd, _ = after[t]
    diff = md - mb
    sig = abs(diff) > max(sb, sd)
    better += int(sig and diff > 0)
    worse += int(sig and diff < 0)
    parts.append(f'{t} {mb:.3f} → {md:.3f} ({diff:+.3f}{", beyond 1 std" if sig else ", within 1 std"})')
  verdict = (
      'better'
      if better and not worse
      else 'worse'
      if worse and not better
      else 'mixed'
      if better and worse
      else 'no difference beyond one std'
  )
  return '; '.join(parts), verdict


def _dgr_pairs(summary: dict) -> list[tuple[str, str]]:
  """(without, with DGR) variant pairs: ``X_dgr…`` with ``X`` present (``mtl_dgr``, ``cnn_ew_dgr_l0.01_k1``)."""
  names = summary['variants']
  return [(n[: n.index('_dgr')], n) for n in names if '_dgr' in n and n[: n.index('_dgr')] in names]


def _dgr_claim(study: str, summary: dict) -> tuple[list[str], list[str], list[str]]:
  """Shin et al.: DGR improves the shared representation (linear probe) and the task scores. Returns the lines and
  the task-score and probe verdicts ('better', 'worse', 'mixed', 'no difference beyond one std') per pair."""
  lines, task_verdicts, probe_verdicts = [], [], []
  primary = summary['primary']
  for base, with_dgr in _dgr_pairs(summary):
    b, d = _get(summary, base), _get(summary, with_dgr)
    task_b = {t: b['metrics'][c] for t, c in primary.items() if c in b['metrics']}
    task_d = {t: d['metrics'][c] for t, c in primary.items() if c in d['metrics']}
    tasks_text, tasks_verdict = _compare(task_b, task_d)
    task_verdicts.append(tasks_verdict)
    dm = f'; Δm {b["delta_m"]:+.2f} → {d["delta_m"]:+.2f} %' if 'delta_m' in b and 'delta_m' in d else ''
    line = f'* {study}: `{base}` → `{with_dgr}`: task scores {tasks_text}{dm} — {tasks_verdict}'
    if 'probe' in b and 'probe' in d:
      probe_text, probe_verdict = _compare(b['probe'], d['probe'])
      probe_verdicts.append(probe_verdict)
      held = {'better': 'claim HELD', 'worse': 'claim did NOT hold (probe worse)'}.get(probe_verdict, probe_verdict)
      line += f'. Linear probe: {probe_text} — {held}'
    lines.append(line + '.')
  return lines, task_verdicts, probe_verdicts


def _tally(keys: Sequence[str], order: Sequence[str]) -> str:
  if not keys:
    return '—'
  return ', '.join(f'{k} {keys.count(k)}' for k in order if keys.count(k)) + f' (of {len(keys)})'


# Each study's plain multi-task variant (EW, no terms): what the DM variants and the NT column are read against.
PLAIN_MTL = {'affect': 'mtl', 'shopping': 'mtl', 'multi_fashion': 'cnn_ew'}
_DM_VARIANTS = ('coann', 'coann_uniform', 'dm', 'dm_uniform', 'dm_a_to_b', 'dm_b_to_a', 'dm_coann')
# (plain MTL, the DM / co-annotation variants judged against it) per study; `scarce_*` has its own plain MTL.
DM_GROUPS = {
    'affect': (('mtl', _DM_VARIANTS),),
    'shopping': (('mtl', _DM_VARIANTS), ('scarce_mtl', ('scarce_coann', 'scarce_dm', 'scarce_dm_coann'))),
}
# The options whose default the validation data decide: (the default variant, the alternative, what differs).
DEFAULT_CHOICES = (
    ('dm', 'dm_uniform', 'DM prior: `model` vs `uniform`'),
    ('coann', 'coann_uniform', 'co-annotation prior: `model` vs `uniform`'),
    ('dm', 'dm_a_to_b', 'DM direction: `both` vs `a_to_b`'),
    ('dm', 'dm_b_to_a', 'DM direction: `both` vs `b_to_a`'),
)
# A default is changed only on at least this many seeds of both variants in every study compared.
MIN_SEEDS_TO_DECIDE = 3
# A cell "collapses" when a task's primary test metric is below plain MTL's by more than this (absolute).
COLLAPSE_MARGIN = 0.05
_DM_ORDER = ('HELD', 'PARTLY', 'NOT', 'no NT to prevent')
_DGR_ORDER = ('better', 'worse', 'mixed', 'no difference beyond one std')


def _validation_score(summary: dict, name: str) -> Optional[tuple]:
  v = _get(summary, name)
  return tuple(v['metrics']['validation/score']) if v and 'validation/score' in v['metrics'] else None


def _defaults_lines(loaded: Mapping[str, dict]) -> list[str]:
  lines = [
      '| option | ' + ' | '.join(f'{s}: default when run → alternative' for s in loaded) + ' | decision |',
      '|---|' + '---|' * len(loaded) + '---|',
  ]
  for default, alternative, what in DEFAULT_CHOICES:
    cells, better, worse, compared, seeds = [], 0, 0, 0, []
    for summary in loaded.values():
      a, b = _validation_score(summary, default), _validation_score(summary, alternative)
      if a is None or b is None:
        cells.append('—')
        continue
      compared += 1
      seeds.append(min(a[2], b[2]))
      margin = max(a[1], b[1])
      better += int(b[0] - a[0] > margin)
      worse += int(a[0] - b[0] > margin)
      cells.append(f'{a[0]:.4f} ± {a[1]:.4f} → {b[0]:.4f} ± {b[1]:.4f} (n={min(a[2], b[2])})')
    if not compared:
      decision = 'not run'
    elif min(seeds) < MIN_SEEDS_TO_DECIDE:
      decision = (
          f'undecided: fewer than {MIN_SEEDS_TO_DECIDE} seeds (the default stays; the alternative better '
          f'beyond one std on {better}, worse on {worse}, of {compared})'
      )
    elif 2 * better >= compared and not worse:
      decision = f"switch to `{alternative}`'s setting (better beyond one std on {better} of {compared})"
    else:
      decision = (
          f"keep `{default}`'s setting (the alternative better beyond one std on {better}, worse on "
          f'{worse}, of {compared})'
      )
    lines.append(f'| {what} | ' + ' | '.join(cells) + f' | {decision} |')
  return lines


def _plain_of(study: str, name: str) -> str:
  """The plain MTL variant ``name`` is read against: ``scarce_mtl`` for ``scarce_*``, else the study's own."""
  scoped = [p for p, _ in DM_GROUPS.get(study, ()) if p.endswith('_mtl') and name.startswith(p[: -len('mtl')])]
  return scoped[0] if scoped else PLAIN_MTL[study]


def _collapse_lines(loaded: Mapping[str, dict]) -> list[str]:
  lines = []
  for study, summary in loaded.items():
    primary, found = summary['primary'], []
    for name, v in summary['variants'].items():
      plain = _plain_of(study, name)
      base = _get(summary, plain)
      if base is None or name == plain or is_baseline(name, primary):
        continue
      drops = [
          f'{t} {base["metrics"][c][0]:.3f} → {v["metrics"][c][0]:.3f}'
          for t, c in primary.items()
          if c in v['metrics'] and c in base['metrics'] and v['metrics'][c][0] < base['metrics'][c][0] - COLLAPSE_MARGIN
      ]
      if drops:
        found.append(f'`{name}` vs `{plain}`: ' + ', '.join(drops))
    lines.append(f'* {study}: ' + ('; '.join(found) if found else 'no variant collapsed.'))
  return lines


def _convergence_lines(loaded: Mapping[str, dict]) -> list[str]:
  lines = []
  for study, summary in loaded.items():
    cells = {n: v['metrics'] for n, v in summary['variants'].items() if v['metrics'].get('validation/late_gain')}
    if not cells:
      lines.append(f'* {study}: no validation history; no convergence check.')
      continue
    gains = {n: m['validation/late_gain'][0] for n, m in cells.items()}
    runs = sum(m['validation/late_gain'][2] for m in cells.values())
    weighted = lambda c: sum(m[c][0] * m[c][2] for m in cells.values() if c in m and m[c][2])  # noqa: E731
    worst = max(gains, key=gains.get)
    lines.append(
        f'* {study}: {runs} runs; {weighted("validation/stopped_early"):.0f} stopped early, '
        f'{weighted("validation/best_at_end"):.0f} had their best validation score at their last step. Gain in the '
        f'last {sweep.LATE_STEPS} steps (cell means): median {np.median(list(gains.values())):+.4f}, largest '
        f'{gains[worst]:+.4f} (`{worst}`).'
    )
  return lines


def write_overall_summary(results_dir: str, preamble: str = '') -> str:
  """``<results_dir>/SUMMARY.md`` from each study's ``summary.json``; returns the text. Its "At a glance" section
  (verdict counts per study) is what :func:`update_readme` copies into README."""
  loaded = {}
  for study in STUDY_DIRS:
    path = os.path.join(results_dir, study, 'summary.json')
    if os.path.isfile(path):
      with open(path) as f:
        loaded[study] = json.load(f)
  dm_lines, dgr_lines, glance = [], [], []
  for study in STUDY_DIRS:
    if study not in loaded:
      continue
    dm_keys, nt, plain = [], '—', PLAIN_MTL[study]
    for group_plain, matched in DM_GROUPS.get(study, ()):
      lines, keys = _dm_claim(study, loaded[study], group_plain, matched)
      dm_lines += lines
      dm_keys += keys
    mtl, ctl = _get(loaded[study], plain), _get(loaded[study], f'{plain}_equal_exposure')
    if mtl and 'negative_transfer' in mtl:
      nt = f'`{plain}`: {_nt_list(mtl)}' + (
          f'; `{plain}_equal_exposure`: {_nt_list(ctl)}' if ctl and 'negative_transfer' in ctl else ''
      )
    lines, task_v, probe_v = _dgr_claim(study, loaded[study])
    dgr_lines += lines or [f'* {study}: no DGR pair finished; no verdict.']
    glance.append(
        f'| {study} | {nt} | {_tally(dm_keys, _DM_ORDER)} | {_tally(task_v, _DGR_ORDER)} | '
        f'{_tally(probe_v, _DGR_ORDER)} |'
    )
  lines = [
      '# What held here',
      '',
      "Written by `experiments/report.py` (`write_overall_summary`) from the studies' "
      '`summary.json`, by fixed rules stated below; no number is typed by hand.',
      '',
  ]
  if preamble:
    lines += [preamble, '']
  lines += [
      '## At a glance',
      '',
      'Verdict counts by the rules of `experiments/results/SUMMARY.md` (one per DM / co-annotation variant; one '
      'per pair without → with DGR); NT = negative transfer (worse than the single-task model beyond one std).',
      '',
      '| study | NT on | DM / co-annotation vs plain MTL | DGR: task scores | ' 'DGR: linear probe |',
      '|---|---|---|---|---|',
  ] + glance
  lines += [
      '',
      '## Distribution matching + co-annotation (Kollias et al., AAAI 2024): prevents negative transfer',
      '',
      'Rule: negative transfer (NT) on a task = worse than its single-task model by more than one std over '
      'seeds; HELD = plain MTL has NT and the variant has none; PARTLY = no task gains NT, and fewer NT tasks '
      'or a higher Δm; NOT otherwise.',
      '',
  ] + dm_lines
  lines += [
      '',
      '## Defaults decided on validation data',
      '',
      'Rule: for each option, the mean over seeds of the best validation score (the mean over tasks of the '
      'primary validation metric, never a test number) of the default variant against the alternative, per '
      'study; the default is switched only when the alternative is better by more than one std (the larger '
      'of the two) on at least half of the studies that ran both and worse beyond one std on none, and '
      f'only on at least {MIN_SEEDS_TO_DECIDE} seeds of each.',
      '',
  ] + _defaults_lines(loaded)
  lines += [
      '',
      '## Collapse check',
      '',
      f"Rule: a variant collapses when a task's primary test metric is below plain MTL's by more than "
      f'{COLLAPSE_MARGIN} (absolute; seed means). Mean prediction entropy and the confusion-matrix diagonal of '
      'every variant are in each REPORT.md.',
      '',
  ] + _collapse_lines(loaded)
  lines += [
      '',
      '## Convergence',
      '',
      f'Rule: the validation score a cell gained in its last {sweep.LATE_STEPS} steps (best score minus the best up '
      f'to {sweep.LATE_STEPS} steps before the end, seed mean); each REPORT.md has it per variant beside the '
      'validation curves. The schedules decay the learning rate to 0 at the step cap, so a best score at the last '
      'step with a small late gain is a run that converged on its budget.',
      '',
  ] + _convergence_lines(loaded)
  lines += [
      '',
      '## DGR (Shin et al., ECCV 2024): better shared representation (linear probe) and task scores',
      '',
      'Rule: per pair (variant without → with DGR), a task counts as better / worse when its score moves by more '
      'than one std (the larger of the two); a pair is better = better on some task and worse on none (worse '
      'likewise); the probe claim HELD = the probe is better.',
      '',
  ] + dgr_lines
  missing = sorted(set(STUDY_DIRS) - set(loaded))
  if missing:
    lines += ['', f'Not run here (no results): {", ".join(missing)}.']
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(results_dir, 'SUMMARY.md'), 'w') as f:
    f.write(text)
  return text


README_BEGIN, README_END = '<!-- results:begin (written by case_studies.py summary) -->', '<!-- results:end -->'


def update_readme(readme: str, summary_text: str) -> None:
  """Replace the block between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with the "At a glance"
  section of SUMMARY.md (without its heading), so the docs quote no verdict by hand."""
  with open(readme) as f:
    text = f.read()
  if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
    raise ValueError(f'readme: {readme!r} must hold one {README_BEGIN!r} line followed by one {README_END!r} line')
  body = summary_text.split('\n## At a glance\n', 1)[1].split('\n## ', 1)[0]
  head, rest = text.split(README_BEGIN)
  tail = rest.split(README_END)[1]
  with open(readme, 'w') as f:
    f.write(f'{head}{README_BEGIN}\n{body.strip()}\n{README_END}{tail}')


def main(argv: Optional[Sequence[str]] = None) -> None:
  """This module is the report library of ``case_studies.py``, which runs the sweeps and calls it: ``--help`` says
  so, and any other use is refused with a pointer there (it writes nothing by itself)."""
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog=(
          'This module is a library: write the report of a study with python experiments/case_studies.py <study> '
          '--report-only (after its runs) and SUMMARY.md with python experiments/case_studies.py summary.'
      ),
  )
  parser.parse_args(argv)
  parser.error('nothing to do: run python experiments/case_studies.py (see --help)')


if __name__ == '__main__':
  main()
