"""mtlmatch side by side with LibMTL 1.1.5 on dense tasks: the generated scenes written in the NYUv2 layout, the
same SegNet from the same initial weights, EW and PCGrad on both sides; test metrics, metric agreement on the same
predictions, and step times.

  python experiments/bench_libmtl.py --out experiments/results/libmtl_dense

Runs in mtlmatch's environment. PyTorch and LibMTL are never dependencies of mtlmatch: the LibMTL side
(``experiments/libmtl_side.py``) runs in a peer venv that this script creates at ``--peer_venv`` (default
``workdirs/peer_venv``) with ``python -m venv``, then ``pip install torch==2.13.0+cpu numpy scipy`` and
``pip install --no-deps LibMTL==1.1.5`` (its declared torchvision is only needed by its ResNets' pretrained weights,
which :data:`libmtl_side.PATCHES` route through ``torch.hub``), then applies those documented patches.

Steps (all from ``--seed``):

1. ``scenes.generate_scenes`` → ``nyuv2_layout.write_layout`` (``train`` = ``--num_train`` training scenes, ``val``
   = ``--num_test`` test scenes) at ``--size`` × ``--size``.
2. mtlmatch's run: ``configs/nyuv2.py`` on that folder (6 classes, no validation hold-out, so both sides train on
   the same images), encoder ``segnet`` ``--widths`` with one conv per stage, ``segnet_decoder`` heads
   ``--decoder_widths``; Adam at a constant ``--lr`` with no warm-up, clipping or weight decay (LibMTL's Trainer:
   ``torch.optim.Adam``, ``weight_decay=0``, no scheduler). Its fresh initial state (``Experiment.init_state``) is
   converted to the PyTorch network's ``state_dict`` (:func:`torch_state`); both forwards on the same test images,
   BatchNorm in eval and in train mode, must agree within ``FORWARD_TOL``.
3. Per method (``ew``, ``pcgrad``): ``--steps`` steps of batch ``--batch`` on each side, every step timed; then the
   test split's metrics (ours: ``metrics_dense`` over the whole set; LibMTL: its meter, test batch 8).
4. ``dgr`` (ours only; LibMTL has no DGR): ``--dgr_steps`` steps, timed.
5. Metric agreement on **one** set of predictions (ours after EW): ``metrics_dense``, LibMTL's metric classes fed
   per test batch of 8 (in the peer venv), and :func:`reference_metrics` (float64 numpy); and the test losses as
   LibMTL averages them (the mean of per-batch means) next to the whole-set pixel means.

Step times: the median after ``--warmup`` steps, of the step alone (the batch already loaded). PyTorch runs with
``torch.set_num_threads(--threads)`` (default 1); mtlmatch on one XLA:CPU device per core (``mtlmatch.cpu_devices``),
on the same machine, one run after the other. Writes ``<out>/results.json``, ``<out>/REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mtlmatch import cpu_devices  # noqa: E402  pylint: disable=wrong-import-position

TASKS = ('segmentation', 'depth', 'normal')
NUM_CLASSES = 6  # mtlmatch.data.scenes.CLASSES
FORWARD_TOL = 1e-5
PEER_PACKAGES = ('torch==2.13.0+cpu', 'numpy', 'scipy')
LIBMTL = 'LibMTL==1.1.5'
METRIC_KEYS = {
    'segmentation': ('miou', 'pixel_accuracy'),
    'depth': ('abs_err', 'rel_err'),
    'normal': ('mean_angle', 'median_angle', 'within_11.25', 'within_22.5', 'within_30'),
}
LOWER_IS_BETTER = ('abs_err', 'rel_err', 'mean_angle', 'median_angle')
ROWS = ('libmtl_ew', 'libmtl_pcgrad', 'mtlmatch_ew', 'mtlmatch_pcgrad', 'mtlmatch_dgr')  # the step-time rows


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_bench_libmtl.py without torch).


def torch_state(params: Mapping, batch_stats: Mapping) -> dict[str, np.ndarray]:
  """mtlmatch's SegNet parameters → the ``state_dict`` of ``libmtl_side.build_network`` inside LibMTL's HPS model.

  Flax convolution kernels ``[kh, kw, in, out]`` become torch weights ``[out, in, kh, kw]``; BatchNorm ``scale``,
  ``bias`` and ``batch_stats`` ``mean``, ``var`` become ``weight``, ``bias``, ``running_mean``, ``running_var``;
  GroupNorm ``scale``/``bias`` become ``weight``/``bias``. Encoder stage i (one conv per stage) is
  ``encoder.stages.i.{0 conv, 1 BatchNorm}``; decoder step k of task t is ``decoders.t.steps.k.{0 conv, 1 GroupNorm}``,
  its 1×1 output ``decoders.t.classifier``. One ValueError for a layout this conversion does not know."""
  enc, stats = params['encoder'], batch_stats['encoder']
  stages = sorted({k.split('_')[0] for k in enc})
  out = {}
  conv = lambda k: np.ascontiguousarray(np.transpose(np.asarray(k, np.float32), (3, 2, 0, 1)))
  for i in range(len(stages)):
    if set(enc) & {f'stage{i}_conv1', f'stage{i}_gn0'} or f'stage{i}_bn0' not in enc:
      raise ValueError(f'params: encoder stage {i} has {sorted(enc)}, expected one conv + BatchNorm per stage')
    out[f'encoder.stages.{i}.0.weight'] = conv(enc[f'stage{i}_conv0']['kernel'])
    for src, dst in (('scale', 'weight'), ('bias', 'bias')):
      out[f'encoder.stages.{i}.1.{dst}'] = np.asarray(enc[f'stage{i}_bn0'][src], np.float32)
    for src, dst in (('mean', 'running_mean'), ('var', 'running_var')):
      out[f'encoder.stages.{i}.1.{dst}'] = np.asarray(stats[f'stage{i}_bn0'][src], np.float32)
  for task, head in params['heads'].items():
    steps = sorted(int(k[3:].split('_')[0]) for k in head if k.startswith('dec') and k.endswith('_conv'))
    for k in steps:
      pre = f'decoders.{task}.steps.{k}'
      out[f'{pre}.0.weight'] = conv(head[f'dec{k}_conv']['kernel'])
      out[f'{pre}.0.bias'] = np.asarray(head[f'dec{k}_conv']['bias'], np.float32)
      if f'dec{k}_gn' not in head:
        raise ValueError(f"params: head {task!r} step {k} has no GroupNorm, expected the heads' norm='group'")
      out[f'{pre}.1.weight'] = np.asarray(head[f'dec{k}_gn']['scale'], np.float32)
      out[f'{pre}.1.bias'] = np.asarray(head[f'dec{k}_gn']['bias'], np.float32)
    out[f'decoders.{task}.classifier.weight'] = conv(head['classifier']['kernel'])
    out[f'decoders.{task}.classifier.bias'] = np.asarray(head['classifier']['bias'], np.float32)
  return out


def reference_metrics(outputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict:
  """The nine NYUv2 metrics in float64 numpy over the whole set, from raw outputs (NHWC: segmentation logits,
  depth, unnormalised normals) and targets (segmentation −1 = ignore, depth 0 = invalid, normal 0-vector = invalid).
  mIoU over the classes with a non-empty union; angles θ = arccos(clip(x̂·y, −1, 1)) in degrees, ``np.median``."""
  logits = np.asarray(outputs['segmentation'], np.float64)
  c = logits.shape[-1]
  y = np.asarray(labels['segmentation']).reshape(-1)
  pred = np.argmax(logits, -1).reshape(-1)
  keep = (y >= 0) & (y < c)
  confusion = np.bincount(c * y[keep] + pred[keep], minlength=c * c).reshape(c, c).astype(np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  seg = {'miou': float(np.mean(tp[union > 0] / union[union > 0])), 'pixel_accuracy': float(tp.sum() / confusion.sum())}
  d_pred, d_true = np.asarray(outputs['depth'], np.float64), np.asarray(labels['depth'], np.float64)
  valid = d_true[..., 0] != 0
  err = np.abs(d_pred - d_true)[..., 0][valid]
  depth = {'abs_err': float(err.mean()), 'rel_err': float(np.mean(err / d_true[..., 0][valid]))}
  n_pred, n_true = np.asarray(outputs['normal'], np.float64), np.asarray(labels['normal'], np.float64)
  valid = np.sum(n_true * n_true, -1) > 0
  unit = n_pred / np.linalg.norm(n_pred, axis=-1, keepdims=True)
  theta = np.degrees(np.arccos(np.clip(np.sum(unit * n_true, -1)[valid], -1, 1)))
  normal = {'mean_angle': float(theta.mean()), 'median_angle': float(np.median(theta))}
  normal.update({f'within_{t:g}': float(np.mean(theta < t)) for t in (11.25, 22.5, 30.0)})
  return {'segmentation': seg, 'depth': depth, 'normal': normal}


def test_losses(outputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], batch: int) -> dict:
  """The three test losses (cross-entropy, masked L1, 1 − cos) two ways, float64: ``whole_set`` (the mean over
  every valid pixel of the set, as mtlmatch reduces a loss) and ``per_batch_mean`` (each batch of ``batch``
  images' pixel mean, then the mean over batches weighted by their image counts: LibMTL's ``AbsLoss._average_loss``)."""
  logits = np.asarray(outputs['segmentation'], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  y = np.asarray(labels['segmentation'])
  ok = y >= 0
  ce = -np.take_along_axis(logp, np.where(ok, y, 0)[..., None], -1)[..., 0]
  d_true = np.asarray(labels['depth'], np.float64)[..., 0]
  d_ok = d_true != 0
  l1 = np.abs(np.asarray(outputs['depth'], np.float64)[..., 0] - d_true)
  n_true = np.asarray(labels['normal'], np.float64)
  n_ok = np.sum(n_true * n_true, -1) > 0
  n_pred = np.asarray(outputs['normal'], np.float64)
  cos = np.sum(n_pred / np.linalg.norm(n_pred, axis=-1, keepdims=True) * n_true, -1)
  per_pixel = {'segmentation': (ce, ok), 'depth': (l1, d_ok), 'normal': (1 - cos, n_ok)}
  out = {}
  for t, (v, m) in per_pixel.items():
    whole = float(np.sum(np.where(m, v, 0)) / m.sum())
    if t == 'normal':  # LibMTL's NormalLoss is 1 − Σ cos / n: the same as the mean of (1 − cos)
      whole = float(1 - np.sum(np.where(m, cos, 0)) / m.sum())
    means, sizes = [], []
    for s in range(0, len(v), batch):
      vb, mb = v[s : s + batch], m[s : s + batch]
      means.append(np.sum(np.where(mb, vb, 0)) / mb.sum())
      sizes.append(len(vb))
    out[t] = {'whole_set': whole, 'per_batch_mean': float(np.dot(means, sizes) / np.sum(sizes))}
  return out


def differences(a: Mapping, b: Mapping) -> dict:
  """``{task: {metric: a − b}}`` over the metrics of :data:`METRIC_KEYS`, and ``max_abs`` over all but the median."""
  out = {t: {k: float(a[t][k]) - float(b[t][k]) for k in METRIC_KEYS[t]} for t in TASKS}
  out['max_abs'] = max(abs(v) for t in TASKS for k, v in out[t].items() if k != 'median_angle')
  return out


def _fmt(x: float, key: str = '') -> str:
  return f'{x:.2f}' if key in ('mean_angle', 'median_angle') else f'{x:.3f}'


def write_report(results: Mapping, path: str) -> str:
  """``REPORT.md`` from ``results`` (this script's ``results.json``): test metrics, step times, metric agreement."""
  cfg = results['setup']
  lines = [
      '# mtlmatch vs LibMTL 1.1.5 on the generated scenes (NYUv2 layout)',
      '',
      f"Command: `{results['command']}`",
      '',
      f"{cfg['num_train']} training / {cfg['num_test']} test scenes at {cfg['size']}×{cfg['size']},"
      f' {NUM_CLASSES} classes;'
      f" SegNet encoder {tuple(cfg['widths'])} (one conv per stage), decoders {tuple(cfg['decoder_widths'])} per task;"
      f" {cfg['steps']} steps of batch {cfg['batch']}, Adam lr {cfg['lr']} (constant, no clipping or weight decay);"
      f" the same initial weights on both sides (max |forward difference| {results['forward_check']['max_abs']:.1e})."
      ' Test metrics over the whole test split; ours by `mtlmatch/metrics_dense.py`, LibMTL by its NYUv2 metric'
      ' classes.',
      '',
      "The network on LibMTL's side is mtlmatch's SegNet written in PyTorch (LibMTL's own NYUv2 SegNet is MTAN's,"
      ' with max-unpooling and attention, which cannot start from the same weights); LibMTL supplies the Trainer'
      ' (HPS, its EW and PCGrad), the NYUv2 losses, metric classes and loader; 1.1.5 runs on a CPU with current'
      ' torch after 4 patches (`experiments/libmtl_side.py`, `PATCHES`). The two sides draw their batches in'
      " different orders (torch's DataLoader shuffle, mtlmatch's seeded stream), so the trained numbers differ"
      ' by that much noise; the metric-agreement table below scores one set of predictions three ways.',
      '',
      '| run | mIoU ↑ | pix acc ↑ | abs err ↓ | rel err ↓ | mean° ↓ | median° ↓ | ≤11.25 ↑ | ≤22.5 ↑ | ≤30 ↑ |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name, run in results['runs'].items():
    cells = [_fmt(run['test'][t][k], k) for t in TASKS for k in METRIC_KEYS[t]]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  t = results['timing']
  lines += [
      '',
      f"Step time (ms, median and fastest after {cfg['warmup']} warm-up steps; {t['note']}):",
      '',
      '| step | median ms (fastest) | × LibMTL EW (fastest ÷ its fastest) |',
      '|---|---|---|',
  ]
  base, fastest = t['rows']['libmtl_ew'], t.get('fastest', {})
  for name, ms in t['rows'].items():
    if name in fastest:
      ratio = f" ({fastest[name] / fastest['libmtl_ew']:.2f})"
      lines.append(f'| {name} | {ms:.0f} ({fastest[name]:.0f}) | {ms / base:.2f}{ratio} |')
    else:
      lines.append(f'| {name} | {ms:.0f} | {ms / base:.2f} |')
  agree = results['metric_agreement']
  lines += [
      '',
      f"Metric agreement on one set of predictions (ours after EW, {cfg['num_test']} test images):"
      ' each metric minus the float64 numpy reference.',
      '',
      '| metric | mtlmatch − numpy | LibMTL (per batch of 8) − numpy |',
      '|---|---|---|',
  ]
  for task in TASKS:
    for k in METRIC_KEYS[task]:
      lines.append(
          f"| {task} {k} | {agree['ours_minus_numpy'][task][k]:.1e} | {agree['libmtl_minus_numpy'][task][k]:.1e} |"
      )
  lines += [
      '',
      f"Largest difference except the median: mtlmatch {agree['ours_minus_numpy']['max_abs']:.1e}, LibMTL"
      f" {agree['libmtl_minus_numpy']['max_abs']:.1e}. mtlmatch's median comes from a 0.01° histogram: within its"
      f" stated bound 0.005° ({abs(agree['ours_minus_numpy']['normal']['median_angle']):.1e}).",
      '',
      'Test losses at batch 8: LibMTL reports the mean of per-batch means, mtlmatch reduces over every valid pixel:',
      '',
      '| loss | whole set (numpy) | mean of per-batch means (numpy) | LibMTL `_average_loss` |',
      '|---|---|---|---|',
  ]
  for task in TASKS:
    row = agree['losses'][task]
    lines.append(
        f"| {task} | {row['whole_set']:.5f} | {row['per_batch_mean']:.5f} | {agree['libmtl_losses'][task]:.5f} |"
    )
  v = results['versions']
  lines += ['', 'Versions: ' + ', '.join(f'{k} {val}' for k, val in v.items()) + '.', '']
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return path


# ---------------------------------------------------------------------------------------------------------------
# The peer venv.


def ensure_peer_venv(venv: str) -> str:
  """The peer venv's python, creating the venv and applying the patches if it has no LibMTL yet."""
  python = os.path.join(venv, 'bin', 'python')
  check = [python, '-c', 'import importlib.metadata as m; m.version("LibMTL"); import torch, scipy']
  if not os.path.exists(python) or subprocess.run(check, capture_output=True, check=False).returncode:
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
    subprocess.run([python, '-m', 'pip', 'install', '-q', *PEER_PACKAGES], check=True)
    subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', LIBMTL], check=True)
  run_peer(python, 'patch')
  return python


def run_peer(python: str, *args: str) -> None:
  env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
  subprocess.run([python, os.path.join(REPO, 'experiments', 'libmtl_side.py'), *args], check=True, env=env)


# ---------------------------------------------------------------------------------------------------------------
# mtlmatch's side.


def make_config(root: str, method: str, args):
  from mtlmatch import config_lib  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, os.path.join(REPO, 'configs'))
  import nyuv2  # pylint: disable=import-outside-toplevel

  config = nyuv2.get_config('dgr' if method == 'dgr' else 'mtl')
  config.data.options.root = root
  config.data.options.num_classes = NUM_CLASSES
  config.data.validation_fraction = 0.0
  config_lib.set_encoder(config, 'segnet', widths=tuple(args.widths), convs_per_stage=(1,) * len(args.widths))
  config.head.kwargs = {'widths': tuple(args.decoder_widths)}
  config.batch_size = args.batch
  config.eval_batch_size = args.batch
  config.seed = args.seed
  config.data.seed = args.seed
  config.total_steps = max(args.steps, args.dgr_steps)
  opt = config.optimizer
  opt.name, opt.learning_rate, opt.schedule, opt.warmup_steps, opt.clip_norm = 'adam', args.lr, 'constant', 0, 0.0
  if method == 'pcgrad':
    config.weighting.name = 'pcgrad'
  return config


def train_ours(config, steps: int):
  """``steps`` steps of the library's compiled train step; returns (experiment, state, step seconds, losses)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mtlmatch import experiment as experiment_lib  # pylint: disable=import-outside-toplevel

  exp = experiment_lib.build_experiment(config)
  state = exp.init_state()
  batches = exp.train_batches(0)
  times, losses = [], []
  for _ in range(steps):
    batch = next(batches)
    t0 = time.perf_counter()
    state, metrics = exp.step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    metrics = jax.device_get(metrics)
    losses.append([float(metrics[k]) for k in sorted(metrics) if k.startswith('loss/')])
  return exp, state, times, losses


def predict_ours(exp, state, images: np.ndarray) -> dict[str, np.ndarray]:
  """Raw outputs (NHWC) of each task on uint8 ``images``, BatchNorm with its running statistics."""
  import jax  # pylint: disable=import-outside-toplevel

  fn = jax.jit(lambda p, s, x: exp.model.apply({'params': p, 'batch_stats': s}, x, train=False)[0]['logits'])
  x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # mtlmatch.data.pipeline.normalize
  params, stats = jax.device_get((state.params, state.batch_stats))
  return {t: np.asarray(v) for t, v in jax.device_get(fn(params, stats, x)).items()}


def _widen(x) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64)


def our_metrics(
    tasks: Mapping, outputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], batch: int
) -> dict:
  """mtlmatch's metrics (``metrics_dense``: per-batch additive statistics, accumulated, finalized); ``tasks``: the
  benchmark's ``{name: TaskSpec}``."""
  import jax  # pylint: disable=import-outside-toplevel
  from mtlmatch import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from mtlmatch import metrics_dense as md  # pylint: disable=import-outside-toplevel

  fns = {
      'segmentation': (md.segmentation_statistics, md.segmentation_finalize),
      'depth': (md.depth_statistics, md.depth_finalize),
      'normal': (md.normals_statistics, md.normals_finalize),
  }
  out = {}
  for t, (stats_fn, finalize) in fns.items():
    task = tasks[t]
    total = None
    for s in range(0, len(outputs[t]), batch):
      stats = jax.device_get(stats_fn(task, outputs[t][s : s + batch], labels[t][s : s + batch]))
      total = metrics_lib.accumulate(total, jax.tree.map(_widen, stats))
    out[t] = {k: float(v) for k, v in finalize(task, total).items() if k in METRIC_KEYS[t]}
  return out


def forward_check(exp, state, python: str, images: np.ndarray, tmp: str) -> dict:
  """Max |torch − flax| of every task's output on ``images``, BatchNorm in eval and in train mode."""
  import jax  # pylint: disable=import-outside-toplevel

  x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  params, stats = jax.device_get((state.params, state.batch_stats))
  ours = {'eval': predict_ours(exp, state, images)}
  train_out, _ = exp.model.apply({'params': params, 'batch_stats': stats}, x, train=True)
  ours['train'] = {t: np.asarray(v) for t, v in train_out['logits'].items()}
  np.savez(os.path.join(tmp, 'inputs.npz'), image=x)
  run_peer(python, 'forward', f'--init={tmp}/init.npz', f'--inputs={tmp}/inputs.npz', f'--out={tmp}/forward.npz')
  diffs = {}
  with np.load(os.path.join(tmp, 'forward.npz')) as theirs:
    for mode in ('eval', 'train'):
      for t in TASKS:
        diffs[f'{mode}/{t}'] = float(np.max(np.abs(theirs[f'{mode}/{t}'] - ours[mode][t])))
  return {'max_abs': max(diffs.values()), 'per_output': diffs, 'images': len(images)}


def _median_ms(seconds: Sequence[float], warmup: int) -> float:
  return 1000 * statistics.median(seconds[warmup:])


def timing_rows(step_seconds: Mapping[str, Sequence[float]], warmup: int) -> tuple[dict, dict]:
  """``(median ms, fastest ms)`` per row, over the steps after ``warmup`` (the first includes compilation)."""
  median = {k: _median_ms(v, warmup) for k, v in step_seconds.items()}
  return median, {k: 1000 * min(v[warmup:]) for k, v in step_seconds.items()}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results', 'libmtl_dense'))
  p.add_argument('--peer_venv', default=os.path.join(REPO, 'workdirs', 'peer_venv'))
  p.add_argument('--data_root', default=None, help='where to write the NYUv2-layout scenes (default: a temp dir)')
  p.add_argument('--num_train', type=int, default=800)
  p.add_argument('--num_test', type=int, default=200)
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--dgr_steps', type=int, default=30)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=1, help='torch.set_num_threads of the LibMTL side')
  ints = lambda s: tuple(int(x) for x in s.split(','))
  p.add_argument('--widths', type=ints, default=(16, 32, 64))
  p.add_argument('--decoder_widths', type=ints, default=(64, 32, 16))
  p.add_argument('--report_from', help='only rewrite REPORT.md beside this results.json (no run)')
  args = p.parse_args(argv)
  if args.warmup >= min(args.steps, args.dgr_steps):
    p.error(f'--warmup {args.warmup}: expected fewer than --steps and --dgr_steps')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  if args.report_from:
    with open(args.report_from, encoding='utf-8') as f:
      results = json.load(f)
    t = results['timing']
    t['rows'], t['fastest'] = timing_rows({k: t['step_seconds'][k] for k in ROWS}, results['setup']['warmup'])
    results['command'] = results['command'].strip()
    with open(args.report_from, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
    print(write_report(results, os.path.join(os.path.dirname(args.report_from), 'REPORT.md')))
    return results
  os.environ['XLA_FLAGS'] = cpu_devices.xla_flags_with_cores(
      os.environ.get('XLA_FLAGS'), cpu_devices.available_cores(), (args.batch,)
  )
  import jax  # pylint: disable=import-outside-toplevel
  from mtlmatch.data import nyuv2_layout, scenes  # pylint: disable=import-outside-toplevel

  python = ensure_peer_venv(args.peer_venv)
  tmp = tempfile.mkdtemp(prefix='bench_libmtl_')
  root = args.data_root or os.path.join(tmp, 'scenes_nyuv2')
  test = scenes.generate_scenes(args.seed, 'test', args.num_test, args.size, args.size)
  nyuv2_layout.write_layout(
      root, 'train', scenes.generate_scenes(args.seed, 'train', args.num_train, args.size, args.size), overwrite=True
  )
  nyuv2_layout.write_layout(root, 'val', test, overwrite=True)
  labels = {t: test[t] for t in TASKS}
  side = [f'--root={root}', f'--steps={args.steps}', f'--batch={args.batch}', f'--lr={args.lr}', f'--seed={args.seed}']
  side += [f'--threads={args.threads}', '--widths=' + ','.join(map(str, args.widths))]
  side += ['--decoder_widths=' + ','.join(map(str, args.decoder_widths)), f'--init={tmp}/init.npz']
  runs, step_seconds, check, agreement = {}, {}, None, None
  for method in ('ew', 'pcgrad'):
    config = make_config(root, method, args)
    if check is None:  # the initial state is the same for every method (seeded by config.seed)
      from mtlmatch import experiment as experiment_lib  # pylint: disable=import-outside-toplevel

      exp0 = experiment_lib.build_experiment(config)
      state0 = exp0.init_state()
      np.savez(f'{tmp}/init.npz', **torch_state(*jax.device_get((state0.params, state0.batch_stats))))
      check = forward_check(exp0, state0, python, test['image'][:8], tmp)
      print('forward check', json.dumps(check), flush=True)
      if check['max_abs'] > FORWARD_TOL:
        raise SystemExit(f'forward check: max |torch - flax| {check["max_abs"]:.2e} > {FORWARD_TOL}')
    exp, state, times, _ = train_ours(config, args.steps)
    outputs = predict_ours(exp, state, test['image'])
    runs[f'mtlmatch {method}'] = {'test': our_metrics(exp.benchmark.tasks, outputs, labels, args.batch)}
    step_seconds[f'mtlmatch_{method}'] = times
    name = {'ew': 'EW', 'pcgrad': 'PCGrad'}[method]
    run_peer(python, 'train', *side, f'--weighting={name}', f'--out={tmp}/libmtl_{method}.json')
    with open(f'{tmp}/libmtl_{method}.json', encoding='utf-8') as f:
      theirs = json.load(f)
    runs[f'LibMTL {name}'] = {'test': theirs['test']}
    step_seconds[f'libmtl_{method}'] = theirs['step_seconds']
    versions = theirs['versions']
    print(method, json.dumps({k: runs[k] for k in runs if method in k.lower()}), flush=True)
    if method == 'ew':
      preds = f'{tmp}/predictions.npz'
      np.savez(preds, **outputs, **{f'labels/{t}': labels[t] for t in TASKS})
      run_peer(python, 'metrics', f'--predictions={preds}', '--test_batch=8', f'--out={tmp}/libmtl_metrics.json')
      with open(f'{tmp}/libmtl_metrics.json', encoding='utf-8') as f:
        libmtl_metrics = json.load(f)
      reference = reference_metrics(outputs, labels)
      agreement = {
          'numpy': reference,
          'mtlmatch': our_metrics(exp.benchmark.tasks, outputs, labels, 8),
          'libmtl': libmtl_metrics['metrics'],
          'losses': test_losses(outputs, labels, 8),
          'libmtl_losses': libmtl_metrics['losses_per_batch_mean'],
      }
      agreement['ours_minus_numpy'] = differences(agreement['mtlmatch'], reference)
      agreement['libmtl_minus_numpy'] = differences(agreement['libmtl'], reference)
  _, _, dgr_times, _ = train_ours(make_config(root, 'dgr', args), args.dgr_steps)
  step_seconds['mtlmatch_dgr'] = dgr_times
  median, fastest = timing_rows({k: step_seconds[k] for k in ROWS}, args.warmup)
  note = (
      f'PyTorch {versions["torch"]} with {args.threads} thread(s); mtlmatch on {jax.device_count()} XLA:CPU devices'
      f' (one per core); {os.cpu_count()} cores, shared with other processes; load average before the DGR run'
      f' {os.getloadavg()[0]:.1f}'
  )
  import flax  # pylint: disable=import-outside-toplevel

  results = {
      'command': ' '.join(['python experiments/bench_libmtl.py', *(argv if argv is not None else sys.argv[1:])]),
      'setup': {
          k: getattr(args, k)
          for k in (
              'num_train',
              'num_test',
              'size',
              'steps',
              'dgr_steps',
              'warmup',
              'batch',
              'lr',
              'seed',
              'threads',
              'widths',
              'decoder_widths',
          )
      },
      'forward_check': check,
      'runs': runs,
      'timing': {
          'note': note,
          'rows': median,
          'fastest': fastest,
          'step_seconds': step_seconds,
      },
      'metric_agreement': agreement,
      'versions': {**versions, 'jax': jax.__version__, 'flax': flax.__version__, 'machine': platform.machine()},
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  print(write_report(results, os.path.join(args.out, 'REPORT.md')))
  return results


if __name__ == '__main__':
  main()
