"""Experiments layer: sweep driver (skip-finished, commands, table), report statistics against hand numbers, one real
smoke run through the driver (+ its linear probe from the checkpoint), a fake sweep's report (relative paths, each
row's command), and the notebooks end to end."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import case_studies, report, sweep  # noqa: E402
from experiments.sweep import Variant  # noqa: E402


def _fake_results(workdir, metrics):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'step': 10, 'wall_time_s': 1.0, 'metrics': metrics, 'per_source': {}}, f)


def test_sweep_runs_only_unfinished_and_tables_them(tmp_path):
  grid = [
      Variant('a', 'configs/affect.py:mtl', {'total_steps': 5, 'encoder.kwargs.widths': (8, 16)}),
      Variant('b', 'configs/affect.py:dm'),
  ]
  runs = sweep.expand(grid, seeds=(0, 1), root=str(tmp_path))
  assert [(r.variant.name, r.seed) for r in runs] == [('a', 0), ('a', 1), ('b', 0), ('b', 1)]
  assert runs[1].workdir == os.path.join(str(tmp_path), 'a', 'seed_1')
  by_seed = sweep.expand(grid, seeds=(0, 1), root=str(tmp_path), order='seed')
  assert [(r.variant.name, r.seed) for r in by_seed] == [('a', 0), ('b', 0), ('a', 1), ('b', 1)]
  cmd = runs[1].command('py')
  assert cmd[:4] == ['py', '-m', 'mtlmatch.main', '--config=configs/affect.py:mtl']
  assert cmd[4:] == [
      f'--workdir={runs[1].workdir}',
      '--config.seed=1',
      '--config.total_steps=5',
      '--config.encoder.kwargs.widths=(8,16)',
  ]
  _fake_results(runs[2].workdir, {'expression': {'accuracy': 0.5, 'count': 3.0}})
  launched = []

  def fake_launch(run):
    launched.append((run.variant.name, run.seed))
    _fake_results(
        run.workdir,
        {
            'expression': {'accuracy': 0.25 * (1 + run.seed), 'macro_f1': 0.1, 'count': 3.0},
            'aus': {'mean_f1': 0.3, 'f1_0': 0.2, 'accuracy': 0.9, 'count': 3.0},
        },
    )
    return 0

  codes = sweep.run_all(runs, jobs=2, launcher=fake_launch, echo=lambda s: None)
  assert sorted(launched) == [('a', 0), ('a', 1), ('b', 1)] and set(codes.values()) == {0}
  launched.clear()
  assert sweep.run_all(runs, jobs=1, launcher=fake_launch, echo=lambda s: None) == {} and not launched
  rows = sweep.collect(runs)
  assert [r['name'] for r in rows] == ['a', 'a', 'b', 'b']
  assert rows[1]['expression/accuracy'] == 0.5 and rows[2]['expression/accuracy'] == 0.5
  assert 'aus/f1_0' not in rows[0] and 'aus/count' not in rows[0] and rows[0]['aus/mean_f1'] == 0.3
  sweep.write_table(rows, str(tmp_path / 't.csv'))
  with open(tmp_path / 't.csv') as f:
    lines = f.read().splitlines()
  assert len(lines) == 5 and lines[0].startswith('name,spec,seed,workdir,step,best_step,wall_time_s,validation/score')
  # A run with a selection record is tabled with the test metrics of its best-validation step, not the final ones.
  with open(runs[0].results_path, 'w') as f:
    json.dump(
        {
            'step': 10,
            'metrics': {'expression': {'accuracy': 0.6}},
            'selection': {'best_step': 4, 'best_score': 0.7, 'metrics': {'expression': {'accuracy': 0.8}}},
        },
        f,
    )
  row = sweep.collect(runs[:1])[0]
  assert (row['expression/accuracy'], row['best_step'], row['step'], row['validation/score']) == (0.8, 4, 10, 0.7)
  with pytest.raises(ValueError, match='duplicate'):
    sweep.expand(grid + grid[:1], seeds=(0,), root=str(tmp_path))
  with pytest.raises(ValueError, match='jobs'):
    sweep.run_all(runs, jobs=0)


def test_cpu_variant_sizes_the_run_and_keeps_the_rest():
  from mtlmatch import config_lib  # pylint: disable=g-import-not-at-top

  base, cpu = (config_lib.load_config(f'configs/multi_fashion.py:mtl+dgr{t}') for t in ('', ',cpu'))
  assert (cpu.total_steps, cpu.batch_size, cpu.keep_checkpoints, cpu.optimizer.warmup_steps) == (300, 64, 1, 20)
  assert (tuple(cpu.encoder.kwargs.widths), cpu.encoder.kwargs.features) == ((16, 32), 64)
  assert (cpu.data.options.num_train, cpu.data.options.num_test) == (20000, 2000)
  for key in ('objective', 'weighting', 'head'):
    assert config_lib.to_json(cpu[key]) == config_lib.to_json(base[key]), key
  assert (cpu.tasks, cpu.seed) == (base.tasks, base.seed)
  resnet = config_lib.load_config('configs/affect.py:encoder=resnet18,dm,cpu')
  assert config_lib.to_json(resnet.encoder) == config_lib.to_json(
      config_lib.load_config('configs/affect.py:encoder=resnet18,dm').encoder
  )  # another encoder keeps its own sizes
  with pytest.raises(ValueError, match="at most one of 'cpu' and 'smoke'"):
    config_lib.load_config('configs/affect.py:dm,cpu,smoke')


def test_cpu_variant_is_the_small_cnn_whatever_encoder_the_config_file_has():
  from mtlmatch import config_lib  # pylint: disable=g-import-not-at-top

  assert config_lib.load_config('configs/faces.py:dm').encoder.name == 'resnet18'
  cpu = config_lib.load_config('configs/faces.py:dm,cpu')  # kept ResNet-18 (60 steps in 3 min 39 s)
  assert cpu.encoder.name == 'cnn' and (tuple(cpu.encoder.kwargs.widths), cpu.encoder.kwargs.features) == ((16, 32), 64)
  assert config_lib.to_json(cpu.encoder) == config_lib.to_json(
      config_lib.load_config('configs/affect.py:dm,cpu').encoder
  )
  chosen = config_lib.load_config('configs/faces.py:encoder=resnet18,dm,cpu')  # chosen for this run: kept
  assert config_lib.to_json(chosen.encoder) == config_lib.to_json(config_lib.load_config('configs/faces.py:dm').encoder)


def test_sweep_checks_every_variant_before_any_run(tmp_path):
  typo = [
      Variant('ok', 'configs/affect.py:mtl', {'total_steps': 5}),
      Variant('typo', 'configs/affect.py:dm', {'objective.terms.dm.priorr': 'model'}),
  ]
  with pytest.raises(ValueError, match=r"sweep variant 'typo' .*--config.objective.terms.dm.priorr: no such key"):
    sweep.run_all(sweep.expand(typo, seeds=(0,), root=str(tmp_path)), echo=lambda s: None)
  zero = [Variant('zero', 'configs/affect.py:mtl', {'total_steps': 0})]
  with pytest.raises(ValueError, match=r"sweep variant 'zero' .*config.total_steps: got 0, expected an int >= 1"):
    sweep.run_all(sweep.expand(zero, seeds=(0,), root=str(tmp_path)), echo=lambda s: None)
  assert not os.listdir(tmp_path)  # nothing was launched or written


def test_method_families_colour_the_difference_plot():
  assert [
      report.family(n)[0]
      for n in (
          'mtl',
          'cnn_ew',
          'scarce_coann',
          'dm_uniform',
          'scarce_dm_coann',
          'mtl_dgr_unbiased',
          'cnn_ew_dgr_l0.01_k1',
      )
  ] == ['plain MTL', 'plain MTL', 'co-annotation', 'DM', 'DM + co-annotation', 'DGR', 'DGR']
  assert len({colour for _, _, colour in report.FAMILIES}) == len(report.FAMILIES)  # no two families share one


def test_late_gain_is_what_the_last_steps_added():
  history = [
      {'step': 50, 'score': 0.5},
      {'step': 100, 'score': 0.7},
      {'step': 150, 'score': 0.72},
      {'step': 200, 'score': 0.71},
      {'step': 210, 'score': float('nan')},
  ]
  assert sweep.late_gain(history, 200) == pytest.approx(0.02)  # best 0.72, best up to step 100: 0.70
  assert sweep.late_gain(history, 200, window=40) == 0.0  # peaked at step 150, before 200 - 40
  assert sweep.late_gain(history, 120) is None  # no evaluation at step <= 20
  assert sweep.late_gain([], 200) is None


def test_delta_m_and_negative_transfer_hand_numbers():
  # Δm = ((0.84 − 0.8)/0.8 + (0.45 − 0.5)/0.5) / 2 × 100 = (5 − 10) / 2 = −2.5
  assert report.delta_m({'a': 0.84, 'b': 0.45}, {'a': 0.8, 'b': 0.5}) == pytest.approx(-2.5)
  # a lower-is-better metric flips its sign: error 0.45 vs 0.5 is a 10 % improvement → (5 + 10) / 2
  assert report.delta_m({'a': 0.84, 'b': 0.45}, {'a': 0.8, 'b': 0.5}, {'b': True}) == pytest.approx(7.5)
  assert report.negative_transfer((0.45, 0.01), (0.5, 0.02))  # gap 0.05 > 0.02
  assert not report.negative_transfer((0.49, 0.02), (0.5, 0.015))  # gap 0.01 < 0.02
  assert not report.negative_transfer((0.40, 0.12), (0.5, 0.02))  # gap 0.10 < MTL's std 0.12
  assert report.negative_transfer((0.6, 0.01), (0.5, 0.02), lower_is_better=True)
  m, s, n = report.mean_std([1.0, 2.0, 4.0, float('nan')])
  assert (m, n) == (pytest.approx(7 / 3), 3) and s == pytest.approx(
      math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
  )
  with pytest.raises(ValueError, match='means'):
    report.delta_m({'a': 1.0}, {'a': 1.0, 'b': 1.0})


def test_summarize_over_seeds_matches_numpy():
  st_e, st_a = [0.80, 0.82, 0.78], [0.40, 0.42, 0.41]
  mtl_e, mtl_a = [0.70, 0.72, 0.71], [0.45, 0.44, 0.46]
  rows = (
      [{'name': 'st_expression', 'seed': s, 'workdir': f'e{s}', 'expression/accuracy': v} for s, v in enumerate(st_e)]
      + [{'name': 'st_aus', 'seed': s, 'workdir': f'a{s}', 'aus/mean_f1': v} for s, v in enumerate(st_a)]
      + [
          {'name': 'mtl', 'seed': s, 'workdir': f'm{s}', 'expression/accuracy': e, 'aus/mean_f1': a}
          for s, (e, a) in enumerate(zip(mtl_e, mtl_a))
      ]
  )
  probes = {f'm{s}': {'expression': 0.5 + s / 10, 'aus': 0.3} for s in range(3)}
  out = report.summarize(rows, {'expression': 'multiclass', 'aus': 'multilabel'}, probes)
  assert out['primary'] == {'expression': 'expression/accuracy', 'aus': 'aus/mean_f1'}
  mtl = out['variants']['mtl']
  assert mtl['metrics']['expression/accuracy'][:2] == [
      pytest.approx(np.mean(mtl_e)),
      pytest.approx(np.std(mtl_e, ddof=1)),
  ]
  want = 100 * ((np.mean(mtl_e) - np.mean(st_e)) / np.mean(st_e) + (np.mean(mtl_a) - np.mean(st_a)) / np.mean(st_a)) / 2
  assert mtl['delta_m'] == pytest.approx(want)
  assert mtl['negative_transfer'] == {'expression': True, 'aus': False}
  assert mtl['probe']['expression'][:2] == [pytest.approx(0.6), pytest.approx(0.1)]
  assert 'delta_m' not in out['variants']['st_aus']
  text = report.render_markdown(
      'affect', out, {'expression': 'multiclass', 'aus': 'multilabel'}, command='c', seeds=(0, 1, 2)
  )
  assert f'| mtl | {np.mean(mtl_e):.4f} ± {np.std(mtl_e, ddof=1):.4f} |' in text and f'{want:+.2f}' in text
  assert '**yes**' in text and 'Δm (%) = (1/T)' in text


def test_summarize_compares_each_encoder_with_its_own_baselines():
  # multi_fashion names its runs <encoder>_<method>; cnn_ew must use cnn_st_*, resnet18_ew resnet18_st_*.
  kinds = {'left': 'multiclass', 'right': 'multiclass'}
  st = {'cnn': (0.80, 0.70), 'resnet18': (0.90, 0.60)}
  mtl = {'cnn': (0.84, 0.63), 'resnet18': (0.81, 0.66)}
  rows = []
  for enc in st:
    for s in range(2):
      jitter = 0.001 * s
      rows += [
          {'name': f'{enc}_st_left', 'seed': s, 'workdir': f'{enc}l{s}', 'left/accuracy': st[enc][0] + jitter},
          {'name': f'{enc}_st_right', 'seed': s, 'workdir': f'{enc}r{s}', 'right/accuracy': st[enc][1] + jitter},
          {
              'name': f'{enc}_ew',
              'seed': s,
              'workdir': f'{enc}m{s}',
              'left/accuracy': mtl[enc][0] + jitter,
              'right/accuracy': mtl[enc][1] + jitter,
          },
      ]
  out = report.summarize(rows, kinds)
  for enc in st:
    want = 100 * sum((m - b) / (b + 0.0005) for m, b in zip(mtl[enc], st[enc])) / 2  # seed means carry +0.0005
    assert out['variants'][f'{enc}_ew']['delta_m'] == pytest.approx(want, abs=1e-6)
    assert 'delta_m' not in out['variants'][f'{enc}_st_left']
  assert out['variants']['cnn_ew']['negative_transfer'] == {'left': False, 'right': True}
  assert out['variants']['resnet18_ew']['negative_transfer'] == {'left': True, 'right': False}


def test_case_study_grids_have_baselines_and_valid_methods():
  from mtlmatch import weighting

  assert set(case_studies.METHODS) == set(weighting.METHODS)
  for study, tasks in case_studies.TASKS.items():
    for grid in (case_studies.full_grid(study), case_studies.cpu_grid(study)):
      names = [v.name for v in grid]
      assert len(names) == len(set(names))
      assert all(any(n.endswith(f'st_{t}') for n in names) for t in tasks)
  full = case_studies.full_grid('multi_fashion')
  assert {v.overrides.get('weighting.name') for v in full} >= set(weighting.METHODS)
  assert {v.overrides.get('encoder.name', 'cnn') for v in full} == {'cnn', 'resnet18'}
  # Every override must name a key of its config (absl refuses unknown keys only when the run starts).
  from mtlmatch import config_lib

  loaded = {}
  for study in case_studies.TASKS:
    for v in case_studies.full_grid(study) + case_studies.cpu_grid(study):
      config = loaded.setdefault(v.spec, config_lib.load_config(v.spec))
      for key in v.overrides:
        node = config
        for part in key.split('.'):
          assert part in node, f'{study}/{v.name}: override {key!r} is not a key of {v.spec}'
          node = node[part]
  affect = {v.name: v for v in case_studies.full_grid('affect')}
  assert affect['dm_coann_est100'].overrides['objective.terms.dm.relatedness'] == 'estimate:coannotated_100'


def test_real_smoke_run_through_the_driver_and_its_linear_probe(tmp_path):
  runs = sweep.expand([Variant('mtl', 'configs/affect.py:mtl,smoke')], seeds=(0,), root=str(tmp_path))
  codes = sweep.run_all(runs, jobs=1, echo=lambda s: None, timeout=300)
  run = runs[0]
  log = open(os.path.join(run.workdir, 'log.txt')).read()
  assert codes == {run.workdir: 0}, log[-3000:]
  for name in ('command.txt', 'log.txt', 'config.json', 'results.json'):
    assert os.path.isfile(os.path.join(run.workdir, name)), name
  assert sweep.run_all(runs, launcher=lambda r: pytest.fail('finished run relaunched'), echo=lambda s: None) == {}
  row = sweep.collect(runs)[0]
  assert row['step'] == 6 and 0 <= row['expression/accuracy'] <= 1 and 0 <= row['aus/mean_f1'] <= 1
  probes = report.linear_probes(runs, probe_train=64, probe_test=48, echo=lambda s: None)
  assert set(probes[run.workdir]) == {'expression', 'aus'}
  assert 0 <= probes[run.workdir]['expression'] <= 1
  assert any(tag.startswith('loss/task/') for tag in report.read_scalars(run.workdir))


NOTEBOOK_PARAMS = {
    'compose_losses': {'STEPS': 12, 'BATCH': 16, 'NUM_EXPRESSIONS': 256, 'NUM_AUS': 128, 'NUM_TEST': 96},
    'own_data': {'STEPS': 4, 'NUM_TRAIN': 128, 'NUM_TEST': 64},
}
NOTEBOOK_CHECKS = {
    'compose_losses': ("'expression_accuracy'", "'dgr'"),
    'own_data': ("mtl {'", "dm {'", "'count': ", 'test.npz', 'first example: shape probabilities'),
}


@pytest.mark.parametrize('name', sorted(NOTEBOOK_PARAMS))
def test_notebook_runs_end_to_end_and_is_stored_with_outputs(name):
  pytest.importorskip('nbclient')
  nbformat = pytest.importorskip('nbformat')
  from experiments import notebooks

  nb = notebooks.execute(name, params=NOTEBOOK_PARAMS[name], timeout=400)
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert all(needle in text for needle in NOTEBOOK_CHECKS[name]), text[-3000:]
  assert any('image/png' in o.get('data', {}) for o in outputs if o.output_type == 'display_data')
  stored = nbformat.read(os.path.join(REPO, 'experiments', f'{name}.ipynb'), as_version=4)
  stored_outputs = [o for c in stored.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert all(c.execution_count for c in stored.cells if c.cell_type == 'code'), 'stored without running it'
  assert all(needle in ''.join(o.get('text', '') for o in stored_outputs) for needle in NOTEBOOK_CHECKS[name])
  assert any('image/png' in o.get('data', {}) for o in stored_outputs if o.output_type == 'display_data')
  stored_text = ''.join(str(o) for o in stored_outputs)
  assert REPO not in stored_text and '<this repository>' not in ''.join(c.source for c in stored.cells)


def test_fake_sweep_report_has_relative_paths_and_each_rows_command():
  """On a fake sweep inside the repository: no absolute path in the tables or REPORT.md, and
  each row's exact command (its config file and overrides)."""
  import shutil
  import uuid

  root = os.path.join(REPO, 'workdirs', f'_test_fake_sweep_{uuid.uuid4().hex[:8]}')
  try:
    grid = [
        Variant('st_expression', 'configs/affect.py:single=expression,cpu', {'total_steps': 250}),
        Variant('mtl', 'configs/affect.py:mtl,cpu', {'encoder.kwargs.widths': (32, 64, 128)}),
    ]
    runs = sweep.expand(grid, seeds=(0, 1), root=root)
    for run in runs:
      _fake_results(
          run.workdir,
          {
              'expression': {'accuracy': 0.5 + 0.1 * run.seed, 'count': 3},
              **({'aus': {'mean_f1': 0.4, 'count': 3}} if run.variant.name == 'mtl' else {}),
          },
      )
    rel = os.path.relpath(root, REPO)
    assert runs[0].command('python')[4] == f'--workdir={rel}/st_expression/seed_0'
    rows = sweep.collect(runs)
    assert {r['workdir'] for r in rows} == {f'{rel}/{n}/seed_{s}' for n in ('st_expression', 'mtl') for s in (0, 1)}
    out = os.path.join(root, 'report')
    report.write_report(
        'affect', runs, out, tasks=['expression'], command='python experiments/case_studies.py ' 'affect', probe=False
    )
    text = open(os.path.join(out, 'REPORT.md')).read()
    assert REPO not in text and REPO not in open(os.path.join(out, 'summary.json')).read()
    assert (
        f'| mtl | `XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mtlmatch.main '
        f'--config=configs/affect.py:mtl,cpu --workdir={rel}/mtl/seed_0 --config.seed=0 '
        "'--config.encoder.kwargs.widths=(32,64,128)'` |"
    ) in text
    assert '| st_expression | `XLA_FLAGS=' in text and '--config.total_steps=250' in text
  finally:
    shutil.rmtree(root, ignore_errors=True)


def test_overall_summary_verdicts(tmp_path):
  def variant(dm, nt, probe=None, expression=(0.8, 0.01, 3)):
    v = {'metrics': {'expression/accuracy': list(expression)}, 'delta_m': dm, 'negative_transfer': nt}
    if probe:
      v['probe'] = probe
    return v

  summary = {
      'primary': {'expression': 'expression/accuracy'},
      'variants': {
          'mtl': variant(
              -3.0, {'expression': True, 'aus': False}, {'expression': [0.60, 0.01, 3], 'aus': [0.5, 0.01, 3]}
          ),
          'dm': variant(-1.0, {'expression': True, 'aus': False}),
          'mtl_equal_exposure': variant(-0.5, {'expression': False, 'aus': False}),
          'dm_coann': variant(1.0, {'expression': False, 'aus': False}),
          'coann': variant(-2.5, {'expression': True, 'aus': True}),  # higher Δm, but NT appears on aus: NOT
          'mtl_dgr': variant(
              -2.0,
              {'expression': True, 'aus': False},
              {'expression': [0.65, 0.01, 3], 'aus': [0.5, 0.02, 3]},
              expression=(0.75, 0.02, 3),
          ),
      },
  }
  os.makedirs(tmp_path / 'affect')
  with open(tmp_path / 'affect' / 'summary.json', 'w') as f:
    json.dump(summary, f)
  text = report.write_overall_summary(str(tmp_path), 'pre')
  assert '`dm`: Δm = -1.00 %, negative transfer on: expression — claim held PARTLY' in text
  assert 'single-task run): Δm = -0.50 %, negative transfer on: none.' in text
  assert (
      '`coann`: Δm = -2.50 %, negative transfer on: expression, aus — claim did NOT hold: negative transfer '
      'remains and appears on aus.' in text
  )
  assert (
      '| affect | `mtl`: expression; `mtl_equal_exposure`: none | HELD 1, PARTLY 1, NOT 1 (of 3) | '
      'worse 1 (of 1) | better 1 (of 1) |'
  ) in text
  assert '`dm_coann`: Δm = +1.00 %, negative transfer on: none — claim HELD' in text
  assert (
      '`mtl` → `mtl_dgr`: task scores expression 0.800 → 0.750 (-0.050, beyond 1 std); Δm -3.00 → -2.00 % — '
      'worse. Linear probe: expression 0.600 → 0.650 (+0.050, beyond 1 std); aus 0.500 → 0.500 (+0.000, '
      'within 1 std) — claim HELD.'
  ) in text
  assert 'Not run here (no results): multi_fashion, shopping.' in text
  assert (tmp_path / 'SUMMARY.md').read_text() == text
  readme = tmp_path / 'README.md'
  readme.write_text(f'# x\n\n## Results\n\nprose\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## Next\n')
  report.update_readme(str(readme), text)
  new = readme.read_text()
  assert new.startswith('# x\n\n## Results\n\nprose\n') and new.endswith(f'{report.README_END}\n\n## Next\n')
  assert 'old' not in new and '| affect | `mtl`: expression;' in new and 'Distribution matching' not in new
  readme.write_text('# no markers\n')
  with pytest.raises(ValueError, match='must hold one'):
    report.update_readme(str(readme), text)


def test_every_script_has_a_working_help():
  """``python experiments/<script>.py --help``: exit 0 and a usage line, for every script (run side by side)."""
  import glob  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  # The scripts (a module of shared helpers such as bench_common.py has no __main__ and is not run).
  scripts = sorted(
      p for p in glob.glob(os.path.join(REPO, 'experiments', '*.py')) if "__name__ == '__main__'" in open(p).read()
  )
  assert len(scripts) >= 10, scripts
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  running = {
      path: subprocess.Popen(
          [sys.executable, path, '--help'], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
      for path in scripts
  }
  for path, process in running.items():
    out, err = process.communicate(timeout=300)
    name = os.path.basename(path)
    assert process.returncode == 0, f'{name}: exit {process.returncode}\n{err[-2000:]}'
    assert out.startswith(f'usage: {name}'), f'{name}: no usage line\n{out[:500]}'


def test_building_a_benchmark_again_repeats_no_tfds_warning(tmp_path, caplog):
  """bench.py builds one benchmark per row: TFDS's "custom data configuration" and "FeatureConnector.dtype is
  deprecated" warnings came back at each (mtlmatch.data drops those two, only those)."""
  import logging  # pylint: disable=g-import-not-at-top

  from mtlmatch import data  # pylint: disable=g-import-not-at-top

  options = dict(num_expressions=16, num_aus=16, num_coannotated=8, num_test=8, coannotated_subsets=())
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      data.get_benchmark('synthetic_affect', data_dir=str(tmp_path), seed=0, **options)
  assert 'custom data configuration' not in caplog.text and 'FeatureConnector.dtype' not in caplog.text, caplog.text
  logging.getLogger('absl').warning('Using custom data configuration: a warning of our own passes')
  assert 'a warning of our own passes' in caplog.text


def test_report_names_the_labels_no_variant_finds(tmp_path):
  runs = sweep.expand([Variant('mtl', 'configs/affect.py:mtl,cpu', {}), Variant('dm', 'configs/affect.py:dm,cpu', {})],
                      seeds=(0, 1), root=str(tmp_path))  # fmt: skip
  for run in runs:
    aus = {'mean_f1': 0.3, 'f1_AU1': 0.5, 'f1_AU12': 0.0 if run.seed else 0.2, 'f1_AU23': 0.0, 'f1_AU26': math.nan}
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
      json.dump({'step': 10, 'metrics': {}, 'selection': {'metrics': {'aus': aus}, 'validation': {'aus': aus}}}, f)
  unfound = report.unfound_labels(runs, {'aus': 'multilabel', 'expression': 'multiclass'})
  assert unfound == {'aus': ['AU23', 'AU26']}  # AU12 is found in seed 0; NaN (never labelled) counts as not found
  assert '* `aus`: `AU23`, `AU26`' in report.unfound_labels_markdown(unfound)
  assert report.unfound_labels_markdown({}) == ''


def test_arch_study_reruns_the_case_study_cells_with_the_arch_token(tmp_path):
  from experiments import arch_study  # pylint: disable=g-import-not-at-top
  from mtlmatch import config_lib  # pylint: disable=g-import-not-at-top

  base = {v.name: v for v in case_studies.cpu_grid('affect')}
  grid = {v.name: v for v in arch_study.grid('affect', ('mmoe', 'mtan'))}
  assert sorted(grid) == ['mmoe_dm_coann', 'mmoe_mtl', 'mtan_dm_coann', 'mtan_mtl']
  for name, variant in grid.items():  # the case study's cell, the same overrides, plus the arch token
    cell = base[name.split('_', 1)[1]]
    assert variant.overrides == cell.overrides and variant.spec == cell.spec + f',arch={name.split("_")[0]}'
  assert config_lib.load_config(grid['mmoe_mtl'].spec).arch.name == 'mmoe'
  # The committed rows: st_* kept, mtl / dm_coann renamed hps_* (dropped when HPS is rerun), the rest left out.
  cells = (('st_expression', 0.9), ('mtl', 0.8), ('dm', 0.0))
  rows = [{'name': n, 'seed': 0, 'expression/accuracy': a} for n, a in cells]
  os.makedirs(tmp_path / 'affect')
  with open(tmp_path / 'affect' / 'runs.json', 'w') as f:
    json.dump(rows, f)
  assert [r['name'] for r in arch_study.reference_rows(str(tmp_path), 'affect', False)] == ['st_expression', 'hps_mtl']
  assert [r['name'] for r in arch_study.reference_rows(str(tmp_path), 'affect', True)] == ['st_expression']
  summary = report.summarize(
      [
          {'name': 'st_expression', 'expression/accuracy': 0.8},
          {'name': 'mmoe_mtl', 'expression/accuracy': 0.84},
          {'name': 'mmoe_mtl', 'expression/accuracy': 0.88},
      ],
      {'expression': 'multiclass'},
  )
  lines = arch_study.table('affect', summary, ['expression'], ['st_expression', 'mmoe_mtl', 'cgc_mtl'])
  assert lines[2] == '| `st_expression` | 0.8000 ± 0.0000 | baseline | 1 |'
  assert lines[3] == f'| `mmoe_mtl` | 0.8600 ± {np.std([0.84, 0.88], ddof=1):.4f} | +7.50 | 2 |' and len(lines) == 4


def test_dense_study_summary_matches_numpy():
  """Seed mean, sample std and the nine-metric Δm (each metric's own direction) of the dense study's cells."""
  from experiments import dense_study  # pylint: disable=g-import-not-at-top

  lower = {'abs_err', 'rel_err', 'mean_angle', 'median_angle'}
  rng = np.random.default_rng(0)
  keys = [f'{t}/{m}' for t, m in dense_study.METRICS]
  rows = []
  for name in ('st_segmentation', 'st_depth', 'st_normal', 'ew'):
    for seed in range(3):
      rows.append({'name': name, 'seed': seed, **{k: float(v) for k, v in zip(keys, rng.uniform(0.2, 2.0, len(keys)))}})
  cells = dense_study.summarize(rows)
  value = lambda name, k: np.array([r[k] for r in rows if r['name'] == name])  # noqa: E731
  base = {k: value(f'st_{k.split("/")[0]}', k).mean() for k in keys}
  ew = {k: value('ew', k) for k in keys}
  for k in keys:
    np.testing.assert_allclose(cells['ew']['mean'][k], ew[k].mean(), rtol=1e-12)
    np.testing.assert_allclose(cells['ew']['std'][k], ew[k].std(ddof=1), rtol=1e-12)
  sign = lambda k: -1.0 if k.split('/')[1] in lower else 1.0  # noqa: E731
  expected = 100 * np.mean([sign(k) * (ew[k].mean() - base[k]) / base[k] for k in keys])
  np.testing.assert_allclose(cells['ew']['delta_m'], expected, rtol=1e-10)
  assert math.isnan(dense_study.delta_m({keys[0]: 1.0}, base))
  readme = dense_study.readme_table(cells).splitlines()
  ew_row = next(line for line in readme if line.startswith('| `ew` |'))
  assert f'{ew["segmentation/miou"].mean():.4f} ± {ew["segmentation/miou"].std(ddof=1):.4f}' in ew_row
  assert f'{expected:+.2f}' in ew_row and ew_row.endswith('| 3 |')  # no one-label runs: full-label seeds only
