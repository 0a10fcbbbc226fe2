"""The LibMTL side of ``experiments/bench_libmtl.py``: runs inside the peer venv (PyTorch + LibMTL 1.1.5), never in
mtlmatch's own environment, and never imports mtlmatch.

  workdirs/peer_venv/bin/python experiments/libmtl_side.py patch            # once, after pip install LibMTL==1.1.5
  workdirs/peer_venv/bin/python experiments/libmtl_side.py train --root=... --init=init.npz --weighting=EW --out=...
  workdirs/peer_venv/bin/python experiments/libmtl_side.py forward --init=init.npz --inputs=x.npz --out=y.npz
  workdirs/peer_venv/bin/python experiments/libmtl_side.py metrics --predictions=p.npz --out=m.json

What is LibMTL's here, and what is not:

* **LibMTL's**: the ``Trainer`` (its HPS architecture, its ``EW`` and ``PCGrad`` weighting classes, its
  ``forward4loss``, ``model.backward`` and optimizer step, in the order of ``Trainer.train_singlelevel``), its
  ``_PerformanceMeter`` and the NYUv2 example's losses and metric classes (``SegLoss``, ``DepthLoss``,
  ``NormalLoss``, ``SegMetric``, ``DepthMetric``, ``NormalMetric``) and data set class (``NYUv2``), copied below from
  ``examples/nyu/utils.py`` and ``examples/nyu/create_dataset.py`` of https://github.com/median-research-group/LibMTL
  at commit 4336804847eaa5e0b924b743d76beec7ac3fdc97 (MIT licence, (c) Baijiong Lin et al.); those files are not in
  the pip package. ``num_classes`` is 6 (the generated scenes) instead of 13.
* **Not LibMTL's example network**: the examples' SegNet is MTAN's (``segnet_mtan.py``: max-unpooling with the
  encoder's indices, attention modules, a shared decoder). To train both sides **from the same initial weights**,
  the network here is mtlmatch's ``segnet`` encoder + ``segnet_decoder`` heads written in PyTorch
  (:class:`SegNetEncoder`, :class:`SegNetDecoder`), built from LibMTL's SegNet blocks where they exist
  (``conv_layer``: 3×3 conv → BatchNorm → ReLU, then 2×2 max-pool; without the conv's bias, which the BatchNorm
  cancels, as in mtlmatch) and mtlmatch's decoder where they differ (bilinear upsampling, GroupNorm ε 1e-6 as
  Flax's). ``bench_libmtl.py`` converts mtlmatch's initial parameters into this module's ``state_dict`` and checks
  the two forwards agree.
* The image: the layout's float [0, 1] mapped to ``2x − 1`` (mtlmatch's ``x / 127.5 − 1``), as Auto-Lambda does.

LibMTL 1.1.5 needs :data:`PATCHES` (applied by ``patch``) to run on a CPU with current torch; each is documented
there.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import sys
import time

import numpy as np

COMMIT = '4336804847eaa5e0b924b743d76beec7ac3fdc97'
NUM_CLASSES = 6
TASKS = ('segmentation', 'depth', 'normal')

# (file under the installed LibMTL package, old text, new text, why). ``patch`` applies each once (idempotent).
PATCHES = (
    (
        'model/resnet.py',
        'from torchvision.models.utils import load_state_dict_from_url',
        'from torch.hub import load_state_dict_from_url',
        'torchvision.models.utils was removed in torchvision 0.13; torch.hub has the same function, so LibMTL '
        'imports without torchvision at all (only its ResNets used it, for pretrained weights)',
    ),
    (
        'trainer.py',
        "self.device = torch.device('cuda:0')",
        "self.device = torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        'the Trainer hard-codes cuda:0; on a CPU-only torch every .to(self.device) fails',
    ),
    (
        'trainer.py',
        'loader[1].next()',
        'next(loader[1])',
        'DataLoader iterators have no .next() method (Python 3 iterators: next(it)); the bare except in '
        '_process_data re-creates the iterator and calls .next() again, which then raises',
    ),
    (
        'architecture/abstract_arch.py',
        'self.encoder.zero_grad()',
        'self.encoder.zero_grad(set_to_none=False)',
        'since torch 2.0 zero_grad() sets .grad to None; the gradient methods (PCGrad) then write '
        'param.grad.data of None in _reset_grad (LibMTL later passes set_to_none=False in its trainer)',
    ),
)


def apply_patches(package_dir: str) -> list[str]:
  """Applies :data:`PATCHES` to the LibMTL package at ``package_dir``; returns what was done, one line each."""
  done = []
  for rel, old, new, _ in PATCHES:
    path = os.path.join(package_dir, rel)
    with open(path, encoding='utf-8') as f:
      text = f.read()
    if new in text:
      done.append(f'{rel}: already patched')
      continue
    if old not in text:
      raise ValueError(f'{path}: the text to patch {old!r} is absent, expected LibMTL 1.1.5')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text.replace(old, new))
    done.append(f'{rel}: patched')
  return done


# ---------------------------------------------------------------------------------------------------------------
# The network: mtlmatch's segnet encoder + segnet_decoder heads in PyTorch (see the module docstring).


def build_network(torch, widths, decoder_widths, num_classes):
  nn, F = torch.nn, torch.nn.functional

  class SegNetEncoder(nn.Module):
    """Per stage: 3×3 conv (no bias) → BatchNorm (ε 1e-5) → ReLU, then 2×2 max-pool; returns the last map."""

    def __init__(self):
      super().__init__()
      blocks, c_in = [], 3
      for w in widths:
        blocks.append(nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
        c_in = w
      self.stages = nn.ModuleList(blocks)

    def forward(self, x):
      for block in self.stages:
        x = F.max_pool2d(block(x), 2, 2)
      return x

  class SegNetDecoder(nn.Module):
    """Per step: bilinear ×2 (half-pixel centres) → 3×3 conv → GroupNorm(gcd(32, w), ε 1e-6) → ReLU; 1×1 out."""

    def __init__(self, out_channels):
      super().__init__()
      steps, c_in = [], widths[-1]
      for w in decoder_widths:
        steps.append(
            nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(math.gcd(32, w), w, eps=1e-6), nn.ReLU())
        )
        c_in = w
      self.steps = nn.ModuleList(steps)
      self.classifier = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, x):
      for step in self.steps:
        x = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)
        x = step(x)
      return self.classifier(x)

  channels = {'segmentation': num_classes, 'depth': 1, 'normal': 3}
  return SegNetEncoder, nn.ModuleDict({t: SegNetDecoder(channels[t]) for t in TASKS})


# ---------------------------------------------------------------------------------------------------------------
# Copied from LibMTL examples/nyu/utils.py and create_dataset.py at COMMIT (MIT licence); see the module docstring.


def libmtl_example_classes(torch):
  nn = torch.nn
  from LibMTL.loss import AbsLoss  # pylint: disable=import-outside-toplevel
  from LibMTL.metrics import AbsMetric  # pylint: disable=import-outside-toplevel

  class SegMetric(AbsMetric):

    def __init__(self, num_classes):
      super().__init__()
      self.num_classes = num_classes
      self.record = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update_fun(self, pred, gt):
      self.record = self.record.to(pred.device)
      pred = pred.softmax(1).argmax(1).flatten()
      gt = gt.long().flatten()
      k = (gt >= 0) & (gt < self.num_classes)
      inds = self.num_classes * gt[k].to(torch.int64) + pred[k]
      self.record += torch.bincount(inds, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def score_fun(self):
      h = self.record.float()
      iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
      acc = torch.diag(h).sum() / h.sum()
      return [torch.mean(iu).item(), acc.item()]

    def reinit(self):
      self.record = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

  class DepthMetric(AbsMetric):

    def __init__(self):
      super().__init__()
      self.abs_record = []
      self.rel_record = []

    def update_fun(self, pred, gt):
      device = pred.device
      binary_mask = (torch.sum(gt, dim=1) != 0).unsqueeze(1).to(device)
      pred = pred.masked_select(binary_mask)
      gt = gt.masked_select(binary_mask)
      abs_err = torch.abs(pred - gt)
      rel_err = torch.abs(pred - gt) / gt
      abs_err = (torch.sum(abs_err) / torch.nonzero(binary_mask, as_tuple=False).size(0)).item()
      rel_err = (torch.sum(rel_err) / torch.nonzero(binary_mask, as_tuple=False).size(0)).item()
      self.abs_record.append(abs_err)
      self.rel_record.append(rel_err)
      self.bs.append(pred.size()[0])

    def score_fun(self):
      records = np.stack([np.array(self.abs_record), np.array(self.rel_record)])
      batch_size = np.array(self.bs)
      return [(records[i] * batch_size).sum() / (sum(batch_size)) for i in range(2)]

    def reinit(self):
      self.abs_record = []
      self.rel_record = []
      self.bs = []

  class NormalMetric(AbsMetric):

    def update_fun(self, pred, gt):
      pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
      binary_mask = torch.sum(gt, dim=1) != 0
      error = torch.acos(torch.clamp(torch.sum(pred * gt, 1).masked_select(binary_mask), -1, 1)).detach().cpu().numpy()
      error = np.degrees(error)
      self.record.append(error)

    def score_fun(self):
      records = np.concatenate(self.record)
      return [
          np.mean(records),
          np.median(records),
          np.mean((records < 11.25) * 1.0),
          np.mean((records < 22.5) * 1.0),
          np.mean((records < 30) * 1.0),
      ]

  class SegLoss(AbsLoss):

    def __init__(self):
      super().__init__()
      self.loss_fn = nn.CrossEntropyLoss(ignore_index=-1)

    def compute_loss(self, pred, gt):
      return self.loss_fn(pred, gt.long())

  class DepthLoss(AbsLoss):

    def compute_loss(self, pred, gt):
      binary_mask = (torch.sum(gt, dim=1) != 0).float().unsqueeze(1).to(pred.device)
      return torch.sum(torch.abs(pred - gt) * binary_mask) / torch.nonzero(binary_mask, as_tuple=False).size(0)

  class NormalLoss(AbsLoss):

    def compute_loss(self, pred, gt):
      pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
      binary_mask = (torch.sum(gt, dim=1) != 0).float().unsqueeze(1).to(pred.device)
      return 1 - torch.sum((pred * gt) * binary_mask) / torch.nonzero(binary_mask, as_tuple=False).size(0)

  class NYUv2(torch.utils.data.Dataset):
    """LibMTL's NYUv2 loader without augmentation; the image mapped to 2x − 1 (see the module docstring)."""

    def __init__(self, root, mode='train'):
      folder = 'train' if mode == 'train' else 'val'
      self.data_path = os.path.join(os.path.expanduser(root), folder)
      self.index_list = list(range(len(fnmatch.filter(os.listdir(self.data_path + '/image'), '*.npy'))))

    def __getitem__(self, i):
      index = self.index_list[i]
      image = torch.from_numpy(np.moveaxis(np.load(self.data_path + f'/image/{index:d}.npy'), -1, 0))
      semantic = torch.from_numpy(np.load(self.data_path + f'/label/{index:d}.npy'))
      depth = torch.from_numpy(np.moveaxis(np.load(self.data_path + f'/depth/{index:d}.npy'), -1, 0))
      normal = torch.from_numpy(np.moveaxis(np.load(self.data_path + f'/normal/{index:d}.npy'), -1, 0))
      image = 2 * image.float() - 1
      return image, {'segmentation': semantic.float(), 'depth': depth.float(), 'normal': normal.float()}

    def __len__(self):
      return len(self.index_list)

  task_dict = {
      'segmentation': {
          'metrics': ['mIoU', 'pixAcc'],
          'metrics_fn': SegMetric(num_classes=NUM_CLASSES),
          'loss_fn': SegLoss(),
          'weight': [1, 1],
      },
      'depth': {
          'metrics': ['abs_err', 'rel_err'],
          'metrics_fn': DepthMetric(),
          'loss_fn': DepthLoss(),
          'weight': [0, 0],
      },
      'normal': {
          'metrics': ['mean', 'median', '<11.25', '<22.5', '<30'],
          'metrics_fn': NormalMetric(),
          'loss_fn': NormalLoss(),
          'weight': [0, 0, 1, 1, 1],
      },
  }
  return task_dict, NYUv2


# ---------------------------------------------------------------------------------------------------------------
# Commands.

METRIC_KEYS = {
    'segmentation': ('miou', 'pixel_accuracy'),
    'depth': ('abs_err', 'rel_err'),
    'normal': ('mean_angle', 'median_angle', 'within_11.25', 'within_22.5', 'within_30'),
}


def _torch(threads: int):
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  return torch


def _trainer(torch, args, weighting: str):
  from LibMTL import Trainer, architecture, weighting as weighting_lib  # pylint: disable=import-outside-toplevel

  task_dict, nyu = libmtl_example_classes(torch)
  encoder_class, decoders = build_network(torch, args.widths, args.decoder_widths, NUM_CLASSES)
  trainer = Trainer(
      task_dict=task_dict,
      weighting=getattr(weighting_lib, weighting),  # 1.1.5 takes the classes (later versions their names)
      architecture=architecture.HPS,
      encoder_class=encoder_class,
      decoders=decoders,
      rep_grad=False,
      multi_input=False,
      optim_param={'optim': 'adam', 'lr': args.lr, 'weight_decay': 0.0},
      scheduler_param=None,
      weight_args={},
      arch_args={},
  )
  if args.init:
    load_init(torch, trainer.model, args.init)
  return trainer, nyu


def load_init(torch, model, path: str) -> None:
  """Loads ``bench_libmtl.py``'s converted state (npz of ``state_dict`` names → arrays) into the HPS model."""
  with np.load(path) as f:
    state = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
  own = model.state_dict()
  missing = sorted(k for k in own if k not in state and not k.endswith('num_batches_tracked'))
  extra = sorted(k for k in state if k not in own)
  if missing or extra:
    raise ValueError(f'{path}: missing {missing}, unexpected {extra}, expected the keys of the HPS state_dict')
  for k, v in state.items():
    if tuple(own[k].shape) != tuple(v.shape):
      raise ValueError(f'{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}')
  model.load_state_dict(state, strict=False)


def _evaluate(torch, trainer, loader):
  """``Trainer.test`` without its printing: LibMTL's meter over the test loader (per batch), then its scores."""
  trainer.model.eval()
  meter = trainer.meter
  preds_all = {t: [] for t in TASKS}
  with torch.no_grad():
    for inputs, gts in loader:
      preds = trainer.model(inputs)
      trainer._compute_loss(preds, gts)  # pylint: disable=protected-access
      meter.update(preds, gts)
      for t in TASKS:
        preds_all[t].append(preds[t].numpy())
  meter.get_score()
  out = {t: dict(zip(METRIC_KEYS[t], map(float, meter.results[t]))) for t in TASKS}
  losses = {t: float(meter.losses[t]._average_loss()) for t in TASKS}  # pylint: disable=protected-access
  meter.reinit()
  return out, losses, {t: np.concatenate(v) for t, v in preds_all.items()}


def cmd_train(args) -> dict:
  torch = _torch(args.threads)
  from LibMTL.utils import set_random_seed  # pylint: disable=import-outside-toplevel

  set_random_seed(args.seed)
  trainer, nyu = _trainer(torch, args, args.weighting)
  train_set, test_set = nyu(args.root, 'train'), nyu(args.root, 'test')
  gen = torch.Generator().manual_seed(args.seed)
  train_loader = torch.utils.data.DataLoader(
      train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=gen
  )
  test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch, shuffle=False)
  loader = [train_loader, iter(train_loader)]
  model = trainer.model
  model.epochs, model.epoch = 1, 0  # what train_singlelevel sets (read by DWA-like methods only)
  model.train_loss_buffer = np.zeros([len(TASKS), 1])
  times, losses = [], []
  model.train()
  for _ in range(args.steps):
    inputs, gts = trainer._process_data(loader)  # pylint: disable=protected-access
    t0 = time.perf_counter()  # the step of Trainer.train (1.1.5), its train-metric meter update left out
    train_preds = trainer.process_preds(model(inputs))
    train_losses = trainer._compute_loss(train_preds, gts)  # pylint: disable=protected-access
    trainer.optimizer.zero_grad()
    model.backward(train_losses, **trainer.kwargs['weight_args'])
    trainer.optimizer.step()
    times.append(time.perf_counter() - t0)
    losses.append([float(x) for x in train_losses.detach()])
  for t in TASKS:
    trainer.meter.losses[t]._reinit()  # pylint: disable=protected-access
  metrics, test_losses, preds = _evaluate(torch, trainer, test_loader)
  if args.predictions:
    np.savez(args.predictions, **preds)
  return {
      'weighting': args.weighting,
      'steps': args.steps,
      'batch_size': args.batch,
      'threads': args.threads,
      'step_seconds': times,
      'train_losses': losses,
      'test': metrics,
      'test_losses_per_batch_mean': test_losses,
      'versions': {'torch': torch.__version__, 'LibMTL': _libmtl_version(), 'python': sys.version.split()[0]},
  }


def _libmtl_version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  return metadata.version('LibMTL')


def cmd_forward(args) -> dict:
  """This network's outputs on ``--inputs`` (npz ``image`` [N, H, W, 3] in [-1, 1]) from ``--init``: eval mode
  (BatchNorm's running statistics) and train mode (the batch's), NHWC, into ``--out``."""
  torch = _torch(args.threads)
  trainer, _ = _trainer(torch, args, 'EW')
  with np.load(args.inputs) as f:
    x = torch.from_numpy(np.moveaxis(np.array(f['image'], np.float32), -1, 1))
  out = {}
  with torch.no_grad():
    for mode in ('eval', 'train'):
      trainer.model.train(mode == 'train')
      preds = trainer.model(x)
      for t in TASKS:
        out[f'{mode}/{t}'] = np.moveaxis(preds[t].numpy(), 1, -1)
  np.savez(args.out, **out)
  return {'saved': args.out}


def cmd_metrics(args) -> dict:
  """LibMTL's metric classes and losses on given predictions (npz ``<task>`` NHWC outputs, ``labels/<task>``), per
  batch of ``--test_batch`` as LibMTL's test loop feeds them."""
  torch = _torch(args.threads)
  task_dict, _ = libmtl_example_classes(torch)
  with np.load(args.predictions) as f:
    arrays = {k: np.array(f[k]) for k in f.files}
  n = len(arrays['segmentation'])
  chw = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).astype(np.float32))
  loss_batches = {t: [] for t in TASKS}
  for start in range(0, n, args.test_batch):
    sl = slice(start, start + args.test_batch)
    for t in TASKS:
      pred = chw(arrays[t][sl])
      gt = torch.from_numpy(arrays[f'labels/{t}'][sl].astype(np.float32))
      gt = gt if t == 'segmentation' else torch.moveaxis(gt, -1, 1)
      task_dict[t]['metrics_fn'].update_fun(pred, gt)
      loss = task_dict[t]['loss_fn']._update_loss(pred, gt)  # pylint: disable=protected-access
      loss_batches[t].append(float(loss))
  return {
      'test_batch': args.test_batch,
      'metrics': {t: dict(zip(METRIC_KEYS[t], map(float, task_dict[t]['metrics_fn'].score_fun()))) for t in TASKS},
      'losses_per_batch_mean': {t: float(task_dict[t]['loss_fn']._average_loss()) for t in TASKS},  # noqa
      'loss_batches': loss_batches,
  }


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('command', choices=('patch', 'train', 'forward', 'metrics'))
  p.add_argument('--root', help='the NYUv2-layout folder (train/, val/)')
  p.add_argument('--init', help='npz of the converted initial state_dict')
  p.add_argument('--inputs', help='forward: npz with image [N, H, W, 3]')
  p.add_argument('--predictions', help='train: where to save the test predictions; metrics: the predictions to score')
  p.add_argument('--out', help='the JSON (train, metrics) or npz (forward) to write')
  p.add_argument('--weighting', default='EW', choices=('EW', 'PCGrad'))
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--test_batch', type=int, default=8)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--widths', type=lambda s: tuple(int(x) for x in s.split(',')), default=(16, 32, 64))
  p.add_argument('--decoder_widths', type=lambda s: tuple(int(x) for x in s.split(',')), default=(64, 32, 16))
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.command == 'patch':
    import importlib.util  # pylint: disable=import-outside-toplevel

    package_dir = os.path.dirname(importlib.util.find_spec('LibMTL').origin)
    result = {'patches': apply_patches(package_dir)}
  else:
    random.seed(args.seed)
    result = {'train': cmd_train, 'forward': cmd_forward, 'metrics': cmd_metrics}[args.command](args)
  if args.out and args.command != 'forward':
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k not in ('step_seconds', 'train_losses', 'loss_batches')}))


if __name__ == '__main__':
  main()
