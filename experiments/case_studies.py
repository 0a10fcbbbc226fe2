"""The three case studies, each one command: sweep (skipping finished runs) → table → report with plots.

  python experiments/case_studies.py affect          # DM paper: negative transfer on expressions + AUs
  python experiments/case_studies.py shopping        # DM paper: scarce `item` labels, Fashion-MNIST
  python experiments/case_studies.py multi_fashion   # DGR paper: weighting/gradient methods ± DGR, two encoders
  python experiments/case_studies.py affect_va       # affect + a VA-only source: regression beside classification
  python experiments/case_studies.py summary         # experiments/results/SUMMARY.md from the three reports
  python experiments/case_studies.py summary --readme docs/explanations/results.md  # ... and the site's results block

Options: ``--grid=full`` (the whole grid the studies were designed with; hours on a GPU) or ``--grid=cpu`` (default: the
cut grid run for ``experiments/results/``, listed in :data:`CPU_GRIDS` with what was cut), ``--seeds=0,1,2``,
``--jobs=2``, ``--workdirs=workdirs/experiments`` (checkpoints, logs, event files; not committed),
``--results=experiments/results``. Every grid has the single-task baselines of every task (variants named
``st_<task>``), which the report's Δm and negative-transfer flags need.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import sweep  # noqa: E402
from experiments.sweep import Variant  # noqa: E402
from mtlmatch import weighting  # noqa: E402

TASKS = {
    'affect': ('expression', 'aus'),
    'shopping': ('item', 'group', 'attributes'),
    'multi_fashion': ('left', 'right'),
    'affect_va': ('expression', 'aus', 'va'),
}
# The full grid's weighting methods: every method of the library.
METHODS = tuple(weighting.METHODS)


def _relatedness(terms: Sequence[str], spec: str) -> dict:
  return {f'objective.terms.{t}.relatedness': spec for t in terms}


def dm_grid(study: str, spec_of, *, dgr: bool = True, extra=()) -> list[Variant]:
  """ST for every task; MTL (EW), +co-annotation, +DM, +DM+co-annotation; each ± DGR."""
  grid = [Variant(f'st_{t}', spec_of(f'single={t}')) for t in TASKS[study]]
  for name in ('mtl', 'coann', 'dm', 'dm+coann'):
    grid.append(Variant(name.replace('+', '_'), spec_of(name)))
    if dgr:
      grid.append(Variant(name.replace('+', '_') + '_dgr', spec_of(f'{name}+dgr')))
  return grid + list(extra)


def affect_relatedness_variants(spec_of) -> list[Variant]:
  """DM + co-annotation with R estimated from 100 / 1,000 co-annotated examples instead of the expert prior."""
  # The synthetic affect benchmark's aux source `coannotated` has 1,000 examples and `coannotated_100` its first 100.
  return [
      Variant('dm_coann_est100', spec_of('dm+coann'), _relatedness(('dm', 'coann'), 'estimate:coannotated_100')),
      Variant('dm_coann_est1000', spec_of('dm+coann'), _relatedness(('dm', 'coann'), 'estimate:coannotated')),
  ]


def multi_fashion_grid(
    spec_of, *, methods=METHODS, encoders=('cnn', 'resnet18'), dgr=((0.01, 1), (0.1, 1), (0.01, 4))
) -> list[Variant]:
  """ST left/right per encoder; every method, without DGR and with each (λ, K) of ``dgr``."""
  grid = []
  for enc in encoders:
    enc_over = {} if enc == 'cnn' else {'encoder.name': enc}
    grid += [Variant(f'{enc}_st_{t}', spec_of(f'single={t}'), enc_over) for t in TASKS['multi_fashion']]
    for m in methods:
      grid.append(Variant(f'{enc}_{m}', spec_of('mtl'), {**enc_over, 'weighting.name': m}))
      for lam, k in dgr:
        grid.append(
            Variant(
                f'{enc}_{m}_dgr_l{lam:g}_k{k}',
                spec_of('mtl+dgr'),
                {
                    **enc_over,
                    'weighting.name': m,
                    'objective.terms.dgr.weight': lam,
                    'objective.terms.dgr.num_dummies': k,
                },
            )
        )
  return grid


def affect_va_grid(spec_of, methods=('uw', 'famo', 'upgrad')) -> list[Variant]:
  """ST for each of the three tasks; MTL; DM + co-annotation on (expression, aus) with VA co-trained; MTL + DGR;
  MTL under each weighting method of ``methods``."""
  grid = [Variant(f'st_{t}', spec_of(f'single={t}')) for t in TASKS['affect_va']]
  grid += [Variant('mtl', spec_of('mtl')), Variant('dm_coann', spec_of('dm+coann'))]
  grid += [Variant('mtl_dgr', spec_of('mtl+dgr'))]
  grid += [Variant(f'mtl_{m}', spec_of('mtl'), {'weighting.name': m}) for m in methods]
  # What decided the VA loss (CCC, the benchmark's default) on validation data: the same MTL cell with MSE.
  grid += [Variant('mtl_va_mse', spec_of('mtl'), {'task_options.va.loss': 'mse'})]
  # Control: the same MTL cell without the VA source (does adding VA transfer negatively to expressions or AUs?).
  return grid + [Variant('mtl_without_va', spec_of('mtl').replace(',va', ''))]


def full_grid(study: str) -> list[Variant]:
  spec_of = lambda v: f'configs/{study}.py:{v}'  # noqa: E731
  if study == 'affect_va':
    return affect_va_grid(lambda v: f'configs/affect.py:{v},va', methods=METHODS)
  if study == 'affect':
    return dm_grid(study, spec_of, extra=affect_relatedness_variants(spec_of))
  if study == 'shopping':
    return dm_grid(study, spec_of)
  return multi_fashion_grid(spec_of)


# What the committed CPU results ran (2 cores, one sweep of 2 parallel runs per study). Every cell is trained until
# its validation score (the mean over tasks of the primary validation metric, on 10 % held out of each training
# source) has not improved for EARLY_STOP evaluations (one every EVAL_EVERY steps), or CPU_STEPS steps; the reports
# use the test metrics of the best-validation step. Model: the `cpu` config variant's CNN (widths (16, 32),
# 64 features, batch 64) with lr 3e-3.
EVAL_EVERY, EARLY_STOP = 50, 4
CPU_STEPS = {'affect': 600, 'shopping': 400, 'multi_fashion': 400, 'affect_va': 600}
# How the committed runs were launched (appended to each study's notes).
RUN_NOTES = (
    ' Runs: 3 seeds per cell (0, 1, 2), each with 8 fake CPU devices (XLA_FLAGS as in the commands below) on a '
    '2-core machine, one or two at a time; the learning rate follows a cosine decay to 0 at the step cap. The runs '
    'were launched as `experiments/cpu_config.py:<study>:<variant>`, which built exactly the config of '
    '`configs/<study>.py:<variant>,cpu` shown below (that file became the `cpu` variant token; the two were '
    'compared key by key before it was removed), so their own command.txt shows the older form. Convolution '
    'backward: the default-deciding cells (MTL, DM and co-annotation with either prior, the single-task baselines) '
    "ran seeds 0-2 with XLA's own (but affect's `mtl` seed 0), every other run with the GEMM weight gradient of "
    'mtlmatch/models/cpu_ops.py (`conv_impl=auto`): the same maths, other float rounding.'
)
CPU_CUTS = {
    'affect': 'At most 600 steps (batch 64), early-stopped on validation. Grid: ST ×2; MTL; co-annotation and DM '
    'with the `model` prior (defaults) and with `uniform`; DM alone `a_to_b` / `b_to_a`; DM + '
    'co-annotation; MTL + DGR with `sq_l2` and with `sq_l2_unbiased` (λ = 0.01, K = 1). Control '
    '`mtl_equal_exposure`: plain MTL with twice the step budget (1,200), so that each task can see as many '
    'labelled examples as its single-task run (the two train sources are mixed 1:1). DM + co-annotation with '
    'learned relatedness (re-estimated every 50 steps) from uniform and from the expert prior, and with the '
    "negative-transfer monitor annealing against the same seed's single-task runs (`dm_coann_learned_*`, "
    '`dm_coann_monitor`; run after the others, with the current code). Dropped from '
    '--grid=full: DGR on the DM variants, R estimated from co-annotated subsets.',
    'shopping': 'At most 400 steps (batch 64), early-stopped on validation. Grid: ST ×3; MTL; co-annotation and DM '
    'with the `model` prior (defaults) and with `uniform`; DM alone `a_to_b` / `b_to_a`; DM + '
    'co-annotation; MTL + DGR `sq_l2` / `sq_l2_unbiased`; control `mtl_equal_exposure` (800 steps); DM + '
    'co-annotation with learned relatedness (re-estimated every 50 steps) from uniform and from the co-annotated '
    'estimate, and with the negative-transfer monitor (`dm_coann_learned_*`, `dm_coann_monitor`; run after the '
    'others, with the current code). '
    'Scarce item task (`scarce_*`: 100 item images instead of 1,000, so 90 to train on and 10 to '
    'validate): ST item, MTL, co-annotation, DM, DM + co-annotation (its group/attributes baselines are '
    'the ST runs above: their sources are unchanged).',
    'affect_va': 'At most 600 steps (batch 64), early-stopped on validation. The affect benchmark with its third '
    'source, labelled only for valence/arousal (`va`: 3,000 images, CCC loss, tanh head). Grid: ST ×3; MTL (EW); '
    'DM + co-annotation on the classification pair (expert prior), VA co-trained; MTL + DGR (λ = 0.01, K = 1); '
    'UW, FAMO and UPGrad; MTL with the MSE loss for VA instead of CCC (`mtl_va_mse`, what chose the VA loss on '
    'validation data); control `mtl_without_va`: MTL on the two classification sources alone (each task then fills '
    'half of every batch instead of a third). Cut from --grid=full: the other weighting methods and relatedness '
    'variants.',
    'multi_fashion': 'At most 400 steps (batch 64), early-stopped on validation, 20k train / 2k test images, CNN '
    'only: ST ×2, EW, EW + DGR `sq_l2`, EW + DGR `sq_l2_unbiased` (λ = 0.01, K = 1). The other '
    'weighting methods, the λ/K sweep and resnet18 are in --grid=full.',
}
SUMMARY_PREAMBLE = (
    'Scale: these are the cut CPU runs of `--grid=cpu` (a small CNN on a 2-core CPU, each cell trained until its '
    'validation score stopped improving or a step cap, 3 seeds per cell unless n is given; see each REPORT.md for '
    'exactly what ran and what was cut). Every number is the test metric at the best-validation step. They test '
    "whether the claims show up at this small scale, not whether they hold at the papers' scale; a claim that did "
    'not hold here is not refuted by it. Δm divides by the single-task score: where a single-task model barely '
    'learned Δm is huge and says little; read the per-task columns and NT flags there.'
)


def _term_overrides(study: str, kind: str, **options) -> dict:
  """``objective.terms.<term>.<option>`` for every ``kind`` ('dm' or 'coann') term of the study's task pairs."""
  names = [kind] if study == 'affect' else [f'{kind}_{b}' for b in ('group', 'attributes')]
  return {f'objective.terms.{n}.{k}': v for n in names for k, v in options.items()}


# Each study's own relatedness table (its config's RELATEDNESS): where the learned tables start besides uniform.
STUDY_TABLE = {'affect': 'prior:expressions_to_aus', 'shopping': 'estimate:coannotated'}


def cpu_grid(study: str, root: str = os.path.join('workdirs', 'experiments', 'STUDY')) -> list[Variant]:
  """The cut grid of :data:`CPU_CUTS`; ``root`` = the study's sweep root (the monitor cell reads its st_* runs)."""
  root = root.replace('STUDY', study)
  spec_of = lambda v: f'configs/{study}.py:{v},cpu'  # noqa: E731
  steps = CPU_STEPS[study]
  if study == 'affect_va':
    spec_of = lambda v: f'configs/affect.py:{v},va,cpu'  # noqa: E731
    grid = affect_va_grid(spec_of)
  elif study == 'multi_fashion':
    grid = multi_fashion_grid(spec_of, methods=('ew',), encoders=('cnn',), dgr=((0.01, 1),))
    grid.append(Variant('cnn_ew_dgr_unbiased', spec_of('mtl+dgr'), {'objective.terms.dgr.norm': 'sq_l2_unbiased'}))
  else:
    terms = lambda kind, **o: _term_overrides(study, kind, **o)  # noqa: E731
    both = terms('dm', direction='both')
    grid = [Variant(f'st_{t}', spec_of(f'single={t}')) for t in TASKS[study]]
    grid += [
        Variant('mtl', spec_of('mtl')),
        Variant('mtl_equal_exposure', spec_of('mtl'), {'total_steps': 2 * steps}),
        Variant('coann', spec_of('coann')),
        Variant('coann_uniform', spec_of('coann'), terms('coann', prior='uniform')),
        # `dm`, `dm_uniform`, `dm_coann` and the scarce DM cells ran with direction 'both', the default until these
        # runs decided on `a_to_b` (SUMMARY.md, "Defaults decided on validation data"): pinned so they stay what ran.
        Variant('dm', spec_of('dm'), both),
        Variant('dm_uniform', spec_of('dm'), {**both, **terms('dm', prior='uniform')}),
        Variant('dm_a_to_b', spec_of('dm'), terms('dm', direction='a_to_b')),
        Variant('dm_b_to_a', spec_of('dm'), terms('dm', direction='b_to_a')),
        Variant('dm_coann', spec_of('dm+coann'), both),
        Variant('mtl_dgr', spec_of('mtl+dgr')),
        Variant('mtl_dgr_unbiased', spec_of('mtl+dgr'), {'objective.terms.dgr.norm': 'sq_l2_unbiased'}),
    ]
    # Learned relatedness (docs/maths.md §8), re-estimated at every evaluation, from uniform and from the study's
    # own table (affect: the expert prior; shopping, which has none: the co-annotated estimate), and the
    # negative-transfer monitor (§9) annealing DM / co-annotation against the same seed's single-task runs; all on
    # dm_coann (direction 'both'), the static-table cell they compare with. The monitor cell reads the st_* runs'
    # results.json: the grid lists it after them (and a sweep runs seed by seed).
    learned = lambda init: {  # noqa: E731
        **both,
        **terms('dm', relatedness=f'learned:{init}'),
        **terms('coann', relatedness=f'learned:{init}'),
        'relatedness_every': EVAL_EVERY,
    }
    grid += [
        Variant('dm_coann_learned_uniform', spec_of('dm+coann'), learned('uniform')),
        Variant('dm_coann_learned_prior', spec_of('dm+coann'), learned(STUDY_TABLE[study])),
        Variant(
            'dm_coann_monitor', spec_of(f'dm+coann,nt={sweep.display_path(root)}'), {**both, 'nt_action': 'anneal'}
        ),
    ]
    if study == 'shopping':
      scarce = {'data.options.num_item': 100}
      grid += [Variant('scarce_st_item', spec_of('single=item'), scarce)]
      grid += [
          Variant(f'scarce_{v.replace("+", "_")}', spec_of(v), {**scarce, **(both if 'dm' in v else {})})
          for v in ('mtl', 'coann', 'dm', 'dm+coann')
      ]
  over = {
      'optimizer.learning_rate': 0.003,
      'total_steps': steps,
      'eval_every': EVAL_EVERY,
      'log_every': EVAL_EVERY,
      'early_stopping_patience': EARLY_STOP,
  }
  grid = [Variant(v.name, v.spec, {**over, **v.overrides}) for v in grid]
  # A checkpoint at the end only (for the linear probes); keep one.
  return [
      Variant(v.name, v.spec, {**v.overrides, 'checkpoint_every': v.overrides['total_steps'], 'keep_checkpoints': 1})
      for v in grid
  ]


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('study', choices=sorted(TASKS) + ['summary'])
  parser.add_argument('--grid', choices=('cpu', 'full'), default='cpu')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--jobs', type=int, default=2)
  parser.add_argument('--workdirs', default=os.path.join('workdirs', 'experiments'))
  parser.add_argument('--results', default=os.path.join('experiments', 'results'))
  parser.add_argument('--no-probe', action='store_true', help='skip the linear probes of the shared features')
  parser.add_argument(
      '--probe-dgr-only',
      action='store_true',
      help='linear probes only of the variants in a without/with-DGR pair (what the DGR claim reads)',
  )
  parser.add_argument('--readme', default='', help='summary: also rewrite the generated block of this README')
  parser.add_argument('--report-only', action='store_true', help='table and report the finished runs only')
  args = parser.parse_args(argv)
  if args.study == 'summary':
    from experiments import report  # pylint: disable=g-import-not-at-top

    text = report.write_overall_summary(args.results, SUMMARY_PREAMBLE if args.grid == 'cpu' else '')
    if args.readme:
      report.update_readme(args.readme, text)
    print(text)
    return
  root = os.path.join(args.workdirs, args.study)
  grid = cpu_grid(args.study, root) if args.grid == 'cpu' else full_grid(args.study)
  runs = sweep.expand(grid, seeds=[int(s) for s in args.seeds.split(',')], root=root, order='seed')
  start = time.time()
  if not args.report_only:
    sweep.run_all(runs, jobs=args.jobs)
  from experiments import report  # pylint: disable=g-import-not-at-top  (imports JAX/TF; not needed to sweep)

  out = os.path.join(args.results, args.study)
  rows = sweep.collect(runs)
  sweep.write_table(rows, os.path.join(out, 'runs.csv'))
  sweep.write_table(rows, os.path.join(out, 'runs.json'))
  given = list(argv if argv is not None else sys.argv[1:])
  command = 'python experiments/case_studies.py ' + ' '.join(a for a in given if a != '--report-only')
  if args.report_only:
    command += (
        '   # runs the sweep (finished runs skipped) and writes this report; this report came from the same '
        '+ --report-only after the runs'
    )
  report.write_report(
      args.study,
      runs,
      out,
      tasks=TASKS[args.study],
      command=command,
      probe=not args.no_probe,
      probe_dgr_only=args.probe_dgr_only,
      notes=CPU_CUTS[args.study] + RUN_NOTES if args.grid == 'cpu' else 'The full grid.',
      sweep_seconds=None if args.report_only else time.time() - start,
  )
  print(f'report: {os.path.join(out, "REPORT.md")}')


if __name__ == '__main__':
  main()
