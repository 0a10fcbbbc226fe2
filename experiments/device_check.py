"""Compile and time the ResNet train steps on whatever backend JAX finds; report step time, TFLOP/s and % of peak.

  python experiments/device_check.py                     # ResNet-18 and ResNet-50, bf16, batch 256 at 112 px
  python experiments/device_check.py --remat both        # each row with and without remat: memory vs time
  python experiments/device_check.py --grad_accum 1,2,4  # each row with k microbatches per step: memory vs time
  python experiments/device_check.py --batch_size 32 --image_size 64 --steps 3    # a smaller, stated size
  python experiments/device_check.py --encoders resnet18 --rows ew,pcgrad_t2 --precision float32
  python experiments/device_check.py --encoders deeplabv3 --image_size 288 --batch_size 8   # DeepLabV3 on NYUv2's size

Run it first on a new machine (a GPU, a TPU VM): it says whether the accelerator is found and used, what one step of
each method costs there, and how close XLA's estimate of the step's FLOPs per second comes to the device's peak.

Rows (``--rows``), each the real ``experiment.build_experiment`` step (``exp.step_fn``) of ``configs/affect.py`` on an
in-memory benchmark of random RGB images at ``--image_size`` with the affect tasks (``expression`` 7-way, ``aus`` 17
multilabel), every example labelled for both (so every term has data):

* ``ew`` — plain multi-task learning, equal weights (the ``mtl`` variant);
* ``dm+coann`` — distribution matching + soft co-annotation (prior ``expressions_to_aus``), EW;
* ``dgr_k1`` — DGR with K = 1 fixed dummy head per task (λ = 0.01), EW;
* ``pcgrad_t2`` — PCGrad on the T = 2 task losses (the task Jacobian, ``config.weighting.jacobian``).

The ``deeplabv3`` encoder group is DeepLabV3's "split" network of the DGR and Auto-Lambda code — a dilated ResNet
(``dilated_resnet``; default ResNet-50, bottleneck blocks (3, 4, 6, 3), output stride 8) shared, one ASPP head per
task — on ``configs/scenes.py``'s dense tasks (``segmentation`` 6 classes, ``depth``, ``normal``; random labels at
``--image_size``², a multiple of 8, with some ignored / invalid pixels). Its rows (:data:`DENSE_ROWS`): ``ew``,
``dgr_k1`` (dummy ASPP decoders, K = 1, λ = 0.01) and ``pcgrad_t3`` (T = 3 rows through the dilated ResNet);
``--dense_kwargs`` (JSON) overrides its fields (the tests use a one-block, width-2 network).

Encoders (``--encoders``): ``resnet18`` and ``resnet50`` with ``--stem`` (default ``imagenet``: 7×7 stride 2 +
max-pool, for 112-224 px) and ``--precision`` (default ``bfloat16``: bf16 compute, float32 parameters and losses);
``--encoder_kwargs`` (JSON) overrides fields of both (the tests use ``{"width": 2, "stage_sizes": [1, 1, 1, 1]}``).

Columns: ``step ms`` = median over ``--steps`` timed steps (after compiling and ``--warmup`` steps; the rows of one
encoder are interleaved round by round, as in experiments/bench.py); ``x EW`` = step / the same encoder's ``ew``
step; ``compile s``; ``temp MB`` = XLA's temporary buffers of the compiled step on one device
(``compiled.memory_analysis().temp_size_in_bytes``: activations kept for the backward pass among them, which
``--remat`` is meant to cut — on XLA:CPU it did not, see docs/howto/accelerators.md — and ``--grad_accum`` k > 1 cuts to
about one microbatch's); ``GFLOP`` = XLA's cost analysis of
the compiled step (``compiled.cost_analysis()['flops']``, per-device program × devices; an estimate; ``n/a`` with
``--grad_accum`` k > 1, whose microbatch loop XLA's analysis counts once); ``TFLOP/s`` =
that / step time; ``% peak`` = TFLOP/s / (devices × the device's peak dense bf16 TFLOP/s in
:data:`PEAK_BF16_TFLOPS`; ``n/a`` for a device kind not in the table, the CPU included). A float32 run is still
compared with the bf16 peak (the table holds no float32 peaks).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import data  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import experiment as experiment_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch.tasks import TaskSpec  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Peak dense bf16 TFLOP/s per device (one JAX device: a GPU, or a TPU chip from v4 on), matched against
# ``jax.devices()[0].device_kind`` (case-insensitive regex, first match wins). NVIDIA's datasheets give Tensor Core
# BF16 "with sparsity"; the dense peak used here is half of it. Sources: NVIDIA H100 datasheet (SXM 1,979; PCIe
# 1,513; NVL 1,671 TFLOPS with sparsity), NVIDIA H200 datasheet (SXM 1,979; NVL 1,671 with sparsity), NVIDIA A100
# datasheet (BF16 312 TFLOPS dense, 624 with sparsity), https://www.nvidia.com/en-us/data-center/{h100,h200,a100}/;
# Cloud TPU system architecture pages, "peak compute per chip (bf16)": v4 275, v5e 197, v5p 459, v6e (Trillium) 918,
# https://cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}. JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
PEAK_BF16_TFLOPS = (
    (r'h100.*pcie', 756.5, 'NVIDIA H100 PCIe'),
    (r'h100.*nvl', 835.5, 'NVIDIA H100 NVL'),
    (r'h100', 989.5, 'NVIDIA H100 SXM'),
    (r'h200.*nvl', 835.5, 'NVIDIA H200 NVL'),
    (r'h200', 989.5, 'NVIDIA H200 SXM'),
    (r'a100', 312.0, 'NVIDIA A100'),
    (r'^tpu v4$', 275.0, 'TPU v4'),
    (r'^tpu v5( lite|e)$', 197.0, 'TPU v5e'),
    (r'^tpu v5p?$', 459.0, 'TPU v5p'),
    (r'^tpu v6( lite|e)$', 918.0, 'TPU v6e'),
)

ROWS = {  # name -> (configs/affect.py variant, weighting method)
    'ew': ('mtl', 'ew'),
    'dm+coann': ('dm+coann', 'ew'),
    'dgr_k1': ('dgr', 'ew'),
    'pcgrad_t2': ('mtl', 'pcgrad'),
}
DENSE_ROWS = {  # name -> (configs/scenes.py variant, weighting method)
    'ew': ('mtl', 'ew'),
    'dgr_k1': ('mtl+dgr', 'ew'),
    'pcgrad_t3': ('mtl', 'pcgrad'),
}
ENCODERS = ('resnet18', 'resnet50', 'deeplabv3')
DENSE_ENCODERS = ('deeplabv3',)


def rows_of(encoder: str) -> dict:
  return DENSE_ROWS if encoder in DENSE_ENCODERS else ROWS


def peak_tflops(device_kind: str) -> tuple[Optional[float], Optional[str]]:
  """(peak dense bf16 TFLOP/s of one device, the table's name for it), or (None, None) for an unknown kind."""
  for pattern, tflops, name in PEAK_BF16_TFLOPS:
    if re.search(pattern, device_kind.strip(), re.IGNORECASE):
      return tflops, name
  return None, None


def affect_like_benchmark(image_size: int, channels: int, num_examples: int, seed: int = 0) -> data.Benchmark:
  """Random uint8 images [N, S, S, C]; ``expression`` (7-way) and ``aus`` (17 multilabel) labelled on every one."""
  rng = np.random.default_rng(seed)
  tasks = [TaskSpec('expression', 'multiclass', 7), TaskSpec('aus', 'multilabel', 17)]
  images = rng.integers(0, 256, (num_examples, image_size, image_size, channels), dtype=np.uint8)
  labels = {
      'expression': rng.integers(0, 7, num_examples).astype(np.int32),
      'aus': (rng.random((num_examples, 17)) < 0.2).astype(np.int32),
  }
  return data.make_benchmark('device_check', tasks, [data.array_source('faces', images, labels)])


def scenes_like_benchmark(image_size: int, num_examples: int, seed: int = 0) -> data.Benchmark:
  """Random uint8 images [N, S, S, 3] with the scenes' dense labels on every one: segmentation in [0, 6) (5 % −1,
  ignored), depth in (0.5, 10) m (5 % 0, invalid), unit normals (5 % the 0-vector, invalid)."""
  from mtlmatch.data import dense_benchmarks  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  shape = (num_examples, image_size, image_size)
  holes = lambda: rng.random(shape) < 0.05  # noqa: E731
  segmentation = np.where(holes(), -1, rng.integers(0, 6, shape)).astype(np.int32)
  depth = np.where(holes(), 0.0, rng.uniform(0.5, 10.0, shape)).astype(np.float32)[..., None]
  normal = rng.normal(size=shape + (3,))
  normal = np.where(holes()[..., None], 0.0, normal / np.linalg.norm(normal, axis=-1, keepdims=True))
  tasks = dense_benchmarks.dense_tasks(6, (image_size, image_size))
  images = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  labels = {'segmentation': segmentation, 'depth': depth, 'normal': normal.astype(np.float32)}
  return data.make_benchmark('device_check_dense', tasks, [data.array_source('scenes', images, labels)])


def row_config(row: str, encoder: str, args, remat: bool, accum: int = 1):
  variant, method = rows_of(encoder)[row]
  if encoder in DENSE_ENCODERS:
    config = config_lib.load_config(os.path.join(REPO, 'configs', 'scenes.py') + f':{variant}')
    config_lib.set_encoder(config, 'dilated_resnet', **args.dense_kwargs)
    config.head.name, config.head.kwargs = 'aspp', {}
  else:
    config = config_lib.load_config(os.path.join(REPO, 'configs', 'affect.py') + f':{variant}')
    config_lib.set_encoder(config, encoder, **{'stem': args.stem, **args.encoder_kwargs})
  config_lib.set_weighting(config, method)
  config.precision = args.precision
  config.remat = remat
  config.grad_accum_steps = accum
  config.weighting.jacobian = args.jacobian
  config.batch_size = config.eval_batch_size = args.batch_size
  return config


def run_group(encoder: str, remat: bool, benchmark: data.Benchmark, args, accum: int = 1) -> list[dict]:
  """Compiles the rows of one (encoder, remat, grad_accum) and times them in interleaved rounds
  (experiments/bench.py)."""
  prepared, batch = [], None
  group = f'{encoder}{" remat" if remat else ""}{f" k={accum}" if accum > 1 else ""}'
  for row in [r for r in args.rows if r in rows_of(encoder)]:
    exp = experiment_lib.build_experiment(row_config(row, encoder, args, remat, accum), benchmark=benchmark)
    batch = bench.first_batch(exp, args.batch_size) if batch is None else batch
    prepared.append(bench.prepare(row, group, exp, bench.init_state(exp, args), batch, args))
  rows = bench.time_rounds(prepared, args)
  baseline = next((r for r in rows if r['name'] == 'ew'), None)
  for r in rows:
    r.update(
        encoder=encoder,
        remat=remat,
        grad_accum=accum,
        ratio_to_ew=r['step_ms'] / baseline['step_ms'] if baseline else None,
    )
    if accum > 1:  # XLA's cost analysis counts a loop body once, not k times: its FLOPs would be far too low
      r.update(gflop_per_step=None, tflops=None)
  return rows


def add_peak(rows: list[dict]) -> list[dict]:
  kind = jax.devices()[0].device_kind
  peak, name = peak_tflops(kind)
  for r in rows:
    r.update(device_kind=kind, peak_name=name, peak_tflops_per_device=peak, num_devices=jax.device_count())
    r['fraction_of_peak'] = r['tflops'] / (peak * jax.device_count()) if peak and r['tflops'] else None
  return rows


TABLE = (
    bench_common.Column('encoder', 20, 'group', align='<'),
    bench_common.Column('row', 10, 'name', align='<'),
    bench_common.Column('step ms', 9, 'step_ms', '.2f'),
    bench_common.Column('x EW', 6, 'ratio_to_ew', '.3f'),
    bench_common.Column('compile s', 9, 'compile_s', '.1f'),
    bench_common.Column('temp MB', 9, 'step_temp_mb', '.1f'),
    bench_common.Column('GFLOP', 9, 'gflop_per_step', '.2f'),
    bench_common.Column('TFLOP/s', 8, 'tflops', '.3f'),
    bench_common.Column(
        '% peak', 7, lambda r: 100 * r['fraction_of_peak'] if r['fraction_of_peak'] is not None else None, '.1f'
    ),
)


def format_table(rows: list[dict]) -> str:
  return bench_common.format_table(rows, TABLE, missing='n/a')


def parse_args(argv=None):
  parser = bench_common.make_parser(__doc__)
  parser.add_argument('--encoders', default=','.join(ENCODERS), help=f'comma-separated, of {list(ENCODERS)}')
  every_row = list(dict.fromkeys([*ROWS, *DENSE_ROWS]))
  parser.add_argument('--rows', default=','.join(every_row), help=f'comma-separated, of {every_row}')
  parser.add_argument('--batch_size', type=int, default=256, help='global batch (a multiple of the device count)')
  parser.add_argument('--image_size', type=int, default=112, help='square RGB images of this many pixels')
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--precision', default='bfloat16', choices=config_lib.PRECISIONS, help='config.precision')
  parser.add_argument('--stem', default='imagenet', choices=('cifar', 'imagenet'), help="the ResNets' stem")
  parser.add_argument('--encoder_kwargs', default='{}', help='JSON, fields of both ResNets (e.g. width)')
  parser.add_argument('--dense_kwargs', default='{}', help="JSON, fields of deeplabv3's dilated ResNet")
  parser.add_argument('--remat', default='off', choices=('off', 'on', 'both'), help='config.remat')
  parser.add_argument(
      '--grad_accum', default='1', help='comma-separated config.grad_accum_steps values, one group of rows each'
  )
  parser.add_argument('--jacobian', default='auto', choices=('auto', 'vmap', 'rows'), help='config.weighting.jacobian')
  bench_common.add_timing_arguments(parser, steps=10, warmup=2)
  parser.add_argument(
      '--fast_compile', action='store_true', help='CPU only, for tests: quicker XLA compiles, slower steps'
  )
  bench_common.add_json_argument(parser)
  args = parser.parse_args(argv)
  args.encoders = bench_common.comma_list(args.encoders)
  args.rows = bench_common.comma_list(args.rows)
  try:
    args.grad_accum = [int(k) for k in bench_common.comma_list(args.grad_accum)]
  except ValueError:
    parser.error(f'--grad_accum: got {args.grad_accum!r}, expected comma-separated ints >= 1')
  if not args.grad_accum or min(args.grad_accum) < 1:
    parser.error(f'--grad_accum: got {args.grad_accum}, expected comma-separated ints >= 1')
  if not args.encoders or set(args.encoders) - set(ENCODERS):
    parser.error(f'--encoders: got {args.encoders}, expected names from {list(ENCODERS)}')
  if not args.rows or set(args.rows) - set(every_row):
    parser.error(f'--rows: got {args.rows}, expected names from {every_row}')
  if args.image_size % 8 and set(args.encoders) & set(DENSE_ENCODERS):
    parser.error(f'--image_size={args.image_size}: expected a multiple of 8 for {list(DENSE_ENCODERS)}')
  if min(args.batch_size, args.image_size, args.channels, args.steps) < 1 or args.warmup < 0:
    parser.error('--batch_size, --image_size, --channels and --steps must be >= 1, --warmup >= 0')
  for k in args.grad_accum:
    if args.batch_size % (jax.device_count() * k):
      parser.error(
          f'--batch_size={args.batch_size}: expected a multiple of the device count {jax.device_count()} x '
          f'grad_accum {k}'
      )
  bench_common.check_fast_compile(parser, args, jax.default_backend())
  for name in ('encoder_kwargs', 'dense_kwargs'):
    kwargs = json.loads(getattr(args, name))
    setattr(args, name, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  device = jax.devices()[0]
  peak, peak_name = peak_tflops(device.device_kind)
  print(
      f'backend {jax.default_backend()}: {jax.device_count()} x {device.device_kind} '
      f'({jax.process_count()} process(es)); peak bf16 '
      + (f'{peak:g} TFLOP/s per device ({peak_name})' if peak else 'n/a (device kind not in PEAK_BF16_TFLOPS)')
  )
  print(
      f'batch {args.batch_size} of {args.image_size}x{args.image_size}x{args.channels}, precision {args.precision}, '
      f'stem {args.stem}, grad_accum {args.grad_accum}, encoder kwargs {args.encoder_kwargs or "default"}, '
      f'{args.steps} timed steps',
      flush=True,
  )
  classification = affect_like_benchmark(args.image_size, args.channels, num_examples=2 * args.batch_size)
  dense = scenes_like_benchmark(args.image_size, 2 * args.batch_size) if DENSE_ENCODERS[0] in args.encoders else None
  remats = {'off': (False,), 'on': (True,), 'both': (False, True)}[args.remat]
  rows = []
  for encoder in args.encoders:
    for remat in remats:
      for accum in args.grad_accum:
        benchmark = dense if encoder in DENSE_ENCODERS else classification
        rows += run_group(encoder, remat, benchmark, args, accum)
  rows = add_peak(rows)
  print(format_table(rows))
  bench_common.write_json(rows, args.json)
  return rows


if __name__ == '__main__':
  main()
