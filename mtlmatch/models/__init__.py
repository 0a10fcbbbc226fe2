"""Models: shared image encoders, stateless task heads and their composition into a multi-task model.

* ``encoders``: ``ENCODERS`` = {'mlp', 'cnn', 'resnet18', 'resnet50', 'vit_tiny'}; ``build_encoder(name, **kwargs)``.
* ``heads``: ``HEADS`` = {'linear', 'mlp'}; ``build_head(name, num_classes, **kwargs)``.
* ``dense``: dense-prediction networks, registered in both: encoders 'dilated_resnet', 'segnet' (features
  ``{'out': map, 'stages': maps}``) and heads 'aspp', 'segnet_decoder', 'mtan' (``[B, H, W, num_classes]``).
* ``cpu_ops``: ``conv_general_dilated`` (a drop-in for ``lax``'s, for ``nn.Conv``) and ``max_pool_2x2`` with a
  GEMM / reshape backward that is several times faster on XLA:CPU; ``IMPLS`` = ('auto', 'native', 'gemm').
* ``architectures``: ``ARCHITECTURES`` = LibMTL's eight ('hps' the default, 'mmoe', 'cgc', 'ple', 'dselect_k',
  'cross_stitch', 'ltb', 'mtan'); ``build_architecture(name, encoder, heads, **kwargs)`` (docs/maths.md §12).
* ``multitask``: ``MultiTaskModel(encoder, heads)`` with ``init``/``apply``/``encode``/``apply_head`` and
  ``build_model(tasks, encoder=..., encoder_kwargs=..., head=..., head_kwargs=...)``.

Models know nothing of training: losses, optimisers and the sharded step live in ``mtlmatch.train``.
"""

from mtlmatch.models import cpu_ops
from mtlmatch.models.encoders import ENCODERS, CNNEncoder, MLPEncoder, ResNet18, ResNet50, ViTTiny, build_encoder
from mtlmatch.models import dense  # after encoders: encoders.py imports dense part-way through its own import
from mtlmatch.models.heads import HEADS, Bounded, LinearHead, MLPHead, build_head, build_task_head
from mtlmatch.models.multitask import MultiTaskModel, build_model
from mtlmatch.models import architectures  # after multitask, which it composes

__all__ = [
    'ENCODERS',
    'HEADS',
    'Bounded',
    'CNNEncoder',
    'LinearHead',
    'MLPEncoder',
    'MLPHead',
    'MultiTaskModel',
    'ResNet18',
    'ResNet50',
    'ViTTiny',
    'build_encoder',
    'build_head',
    'build_model',
    'architectures',
    'build_task_head',
    'cpu_ops',
    'dense',
]
