"""The dense study: the generated scenes at CPU size, full labels against one-label, 3 seeds, one command.

  python experiments/dense_study.py                      # learning-rate check, sweep (finished runs skipped), report
  python experiments/dense_study.py --report-only        # the table and report of the finished runs only
  python experiments/dense_study.py --readme README.md   # ... and rewrite README's generated dense-study block

What runs (``configs/scenes.py`` with :data:`OVERRIDES`): the SegNet encoder (widths 8, 16, 32) with one SegNet
decoder per task (segmentation, depth, normal) on 32 × 32 rooms (1,000 training images, 10 % of them held out for
validation, 200 test images), batch 32, Adam with a cosine decay over :data:`STEPS` steps, an evaluation every
:data:`EVAL_EVERY` steps. Each reported number is the *test* metric at the best-validation step (the validation
score: the mean over tasks of mIoU, −abs_err and within_22.5, as ``mtlmatch.metrics.selection_score``).

Cells, under both label protocols (``full``: every training image labelled for every task; ``one-label``: each
training image keeps one task, balanced, chosen by the data seed, so every method runs with tasks absent from
batches): the three single-task baselines and :data:`METHODS` (EW; EW + DGR with dummy decoders; the weighting and
gradient methods). One-label cells are prefixed ``one_``.

Δm (``mtlmatch.metrics.delta_m``, docs/maths.md) is taken over all nine metrics the NYUv2 papers report (mIoU, pixel
accuracy, abs/rel depth error, mean/median angle, within 11.25°/22.5°/30°), each with its direction, against the
single-task models *with full labels* (the fixed reference of every row), and, for the one-label rows, also against
the one-label single-task models (same labels seen).

The learning rate was decided before the sweep on validation data: EW, full labels, seed 0, at each rate of
:data:`LR_GRID` (cells ``lr_<rate>``; the report lists their validation scores and the one kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Mapping, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import sweep  # noqa: E402
from experiments.sweep import Variant  # noqa: E402

TASKS = ('segmentation', 'depth', 'normal')
# (task, metric) of the nine NYUv2 numbers, in the papers' column order (directions: the task kinds').
METRICS = (
    ('segmentation', 'miou'),
    ('segmentation', 'pixel_accuracy'),
    ('depth', 'abs_err'),
    ('depth', 'rel_err'),
    ('normal', 'mean_angle'),
    ('normal', 'median_angle'),
    ('normal', 'within_11.25'),
    ('normal', 'within_22.5'),
    ('normal', 'within_30'),
)
# (cell name, config variant, overrides): EW, EW + DGR, then the methods by name.
METHODS = (
    ('ew', 'mtl', {}),
    ('dgr', 'mtl+dgr', {}),
    *((m, f'weighting={m}', {}) for m in ('uw', 'dwa', 'pcgrad', 'cagrad', 'nash_mtl', 'famo', 'upgrad', 'db_mtl')),
)
PROTOCOLS = {'full': '', 'one-label': 'one_'}
STEPS, EVAL_EVERY = 300, 50
LR_GRID = (0.001, 0.003, 0.01)
OVERRIDES = {
    'encoder.kwargs.widths': (8, 16, 32),
    'head.kwargs.widths': (32, 16, 8),
    'total_steps': STEPS,
    'eval_every': EVAL_EVERY,
    'log_every': EVAL_EVERY,
    'checkpoint_every': STEPS,
    'keep_checkpoints': 1,
}
README_BEGIN, README_END = '<!-- dense-study:begin -->', '<!-- dense-study:end -->'


def lr_grid() -> list[Variant]:
  """EW with full labels at each rate of :data:`LR_GRID` (run with seed 0 only)."""
  return [
      Variant(f'lr_{lr:g}', 'configs/scenes.py:mtl', {**OVERRIDES, 'optimizer.learning_rate': lr}) for lr in LR_GRID
  ]


def pick_learning_rate(rows: Sequence[Mapping]) -> tuple[float, dict[float, float]]:
  """The rate of the ``lr_<rate>`` row with the best validation score, and every rate's score."""
  scores = {float(r['name'][3:]): r['validation/score'] for r in rows if r['name'].startswith('lr_')}
  if not scores:
    raise ValueError('rows: got no lr_<rate> row with a validation score; run the learning-rate cells first')
  return max(scores, key=scores.get), scores


def grid(learning_rate: float) -> list[Variant]:
  """Every cell of the study (module docstring) at ``learning_rate``."""
  out = []
  for protocol, prefix in PROTOCOLS.items():
    over = {**OVERRIDES, 'optimizer.learning_rate': learning_rate, 'data.options.labels': protocol}
    out += [Variant(f'{prefix}st_{t}', f'configs/scenes.py:single={t}', over) for t in TASKS]
    out += [
        Variant(f'{prefix}{name}', f'configs/scenes.py:{variant}', {**over, **extra})
        for name, variant, extra in METHODS
    ]
  return out


def delta_m(means: Mapping[str, float], baselines: Mapping[str, float]) -> float:
  """Δm (%) over the nine ``task/metric`` keys of :data:`METRICS` (flat ``{'depth/abs_err': value}`` maps): the
  library's ``mtlmatch.metrics.delta_m``, each metric's direction from its task kind; NaN if any value is missing."""
  from mtlmatch import metrics  # pylint: disable=g-import-not-at-top  (imports JAX; not needed to sweep)
  from mtlmatch.data import dense_benchmarks  # pylint: disable=g-import-not-at-top

  keys = [f'{t}/{m}' for t, m in METRICS]
  if not all(math.isfinite(d.get(k, math.nan)) for d in (means, baselines) for k in keys):
    return math.nan
  nest = lambda flat: {t: {m: flat[f'{t}/{m}'] for tt, m in METRICS if tt == t} for t in TASKS}  # noqa: E731
  specs = dense_benchmarks.dense_tasks(2, (1, 1), tasks=TASKS)  # only the kinds (directions) are read
  which = {t: [m for tt, m in METRICS if tt == t] for t in TASKS}
  return metrics.delta_m(specs, nest(means), nest(baselines), which=which)


def summarize(rows: Sequence[Mapping]) -> dict:
  """Per cell: seed mean and std of every metric, best step and wall time, Δm against the full-label and (one-label
  cells) the one-label single-task models, and the number of seeds."""
  from experiments import report  # pylint: disable=g-import-not-at-top  (imports JAX/TF; not needed to sweep)

  by_name: dict[str, list[Mapping]] = {}
  for r in rows:
    by_name.setdefault(r['name'], []).append(r)
  keys = [f'{t}/{m}' for t, m in METRICS] + ['best_step', 'wall_time_s', 'validation/score']
  cells = {}
  for name, group in by_name.items():
    cells[name] = {
        'seeds': len(group),
        'mean': {k: report.mean_std([g.get(k) for g in group])[0] for k in keys},
        'std': {k: report.mean_std([g.get(k) for g in group])[1] for k in keys},  # sample std (ddof = 1)
    }
  for protocol, prefix in PROTOCOLS.items():
    full_st = _baseline_means(cells, '')
    same_st = _baseline_means(cells, prefix)
    for name, cell in cells.items():
      if not name.startswith(prefix) or (prefix == '' and name.startswith('one_')) or name.startswith('lr_'):
        continue
      if '_st_' in f'_{name}':
        continue
      cell['protocol'] = protocol
      cell['delta_m'] = delta_m(cell['mean'], full_st)
      if prefix:
        cell['delta_m_same_labels'] = delta_m(cell['mean'], same_st)
  return cells


def _baseline_means(cells: Mapping[str, dict], prefix: str) -> dict[str, float]:
  """``task/metric`` → the mean of ``<prefix>st_<task>`` (each task's metrics from its own single-task cell)."""
  out = {}
  for task, metric in METRICS:
    cell = cells.get(f'{prefix}st_{task}')
    if cell is not None:
      out[f'{task}/{metric}'] = cell['mean'][f'{task}/{metric}']
  return out


COLUMNS = (
    ('segmentation/miou', 'mIoU ↑'),
    ('segmentation/pixel_accuracy', 'pix acc ↑'),
    ('depth/abs_err', 'abs err ↓'),
    ('depth/rel_err', 'rel err ↓'),
    ('normal/mean_angle', 'mean ° ↓'),
    ('normal/median_angle', 'median ° ↓'),
    ('normal/within_11.25', '≤11.25° ↑'),
    ('normal/within_22.5', '≤22.5° ↑'),
    ('normal/within_30', '≤30° ↑'),
)


def table(cells: Mapping[str, dict], protocol: str) -> str:
  """A markdown table of one protocol's cells: the nine metrics (mean ± std over seeds), Δm, best step, seeds."""
  prefix = PROTOCOLS[protocol]
  names = [f'{prefix}st_{t}' for t in TASKS] + [f'{prefix}{m}' for m, _, _ in METHODS]
  same = ' | Δm vs one-label ST' if prefix else ''
  lines = [
      '| cell | ' + ' | '.join(label for _, label in COLUMNS) + f' | Δm vs ST (%){same} | best step | seeds |',
      '|' + '---|' * (len(COLUMNS) + 4 + bool(prefix)),
  ]
  for name in names:
    cell = cells.get(name)
    if cell is None:
      continue
    values = []
    for key, _ in COLUMNS:
      task = key.split('/')[0]
      if '_st_' in f'_{name}' and not name.endswith(f'st_{task}'):
        values.append('')  # a single-task model has no other task's head
        continue
      mean, std = cell['mean'][key], cell['std'][key]
      digits = 2 if key.startswith('normal/m') else 4 if key.startswith('normal/within') else 4
      values.append(f'{mean:.{digits}f} ± {std:.{digits}f}' if cell['seeds'] > 1 else f'{mean:.{digits}f}')
    dm = f'{cell["delta_m"]:+.2f}' if 'delta_m' in cell and math.isfinite(cell['delta_m']) else 'baseline'
    if prefix:
      dm += ' | ' + (f'{cell["delta_m_same_labels"]:+.2f}' if 'delta_m_same_labels' in cell else 'baseline')
    lines.append(
        f'| `{name}` | ' + ' | '.join(values) + f' | {dm} | {cell["mean"]["best_step"]:.0f} | {cell["seeds"]} |'
    )
  return '\n'.join(lines)


README_COLUMNS = (('segmentation/miou', 'mIoU ↑'), ('depth/abs_err', 'abs err ↓'), ('normal/mean_angle', 'mean ° ↓'))


def readme_table(cells: Mapping[str, dict]) -> str:
  """README's table: each cell under both protocols side by side, one primary metric per task (mean ± std over
  seeds) and Δm over all nine against the full-label single-task models."""

  def values(name: str) -> list[str]:
    cell = cells.get(name)
    if cell is None:
      return [''] * (len(README_COLUMNS) + 1)
    out = []
    for key, _ in README_COLUMNS:
      if '_st_' in f'_{name}' and not name.endswith(f'st_{key.split("/")[0]}'):
        out.append('')
        continue
      digits = 2 if key.startswith('normal/') else 4
      mean, std = cell['mean'][key], cell['std'][key]
      out.append(f'{mean:.{digits}f} ± {std:.{digits}f}' if cell['seeds'] > 1 else f'{mean:.{digits}f}')
    delta = cell.get('delta_m')
    out.append(f'{delta:+.2f}' if delta is not None else '—' if name.startswith('one_') else 'baseline')
    return out

  labels = [label for _, label in README_COLUMNS]
  lines = [
      '| cell | ' + ' | '.join(labels) + ' | Δm (%) | one-label: ' + ' | '.join(labels) + ' | Δm (%) | seeds |',
      '|' + '---|' * (2 * len(README_COLUMNS) + 4),
  ]
  for name in [f'st_{t}' for t in TASKS] + [m for m, _, _ in METHODS]:
    seeds = '/'.join(str(cells[n]['seeds']) for n in (name, f'one_{name}') if n in cells)
    lines.append(f'| `{name}` | ' + ' | '.join(values(name) + values(f'one_{name}')) + f' | {seeds} |')
  return '\n'.join(lines)


def write_report(rows, cells, lr: float, lr_scores: Mapping[float, float], out: str, command: str, seconds) -> str:
  """``REPORT.md`` (and ``summary.json``) under ``out``; returns the README block (both tables)."""
  from experiments import report  # pylint: disable=g-import-not-at-top  (imports JAX; not needed to sweep)

  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(
        {'learning_rate': lr, 'lr_scores': {str(k): v for k, v in lr_scores.items()}, 'cells': cells}, f, indent=1
    )
  full = (
      '**Full labels** (mean ± std over the seeds of the last column; test metrics at the best-validation step; '
      f'Δm over the nine metrics against the full-label single-task models):\n\n{table(cells, "full")}'
  )
  one = (
      '**One label per training image** (balanced; the same 1,000 images, so each task sees a third of the '
      f'labels):\n\n{table(cells, "one-label")}'
  )
  block = (
      'Test metrics at the best-validation step, mean ± std over the seeds of the last column (full / one-label); '
      'Δm over all nine metrics (REPORT.md lists them) against the **full-label** single-task models, also for '
      f'the one-label rows:\n\n{readme_table(cells)}'
  )
  lr_line = ', '.join(f'{k:g}: {v:.4f}' for k, v in sorted(lr_scores.items()))
  text = '\n'.join(
      [
          '# Dense study: generated scenes, full labels vs one-label',
          '',
          f'Command: `{command}`' + (f' ({seconds / 60:.0f} min for the runs it launched).' if seconds else '.'),
          '',
          __doc__.split('\n\n', 2)[2].strip(),
          '',
          f'**Learning rate decided on validation data** (EW, full labels, seed 0; validation score at the best '
          f'step): {lr_line} → **{lr:g}**.',
          '',
          full,
          '',
          one,
          '',
          'Files: `runs.csv` / `runs.json` (one row per run), `summary.json` (the seed means above), '
          '`validation_curves.png` (convergence: validation score vs step, seed mean per cell).',
          '',
          f'Machine: {report.machine_description()}.',
          '',
          'Packages: ' + ', '.join(f'{k} {v}' for k, v in report.package_versions().items()) + '.',
          '',
      ]
  )
  with open(os.path.join(out, 'REPORT.md'), 'w') as f:
    f.write(text)
  return block


def replace_block(path: str, body: str) -> None:
  """Replace the text between :data:`README_BEGIN` and :data:`README_END` of ``path`` with ``body``."""
  with open(path) as f:
    text = f.read()
  if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
    raise ValueError(f'readme: {path!r} must hold one {README_BEGIN!r} line followed by one {README_END!r} line')
  head, rest = text.split(README_BEGIN)
  with open(path, 'w') as f:
    f.write(f'{head}{README_BEGIN}\n{body.strip()}\n{README_END}{rest.split(README_END)[1]}')


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--jobs', type=int, default=2)
  parser.add_argument('--workdirs', default=os.path.join('workdirs', 'experiments', 'scenes'))
  parser.add_argument('--results', default=os.path.join('experiments', 'results', 'scenes'))
  parser.add_argument('--readme', default='', help="also rewrite this README's generated dense-study block")
  parser.add_argument('--report-only', action='store_true', help='table and report the finished runs only')
  args = parser.parse_args(argv)
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '--xla_force_host_platform_device_count=8')}
  start = time.time()
  lr_runs = sweep.expand(lr_grid(), seeds=[0], root=args.workdirs)
  if not args.report_only:
    sweep.run_all(lr_runs, jobs=args.jobs, env=env)
  lr, lr_scores = pick_learning_rate(sweep.collect(lr_runs))
  runs = sweep.expand(grid(lr), seeds=[int(s) for s in args.seeds.split(',')], root=args.workdirs, order='seed')
  if not args.report_only:
    sweep.run_all(runs, jobs=args.jobs, env=env)
  rows = sweep.collect(runs)
  sweep.write_table(rows, os.path.join(args.results, 'runs.csv'))
  sweep.write_table(rows, os.path.join(args.results, 'runs.json'))
  cells = summarize(rows)
  command = 'python experiments/dense_study.py ' + ' '.join(a for a in (argv or sys.argv[1:]) if a != '--report-only')
  block = write_report(
      rows, cells, lr, lr_scores, args.results, command.strip(), None if args.report_only else time.time() - start
  )
  from experiments import report  # pylint: disable=g-import-not-at-top

  report.plot_validation_curves(runs, os.path.join(args.results, 'validation_curves.png'))
  if args.readme:
    replace_block(args.readme, block)
  print(block)


if __name__ == '__main__':
  main()
