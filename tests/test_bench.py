"""experiments/bench.py and experiments/device_check.py end to end at a tiny size: the rows asked for, the JSON
schema, the printed table."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import REPO


def _load_bench():
  spec = importlib.util.spec_from_file_location('mtlmatch_bench', REPO / 'experiments' / 'bench.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_bench_writes_the_json_schema(tmp_path, capsys):
  bench = _load_bench()
  out = tmp_path / 'bench.json'
  # In-process (JAX and TF are already imported here; 8 fake devices, so batch 16): the CLI minus process start-up.
  bench.main(
      [
          '--steps',
          '2',
          '--warmup',
          '0',
          '--only',
          'ew,dm',
          '--json',
          str(out),
          '--batch_size',
          '16',
          '--encoder_kwargs',
          '{"widths": [4], "features": 8}',
          '--num_examples',
          '32',
          '--fast_compile',
          '--data_dir',
          str(tmp_path / 'tfds'),
      ]
  )
  rows = json.loads(out.read_text())
  assert [r['name'] for r in rows] == ['ew', 'dm']
  for r in rows:
    assert {'name', 'step_ms', 'ratio_to_ew', 'peak_mem_mb'} <= set(r)
    assert r['step_ms'] > 0 and r['peak_mem_mb'] > 0 and r['compile_s'] > 0 and r['finite']
  assert rows[0]['ratio_to_ew'] == 1.0
  np.testing.assert_allclose(rows[1]['ratio_to_ew'], rows[1]['step_ms'] / rows[0]['step_ms'])
  assert rows[1]['target'] == 1.05 and rows[1]['meets_target'] == (rows[1]['ratio_to_ew'] <= 1.05)
  printed = capsys.readouterr().out
  table = printed[printed.index('name ') :].splitlines()
  assert table[0].split()[:3] == ['name', 'T', 'step']
  assert [line.split()[0] for line in table[2:]] == ['ew', 'dm']


def test_device_check_runs_at_a_tiny_size(tmp_path, capsys):
  """device_check's main at a tiny size on CPU (8 fake devices): one row of a one-block ResNet-50 with remat and two
  microbatches per step in the real train step (BatchNorm, bfloat16, the ImageNet stem); and the peak table's
  lookups."""
  from experiments import device_check  # pylint: disable=g-import-not-at-top  (imports bench.py: TF, TFDS)

  out = tmp_path / 'device_check.json'
  rows = device_check.main(
      [
          '--encoders',
          'resnet50',
          '--rows',
          'ew',
          '--remat',
          'on',
          '--grad_accum',
          '2',
          '--batch_size',
          '16',
          '--image_size',
          '8',
          '--steps',
          '1',
          '--warmup',
          '0',
          '--encoder_kwargs',
          '{"width": 1, "stage_sizes": [1]}',
          '--fast_compile',
          '--json',
          str(out),
      ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
  (row,) = rows
  assert (row['encoder'], row['name'], row['remat'], row['grad_accum'], row['ratio_to_ew']) == (
      'resnet50',
      'ew',
      True,
      2,
      1.0,
  )
  assert row['step_ms'] > 0 and row['finite'] and row['step_temp_mb'] is not None
  assert row['gflop_per_step'] is None and row['tflops'] is None  # k > 1: XLA's cost analysis counts the loop once
  assert row['device_kind'] == 'cpu' and row['peak_tflops_per_device'] is None and row['fraction_of_peak'] is None
  printed = capsys.readouterr().out
  assert 'peak bf16 n/a' in printed
  table = printed[printed.index(f'{"encoder":<20} row') :].splitlines()
  assert table[0].split()[:4] == ['encoder', 'row', 'step', 'ms'] and table[2].split()[:4] == [
      'resnet50',
      'remat',
      'k=2',
      'ew',
  ]
  assert table[2].split()[-1] == 'n/a'
  for kind, peak in [
      ('NVIDIA H100 80GB HBM3', 989.5),
      ('NVIDIA H100 PCIe', 756.5),
      ('NVIDIA H200', 989.5),
      ('NVIDIA A100-SXM4-40GB', 312.0),
      ('TPU v4', 275.0),
      ('TPU v5 lite', 197.0),
      ('TPU v5', 459.0),
      ('TPU v5p', 459.0),
      ('TPU v6 lite', 918.0),
      ('TPU v4 lite', None),
      ('cpu', None),
  ]:
    assert device_check.peak_tflops(kind)[0] == peak, kind


def _load_bench_torch():
  _load_bench()
  spec = importlib.util.spec_from_file_location('mtlmatch_bench_torch', REPO / 'experiments' / 'bench_torch.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_bench_torch_exits_with_a_clear_message_without_torch(monkeypatch):
  bench_torch = _load_bench_torch()
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(
      SystemExit,
      match=r'needs PyTorch, which mtlmatch does not depend on; install the optional '
      r"extra with `pip install -e '\.\[bench\]'`",
  ):
    bench_torch.import_torch()


def test_bench_torch_table_and_json(tmp_path, capsys):
  pytest.importorskip('torch')
  bench_torch = _load_bench_torch()
  out = tmp_path / 'bench_torch.json'
  bench_torch.main(
      [
          '--steps',
          '1',
          '--warmup',
          '0',
          '--methods',
          'ew',
          '--batch_size',
          '16',
          '--threads',
          '1',
          '--num_examples',
          '32',
          '--fast_compile',
          '--json',
          str(out),
      ]
  )
  rows = json.loads(out.read_text())
  assert [r['name'] for r in rows] == ['torch_ew', 'mtlmatch_ew']
  assert rows[0]['ratio_to_torch'] == 1.0 and rows[1]['target'] == 1.0 and all(r['finite'] for r in rows)
  assert 'mtlmatch_ew' in capsys.readouterr().out


@pytest.mark.slow  # ~12 s; `make test-all` runs it (the suite measured 15 min 3 s on 2 idle cores with it)
def test_bench_data_files_throughput_runs_and_prints_its_table(tmp_path, capsys):
  """experiments/bench_data.py's sources-read-by-row mode at a tiny size (the numbers are the script's business)."""
  spec = importlib.util.spec_from_file_location('mtlmatch_bench_data', REPO / 'experiments' / 'bench_data.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = ['--files_mode=throughput', '--sizes=24', '--pixels=16', '--threads=2', '--steps=1', '--warmup=1', '--runs=1']
  module.main(args + ['--batch_size=8', f'--data_dir={tmp_path}'])
  rows = [line.split('|') for line in capsys.readouterr().out.splitlines() if line.startswith('| 16 ')]
  assert len(rows) == 1 and rows[0][2] == ' 2 ' and all(float(x.replace(',', '')) > 0 for x in rows[0][3:7])


def test_device_check_runs_the_deeplabv3_rows_at_a_tiny_size():
  """The ``deeplabv3`` group (dilated ResNet + one ASPP head per task on random dense labels): a row of each dense
  kind of gradient path, EW beside DGR's dummy ASPP decoders, float32 (XLA:CPU has no bf16 x bf16 → f32 dot)."""
  from experiments import device_check  # pylint: disable=g-import-not-at-top  (imports bench.py: TF, TFDS)

  rows = device_check.main(
      '--encoders deeplabv3 --rows ew,dgr_k1 --precision float32 --batch_size 8 --image_size 8 --steps 1 --warmup 0 '
      '--fast_compile'.split() + ['--dense_kwargs', '{"widths": [2, 2, 2, 2], "stage_sizes": [1, 1, 1, 1]}']
  )
  assert [(r['encoder'], r['name']) for r in rows] == [('deeplabv3', 'ew'), ('deeplabv3', 'dgr_k1')]
  assert all(r['step_ms'] > 0 and r['finite'] for r in rows) and rows[0]['ratio_to_ew'] == 1.0
  with pytest.raises(SystemExit):
    device_check.main('--encoders deeplabv3 --image_size 12 --batch_size 8'.split())
