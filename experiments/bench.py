"""Step time of the train step with DM / co-annotation / DGR and with every weighting method, relative to EW.

  python experiments/bench.py --json bench.json                        # every row: CNN, batch 64, 20 timed steps
  python experiments/bench.py --only ew,dm,dgr_k1_fixed,pcgrad_t4 --steps 50
  python experiments/bench.py --encoder resnet18 --batch_size 256 --json gpu.json    # on a GPU: bf16 compute

Rows (``--only`` takes a comma-separated subset of these names):

* affect — synthetic affect (``expression`` 7-way + 17 ``aus``, 32×32 grey, see ``configs/affect.py``), EW
  weighting: ``ew`` (plain MTL), ``coann``, ``dm``, ``dm+coann``, ``dgr_k1_fixed``, ``dgr_k4_fixed``,
  ``dgr_k1_resample`` (DGR λ=0.01 on every task, task-architecture dummies). ``ratio_to_ew`` = step / ``ew`` step.
* T tasks — an in-memory benchmark (``data.make_benchmark`` + ``data.array_source``) of random 32×32 grey images
  with T 10-way tasks, every task labelled on every example: ``<method>_t<T>`` for each method in
  ``weighting.METHODS`` and T in ``--tasks`` (2, 4, 8). ``ratio_to_ew`` = step / ``ew_t<T>`` step of this run.
  ``auto_lambda`` also gets one batch of the benchmark's validation split (10 % held out, as in the train loop).
* ``pipeline`` — ``data.train_iterator`` over synthetic affect without sharding (host numpy batches of
  ``--batch_size``): ``step_ms`` = ms per batch, ``ratio_to_ew`` = that / the ``ew`` step (< 1: the input keeps up with
  the EW step), ``examples_per_s``.

The EW baseline of a group is always measured (and written) when a row of that group is asked for.

Measurement. Every row uses the same encoder (``--encoder``, ``--encoder_kwargs``, ``--dtype``), batch size and mesh
(all local devices, batch sharded on ``data``, as the train loop does; on CPU that is one device unless
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set); one fixed batch per group, on device, is fed
to every step, so only the step is timed. ``compile_s`` = trace + lower + XLA compile of ``exp.step_fn``. Each row
then runs ``--warmup`` steps. The timed steps are interleaved: ``--steps`` rounds, each timing one step of every row
of the group (``block_until_ready`` on the new state and metrics), in an order rotated each round, so that load from
other processes on a shared machine falls on all rows alike. ``step_ms`` is the median over the rounds,
``step_ms_min`` the fastest. The state is the train loop's own (``exp.init_state()``; within a T group the methods
share the EW experiment's initial state with their own ``weighting_state``, the only part that depends on the
method). ``gflop_per_step`` is XLA's cost analysis of the compiled step (per-device program × devices; an estimate)
and ``tflops`` = that / step time.

Memory. ``peak_mem_mb``: on a GPU/TPU, ``jax.devices()[0].memory_stats()['peak_bytes_in_use']``; on CPU (no memory
stats) the process's peak resident set (``ru_maxrss``). Both are process-wide peaks *so far*, so they only grow from
row to row: read them for the largest configuration, or run one row per process (``--only``). ``step_temp_mb`` is
per row: XLA's temporary buffers of the compiled step on one device (``memory_analysis().temp_size_in_bytes``).

Targets (reported, not asserted): DGR K=1 ≤ 1.10×, K=4 ≤ 1.25×, DM and co-annotation ≤ 1.05× EW; methods that need
the task Jacobian (``weighting.is_gradient_method``: the gradient methods and GradNorm) ≤ (1 + 0.6·T)× EW; Auto-Lambda
(a validation forward and backward, a Jacobian-vector product and a second backward on top of EW's step) ≤ 4×; the
other loss-weighting methods ≤ 1.05×. On a shared CPU, timing noise of a few per cent is normal: compare ratios from one
run, and repeat a row with more ``--steps`` before reading much into a 1.06×.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import data  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import experiment as experiment_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import step as step_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import weighting  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.tasks import TaskSpec  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Affect rows: name -> (config variant of configs/affect.py, DGR overrides or None).
AFFECT = {
    'ew': ('mtl', None),
    'coann': ('coann', None),
    'dm': ('dm', None),
    'dm+coann': ('dm+coann', None),
    'dgr_k1_fixed': ('dgr', {'num_dummies': 1, 'mode': 'fixed'}),
    'dgr_k4_fixed': ('dgr', {'num_dummies': 4, 'mode': 'fixed'}),
    'dgr_k1_resample': ('dgr', {'num_dummies': 1, 'mode': 'resample'}),
}
NUM_CLASSES = 10  # of each synthetic task in the T-task rows
# --fast_compile (tests, CI): XLA:CPU without its fusion emitters and at backend optimisation level 0 compiles the
# step about 3x faster; the steps then run slower, so the numbers are not a benchmark.
FAST_COMPILE = {
    'xla_cpu_use_fusion_emitters': False,
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
}


def row_names(task_counts) -> list[str]:
  return list(AFFECT) + [f'{m}_t{t}' for t in task_counts for m in weighting.METHODS] + ['pipeline']


def target(name: str) -> Optional[float]:
  """The ratio-to-EW target of a row (None for the baselines and the pipeline)."""
  if name in ('coann', 'dm', 'dm+coann'):
    return 1.05
  if name.startswith('dgr_k1'):
    return 1.10
  if name.startswith('dgr_k4'):
    return 1.25
  if name in AFFECT or name == 'pipeline' or name.startswith('ew_t'):
    return None
  method, _, t = name.rpartition('_t')
  if weighting.METHODS[method].needs == 'meta':
    return 4.0  # Auto-Lambda: + a validation forward and backward, one Jacobian-vector product, a second backward
  return 1.0 + 0.6 * int(t) if weighting.is_gradient_method(method) else 1.05


# ---------------------------------------------------------------------------------------------------------------


def base_config(args) -> Any:
  """configs/affect.py with this run's encoder, dtype, batch size and data size; weighting EW, no terms."""
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'affect.py') + ':mtl')
  if args.encoder_kwargs is not None:
    # JSON lists -> tuples: module attributes stay hashable like the configs' own.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.encoder_kwargs).items()}
  else:
    kwargs = config.encoder.kwargs.to_dict() if args.encoder == config.encoder.name else {}
  if args.dtype != 'float32':
    kwargs['dtype'] = args.dtype
  config.encoder.name = args.encoder
  config.encoder.kwargs = kwargs
  config.batch_size = config.eval_batch_size = args.batch_size
  config.data.data_dir = args.data_dir
  n = args.num_examples
  config.data.options = {
      'num_expressions': n,
      'num_aus': max(n // 2, 1),
      'num_test': 64,
      'num_coannotated': 64,
      'coannotated_subsets': (),
  }
  return config


def random_benchmark(num_tasks: int, num_examples: int, image_shape=(32, 32, 1), seed: int = 0) -> data.Benchmark:
  """Random images, ``num_tasks`` 10-way tasks t0..t{T-1}, all labelled, in one in-memory source."""
  rng = np.random.default_rng(seed)
  tasks = [TaskSpec(f't{i}', 'multiclass', NUM_CLASSES) for i in range(num_tasks)]
  images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
  labels = {t.name: rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32) for t in tasks}
  return data.make_benchmark(f'random_t{num_tasks}', tasks, [data.array_source('random', images, labels)])


def peak_mem_mb() -> tuple[float, str]:
  """Process-wide peak so far: device memory where the backend reports it, else the host's peak RSS."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20, 'device_peak'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'host_max_rss'  # Linux: KiB


def compile_lowered(lowered, fast: bool):
  if fast:
    try:
      return lowered.compile(compiler_options=FAST_COMPILE)
    except Exception as e:  # pylint: disable=broad-except
      if 'No such compile option' not in str(e):  # an XLA without these options: compile normally
        raise
  return lowered.compile()


def init_state(exp: experiment_lib.Experiment, args):
  """``exp.init_state()``; with --fast_compile, the same program compiled with :data:`FAST_COMPILE`."""
  if not args.fast_compile:
    return exp.init_state()
  return compile_lowered(jax.jit(exp.init_state).lower(), fast=True)()


def first_batch(exp: experiment_lib.Experiment, batch_size: int):
  """One training batch of ``exp``'s benchmark, on device with the train loop's data sharding."""
  stream = data.train_iterator(exp.benchmark, global_batch_size=batch_size, seed=0)
  return jax.device_put(next(stream), exp.data_sharding)


def with_validation_batch(exp: experiment_lib.Experiment, batch, batch_size: int):
  """``batch`` plus ``'validation'``: one batch of ``exp``'s validation split (what Auto-Lambda's step reads)."""
  validation = dataclasses.replace(exp.benchmark, train_sources=exp.benchmark.validation_sources, validation_sources=())
  stream = data.train_iterator(validation, global_batch_size=batch_size, seed=experiment_lib.validation_seed(0))
  return {**batch, 'validation': jax.device_put(next(stream), exp.data_sharding)}


@dataclasses.dataclass
class Prepared:
  """One compiled row, warm, with its own state, ready for timed rounds."""

  name: str
  group: str
  num_tasks: int
  compiled: Any
  state: Any
  batch: Any
  info: dict
  times: list = dataclasses.field(default_factory=list)
  metrics: Any = None


def prepare(name: str, group: str, exp: experiment_lib.Experiment, state, batch, args) -> Prepared:
  """Compiles ``exp.step_fn`` for (state, batch) and runs the warm-up steps."""
  start = time.perf_counter()
  compiled = compile_lowered(exp.step_fn.lower(state, batch), args.fast_compile)
  compile_s = time.perf_counter() - start
  metrics = None
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) * exp.mesh.size if cost else 0.0
  memory = compiled.memory_analysis()
  mem, mem_source = peak_mem_mb()
  info = {
      'compile_s': compile_s,
      'peak_mem_mb': mem,
      'peak_mem_source': mem_source,
      'step_temp_mb': memory.temp_size_in_bytes / 2**20 if memory is not None else None,
      'gflop_per_step': flops / 1e9 if flops else None,
  }
  print(f'  {name}: compiled in {compile_s:.1f} s', file=sys.stderr, flush=True)
  return Prepared(name, group, len(exp.benchmark.tasks), compiled, state, batch, info)


def time_rounds(prepared: list[Prepared], args) -> list[dict]:
  """``args.steps`` rounds; each times one step of every row (block_until_ready on its state and metrics), in an
  order rotated by one per round, so that load from other processes falls on every row alike (a shared machine's
  noise would otherwise land on whichever rows ran while it lasted)."""
  for r in range(args.steps):
    k = r % len(prepared)
    for p in prepared[k:] + prepared[:k]:
      start = time.perf_counter()
      p.state, p.metrics = p.compiled(p.state, p.batch)
      jax.block_until_ready((p.state, p.metrics))
      p.times.append(time.perf_counter() - start)
  rows = []
  for p in prepared:
    step_s = statistics.median(p.times)
    flops = (p.info['gflop_per_step'] or 0.0) * 1e9
    rows.append(
        {
            'name': p.name,
            'group': p.group,
            'num_tasks': p.num_tasks,
            'step_ms': 1e3 * step_s,
            'step_ms_min': 1e3 * min(p.times),
            **p.info,
            'tflops': flops / step_s / 1e12 if flops else None,
            'finite': bool(np.isfinite(float(p.metrics['loss']))),
        }
    )
    p.state = p.compiled = None  # free the device memory before the next group
  return rows


def bench_affect(names: list[str], args, base) -> list[dict]:
  prepared, batch = [], None
  for name in names:
    variant, dgr = AFFECT[name]
    config = config_lib.load_config(os.path.join(REPO, 'configs', 'affect.py') + f':{variant}')
    for key in ('encoder', 'batch_size', 'eval_batch_size', 'data'):
      config[key] = base[key]
    if dgr:
      config.objective.terms.dgr.update(dgr)
    exp = experiment_lib.build_experiment(config)
    batch = first_batch(exp, args.batch_size) if batch is None else batch
    prepared.append(prepare(name, 'affect', exp, init_state(exp, args), batch, args))
  return time_rounds(prepared, args)


def bench_tasks(num_tasks: int, methods: list[str], args, base) -> list[dict]:
  benchmark = random_benchmark(num_tasks, args.num_examples)
  prepared, batch, initial = [], None, None
  for method in methods:
    config = base.copy_and_resolve_references()
    config.weighting.name = method
    exp = experiment_lib.build_experiment(config, benchmark=benchmark)
    if initial is None:  # EW comes first: its initial state serves every method (all but weighting_state)
      initial = jax.device_get(init_state(exp, args))
      batch = first_batch(exp, args.batch_size)
    combined, _ = experiment_lib.loss_names(exp.objective, exp.config)
    try:
      weighting_state = step_lib.weighting_init(exp.method, len(combined), initial.params)
    except ValueError as e:  # e.g. Krum needs T >= 3: no row, and say why
      print(f'{method}_t{num_tasks}: skipped ({e})', file=sys.stderr, flush=True)
      continue
    # Fresh host copies: the step donates its state, and two leaves sharing one buffer cannot both be donated.
    state = jax.device_put(jax.tree.map(np.array, initial.replace(weighting_state=weighting_state)), exp.replicated)
    method_batch = (
        with_validation_batch(exp, batch, args.batch_size) if weighting.needs_validation(exp.method) else batch
    )
    prepared.append(prepare(f'{method}_t{num_tasks}', f't{num_tasks}', exp, state, method_batch, args))
  return time_rounds(prepared, args)


def bench_pipeline(args, base) -> dict:
  benchmark = data.get_benchmark(base.data.name, data_dir=base.data.data_dir, seed=base.data.seed, **base.data.options)
  stream = data.train_iterator(benchmark, global_batch_size=args.batch_size, seed=0)
  for _ in range(2):
    next(stream)
  num = max(args.steps, 10)
  start = time.perf_counter()
  for _ in range(num):
    next(stream)
  seconds = (time.perf_counter() - start) / num
  mem, mem_source = peak_mem_mb()
  return {
      'name': 'pipeline',
      'group': 'affect',
      'num_tasks': len(benchmark.tasks),
      'step_ms': 1e3 * seconds,
      'examples_per_s': args.batch_size / seconds,
      'peak_mem_mb': mem,
      'peak_mem_source': mem_source,
  }


def add_ratios(rows: list[dict]) -> list[dict]:
  by_name = {r['name']: r for r in rows}
  for r in rows:
    baseline = by_name.get('ew' if r['group'] == 'affect' else f'ew_t{r["num_tasks"]}')
    r['ratio_to_ew'] = r['step_ms'] / baseline['step_ms'] if baseline else None
    r['target'] = target(r['name'])
    r['meets_target'] = (r['ratio_to_ew'] <= r['target']) if r['target'] is not None and r['ratio_to_ew'] else None
  return rows


TABLE = (
    bench_common.Column('name', 20, 'name', align='<'),
    bench_common.Column('T', 2, 'num_tasks'),
    bench_common.Column('step ms', 9, 'step_ms', '.2f'),
    bench_common.Column('x EW', 6, 'ratio_to_ew', '.3f'),
    bench_common.Column('target', 7, 'target', '.2f'),
    bench_common.Column('ok', 3, lambda r: bench_common.ok_mark(r.get('meets_target'))),
    bench_common.Column('compile s', 9, 'compile_s', '.1f'),
    bench_common.Column('peak MB', 8, 'peak_mem_mb', '.0f'),
    bench_common.Column('temp MB', 8, 'step_temp_mb', '.1f'),
    bench_common.Column('GFLOP', 8, 'gflop_per_step', '.3f'),
    bench_common.Column('TFLOP/s', 8, 'tflops', '.3f'),
)


def format_table(rows: list[dict]) -> str:
  return bench_common.format_table(
      rows,
      TABLE,
      suffix=lambda r: f'   ({r["examples_per_s"]:,.0f} examples/s)' if r['name'] == 'pipeline' else '',
  )


def parse_args(argv=None):
  parser = bench_common.make_parser(__doc__)
  bench_common.add_json_argument(parser)
  parser.add_argument('--encoder', default='cnn', help='an encoder of mtlmatch.models.ENCODERS')
  parser.add_argument(
      '--encoder_kwargs',
      default=None,
      help='JSON, e.g. \'{"widths": [8, 16], "features": 32}\' (default: configs/affect.py\'s for '
      'cnn, the model defaults otherwise)',
  )
  parser.add_argument(
      '--dtype',
      default='auto',
      choices=('auto', 'float32', 'bfloat16'),
      help='encoder compute dtype; auto = bfloat16 on a GPU/TPU, float32 on CPU',
  )
  parser.add_argument('--batch_size', type=int, default=64, help='global batch (a multiple of the device count)')
  bench_common.add_timing_arguments(parser, steps=20, warmup=3)
  parser.add_argument('--tasks', default='2,4,8', help='task counts T of the <method>_t<T> rows')
  parser.add_argument('--only', default=None, help='comma-separated row names (default: all)')
  parser.add_argument('--num_examples', type=int, default=2048, help='training examples per generated source')
  parser.add_argument(
      '--fast_compile',
      action='store_true',
      help='CPU only, for tests/CI: quicker XLA compiles, slower steps (the numbers are no benchmark)',
  )
  parser.add_argument('--data_dir', default=None, help='TFDS cache for synthetic affect (default: a temp dir)')
  args = parser.parse_args(argv)
  task_counts = [int(t) for t in bench_common.comma_list(args.tasks)]
  if not task_counts or min(task_counts) < 1:
    parser.error(f'--tasks: got {args.tasks!r}, expected comma-separated ints >= 1')
  valid = row_names(task_counts)
  args.only = bench_common.comma_list(args.only) if args.only else valid
  unknown = [n for n in args.only if n not in valid]
  if unknown:
    parser.error(f'--only: got unknown names {unknown}, expected names from {valid}')
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.num_examples < 1:
    parser.error('--steps and --batch_size and --num_examples must be >= 1, --warmup >= 0')
  bench_common.check_fast_compile(parser, args, jax.default_backend())
  if args.dtype == 'auto':
    args.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  args.task_counts = task_counts
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  tfds.disable_progress_bar()
  if args.data_dir is None:
    args.data_dir = tempfile.mkdtemp(prefix='mtlmatch_bench_')
  base = base_config(args)
  print(
      f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); encoder '
      f'{args.encoder} {base.encoder.kwargs.to_dict()}; batch {args.batch_size}; {args.steps} timed steps',
      file=sys.stderr,
      flush=True,
  )
  wanted = set(args.only)
  rows = []
  affect = [n for n in AFFECT if n in wanted]
  if affect or 'pipeline' in wanted:
    rows += bench_affect(['ew'] + [n for n in affect if n != 'ew'], args, base)
  for t in args.task_counts:
    methods = [m for m in weighting.METHODS if f'{m}_t{t}' in wanted]
    if methods:
      rows += bench_tasks(t, ['ew'] + [m for m in methods if m != 'ew'], args, base)
  if 'pipeline' in wanted:
    rows.append(bench_pipeline(args, base))
  rows = add_ratios(rows)
  print(format_table(rows))
  bench_common.write_json(rows, args.json)
  return rows


if __name__ == '__main__':
  main()
