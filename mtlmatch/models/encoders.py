"""Shared image encoders (Flax Linen): ``images[B, H, W, C] float32 -> features[B, D] float32``.

Every encoder is called as ``encoder.apply(variables, images, train=...)`` and works on any input size (32×32,
36×36, 28×28, even the 8×8 sklearn digits): spatial information is reduced by global average pooling (or, for the
ViT, by pooling tokens), never by a flatten of a hard-coded size. The one exception is ``MLPEncoder``, which flattens
the image, so its first layer's shape is fixed by the size it was initialised with.

Precision: ``dtype`` is the *compute* dtype (e.g. ``jnp.bfloat16`` on GPU, what ``config.precision='bfloat16'``
sets); parameters are always float32 (``param_dtype``), BatchNorm / LayerNorm statistics, the attention softmax and
the final pooling are computed in float32, and features are returned as float32.

Remat: ``remat=True`` (``config.remat``) wraps every block — ResNet blocks, CNN stages (conv → pool → ReLU), ViT
blocks, MLP layers — in ``flax.linen.remat``: their activations are recomputed in the backward pass instead of being
kept, which trades compute for memory. Values, gradients and the parameter tree are the same either way.

BatchNorm (``ResNet18`` / ``ResNet50`` only) uses ``use_running_average=not train`` and momentum 0.9. Batch
statistics are averaged over *all devices* without any ``axis_name``: the train step is a ``jax.jit`` over a device
mesh with the batch sharded on the ``'data'`` axis (global arrays), so the batch mean and variance computed inside
BatchNorm are already reductions over the global batch — XLA inserts the cross-device all-reduce. (An ``axis_name``
is only meaningful under ``pmap``/``shard_map``, which mtlmatch does not use.)

Convolutions and 2×2 max-pooling (``cnn``, ``resnet18``, ``resnet50``, the ViT's patch embedding) go through
``mtlmatch.models.cpu_ops``: ``conv_impl='auto'`` (every conv encoder's field; ``--config.encoder.kwargs.conv_impl``)
gives them a GEMM-based backward on the CPU backend, several times faster there than XLA:CPU's own, and the plain
``lax`` ops on GPU/TPU; ``'native'`` / ``'gemm'`` force one. Values, gradients, parameter names and shapes are the
same either way (checkpoints move between them).

Usage::

    enc = ResNet18(width=64, dtype=jnp.bfloat16)
    variables = enc.init(rng, images, train=False)            # {'params': ..., 'batch_stats': ...}
    feats, upd = enc.apply(variables, images, train=True, mutable=['batch_stats'])
    ResNet50(stem='imagenet', dtype=jnp.bfloat16, remat=True)      # 112-224 px faces on an accelerator
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mtlmatch.models import cpu_ops

Dtype = Any

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# ResNet stems: 'cifar' = 3×3 conv, stride 1, no pooling (small images: 28-36 px); 'imagenet' = 7×7 conv, stride 2,
# then 3×3 max-pool, stride 2 (He et al. 2016; images of 112-224 px: features at 1/32 of the input size).
STEMS = ('cifar', 'imagenet')


def check_images(images, where: str) -> None:
  if images.ndim != 4:
    raise ValueError(f'{where} images: got shape {images.shape}, expected [B, H, W, C]')


def check_positive_ints(where: str, **values) -> None:
  """Each value must be a positive int, or (for a sequence) a non-empty sequence of positive ints."""
  for name, value in values.items():
    is_seq = isinstance(value, (tuple, list))
    items = tuple(value) if is_seq else (value,)
    if not items or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in items):
      expected = 'a non-empty sequence of positive ints' if is_seq else 'a positive int'
      raise ValueError(f'{where}.{name}: got {value!r}, expected {expected}')


def construct(registry: Mapping[str, Callable[..., nn.Module]], what: str, name: str, kwargs) -> nn.Module:
  """registry[name](**kwargs), with unknown names, unknown kwargs and bad values all raised as one ValueError."""
  if name not in registry:
    raise ValueError(f'{what} name: got {name!r}, expected one of {sorted(registry)}')
  cls = registry[name]
  allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in ('parent', 'name'))
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f'{what} {name!r} kwargs: got unknown {unknown}, expected a subset of {allowed}')
  # Lists from configs become tuples: Linen modules are hashed (e.g. as static jit arguments).
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if 'conv_impl' in kwargs:
    cpu_ops.check_impl(f'{what} {name!r} conv_impl', kwargs['conv_impl'])
  if isinstance(kwargs.get('dtype'), str):
    check_dtype(f'{what} {name!r}', kwargs['dtype'])
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return cls(**kwargs)


def check_level(encoder, level) -> None:
  """``level`` must be an int in [0, encoder.num_levels] (the last one is the readout)."""
  last = encoder.num_levels
  if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level <= last:
    raise ValueError(f'{type(encoder).__name__} level: got {level!r}, expected an int in [0, {last}]')


def levels_of(encoder: nn.Module) -> Optional[int]:
  """The number L of levels (stages) ``encoder`` can be run by, or None when it cannot (only the whole network).

  An encoder with levels takes ``encoder.apply(variables, x, train=..., level=i)``: level i < L maps level i's input
  to its output (level 0 reads the images), level L is the readout to the features [B, D]; running levels 0..L in
  turn is the whole encoder, with the same parameter tree (``cnn``: the conv stages, then flatten → Dense;
  ``resnet18`` / ``resnet50``: the stem, the four stages, then global average pooling)."""
  return encoder.num_levels if isinstance(encoder, (CNNEncoder, _ResNet)) else None


def check_bool(where: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{where}: got {value!r}, expected True or False')


def maybe_remat(target, remat: bool, static_argnums=()):
  """``nn.remat(target)`` when ``remat``, else ``target`` (a Module class, or a function whose first argument is a
    module). Flax's lifted remat keeps the variables where ``target`` would put them, so the parameter tree is the same
    either way. ``static_argnums`` index the call's arguments, counting the module as argument 0 (``train`` of a
  block's ``__call__(self, x, train)`` is 2)."""
  return nn.remat(target, static_argnums=static_argnums) if remat else target


def check_dtype(where: str, dtype) -> None:
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f'{where}.dtype: got {dtype!r}, expected a floating dtype (float32, bfloat16, float16)')


class MLPEncoder(nn.Module):
  """Flatten → [Dense(h) → ReLU] for h in ``hidden``; D = hidden[-1].

  The first layer's input size is fixed by the image size used at init (an MLP has no spatial pooling).
  """

  hidden: Sequence[int] = (512, 256)
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each layer's activations in the backward pass (config.remat)

  def __post_init__(self):
    check_positive_ints('MLPEncoder', hidden=self.hidden)
    check_dtype('MLPEncoder', self.dtype)
    check_bool('MLPEncoder.remat', self.remat)
    super().__post_init__()

  def _layer(self, x, i: int):
    return nn.relu(nn.Dense(self.hidden[i], dtype=self.dtype, name=f'dense_{i}')(x))

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train  # no train-dependent layers
    check_images(images, 'MLPEncoder')
    x = images.reshape(images.shape[0], -1)
    layer = maybe_remat(type(self)._layer, self.remat, static_argnums=(2,))
    for i in range(len(self.hidden)):
      x = layer(self, x, i)
    return x.astype(jnp.float32)


class CNNEncoder(nn.Module):
  """Small conv net: for w in ``widths``: Conv3×3(w) → ReLU → MaxPool2×2; then flatten → Dense(features) → ReLU.
  D = ``features``. SAME pooling keeps ≥1 pixel, so even 8×8 inputs pass three blocks (8→4→2→1). Flattening, not
  global pooling, keeps *where* a pattern is (a raised brow vs a lowered lip corner): with global pooling the affect
  benchmark stayed at chance for 300 steps. The dense layer's size follows the input size seen at init.
  """

  widths: Sequence[int] = (32, 64, 128)
  features: int = 256
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # cpu_ops.IMPLS: 'auto' (GEMM backward on CPU), 'native', 'gemm'
  remat: bool = False  # recompute each stage's activations in the backward pass (config.remat)

  def __post_init__(self):
    check_positive_ints('CNNEncoder', widths=self.widths, features=self.features)
    check_dtype('CNNEncoder', self.dtype)
    cpu_ops.check_impl('CNNEncoder.conv_impl', self.conv_impl)
    check_bool('CNNEncoder.remat', self.remat)
    super().__post_init__()

  def _stage(self, x, i: int):
    conv = cpu_ops.conv_fn(self.conv_impl)
    x = nn.Conv(self.widths[i], (3, 3), padding='SAME', dtype=self.dtype, conv_general_dilated=conv, name=f'conv_{i}')(
        x
    )
    # Pool, then ReLU: the same values and gradients as ReLU then pool (ReLU is monotone, and both pools send the
    # gradient to the window's first maximum), with the ReLU and its backward on a quarter of the elements
    # (≈ 10 % of a CPU train step of the small CNN).
    return nn.relu(cpu_ops.max_pool_2x2(x, impl=self.conv_impl))

  @property
  def num_levels(self) -> int:
    """L = one level per conv stage; ``level=L`` is the readout (flatten → Dense → ReLU); see :func:`levels_of`."""
    return len(self.widths)

  @nn.compact
  def __call__(self, images, *, train: bool, level: Optional[int] = None):
    del train
    stage = maybe_remat(type(self)._stage, self.remat, static_argnums=(2,))
    if level is not None:  # one level of the same network (the same parameter names): levels_of
      check_level(self, level)
      return stage(self, images, level) if level < len(self.widths) else self._readout(images)
    check_images(images, 'CNNEncoder')
    x = images
    for i in range(len(self.widths)):
      x = stage(self, x, i)
    return self._readout(x)

  def _readout(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.features, dtype=self.dtype, name='dense')(x))
    return x.astype(jnp.float32)


def batch_norm(train: bool, dtype, **kwargs):
  """The ResNets' BatchNorm (momentum 0.9, ε 1e-5; statistics in float32 whatever ``dtype``)."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, **kwargs)


class BasicBlock(nn.Module):
  """ResNet basic block (He et al. 2016): two 3×3 convs with BN, identity or 1×1-conv+BN shortcut."""

  width: int
  strides: int
  dtype: Dtype
  conv_impl: str = 'auto'
  dilation: int = 1  # of both 3×3 convs (padding = dilation keeps the size); >1 only in dense.DilatedResNet

  @nn.compact
  def __call__(self, x, train: bool):  # train positional: a static argument of nn.remat
    norm = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, conv_general_dilated=cpu_ops.conv_fn(self.conv_impl)
    )
    d = self.dilation
    # Explicit padding d (1, as in the PyTorch CIFAR ResNets, when undilated): H_out = ceil(H / stride) for any H.
    y = conv(self.width, (3, 3), strides=self.strides, padding=d, kernel_dilation=d, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.width, (3, 3), padding=d, kernel_dilation=d, name='conv2')(y)
    # Zero-init the last BN scale so each block starts as the identity (Goyal et al. 2017; flax imagenet example).
    y = norm(scale_init=nn.initializers.zeros, name='bn2')(y)
    residual = x
    if x.shape[-1] != self.width or self.strides != 1:
      residual = conv(self.width, (1, 1), strides=self.strides, padding='VALID', name='shortcut_conv')(x)
      residual = norm(name='shortcut_bn')(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """ResNet bottleneck block (He et al. 2016), "v1.5" as torchvision's and the flax ImageNet example's: 1×1 conv to
  ``width`` → 3×3 conv with the stride → 1×1 conv to ``4·width`` (expansion 4), each with BN; identity shortcut, or
  1×1-conv+BN when the channels or the stride change."""

  width: int
  strides: int
  dtype: Dtype
  conv_impl: str = 'auto'
  dilation: int = 1  # of the 3×3 conv (padding = dilation keeps the size); >1 only in dense.DilatedResNet

  EXPANSION = 4

  @nn.compact
  def __call__(self, x, train: bool):  # train positional: a static argument of nn.remat
    norm = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, conv_general_dilated=cpu_ops.conv_fn(self.conv_impl)
    )
    out = self.EXPANSION * self.width
    y = nn.relu(norm(name='bn1')(conv(self.width, (1, 1), padding='VALID', name='conv1')(x)))
    d = self.dilation
    y = conv(self.width, (3, 3), strides=self.strides, padding=d, kernel_dilation=d, name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(out, (1, 1), padding='VALID', name='conv3')(y)
    y = norm(scale_init=nn.initializers.zeros, name='bn3')(y)  # each block starts as the identity
    residual = x
    if x.shape[-1] != out or self.strides != 1:
      residual = conv(out, (1, 1), strides=self.strides, padding='VALID', name='shortcut_conv')(x)
      residual = norm(name='shortcut_bn')(residual)
    return nn.relu(y + residual)


class _ResNet(nn.Module):
  """The ResNet trunk shared by :class:`ResNet18` and :class:`ResNet50`: stem, stages, global average pooling."""

  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # cpu_ops.IMPLS, as CNNEncoder
  stem: str = 'cifar'  # STEMS: 'cifar' (3×3, stride 1) or 'imagenet' (7×7 stride 2 + 3×3 max-pool stride 2)
  remat: bool = False  # recompute each block's activations in the backward pass (config.remat)

  BLOCK = BasicBlock

  def __post_init__(self):
    where = type(self).__name__
    check_positive_ints(where, width=self.width, stage_sizes=self.stage_sizes)
    check_dtype(where, self.dtype)
    cpu_ops.check_impl(f'{where}.conv_impl', self.conv_impl)
    if self.stem not in STEMS:
      raise ValueError(f'{where}.stem: got {self.stem!r}, expected one of {list(STEMS)}')
    check_bool(f'{where}.remat', self.remat)
    super().__post_init__()

  @property
  def num_levels(self) -> int:
    """L = the stem, then one level per stage; ``level=L`` is the readout (global average pooling)."""
    return 1 + len(self.stage_sizes)

  @nn.compact
  def __call__(self, images, *, train: bool, level: Optional[int] = None):
    if level is not None:  # one level of the same network (the same parameter names): levels_of
      check_level(self, level)
      if level == 0:
        return self._stem(images, train)
      if level < self.num_levels:
        return self._stage(images, level - 1, train)
      return jnp.mean(images.astype(jnp.float32), axis=(1, 2))
    check_images(images, type(self).__name__)
    x = self._stem(images, train)
    for stage in range(len(self.stage_sizes)):
      x = self._stage(x, stage, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def _stem(self, images, train: bool):
    conv = functools.partial(
        nn.Conv,
        self.width,
        use_bias=False,
        dtype=self.dtype,
        conv_general_dilated=cpu_ops.conv_fn(self.conv_impl),
        name='stem_conv',
    )
    if self.stem == 'cifar':
      x = conv((3, 3), padding=1)(images)
    else:
      x = conv((7, 7), strides=2, padding=3)(images)  # torchvision's padding: H_out = ceil(H / 2)
    x = nn.relu(batch_norm(train, self.dtype, name='stem_bn')(x))
    if self.stem == 'imagenet':
      # 3×3, stride 2, padding 1 (−∞): H_out = ceil(H / 2). Once per network, so XLA's own backward
      # (select_and_scatter; slow on XLA:CPU, see cpu_ops) is kept here.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x

  def _stage(self, x, stage: int, train: bool):
    block = maybe_remat(self.BLOCK, self.remat, static_argnums=(2,))
    for index in range(self.stage_sizes[stage]):
      strides = 2 if stage > 0 and index == 0 else 1
      x = block(self.width * 2**stage, strides, self.dtype, self.conv_impl, name=f'stage{stage}_block{index}')(x, train)
    return x


class ResNet18(_ResNet):
  """ResNet-18 with BatchNorm; by default a CIFAR-style stem (3×3 conv, stride 1, no max-pool), or the ImageNet stem
  (``stem='imagenet'``: 7×7 conv stride 2 + 3×3 max-pool stride 2, for 112-224 px images).

  Stages of 2 basic blocks with widths ``width·(1, 2, 4, 8)`` and strides (1, 2, 2, 2), then global average pooling;
  D = 8·width (512 for the standard width 64). BatchNorm statistics are global-batch statistics under a sharded
  ``jax.jit`` (see the module docstring); ``train=True`` uses and updates them (momentum 0.9, so
  running ← 0.9·running + 0.1·batch), ``train=False`` uses the running averages.
  """


class ResNet50(_ResNet):
  """ResNet-50: the :class:`ResNet18` trunk with bottleneck blocks (1×1 → 3×3 → 1×1, expansion 4) in stages of
  (3, 4, 6, 3) blocks; inner widths ``width·(1, 2, 4, 8)``, D = 32·width (2048 for the standard width 64). Stem
  ``'cifar'`` by default (as ResNet18, for this repository's 28-36 px images); ``stem='imagenet'`` is torchvision's
  ResNet-50 trunk (23,508,032 parameters for width 64 and RGB input: its 25,557,032 minus the 1000-way fc layer).
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)

  BLOCK = Bottleneck


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [1, h·w, dim] (MAE / big_vision "simple ViT"); needs dim % 4 == 0."""
  y, x = np.mgrid[:h, :w]
  omega = np.arange(dim // 4) / max(dim // 4 - 1, 1)
  omega = 1.0 / temperature**omega
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class _TransformerBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        force_fp32_for_softmax=True,  # a no-op in float32; the softmax's max/sum in float32 under bfloat16
        deterministic=True,
        kernel_init=nn.initializers.xavier_uniform(),
        name='attn',
    )(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    y = nn.gelu(
        nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name='mlp_in')(y)
    )
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name='mlp_out')(y)
    return x + y


class ViTTiny(nn.Module):
  """ViT-Tiny-style encoder (Dosovitskiy et al. 2021; "simple ViT" choices of Beyer et al. 2022).

  Non-overlapping ``patch_size`` patches (4 gives 8×8 tokens at 32×32, 9×9 at 36×36, 7×7 at 28×28, 2×2 at 8×8; a
  border that does not fill a whole patch is dropped) → linear embedding to ``dim`` → fixed 2-D sin-cos position
  embedding (computed for the actual grid, so any input size works without interpolation) → ``depth`` pre-LN
  blocks with ``num_heads`` heads → LayerNorm → pool: ``'gap'`` (mean over patch tokens, default) or ``'cls'``
  (a learned class token). D = ``dim``. No dropout, so ``train`` has no effect.
  """

  patch_size: int = 4
  dim: int = 192
  depth: int = 4
  num_heads: int = 3
  mlp_dim: int | None = None  # default 4·dim
  pool: str = 'gap'
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # of the patch embedding; cpu_ops.IMPLS, as CNNEncoder
  remat: bool = False  # recompute each block's activations in the backward pass (config.remat)

  def __post_init__(self):
    check_positive_ints('ViTTiny', patch_size=self.patch_size, dim=self.dim, depth=self.depth, num_heads=self.num_heads)
    if self.mlp_dim is not None:
      check_positive_ints('ViTTiny', mlp_dim=self.mlp_dim)
    if self.dim % self.num_heads or self.dim % 4:
      raise ValueError(
          f'ViTTiny.dim: got {self.dim}, expected a multiple of num_heads={self.num_heads} and of 4 '
          '(sin-cos position embedding)'
      )
    if self.pool not in ('gap', 'cls'):
      raise ValueError(f"ViTTiny.pool: got {self.pool!r}, expected one of ['gap', 'cls']")
    check_dtype('ViTTiny', self.dtype)
    cpu_ops.check_impl('ViTTiny.conv_impl', self.conv_impl)
    check_bool('ViTTiny.remat', self.remat)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train
    check_images(images, 'ViTTiny')
    p = self.patch_size
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f'ViTTiny images: got spatial size {images.shape[1:3]}, expected at least patch_size={p}')
    x = nn.Conv(
        self.dim,
        (p, p),
        strides=(p, p),
        padding='VALID',
        dtype=self.dtype,
        conv_general_dilated=cpu_ops.conv_fn(self.conv_impl),
        name='patch_embed',
    )(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d) + jnp.asarray(posemb_sincos_2d(h, w, d), x.dtype)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    block = maybe_remat(_TransformerBlock, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim or 4 * self.dim, self.dtype, name=f'block_{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(x).astype(jnp.float32)
    return x[:, 0] if self.pool == 'cls' else jnp.mean(x, axis=1)


# Dense-prediction encoders ({'out': map, 'stages': maps}); imported here, after the blocks they reuse.
from mtlmatch.models import dense  # noqa: E402  pylint: disable=g-import-not-at-top

ENCODERS: dict[str, type[nn.Module]] = {
    'mlp': MLPEncoder,
    'cnn': CNNEncoder,
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    'vit_tiny': ViTTiny,
    'dilated_resnet': dense.DilatedResNet,
    'segnet': dense.SegNetEncoder,
}


def build_encoder(name: str, **kwargs) -> nn.Module:
  """The shared encoder ``ENCODERS[name](**kwargs)``, e.g. ``build_encoder('resnet18', width=64, dtype='bfloat16')``.

  Raises one ValueError for an unknown name, an unknown keyword or a bad value.
  """
  return construct(ENCODERS, 'encoder', name, kwargs)
