"""Architectures against hard parameter sharing on the two DM case studies, one command.

  python experiments/arch_study.py                 # sweep (finished runs skipped), table, REPORT.md
  python experiments/arch_study.py --report-only   # the table of the finished runs only

Cells: for ``affect`` and ``shopping``, each architecture of ``--archs`` (default MMoE, CGC, MTAN; ``hps`` may be
added) over the case study's CPU model with plain MTL (EW) and with DM + co-annotation: exactly the case studies'
``mtl`` and ``dm_coann`` cells (``experiments/case_studies.py``'s CPU grid: the same overrides, learning rate, step
cap, early stopping and DM direction) with ``arch=<name>`` added to the config variant. Every architecture keeps
its defaults (``python -m mtlmatch.main --help`` lists them).

The reference rows, HPS (``mtl``, ``dm_coann``) and the single-task baselines (``st_<task>``), are the committed
case-study runs (``experiments/results/<study>/runs.json``: same configs and seeds, trained before the
architectures existed; ``hps`` builds the same model bit for bit, tests/test_architectures.py). With ``hps`` in
``--archs`` the HPS cells are rerun here and replace the committed ones. Each number is the test metric at the
best-validation step; Δm is over the tasks' primary metrics against the single-task models (experiments/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import case_studies  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments.sweep import Variant  # noqa: E402

STUDIES = ('affect', 'shopping')
ARCHS = ('mmoe', 'cgc', 'mtan')
CELLS = ('mtl', 'dm_coann')  # the case studies' cells that each architecture reruns


def grid(study: str, archs: Sequence[str]) -> list[Variant]:
  """``<arch>_mtl`` and ``<arch>_dm_coann`` for each of ``archs``: the case study's cell with ``arch=<arch>``."""
  base = {v.name: v for v in case_studies.cpu_grid(study)}
  out = []
  for arch in archs:
    for cell in CELLS:
      variant = base[cell]
      config_file, tokens = variant.spec.split(':', 1)
      out.append(Variant(f'{arch}_{cell}', f'{config_file}:{tokens},arch={arch}', dict(variant.overrides)))
  return out


def reference_rows(results: str, study: str, rerun_hps: bool) -> list[dict]:
  """The committed case study's single-task rows, and its ``mtl`` / ``dm_coann`` rows as ``hps_*`` (unless rerun)."""
  path = os.path.join(results, study, 'runs.json')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: not found, expected the committed {study} case study (experiments/case_studies.py)')
  with open(path) as f:
    rows = json.load(f)
  keep = []
  for row in rows:
    if row['name'].startswith('st_'):
      keep.append(row)
    elif row['name'] in CELLS and not rerun_hps:
      keep.append({**row, 'name': f"hps_{row['name']}"})
  return keep


def task_kinds(results: str, study: str, primary_of_kind) -> dict[str, str]:
  """``{task: kind}`` from the committed case study's ``summary.json`` (its primary metric per task)."""
  with open(os.path.join(results, study, 'summary.json')) as f:
    primary = json.load(f)['primary']
  kind_of = {metric: kind for kind, metric in primary_of_kind.items()}
  return {t: kind_of[primary[t].split('/', 1)[1]] for t in case_studies.TASKS[study]}


def table(study: str, summary: dict, tasks: Sequence[str], names: Sequence[str]) -> list[str]:
  primary = summary['primary']
  head = [f'{t} {primary[t].split("/")[1]}' for t in tasks]
  lines = ['| cell | ' + ' | '.join(head) + ' | Δm vs ST (%) | seeds |', '|---' * (len(tasks) + 3) + '|']
  for name in names:
    entry = summary['variants'].get(name)
    if entry is None:
      continue
    cells = []
    for t in tasks:
      mean, std, n = entry['metrics'].get(primary[t], (float('nan'), float('nan'), 0))
      cells.append(f'{mean:.4f} ± {std:.4f}' if n else '')
    delta = entry.get('delta_m')
    seeds = max(v[2] for v in entry['metrics'].values())
    lines.append(
        f'| `{name}` | ' + ' | '.join(cells) + f' | {"baseline" if delta is None else f"{delta:+.2f}"} | {seeds} |'
    )
  return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--archs', default=','.join(ARCHS))
  parser.add_argument('--studies', default=','.join(STUDIES))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--jobs', type=int, default=2)
  parser.add_argument('--workdirs', default=os.path.join('workdirs', 'experiments', 'architectures'))
  parser.add_argument('--results', default=os.path.join('experiments', 'results'))
  parser.add_argument('--report-only', action='store_true', help='table the finished runs only')
  args = parser.parse_args(argv)
  archs = [a for a in args.archs.split(',') if a]
  studies = [s for s in args.studies.split(',') if s]
  unknown = sorted(set(studies) - set(STUDIES))
  if unknown:
    raise ValueError(f'--studies: got {unknown}, expected some of {STUDIES}')
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = {
      s: sweep.expand(grid(s, archs), seeds=seeds, root=os.path.join(args.workdirs, s), order='seed') for s in studies
  }
  if not args.report_only:  # seed 0 of every study's cells before any seed 1
    sweep.run_all(sorted((r for rs in runs.values() for r in rs), key=lambda r: r.seed), jobs=args.jobs)
  from experiments import report  # pylint: disable=g-import-not-at-top  (imports JAX/TF; not needed to sweep)

  out = os.path.join(args.results, 'architectures')
  os.makedirs(out, exist_ok=True)
  lines = [
      '# Architectures against hard parameter sharing (affect, shopping)',
      '',
      'Generated by `experiments/arch_study.py` (command: `python experiments/arch_study.py '
      + ' '.join(a for a in (argv if argv is not None else sys.argv[1:]) if a != '--report-only')
      + "`) from the runs' `results.json` and the committed case-study rows; no number here is edited by hand.",
      '',
      __doc__.split('\n\n', 2)[2].strip(),
      '',
  ]
  all_rows, summaries = [], {}
  for study in studies:
    rows = sweep.collect(runs[study])
    all_rows += [{**r, 'study': study} for r in rows]
    rows = reference_rows(args.results, study, rerun_hps='hps' in archs) + rows
    tasks = case_studies.TASKS[study]
    kinds = task_kinds(args.results, study, report.PRIMARY)
    summary = report.summarize(rows, kinds)
    summaries[study] = summary
    names = [f'st_{t}' for t in tasks] + [f'{a}_{c}' for c in CELLS for a in ('hps', *[a for a in archs if a != 'hps'])]
    lines += [f'## {study}', '', *table(study, summary, tasks, names), '']
  sweep.write_table(all_rows, os.path.join(out, 'runs.json'))
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summaries, f, indent=1)
  with open(os.path.join(out, 'REPORT.md'), 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
