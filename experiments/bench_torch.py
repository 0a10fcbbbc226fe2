"""One train step of mtlmatch next to the same network's in plain PyTorch, on the CPU, interleaved in one run.

  pip install -e '.[bench]'        # PyTorch: an optional extra for this script only, never a dependency of mtlmatch
  python experiments/bench_torch.py --json experiments/results/bench_torch.json

The network: conv 3×3 32 → ReLU → max-pool 2×2 → conv 3×3 64 → ReLU → max-pool 2×2 → flatten → dense 128 → ReLU →
two 10-way linear heads, on 36×36×1 images, batch 256, softmax cross-entropy per head, Adam (lr 1e-3, no clipping).

Rows:

* ``torch_ew`` — plain PyTorch (NCHW, ``torch.set_num_threads(--threads)``, default: every core): ``zero_grad``,
  forward, the sum of the two losses, ``backward``, ``Adam.step``.
* ``mtlmatch_<method>`` for ``--methods`` (default ``ew,pcgrad,mgda``) — mtlmatch's own train step
  (``experiment_lib.build_experiment(...).step_fn``: the data-parallel step over every JAX device, with the library's
  metrics) for encoder ``cnn`` ``{'widths': (32, 64), 'features': 128}``, built by ``experiments/bench.py``'s helpers
  (random 36×36 images with T = 2 all-labelled 10-way tasks; the config's gradient clipping off, as in the PyTorch
  step).

* with ``--breakdown``: ``torch_forward`` (no grad), ``torch_fwd_bwd`` (the step without ``Adam.step``),
  ``jax_forward`` (mtlmatch's model and the summed task losses, jitted) and ``jax_fwd_bwd`` (``jax.value_and_grad``
  of that: no optimizer, weighting or metrics), on the EW row's mesh and batch.

``--conv_impl native`` builds mtlmatch's encoder with XLA's own convolution and max-pool backward (the "before" of
``mtlmatch.models.cpu_ops``). JAX gets one CPU device per core, as ``mtlmatch.main`` gives a run
(``mtlmatch.cpu_devices``), unless ``XLA_FLAGS`` sets a device count.

Every row is warmed up (``--warmup`` steps after compiling), then ``--steps`` rounds each time one step of every row,
in an order rotated every round (``bench.time_rounds``), so load from other processes falls on all rows alike; the
table gives medians, ``x torch`` = step / ``torch_ew`` step, and the target: mtlmatch EW ≤ 1.0×, the per-task-
gradient methods ≤ (1 + 0.3·T)× PyTorch's EW step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import bench  # noqa: E402  pylint: disable=wrong-import-position
from experiments import bench_common  # noqa: E402  pylint: disable=wrong-import-position
from mtlmatch import cpu_devices  # noqa: E402  pylint: disable=wrong-import-position

NUM_TASKS = 2
IMAGE_SHAPE = (36, 36, 1)
WIDTHS, FEATURES = (32, 64), 128
LEARNING_RATE = 1e-3
MISSING_TORCH = (
    'experiments/bench_torch.py needs PyTorch, which mtlmatch does not depend on; install the optional '
    "extra with `pip install -e '.[bench]'` (CPU build: `pip install torch --index-url "
    'https://download.pytorch.org/whl/cpu`)'
)


def import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit(MISSING_TORCH)
  return torch


def warm_up_info(start: float) -> dict:
  """A row's ``info`` for `bench.Prepared`: the warm-up time since ``start``; no memory or FLOP figures."""
  return {
      'compile_s': time.perf_counter() - start,
      'peak_mem_mb': None,
      'peak_mem_source': None,
      'step_temp_mb': None,
      'gflop_per_step': None,
  }


def torch_rows(args, torch) -> list[bench.Prepared]:
  """The plain PyTorch step as a ``bench.Prepared`` row (``compiled(state, batch) -> (state, {'loss': float})``);
  with ``--breakdown`` also its forward alone and forward + backward."""
  nn = torch.nn
  torch.manual_seed(0)
  h, w, c = IMAGE_SHAPE
  flat = WIDTHS[-1] * (h // 2 ** len(WIDTHS)) * (w // 2 ** len(WIDTHS))
  layers, in_ch = [], c
  for width in WIDTHS:
    layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    in_ch = width
  encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, FEATURES), nn.ReLU())
  heads = nn.ModuleList([nn.Linear(FEATURES, bench.NUM_CLASSES) for _ in range(NUM_TASKS)])
  params = list(encoder.parameters()) + list(heads.parameters())
  opt = torch.optim.Adam(params, lr=LEARNING_RATE)
  gen = torch.Generator().manual_seed(0)
  images = torch.rand(args.batch_size, c, h, w, generator=gen)
  labels = [torch.randint(0, bench.NUM_CLASSES, (args.batch_size,), generator=gen) for _ in range(NUM_TASKS)]

  def step(state, batch):
    x, ys = batch
    opt.zero_grad(set_to_none=True)
    feats = encoder(x)
    loss = sum(nn.functional.cross_entropy(head(feats), y) for head, y in zip(heads, ys))
    loss.backward()
    opt.step()
    return state, {'loss': float(loss.detach())}

  def forward(state, batch):
    x, ys = batch
    with torch.no_grad():
      feats = encoder(x)
      loss = sum(nn.functional.cross_entropy(head(feats), y) for head, y in zip(heads, ys))
    return state, {'loss': float(loss)}

  def forward_backward(state, batch):  # the step without the optimizer
    x, ys = batch
    opt.zero_grad(set_to_none=True)
    feats = encoder(x)
    loss = sum(nn.functional.cross_entropy(head(feats), y) for head, y in zip(heads, ys))
    loss.backward()
    return state, {'loss': float(loss.detach())}

  rows = [('torch_ew', step)] + (
      [('torch_forward', forward), ('torch_fwd_bwd', forward_backward)] if args.breakdown else []
  )
  prepared = []
  for name, fn in rows:
    start = time.perf_counter()
    for _ in range(max(args.warmup, 1)):
      fn(None, (images, labels))
    info = warm_up_info(start)
    prepared.append(bench.Prepared(name, 'torch', NUM_TASKS, fn, None, (images, labels), info))
  return prepared


def mtlmatch_rows(args) -> list[bench.Prepared]:
  """mtlmatch's train step for each of ``args.methods``, as ``experiments/bench.py`` builds its T-task rows."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mtlmatch import experiment as experiment_lib

  base = bench.base_config(args)
  base.optimizer.clip_norm = 0.0  # plain Adam, as the PyTorch step
  base.encoder.kwargs.conv_impl = args.conv_impl
  benchmark = bench.random_benchmark(NUM_TASKS, args.num_examples, image_shape=IMAGE_SHAPE)
  rows, initial, batch = [], None, None
  for method in args.methods:
    config = base.copy_and_resolve_references()
    config.weighting.name = method
    exp = experiment_lib.build_experiment(config, benchmark=benchmark)
    if initial is None:
      initial = jax.device_get(bench.init_state(exp, args))
      batch = bench.first_batch(exp, args.batch_size)
    combined, _ = experiment_lib.loss_names(exp.objective, exp.config)
    state = jax.device_put(
        jax.tree.map(np.array, initial.replace(weighting_state=exp.method.init(len(combined)))), exp.replicated
    )
    rows.append(bench.prepare(f'mtlmatch_{method}', 'mtlmatch', exp, state, batch, args))
    if args.breakdown and method == args.methods[0]:
      # Own copies of the parameters: the step donates its state, which would delete shared buffers.
      params = jax.device_put(jax.device_get(rows[-1].state.params), exp.replicated)
      rows += breakdown_rows(exp, rows[-1].state.replace(params=params), batch, args)
  return rows


def breakdown_rows(exp, state, batch, args) -> list[bench.Prepared]:
  """Sub-parts of ``exp``'s step as rows: the forward pass and loss alone (``jax_forward``), and forward + backward
  of the summed task losses (``jax_fwd_bwd``: ``jax.value_and_grad``, no optimizer, no weighting, no metrics)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mtlmatch import losses  # pylint: disable=import-outside-toplevel

  def loss_fn(params, batch):
    outputs, _ = exp.model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True)
    return sum(
        losses.masked_mean(*losses.softmax_xent(outputs['logits'][t], batch['labels'][t])) for t in exp.model.tasks
    )

  fns = {'jax_forward': jax.jit(loss_fn), 'jax_fwd_bwd': jax.jit(jax.value_and_grad(loss_fn))}
  rows = []
  for name, fn in fns.items():
    start = time.perf_counter()
    compiled = fn.lower(state.params, batch).compile()

    def run(params, batch, compiled=compiled):
      out = compiled(params, batch)  # the loss, or (loss, gradients): all of it is waited for
      return params, {'loss': out[0] if isinstance(out, tuple) else out, 'out': out}

    for _ in range(max(args.warmup, 1)):
      jax.block_until_ready(run(state.params, batch))
    info = warm_up_info(start)
    rows.append(bench.Prepared(name, 'mtlmatch', len(exp.model.tasks), run, state.params, batch, info))
  return rows


def target(name: str):
  if not name.startswith('mtlmatch_'):
    return None
  from mtlmatch import weighting  # pylint: disable=import-outside-toplevel

  method = name[len('mtlmatch_') :]
  return 1.0 + 0.3 * NUM_TASKS if weighting.is_gradient_method(method) else 1.0


TABLE = (
    bench_common.Column('row', 18, 'name', align='<'),
    bench_common.Column('step ms', 9, 'step_ms', '.1f'),
    bench_common.Column('min ms', 8, 'step_ms_min', '.1f'),
    bench_common.Column('x torch', 8, 'ratio_to_torch', '.3f'),
    bench_common.Column('target', 7, 'target', '.2f'),
    bench_common.Column('ok', 3, lambda r: bench_common.ok_mark(r['meets_target'])),
    bench_common.Column('warm-up s', 9, 'compile_s', '.1f'),
)


def format_table(rows: list[dict]) -> str:
  return bench_common.format_table(rows, TABLE)


def parse_args(argv=None):
  parser = bench_common.make_parser(__doc__)
  bench_common.add_json_argument(parser)
  parser.add_argument('--methods', default='ew,pcgrad,mgda', help='mtlmatch weighting methods (comma-separated)')
  parser.add_argument('--batch_size', type=int, default=256)
  bench_common.add_timing_arguments(
      parser, steps=20, warmup=3, steps_help='timed rounds (median reported)', warmup_help=None
  )
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='PyTorch intra-op threads')
  parser.add_argument('--num_examples', type=int, default=512, help='random training examples for mtlmatch')
  parser.add_argument(
      '--conv_impl',
      default='auto',
      choices=('auto', 'native', 'gemm'),
      help="mtlmatch's config.encoder.kwargs.conv_impl (native: XLA's own conv / max-pool backward)",
  )
  parser.add_argument(
      '--breakdown',
      action='store_true',
      help='also time forward alone and forward + backward, of both PyTorch and mtlmatch',
  )
  parser.add_argument('--fast_compile', action='store_true', help='tests only: quicker XLA compiles, slower steps')
  args = parser.parse_args(argv)
  args.methods = bench_common.comma_list(args.methods)
  from mtlmatch import weighting  # pylint: disable=import-outside-toplevel

  unknown = [m for m in args.methods if m not in weighting.METHODS]
  if unknown:
    parser.error(f'--methods: got unknown {unknown}, expected names from {sorted(weighting.METHODS)}')
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
    parser.error('--steps, --batch_size and --threads must be >= 1, --warmup >= 0')
  # What experiments/bench.py's helpers read.
  args.encoder, args.dtype, args.data_dir = 'cnn', 'float32', tempfile.mkdtemp(prefix='mtlmatch_bench_torch_')
  args.encoder_kwargs = json.dumps({'widths': list(WIDTHS), 'features': FEATURES})
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  # One XLA:CPU device per core, as mtlmatch.main gives a run, unless XLA_FLAGS sets a count (JAX has not started
  # its backend yet: nothing above asked it for a device).
  os.environ['XLA_FLAGS'] = cpu_devices.xla_flags_with_cores(
      os.environ.get('XLA_FLAGS'), cpu_devices.available_cores(), (args.batch_size,)
  )
  torch = import_torch()
  torch.set_num_threads(args.threads)
  import jax  # pylint: disable=import-outside-toplevel

  print(
      f'PyTorch {torch.__version__} ({args.threads} threads); JAX {jax.__version__}: {jax.device_count()} x '
      f'{jax.devices()[0].device_kind} ({jax.default_backend()}); batch {args.batch_size}; load {os.getloadavg()}',
      file=sys.stderr,
      flush=True,
  )
  prepared = torch_rows(args, torch) + mtlmatch_rows(args)
  rows = bench.time_rounds(prepared, args)
  torch_ms = next(r['step_ms'] for r in rows if r['name'] == 'torch_ew')
  for r in rows:
    r['ratio_to_torch'] = r['step_ms'] / torch_ms
    r['target'] = target(r['name'])
    r['meets_target'] = r['ratio_to_torch'] <= r['target'] if r['target'] is not None else None
    r['devices'] = jax.device_count() if r['group'] == 'mtlmatch' else None  # (the forward/backward rows too)
    r['threads'] = args.threads if r['group'] == 'torch' else None
  print(format_table(rows))
  print(f'load after: {os.getloadavg()}', file=sys.stderr)
  bench_common.write_json(rows, args.json)
  return rows


if __name__ == '__main__':
  main()
