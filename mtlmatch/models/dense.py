"""Dense-prediction networks (Flax Linen): encoders that keep a feature *map*, heads that give per-pixel outputs.

Contract, shared by every encoder and head here:

* A dense encoder maps ``images [B, H, W, C]`` to the dict pytree ::

      {'out':    [B, H/s, W/s, D]                      # the last stage's map; s = the encoder's output stride
       'stages': (stage_0 [B, H/2, W/2, D_0],          # stride 2, always (the size rule below reads it)
                  stage_1 [B, H/2^k1, W/2^k1, D_1],    # the strides of the later stages are the encoder's own
                  ...)}                                # stages[-1] is 'out'

  every array float32 whatever the compute ``dtype`` (as the other encoders' features). ``H`` and ``W`` must be
  multiples of the encoder's total stride (8 or 16 for ``dilated_resnet``, ``2^len(widths)`` for ``segnet``); the
  encoder raises one ValueError otherwise, so every size below is exact.
* A dense head maps those features to ``outputs [B, H, W, num_classes]`` float32 at the *image* resolution. The
  image size is read from the features, never stored in the head: **image size = 2 × the spatial size of
  ``stages[0]``** (stride 2 in every dense encoder). Upsampling is bilinear (``jax.image.resize``, half-pixel
  centres, as PyTorch's ``align_corners=False``).
* Heads are stateless (see ``heads.py``): only ``'params'``, no BatchNorm, no Dropout, so that DGR's
  ``head.apply({'params': phi}, features)`` with dummies from ``head.init`` works. Normalisation in a head is
  ``norm='group'`` (GroupNorm, parameters only; ``gcd(32, channels)`` groups) or ``norm='none'``. Encoders use the
  ResNets' BatchNorm (``encoders.batch_norm``: momentum 0.9, ε 1e-5).

Registered names: encoders ``dilated_resnet`` (:class:`DilatedResNet`) and ``segnet`` (:class:`SegNetEncoder`);
heads ``aspp`` (:class:`ASPPHead`), ``segnet_decoder`` (:class:`SegNetDecoder`) and ``mtan`` (:class:`MTANHead`, the
task-specific attention of MTAN, used with ``encoder='segnet'``). Any head works with any dense encoder.

Convolutions and 2×2 max-pools go through ``mtlmatch.models.cpu_ops`` (``conv_impl``, as the ResNets), so the
CPU backward is the fast GEMM one; it supports kernel dilation, so the atrous convolutions take the same path.

Usage::

    enc = SegNetEncoder(widths=(8, 16, 32), convs_per_stage=(1, 1, 1))
    variables = enc.init(rng, images, train=False)                 # images [2, 32, 32, 3]
    feats = enc.apply(variables, images, train=False)              # {'out': [2, 4, 4, 32], 'stages': (16², 8², 4²)}
    head = SegNetDecoder(num_classes=5, widths=(16, 8, 8))
    logits = head.apply(head.init(rng, feats), feats)              # [2, 32, 32, 5]
    build_model({'seg': TaskSpec('seg', 'multiclass', 5)}, encoder='segnet', head='mtan', ...)
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlmatch.models import cpu_ops
from mtlmatch.models.encoders import (
    Dtype,
    BasicBlock,
    Bottleneck,
    check_bool,
    check_images,
    maybe_remat,
    batch_norm,
    check_dtype,
    check_positive_ints,
)

HEAD_NORMS = ('group', 'none')
ENCODER_NORMS = ('batch', 'group', 'none')
BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}
# output_stride -> (strides, dilations) of the four ResNet stages after the stem (stride 4): DeepLab's schedules.
SCHEDULES = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}
_GROUPS = 32


def _check_divisible(images, stride: int, where: str) -> None:
  check_images(images, where)
  h, w = images.shape[1:3]
  if h % stride or w % stride:
    raise ValueError(f'{where} images: got spatial size {(h, w)}, expected multiples of the total stride {stride}')


def _conv(features: int, kernel: int, dtype, conv_impl: str, name: str, *, dilation: int = 1, use_bias: bool = True):
  """A ``kernel``×``kernel`` conv (stride 1) that keeps the spatial size: padding ``dilation·(kernel−1)/2``."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      padding=pad,
      kernel_dilation=dilation,
      use_bias=use_bias,
      dtype=dtype,
      conv_general_dilated=cpu_ops.conv_fn(conv_impl),
      name=name,
  )


def _resize(x, size):
  """Bilinear resize of ``x [B, h, w, C]`` to ``[B, *size, C]``."""
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method='bilinear')


def dense_features(features, where: str):
  """``(out, stages, image_size)`` of a dense encoder's features (module docstring), checked."""
  if not isinstance(features, dict) or 'out' not in features or 'stages' not in features:
    got = sorted(features) if isinstance(features, dict) else type(features).__name__
    raise ValueError(
        f"{where} features: got {got}, expected a dense encoder's {{'out': [B, h, w, D], 'stages': (...)}}"
        ' (encoder dilated_resnet or segnet)'
    )
  stages = tuple(features['stages'])
  if not stages or any(s.ndim != 4 for s in stages) or features['out'].ndim != 4:
    raise ValueError(f"{where} features: expected 'out' and a non-empty tuple 'stages' of [B, h, w, D] maps")
  h, w = stages[0].shape[1:3]
  return features['out'], stages, (2 * h, 2 * w)


class _HeadBase(nn.Module):
  """Fields and checks shared by the dense heads."""

  num_classes: int
  norm: str = 'group'  # HEAD_NORMS: 'group' (GroupNorm, params only) or 'none'; never BatchNorm (stateless heads)
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # cpu_ops.IMPLS, as the encoders

  def _check(self, **positive) -> None:
    where = type(self).__name__
    check_positive_ints(where, num_classes=self.num_classes, **positive)
    if self.norm not in HEAD_NORMS:
      raise ValueError(f'{where}.norm: got {self.norm!r}, expected one of {list(HEAD_NORMS)}')
    check_dtype(where, self.dtype)
    cpu_ops.check_impl(f'{where}.conv_impl', self.conv_impl)

  def _conv_norm_relu(self, x, features: int, kernel: int, name: str, *, dilation: int = 1):
    x = _conv(features, kernel, self.dtype, self.conv_impl, f'{name}_conv', dilation=dilation)(x)
    if self.norm == 'group':
      x = nn.GroupNorm(num_groups=math.gcd(_GROUPS, features), dtype=self.dtype, name=f'{name}_gn')(x)
    return nn.relu(x)

  def _decode(self, x, stages, image_size, widths: Sequence[int]):
    """SegNet-style decoder: from the last stage, one step per stage: bilinear ×2 (to the previous stage's size,
    then to the image size) → 3×3 conv to ``widths[k]`` → norm → ReLU; then a 1×1 classifier. float32 out."""
    if len(widths) != len(stages):
      raise ValueError(
          f'{type(self).__name__}.widths: got {len(widths)} decoder widths {tuple(widths)}, expected one per encoder '
          f'stage ({len(stages)})'
      )
    sizes = [s.shape[1:3] for s in stages[-2::-1]] + [image_size]
    for k, (size, width) in enumerate(zip(sizes, widths)):
      x = self._conv_norm_relu(_resize(x, size), width, 3, f'dec{k}')
    return _conv(self.num_classes, 1, self.dtype, self.conv_impl, 'classifier')(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Encoders.


class DilatedResNet(nn.Module):
  """A ResNet with output stride 8 (or 16): DeepLabV3's backbone (Chen et al. 2017), as in the DGR and Auto-Lambda
  dense benchmarks (their dilated ``resnet50``).

  ImageNet stem (7×7 conv stride 2 → BN → ReLU, the map kept as ``stages[0]`` at stride 2; 3×3 max-pool stride 2),
  then four stages of ``stage_sizes`` blocks (``encoders.BasicBlock`` or ``Bottleneck`` with inner widths
  ``widths``) with strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) for ``output_stride=8``, or (1, 2, 2, 1) and
  (1, 1, 1, 2) for 16. Every block of a dilated stage uses the stage's dilation (torchvision's
  ``replace_stride_with_dilation`` keeps the previous dilation in a stage's first block; not done here).
  Features (module docstring): ``'stages'`` = (stem [H/2], stage 1 [H/4], stage 2 [H/8], stage 3, stage 4 [H/s]),
  ``'out'`` = stage 4, D = ``widths[-1]`` (×4 for bottlenecks: 2048 for the defaults, ResNet-50).
  CPU-sized: ``widths=(8, 16, 32, 64), stage_sizes=(1, 1, 1, 1), block='basic'``.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = 'bottleneck'  # BLOCKS: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101)
  output_stride: int = 8  # SCHEDULES: 8 or 16
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # cpu_ops.IMPLS, as CNNEncoder
  remat: bool = False  # recompute each block's activations in the backward pass (config.remat)

  def __post_init__(self):
    check_positive_ints('DilatedResNet', widths=self.widths, stage_sizes=self.stage_sizes)
    if len(self.widths) != 4 or len(self.stage_sizes) != 4:
      raise ValueError(
          f'DilatedResNet.widths / stage_sizes: got {self.widths!r} / {self.stage_sizes!r}, expected 4 each'
      )
    if self.block not in BLOCKS:
      raise ValueError(f'DilatedResNet.block: got {self.block!r}, expected one of {list(BLOCKS)}')
    if self.output_stride not in SCHEDULES:
      raise ValueError(f'DilatedResNet.output_stride: got {self.output_stride!r}, expected one of {list(SCHEDULES)}')
    check_dtype('DilatedResNet', self.dtype)
    cpu_ops.check_impl('DilatedResNet.conv_impl', self.conv_impl)
    check_bool('DilatedResNet.remat', self.remat)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool):
    _check_divisible(images, self.output_stride, 'DilatedResNet')
    x = nn.Conv(
        self.widths[0],
        (7, 7),
        strides=2,
        padding=3,
        use_bias=False,
        dtype=self.dtype,
        conv_general_dilated=cpu_ops.conv_fn(self.conv_impl),
        name='stem_conv',
    )(images)
    x = nn.relu(batch_norm(train, self.dtype, name='stem_bn')(x))
    stages = [x]
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    strides, dilations = SCHEDULES[self.output_stride]
    block = maybe_remat(BLOCKS[self.block], self.remat, static_argnums=(2,))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        x = block(
            self.widths[stage],
            strides[stage] if index == 0 else 1,
            self.dtype,
            self.conv_impl,
            dilations[stage],
            name=f'stage{stage}_block{index}',
        )(x, train)
      stages.append(x)
    stages = tuple(s.astype(jnp.float32) for s in stages)
    return {'out': stages[-1], 'stages': stages}


class SegNetEncoder(nn.Module):
  """SegNet's encoder (Badrinarayanan et al. 2017), MTAN's and LibMTL's NYUv2 backbone: for each stage i,
  ``convs_per_stage[i]`` × (3×3 conv → norm → ReLU) at ``widths[i]`` channels, then 2×2 max-pool (stride 2).
  ``norm``: ``'batch'`` (SegNet's BatchNorm, the default), ``'group'`` (GroupNorm, ``gcd(32, channels)`` groups) or
  ``'none'``. The last two normalise each example on its own, so a step over microbatches (``grad_accum_steps``)
  equals the step over the whole batch; with BatchNorm each microbatch is normalised with its own statistics.

  Features (module docstring): ``'stages'[i]`` = stage i after its pool, [B, H/2^(i+1), W/2^(i+1), widths[i]];
  ``'out'`` = the last. No pooling indices are returned: the decoders here upsample bilinearly instead of
  max-unpooling. Defaults: MTAN's SegNet, widths (64, 128, 256, 512, 512) with (2, 2, 3, 3, 3) convs (VGG-16's
  13 conv layers); H, W multiples of 32. CPU-sized: ``widths=(8, 16, 32), convs_per_stage=(1, 1, 1)``.
  """

  widths: Sequence[int] = (64, 128, 256, 512, 512)
  convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3)
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # cpu_ops.IMPLS, as CNNEncoder
  remat: bool = False  # recompute each stage's activations in the backward pass (config.remat)
  norm: str = 'batch'  # ENCODER_NORMS

  def __post_init__(self):
    check_positive_ints('SegNetEncoder', widths=self.widths, convs_per_stage=self.convs_per_stage)
    if self.norm not in ENCODER_NORMS:
      raise ValueError(f'SegNetEncoder.norm: got {self.norm!r}, expected one of {list(ENCODER_NORMS)}')
    if len(self.widths) != len(self.convs_per_stage):
      raise ValueError(
          f'SegNetEncoder.convs_per_stage: got {self.convs_per_stage!r}, expected one count per width '
          f'({len(self.widths)})'
      )
    check_dtype('SegNetEncoder', self.dtype)
    cpu_ops.check_impl('SegNetEncoder.conv_impl', self.conv_impl)
    check_bool('SegNetEncoder.remat', self.remat)
    super().__post_init__()

  def _stage(self, x, i: int, train: bool):
    for k in range(self.convs_per_stage[i]):
      # Without BatchNorm the conv keeps its bias (nothing after it re-centres the activations).
      x = _conv(self.widths[i], 3, self.dtype, self.conv_impl, f'stage{i}_conv{k}', use_bias=self.norm == 'none')(x)
      if self.norm == 'batch':
        x = batch_norm(train, self.dtype, name=f'stage{i}_bn{k}')(x)
      elif self.norm == 'group':
        x = nn.GroupNorm(num_groups=math.gcd(_GROUPS, self.widths[i]), dtype=self.dtype, name=f'stage{i}_gn{k}')(x)
      x = nn.relu(x)
    return cpu_ops.max_pool_2x2(x, impl=self.conv_impl)

  @nn.compact
  def __call__(self, images, *, train: bool):
    _check_divisible(images, 2 ** len(self.widths), 'SegNetEncoder')
    stage = maybe_remat(type(self)._stage, self.remat, static_argnums=(2, 3))
    x, stages = images, []
    for i in range(len(self.widths)):
      x = stage(self, x, i, train)
      stages.append(x.astype(jnp.float32))
    return {'out': stages[-1], 'stages': tuple(stages)}


# ---------------------------------------------------------------------------------------------------------------
# Heads.


class ASPPHead(_HeadBase):
  """DeepLabV3's head (torchvision's ``DeepLabHead``) on ``features['out']``: ASPP — a 1×1 conv, one 3×3 atrous conv
  per rate in ``rates`` and an image-pooling branch (global mean → 1×1 conv → ReLU → broadcast), each to
  ``channels`` — concatenated → 1×1 projection → 3×3 conv → 1×1 classifier, then bilinear upsampling to the image
  size. Every conv but the pooling branch's and the classifier is followed by ``norm`` and ReLU (BatchNorm in
  DeepLab; a GroupNorm here, stateless; the pooling branch has a 1×1 map, which a GroupNorm would zero). No
  dropout (DeepLab's 0.5 after the projection). ``rates`` default (12, 24, 36): DeepLabV3 at output stride 8, as in
  torchvision; scale them with the map (e.g. (1, 2, 3) for a 4×4 map).
  """

  channels: int = 256
  rates: Sequence[int] = (12, 24, 36)

  def __post_init__(self):
    self._check(channels=self.channels, rates=self.rates)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    x, _, image_size = dense_features(features, 'ASPPHead')
    c = self.channels
    branches = [self._conv_norm_relu(x, c, 1, 'aspp_1x1')]
    for r in self.rates:
      branches.append(self._conv_norm_relu(x, c, 3, f'aspp_rate{r}', dilation=r))
    pooled = nn.relu(_conv(c, 1, self.dtype, self.conv_impl, 'aspp_pool_conv')(jnp.mean(x, (1, 2), keepdims=True)))
    branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], c)).astype(branches[0].dtype))
    y = self._conv_norm_relu(jnp.concatenate(branches, axis=-1), c, 1, 'aspp_project')
    y = self._conv_norm_relu(y, c, 3, 'head')
    y = _conv(self.num_classes, 1, self.dtype, self.conv_impl, 'classifier')(y)
    return _resize(y.astype(jnp.float32), image_size)


class SegNetDecoder(_HeadBase):
  """A SegNet-style decoder on ``features['out']``: one step per encoder stage, each a bilinear ×2 upsampling (to
  the previous stage's size, the last to the image size) → 3×3 conv to ``widths[k]`` → norm → ReLU; then a 1×1
  classifier at the image resolution. Simplified from SegNet / MTAN: bilinear upsampling instead of max-unpooling
  with the encoder's indices, and one conv per step (MTAN has 2-3; its 3×3 + 1×1 prediction layer is the last
  step's conv + the classifier). ``widths`` needs one entry per encoder stage: the default (512, 256, 128, 64, 64)
  mirrors the default ``segnet`` encoder's 5 stages.
  """

  widths: Sequence[int] = (512, 256, 128, 64, 64)

  def __post_init__(self):
    self._check(widths=self.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    x, stages, image_size = dense_features(features, 'SegNetDecoder')
    return self._decode(x, stages, image_size, self.widths)


class MTANHead(_HeadBase):
  """One task's part of MTAN (Liu et al., CVPR 2019, "End-to-End Multi-Task Learning with Attention"): attention
  modules over every shared stage, then a decoder. Use it with ``encoder='segnet'`` (the shared network; any dense
  encoder works).

  At shared stage j with features s_j (``features['stages'][j]``, D_j channels)::

      g_j = sigmoid(conv1×1(ReLU(norm(conv1×1([s_j, p_j])))))        # [s_j] alone at j = 0; both convs to D_j
      a_j = g_j ⊙ s_j                                                 # the task's attended features
      p_{j+1} = maxpool2×2(ReLU(norm(conv3×3(a_j))))                  # to D_{j+1} channels, stage j+1's size

  (the pool only where stage j+1 is smaller than stage j: always in ``segnet``, not between a dilated ResNet's
  stride-1 stages), then the decoder of :class:`SegNetDecoder` (``widths``, one per stage) from the last a_j to
  ``[B, H, W, num_classes]``.
  Kept from MTAN: a soft mask per stage from the shared features and the previous attended ones, applied
  element-wise to the shared features, followed by a conv and pooling to the next stage. Simplified: the mask reads
  and multiplies the same (pooled) stage output, where MTAN reads a stage's first conv and multiplies its last;
  MTAN's decoder is shared and has attention modules of its own, here the decoder is the task's own and plain;
  GroupNorm (or none) instead of BatchNorm, so that the head is stateless.
  """

  widths: Sequence[int] = (512, 256, 128, 64, 64)
  # False: no decoder; the last attended map [B, h, w, D_last] itself (MTAN over a classification encoder's stages,
  # mtlmatch.models.architectures, which runs the encoder's readout on it; num_classes and widths are then unused)
  decode: bool = True

  def __post_init__(self):
    self._check(widths=self.widths)
    check_bool('MTANHead.decode', self.decode)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    _, stages, image_size = dense_features(features, 'MTANHead')
    previous = None
    for j, shared in enumerate(stages):
      d = shared.shape[-1]
      x = shared if previous is None else jnp.concatenate([shared, previous.astype(shared.dtype)], axis=-1)
      g = self._conv_norm_relu(x, d, 1, f'att{j}_mask0')
      g = nn.sigmoid(_conv(d, 1, self.dtype, self.conv_impl, f'att{j}_mask1_conv')(g))
      attended = g * shared
      if j + 1 < len(stages):
        nxt = stages[j + 1]
        previous = self._conv_norm_relu(attended, nxt.shape[-1], 3, f'att{j}_next')
        if previous.shape[1:3] != nxt.shape[1:3]:  # always in segnet; not in a dilated ResNet's stride-1 stages
          previous = cpu_ops.max_pool_2x2(previous, impl=self.conv_impl)
        if previous.shape[1:3] != nxt.shape[1:3]:
          raise ValueError(
              f"MTANHead features: stage {j + 1} has spatial size {nxt.shape[1:3]}, expected stage {j}'s "
              f'{shared.shape[1:3]} or half of it'
          )
    if not self.decode:
      return attended
    return self._decode(attended, stages, image_size, self.widths)
