"""Sweep driver: a grid of (config spec, overrides) × seeds, each run a subprocess of ``mtlmatch.main``.

A run lives in ``<root>/<name>/seed_<k>/`` and keeps everything needed to read or repeat it: ``command.txt`` (the
exact command line, run from the repository root), ``log.txt`` (its stdout + stderr), and what the train loop writes
(``config.json``, checkpoints, TensorBoard event files, ``results.json``). A run whose ``results.json`` exists is
finished and is skipped, so re-running a sweep only runs what is missing (an interrupted run resumes from its
checkpoint).

Usage::

  grid = [Variant('st_expression', 'configs/affect.py:single=expression'),
          Variant('dm', 'configs/affect.py:dm', {'total_steps': 300})]
  runs = expand(grid, seeds=(0, 1, 2), root='experiments/workdirs/affect')
  run_all(runs, jobs=2)                       # sequential with jobs=1; skips finished runs
  rows = collect(runs)                        # one row per finished run: name, seed, metrics …
  write_table(rows, 'experiments/results/affect/runs.csv')

  python experiments/sweep.py --root=/tmp/sweep --spec=configs/affect.py:dm --name=dm --seeds=0,1,2 \\
      --set total_steps=300 --jobs=2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def display_path(path: str) -> str:
  """``path`` relative to the repository when it lies inside it (what commands, tables and reports show, so they
  hold no machine's absolute paths), else absolute."""
  path = os.path.abspath(path)
  return os.path.relpath(path, REPO) if os.path.commonpath([path, REPO]) == REPO else path


def resolve_path(path: str) -> str:
  """The absolute path of a :func:`display_path` (relative paths are relative to the repository)."""
  return os.path.join(REPO, path)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One grid point: ``name`` (a directory name), ``spec`` (``--config=``) and ``overrides`` ``{key: value}``
  passed as ``--config.<key>=<value>``."""

  name: str
  spec: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.name or '/' in self.name or self.name.startswith('.'):
      raise ValueError(f'Variant.name: got {self.name!r}, expected a non-empty directory name without "/"')
    if ':' not in self.spec and not self.spec.endswith('.py'):
      raise ValueError(f"Variant.spec: got {self.spec!r}, expected '<config file>.py[:<variant>]'")


@dataclasses.dataclass(frozen=True)
class Run:
  variant: Variant
  seed: int
  workdir: str

  @property
  def results_path(self) -> str:
    return os.path.join(self.workdir, 'results.json')

  @property
  def finished(self) -> bool:
    return os.path.isfile(self.results_path)

  def command(self, python: str = sys.executable) -> list[str]:
    """The ``mtlmatch.main`` command line, run from the repository root (the workdir is relative to it when inside
    it); ``seed`` sets ``config.seed`` (init and data order; the data set itself is fixed by ``config.data.seed``)."""
    overrides = {'seed': self.seed, **self.variant.overrides}
    return [
        python,
        '-m',
        'mtlmatch.main',
        f'--config={self.variant.spec}',
        f'--workdir={display_path(self.workdir)}',
        *[f'--config.{k}={_flag_value(v)}' for k, v in overrides.items()],
    ]


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(_flag_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def expand(grid: Sequence[Variant], *, seeds: Sequence[int], root: str, order: str = 'variant') -> list[Run]:
  """Every (variant, seed) as a :class:`Run` in ``<root>/<variant.name>/seed_<seed>``; ``order='seed'`` lists every
  variant's seed 0 before any seed 1 (a sweep cut short then still covers the whole grid)."""
  if order not in ('variant', 'seed'):
    raise ValueError(f"order: got {order!r}, expected 'variant' or 'seed'")
  names = [v.name for v in grid]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f'grid: got duplicate variant names {dupes}, expected unique names (one directory each)')
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds: got {list(seeds)}, expected a non-empty list of distinct ints')
  runs = [Run(v, int(s), os.path.join(os.path.abspath(root), v.name, f'seed_{int(s)}')) for v in grid for s in seeds]
  return sorted(runs, key=lambda r: r.seed) if order == 'seed' else runs  # sorted() is stable: grid order kept


def launch(
    run: Run, *, env: Optional[Mapping[str, str]] = None, python: str = sys.executable, timeout: Optional[float] = None
) -> int:
  """Runs one run to completion in a subprocess (cwd = the repository root); returns its exit code. The command
  goes to ``command.txt``, stdout + stderr to ``log.txt`` (appended, so a resumed run keeps its history)."""
  os.makedirs(run.workdir, exist_ok=True)
  cmd = run.command(python)
  with open(os.path.join(run.workdir, 'command.txt'), 'w') as f:
    f.write(shlex.join(cmd) + '\n')
  # No device flags here: mtlmatch.main gives a CPU run one device per core (mtlmatch.cpu_devices) unless XLA_FLAGS
  # (the sweep's environment or ``env``) already sets a device count.
  full_env = {**os.environ, **(env or {})}
  with open(os.path.join(run.workdir, 'log.txt'), 'a') as log:
    log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
    log.flush()
    try:
      return subprocess.run(
          cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
      ).returncode
    except subprocess.TimeoutExpired:
      log.write(f'# killed after {timeout} s\n')
      return -9


def check_variants(variants: Sequence[Variant]) -> None:
  """Builds and validates each variant's config (spec + overrides, as the CLI would) before any run starts, so a
  misspelt key or a bad value stops the sweep with one message instead of failing run after run."""
  from mtlmatch import config_checks, config_lib  # pylint: disable=g-import-not-at-top  (imports JAX; only when launching)

  for variant in variants:
    try:
      spec = config_lib.cli_spec(variant.spec, {k: str(v) for k, v in variant.overrides.items()})
      config_checks.validate_config(config_lib.set_keys(config_lib.load_config(spec), variant.overrides))
    except ValueError as e:
      raise ValueError(f'sweep variant {variant.name!r} ({variant.spec}): {e}') from None


def run_all(
    runs: Sequence[Run],
    *,
    jobs: int = 1,
    env: Optional[Mapping[str, str]] = None,
    python: str = sys.executable,
    timeout: Optional[float] = None,
    launcher: Optional[Callable[[Run], int]] = None,
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
  """Runs every unfinished run, ``jobs`` at a time; returns ``{workdir: exit code}`` of those launched (finished
  runs are skipped and absent). ``launcher`` replaces :func:`launch` (tests)."""
  if not isinstance(jobs, int) or jobs < 1:
    raise ValueError(f'jobs: got {jobs!r}, expected an int >= 1')
  todo = [r for r in runs if not r.finished]
  if launcher is None:
    check_variants({r.variant.name: r.variant for r in todo}.values())
  echo(f'{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)} with {jobs} job(s)')
  launcher = launcher or (lambda r: launch(r, env=env, python=python, timeout=timeout))
  codes: dict[str, int] = {}

  def one(run: Run) -> tuple[Run, int, float]:
    start = time.time()
    return run, launcher(run), time.time() - start

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    for run, code, seconds in pool.map(one, todo):
      codes[run.workdir] = code
      status = 'ok' if code == 0 and run.finished else f'FAILED (exit {code}; see {run.workdir}/log.txt)'
      echo(f'  {run.variant.name} seed {run.seed}: {status} in {seconds:.0f} s')
  return codes


# The window of the convergence check: a run whose best validation score rose by less than noise over its last
# LATE_STEPS steps has stopped improving (2 evaluations of the CPU studies).
LATE_STEPS = 100


def late_gain(history: Sequence[Mapping], step: Optional[int], window: int = LATE_STEPS) -> Optional[float]:
  """Best validation score over the whole run minus the best over the evaluations at steps <= ``step - window``:
  what the last ``window`` steps added (0 when the run had peaked before them). None without such evaluations."""
  scores = [(h['step'], h['score']) for h in history if h.get('score') is not None and np.isfinite(h['score'])]
  early = [s for t, s in scores if step is not None and t <= step - window]
  return None if not early else float(max(s for _, s in scores) - max(early))


def collect(runs: Sequence[Run]) -> list[dict]:
  """One flat row per finished run: ``name, spec, seed, workdir, step, best_step, wall_time_s, <task>/<metric> …``
  (the workdir as :func:`display_path`).

  The metrics are the test metrics **at the best-validation step** (``results['selection']['metrics']``; the final
  step's when a run has no selection record); ``validation/score`` is that step's validation score, and
  ``validation/late_gain`` (:func:`late_gain`) how much of it came in the run's last ``LATE_STEPS`` steps;
  ``validation/stopped_early`` and ``validation/best_at_end`` are 1.0 / 0.0 (their seed means are fractions).
  Per-label F1 (``f1_AU12``; ``f1_3`` for a task without class names) and the ``count`` are left out; the per-class
  recalls (``recall_<k>``, the confusion-matrix diagonal) are kept for the report's collapse check."""
  rows = []
  for run in runs:
    if not run.finished:
      continue
    with open(run.results_path) as f:
      results = json.load(f)
    selection = results.get('selection') or {}
    row = {
        'name': run.variant.name,
        'spec': run.variant.spec,
        'seed': run.seed,
        'workdir': display_path(run.workdir),
        'step': results.get('step'),
        'best_step': selection.get('best_step'),
        'wall_time_s': results.get('wall_time_s'),
        'validation/score': selection.get('best_score'),
        'validation/late_gain': late_gain(selection.get('history', []), results.get('step')),
        'validation/stopped_early': float(bool(results.get('stopped_early'))),
        'validation/best_at_end': None
        if 'best_step' not in selection
        else float(selection['best_step'] == results.get('step')),
    }
    for task, metrics in sorted(selection.get('metrics', results.get('metrics', {})).items()):
      for metric, value in metrics.items():
        if metric != 'count' and not metric.startswith('f1_'):
          row[f'{task}/{metric}'] = value
    rows.append(row)
  return rows


def write_table(rows: Sequence[Mapping], path: str) -> None:
  """``rows`` as CSV (``.csv``) or JSON (anything else); columns are the union of the rows' keys, in order."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.csv'):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows(rows)
  else:
    with open(path, 'w') as f:
      json.dump(list(rows), f, indent=1)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', required=True, help='sweep directory')
  parser.add_argument('--spec', required=True, action='append', help='config spec; repeat for several')
  parser.add_argument('--name', action='append', help='variant name per --spec (default: derived)')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='config override, all specs')
  parser.add_argument('--jobs', type=int, default=1)
  args = parser.parse_args(argv)
  names = args.name or [
      s.split(':', 1)[-1].replace('+', '_').replace('=', '_').replace(',', '_') or 'default' for s in args.spec
  ]
  if len(names) != len(args.spec):
    raise ValueError(f'--name: got {len(names)} names for {len(args.spec)} specs, expected one per --spec')
  overrides = dict(kv.split('=', 1) for kv in args.set)
  grid = [Variant(n, s, overrides) for n, s in zip(names, args.spec)]
  runs = expand(grid, seeds=[int(s) for s in args.seeds.split(',')], root=args.root)
  run_all(runs, jobs=args.jobs)
  rows = collect(runs)
  write_table(rows, os.path.join(args.root, 'runs.csv'))
  write_table(rows, os.path.join(args.root, 'runs.json'))
  print(f'{len(rows)} finished runs tabled in {args.root}/runs.csv')


if __name__ == '__main__':
  main()
