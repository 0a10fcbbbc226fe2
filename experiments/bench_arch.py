"""Step time, parameter count and memory of every architecture (docs/explanations/architectures.md) against HPS.

  python experiments/bench_arch.py --json experiments/results/bench_arch.json          # CNN, batch 64, 20 rounds
  python experiments/bench_arch.py --only hps,mmoe,mtan --encoder resnet18 --batch_size 256     # on a GPU

One row per name of ``models.architectures.ARCHITECTURES`` (``--only`` a subset; ``hps`` is always measured): the
affect benchmark (``configs/affect.py:mtl``, EW) with ``arch=<name>`` at its default kwargs, the encoder, batch and
data of experiments/bench.py's arguments. Measurement as experiments/bench.py's (its ``prepare`` / ``time_rounds``:
one fixed batch on device, interleaved timed rounds, median ``step_ms``); ``ratio_to_hps`` = step / ``hps`` step;
``params`` = the parameter count (encoder + heads), ``encoder_params`` the shared part; ``step_temp_mb`` XLA's
temporary buffers of the compiled step; ``peak_mem_mb`` the process peak so far (grows from row to row on CPU: run
one row per process with ``--only`` to compare it).
"""

from __future__ import annotations

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import experiment as experiment_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.models import architectures  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = (
    bench_common.Column('name', 13, 'name', align='<'),
    bench_common.Column('step_ms', 9, 'step_ms', '.2f'),
    bench_common.Column('x hps', 7, 'ratio_to_hps', '.2f'),
    bench_common.Column('params', 10, 'params', ','),
    bench_common.Column('encoder', 10, 'encoder_params', ','),
    bench_common.Column('temp_mb', 8, 'step_temp_mb', '.1f'),
    bench_common.Column('compile_s', 9, 'compile_s', '.1f'),
)


def main(argv=None) -> list[dict]:
  parser = bench_common.make_parser(__doc__)
  bench_common.add_json_argument(parser)
  parser.add_argument('--encoder', default='cnn', help='cnn, resnet18 or resnet50 (every architecture)')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_examples', type=int, default=512, help='training examples per generated source')
  parser.add_argument('--only', default=None, help='comma-separated architecture names (default: all)')
  parser.add_argument('--fast_compile', action='store_true', help='CPU only, for tests: quicker compiles')
  parser.add_argument('--data_dir', default=None, help='TFDS cache for synthetic affect (default: a temp dir)')
  bench_common.add_timing_arguments(parser, steps=20, warmup=3)
  args = parser.parse_args(argv)
  names = bench_common.comma_list(args.only) if args.only else list(architectures.ARCHITECTURES)
  unknown = [n for n in names if n not in architectures.ARCHITECTURES]
  if unknown:
    parser.error(f'--only: got unknown names {unknown}, expected names from {list(architectures.ARCHITECTURES)}')
  bench_common.check_fast_compile(parser, args, jax.default_backend())
  args.encoder_kwargs, args.dtype = None, 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  args.data_dir = args.data_dir or tempfile.mkdtemp(prefix='mtlmatch_bench_arch_')
  base = bench.base_config(args)
  prepared, batch, sizes = [], None, {}
  count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
  for name in ['hps'] + [n for n in names if n != 'hps']:
    config = base.copy_and_resolve_references()
    config_lib.set_arch(config, name)
    exp = experiment_lib.build_experiment(config)
    batch = bench.first_batch(exp, args.batch_size) if batch is None else batch
    state = bench.init_state(exp, args)
    sizes[name] = {'params': count(state.params), 'encoder_params': count(state.params['encoder'])}
    prepared.append(bench.prepare(name, 'arch', exp, state, batch, args))
  rows = bench.time_rounds(prepared, args)
  hps = next(r['step_ms'] for r in rows if r['name'] == 'hps')
  for row in rows:
    row.update(sizes[row['name']], ratio_to_hps=row['step_ms'] / hps, encoder=args.encoder, batch=args.batch_size)
  print(bench_common.format_table(rows, COLUMNS))
  bench_common.write_json(rows, args.json)
  return rows


if __name__ == '__main__':
  main()
