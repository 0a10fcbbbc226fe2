"""Shared config defaults and the variant grammar used by every file in ``configs/``.

A config file defines ``get_config(arg=None)``: it starts from :func:`base_config` (which states every key), sets its
benchmark, tasks and relatedness, then calls :func:`apply_variant` with the ``arg`` after the colon of
``--config=<file>:<arg>``. The grammar of ``arg`` (EBNF; ``{x}`` is zero or more ``x``, ``[x]`` an optional ``x``)::

    variant   = [ token , { "," , token } ] ;
    token     = methods | single | encoder | arch | weighting | nt | size | data ;
    methods   = method , { "+" , method } ;            (* e.g. dm+coann+dgr *)
    method    = "mtl" | "dm" | "coann" | "dgr" ;
    single    = "single=" , task ;                      (* a task of the config file *)
    encoder   = "encoder=" , name ;                     (* a key of models.ENCODERS *)
    arch      = "arch=" , name ;                        (* a key of models.architectures.ARCHITECTURES *)
    weighting = "weighting=" , name ;                   (* a key of weighting.METHODS *)
    nt        = "nt=" , root ;                          (* a sweep root *)
    size      = "smoke" | "cpu" ;
    data      = "va" ;                                  (* a data option the config file offers *)

* ``methods``: ``mtl`` plain multi-task (no DM / co-annotation term), ``dm`` distribution matching, ``coann`` soft
  co-annotation, ``dgr`` dummy gradient norm regularization, one term per (task_a, task_b) pair of the file;
* ``single=<task>``: the single-task baseline of one task;
* ``encoder=<name>``: another encoder, ``encoder.kwargs`` reset to that encoder's defaults (on the command line
  ``--config.encoder.name=<name>`` is this token, so ``--config.encoder.kwargs.<field>=...`` then names its fields);
* ``arch=<name>``: another architecture over that encoder and the heads (``hps``, the default, is hard parameter
  sharing; ``mmoe``, ``cgc``, ``ple``, ``dselect_k``, ``cross_stitch``, ``ltb``, ``mtan``; docs/maths.md §12),
  ``arch.kwargs`` reset to its defaults (``--config.arch.name=<name>``);
* ``weighting=<name>``: another weighting method, ``weighting.hparams`` its defaults (``--config.weighting.name``);
* ``nt=<root>``: the negative-transfer monitor (``config.nt_reference``) against the single-task runs of a sweep
  root: task t's reference is ``<root>/st_<t>/seed_{seed}``'s results.json, ``{seed}`` being this run's seed;
* ``smoke``: a run of seconds (tests, CI) for whichever encoder is chosen; ``cpu``: the case studies' size on a
  2-core CPU (``experiments/case_studies.py``): a small CNN (whatever encoder the config file has; only an encoder
  chosen with ``encoder=<name>`` in the same variant keeps its own sizes), batch 64, 300 steps, the file's
  ``cpu_data`` options;
* ``va``: the synthetic affect benchmark's third source, labelled only for valence/arousal (the regression task
  ``va``; ``configs/affect.py``); a config file that does not offer it refuses it.

Rules (:data:`RULES`; a variant that breaks one raises one ValueError naming both tokens and what was expected):

1. one of each: at most one token of each kind (a method set, ``single=``, ``encoder=``, ``arch=``, ``weighting=``,
   ``nt=``,
   a size: ``smoke`` or ``cpu``, a data token) and each method once in the set; ``encoder=mlp,encoder=cnn``,
   ``dm,coann`` and ``smoke,cpu`` are refused, not resolved by position;
2. no contradiction: ``mtl`` (no matching term) goes with neither ``dm`` nor ``coann``; ``single=<task>`` (one task)
   goes with neither ``dm`` nor ``coann`` (each relates two tasks);
3. the order of application is fixed, whatever the order written: ``encoder=``, ``arch=``, ``weighting=``, the
   method set,
   ``single=``, ``nt=``, the size, then the data token, so ``smoke`` / ``cpu`` size the chosen encoder and the data
   token sizes its source for them. Empty tokens are skipped.

``python -m mtlmatch.main --config=configs/affect.py:dm+coann,smoke --workdir=/tmp/x``. Any key can then be
overridden on the command line, e.g. ``--config.total_steps=300``; ``--config.encoder.name`` and
``--config.arch.name`` and ``--config.weighting.name`` replace the spec's ``encoder=`` / ``arch=`` / ``weighting=``
token (:func:`cli_spec`).

Loading a config imports neither JAX, Flax nor TensorFlow: the encoders' fields, the methods' hyper-parameters and
the loss options are read from :mod:`mtlmatch.config_schema` (generated from that code, checked by a test);
:func:`mtlmatch.config_checks.validate_config` imports the real registries, when an experiment is built.
"""

from __future__ import annotations

import textwrap
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from mtlmatch import config_schema

METHOD_TOKENS = ('mtl', 'dm', 'coann', 'dgr')
# The kinds of variant token (the grammar's ``token`` alternatives), in the order they are applied (rule 3).
TOKEN_KINDS = ('encoder', 'arch', 'weighting', 'methods', 'single', 'nt', 'size', 'data')
# The data tokens (a config file offers some of them through apply_variant's ``data_tokens``).
DATA_TOKENS = ('va',)
# Rule 2: a method of the set and the tokens it contradicts, with why.
CONTRADICTIONS = {
    'mtl': (('dm', 'coann'), 'mtl is plain multi-task learning, without DM or co-annotation terms'),
    'single': (('dm', 'coann'), 'single=<task> trains one task, DM and co-annotation relate two'),
}
RULES = (
    'one of each: at most one token of each kind (a method set, single=, encoder=, arch=, weighting=, nt=, a size: '
    'smoke or cpu, a data token), each method once in the set',
    'no contradiction: mtl goes with neither dm nor coann; single=<task> goes with neither dm nor coann',
    'applied in a fixed order, whatever the order written: encoder=, arch=, weighting=, the method set, single=, '
    'nt=, the size (smoke or cpu), for the chosen encoder, then the data token; empty tokens are skipped',
)
_RULES_TEXT = '\n'.join(
    textwrap.fill(r, 116, initial_indent=f'  {i}. ', subsequent_indent='     ') for i, r in enumerate(RULES, 1)
)
# The variant part of --help (config_help.help_text): the grammar, each token and the rules.
VARIANT_HELP = f"""
Config variants (after the colon; e.g. configs/affect.py:dm+coann,smoke). Grammar:
  variant = [token {{"," token}}]
  token   = methods | "single=" task | "encoder=" name | "arch=" name | "weighting=" name | "nt=" root | "smoke"
          | "cpu" | "va"
  methods = method {{"+" method}};  method = {" | ".join(f'"{m}"' for m in METHOD_TOKENS)}
  {" ".join(METHOD_TOKENS)}  joined by +: plain MTL, distribution matching, co-annotation, DGR
  single=<task>      the single-task baseline of one task
  encoder=<name>     another encoder with its defaults (= --config.encoder.name=<name>)
  arch=<name>        another architecture with its defaults (= --config.arch.name=<name>; listed below)
  weighting=<name>   another weighting method with its defaults (= --config.weighting.name=<name>)
  nt=<root>          the negative-transfer monitor against the single-task runs of a sweep root
  smoke              a seconds-long run (tiny data and encoder)
  cpu                the case studies' size for a CPU: a small CNN, batch 64, 300 steps
  va                 (configs/affect.py) a third source labelled for valence/arousal: the regression task va
Rules (else one error naming both tokens):
{_RULES_TEXT}
"""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all devices and hosts
  c.eval_batch_size = 512
  c.log_every = 100
  c.eval_every = 0  # the interval of every evaluator whose `every` is None; 0: only at the end
  c.early_stopping_patience = 0  # stop after this many evaluations without a better validation score; 0 = never
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.nonfinite = 'halt'  # or 'skip': skip (and count) non-finite updates
  c.profile_steps = 0  # >0: a jax.profiler trace of that many steps into <workdir>/profile (TensorBoard: Profile)
  c.profile_first_step = 10  # the step the trace starts at (after compilation)
  # 'bfloat16': encoder and heads compute in bfloat16; parameters, optimizer state, losses and reductions stay float32
  c.precision = 'float32'
  c.remat = False  # True: the encoder's blocks recompute their activations in the backward pass (less memory)
  # k > 1: each batch's encoder pass runs as k microbatches in turn (encoder memory / k, one more forward pass); the
  # losses, terms and weighting see the whole batch, so the step is unchanged but for BatchNorm (per microbatch)
  c.grad_accum_steps = 1
  c.tasks = ()  # the tasks to train: () = all of the benchmark's, or a tuple of names
  # {task: {option: value}} over the benchmark's task options (mtlmatch/tasks.py), e.g. a regression task's loss:
  # --config.task_options.va.loss=mse where the config file states the task's options (configs/affect.py's va)
  c.task_options = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.name = ''
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.seed = 0  # generation seed of synthetic data / annotation splits / validation hold-out
  c.data.validation_fraction = 0.1  # held out of every training source for model selection; 0 = none
  c.data.options = ml_collections.ConfigDict()
  c.data.mixing = 'weights'  # or 'equal_per_task'
  # True, False or names from data.pipeline.AUGMENTATIONS; True = ('flip', 'crop'), or with dense tasks LibMTL's
  # ('flip', 'scale_crop'), which moves the labels with the image (mtlmatch/data/pipeline.py)
  c.data.augment = False
  c.data.on_bad_image = 'raise'  # file-backed sources: 'skip' leaves out (and logs) missing or undecodable images

  c.encoder = ml_collections.ConfigDict({'name': 'cnn', 'kwargs': encoder_kwargs('cnn')})
  c.head = ml_collections.ConfigDict({'name': 'linear', 'kwargs': ml_collections.ConfigDict()})
  # The architecture composing encoder and heads (models.architectures.ARCHITECTURES): 'hps' = hard parameter sharing
  c.arch = ml_collections.ConfigDict({'name': 'hps', 'kwargs': arch_kwargs('hps')})

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 50
  c.optimizer.final_lr_fraction = 0.01
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False  # sgd only
  c.optimizer.clip_norm = 1.0

  c.objective = ml_collections.ConfigDict()
  c.objective.task_weights = ml_collections.ConfigDict()
  c.objective.terms = ml_collections.ConfigDict()

  c.weighting = ml_collections.ConfigDict()
  c.weighting.name = 'ew'
  c.weighting.hparams = weighting_hparams('ew')
  c.weighting.terms_as_tasks = False  # DM / co-annotation: extra "tasks" for the method, or added on top
  # Methods that need the task Jacobian: 'vmap' (one vmapped backward), 'rows' (one backward per loss; faster on
  # XLA:CPU) or 'auto' (rows on CPU, vmap on GPU/TPU). The same values either way.
  c.weighting.jacobian = 'auto'

  # Learned relatedness (an objective term's relatedness='learned:<init>', docs/maths.md §8): every
  # `relatedness_every` steps R <- (1 - rate) R + rate R^, R^ from the soft counts of the model's predictions and the
  # labels of the batches since the last re-estimation, smoothed by `relatedness_smoothing` pseudo-examples toward
  # the B marginal. Unused without a learned table.
  c.relatedness_every = 100
  c.relatedness_rate = 0.5  # in (0, 1]: the weight of the new estimate
  c.relatedness_smoothing = 1.0  # alpha >= 0, as estimate_relatedness's smoothing
  # Negative-transfer monitor (mtlmatch/monitor.py, docs/maths.md §9): {task: the single-task primary validation
  # metric (a number) or the path of a single-task run's results.json}; {} = off. At each validation evaluation a
  # task more than `nt_margin` below its reference for `nt_patience` evaluations logs a warning and, with
  # nt_action='anneal', multiplies the DM / co-annotation terms feeding it by `nt_anneal` (divided back, up to 1,
  # at each evaluation once it recovers).
  c.nt_reference = ml_collections.ConfigDict()
  c.nt_margin = 0.01
  c.nt_patience = 2  # evaluations
  c.nt_action = 'warn'  # or 'anneal'
  c.nt_anneal = 0.5  # in (0, 1)

  c.init_from = ''  # a workdir or checkpoint directory whose encoder starts this run (fine-tuning)
  c.init_heads = False  # with init_from: also the heads of the tasks both runs have

  # What the loop measures (mtlmatch/evaluators.py): named entries, each run every `every` steps (None: eval_every;
  # 0: only at the end) and at the end. The defaults: test and validation metrics and the best-validation selection.
  c.evals = ml_collections.ConfigDict()
  c.evals.test = evaluator('classification', split='test')
  c.evals.validation = evaluator('classification', split='validation')
  c.evals.selection = evaluator('selection')
  c.evals.linear_probe = evaluator(
      'linear_probe', every=0, enabled=False, train_examples=2000, test_examples=2000, c=1.0, max_steps=500, seed=0
  )
  return c


def evaluator(kind: str, *, every: Optional[int] = None, enabled: bool = True, **options) -> ml_collections.ConfigDict:
  """A ``config.evals`` entry: evaluator ``kind`` (``evaluators.EVALUATORS``) run every ``every`` steps (None:
  ``config.eval_every``; 0: only at the end) and at the end, if ``enabled``, with its ``options``."""
  return ml_collections.ConfigDict(
      {'kind': kind, 'every': ml_collections.FieldReference(every, field_type=int), 'enabled': enabled, **options}
  )


# ---------------------------------------------------------------------------------------------------------------
# Encoder kwargs and weighting hyper-parameters follow the chosen name: every field exists as a dotted key.

PRECISIONS = ('float32', 'bfloat16')
# Encoder fields set from a top-level key (config.remat), for every encoder alike; not in ``encoder.kwargs``.
ENCODER_FIELDS_FROM_CONFIG = config_schema.ENCODER_FIELDS_FROM_CONFIG


def encoder_kwargs(name: str, **overrides) -> ml_collections.ConfigDict:
  """Every field of encoder ``name`` with its default (``dtype`` as a string), then ``overrides``; the defaults are
  the encoder's dataclass fields, read from :mod:`mtlmatch.config_schema`."""
  fields = config_schema.encoder_fields(name)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f'config.encoder.kwargs: got {unknown} for encoder {name!r}, expected some of {sorted(fields)}')
  kwargs = ml_collections.ConfigDict()
  for field, default in {**fields, **overrides}.items():
    if field == 'dtype' and not isinstance(default, str):
      default = np.dtype(default).name
    kwargs[field] = ml_collections.config_dict.placeholder(int) if default is None else default
  return kwargs


def set_encoder(config: ml_collections.ConfigDict, name: str, **overrides) -> ml_collections.ConfigDict:
  """Chooses encoder ``name``; ``config.encoder.kwargs`` becomes its defaults updated with ``overrides``."""
  config.encoder.name = name
  config.encoder.kwargs = encoder_kwargs(name, **overrides)
  return config


def arch_kwargs(name: str) -> ml_collections.ConfigDict:
  """Every kwarg of architecture ``name`` with its default (read from :mod:`mtlmatch.config_schema`)."""
  return ml_collections.ConfigDict(dict(config_schema.arch_spec(name)['kwargs']))


def set_arch(config: ml_collections.ConfigDict, name: str, **kwargs) -> ml_collections.ConfigDict:
  """Chooses architecture ``name``; ``config.arch.kwargs`` becomes its defaults updated with ``kwargs``."""
  config.arch.name = name
  config.arch.kwargs = arch_kwargs(name)
  config.arch.kwargs.update(kwargs)
  return config


def weighting_hparams(name: str) -> ml_collections.ConfigDict:
  """Every hyper-parameter of weighting method ``name`` with its default (the method's ``HPARAMS``, read from
  :mod:`mtlmatch.config_schema`)."""
  return ml_collections.ConfigDict({k: spec.default for k, spec in config_schema.hparam_specs(name).items()})


def set_weighting(config: ml_collections.ConfigDict, name: str, **hparams) -> ml_collections.ConfigDict:
  """Chooses weighting method ``name``; ``config.weighting.hparams`` becomes its defaults updated with ``hparams``."""
  config.weighting.name = name
  config.weighting.hparams = weighting_hparams(name)
  config.weighting.hparams.update(hparams)
  return config


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``encoder.kwargs`` and ``weighting.hparams`` hold every field of the chosen encoder
  and method (the given values over the defaults), so ``config.json`` records what ran and a config that names only
  some fields equals one that names all. Fields of another encoder raise one ValueError."""
  config = ml_collections.ConfigDict(config.to_dict())
  given = dict(config.encoder.kwargs)
  try:
    config.encoder.kwargs = encoder_kwargs(config.encoder.name, **given)
  except ValueError as e:
    raise ValueError(
        f'{e} (config_lib.set_encoder(config, {config.encoder.name!r}) resets them to its defaults; '
        f'on the command line --config.encoder.name does)'
    ) from None
  if 'arch' in config:
    kwargs = arch_kwargs(config.arch.name)
    with kwargs.unlocked():
      kwargs.update(dict(config.arch.kwargs))
    config.arch.kwargs = kwargs
  hparams = weighting_hparams(config.weighting.name)
  with hparams.unlocked():
    hparams.update(dict(config.weighting.hparams))
  config.weighting.hparams = hparams
  return config


def model_kwargs(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """``(encoder kwargs, head kwargs)`` of the model ``config`` builds: ``encoder.kwargs`` and ``head.kwargs`` with
  the top-level switches applied. ``precision='bfloat16'`` makes bfloat16 the compute dtype of the encoder and of
  every head (parameters stay float32; features and logits are float32); with ``precision='float32'`` the encoder
  keeps ``encoder.kwargs.dtype`` (the older, encoder-only switch) and the heads compute in float32.
  ``remat=True`` sets the encoder's ``remat``."""
  encoder = dict(config.encoder.kwargs)
  head = dict(config.head.kwargs)
  if config.precision == 'bfloat16':
    encoder['dtype'] = head['dtype'] = 'bfloat16'
  if config.remat:
    encoder['remat'] = True
  return encoder, head


def idx_dir_option():
  """``data.options.idx_dir`` of the Fashion-MNIST configs: unset (None) means $MTLMATCH_FASHION_MNIST_DIR or
  Debian's directory; a typed placeholder, so --config.data.options.idx_dir=DIR can set it."""
  return ml_collections.config_dict.placeholder(str)


# Per encoder, the sizes of the ``smoke`` variant: a run of seconds.
SMOKE_ENCODERS = {
    'cnn': {'widths': (8, 16), 'features': 32},
    'mlp': {'hidden': (32,)},
    'resnet18': {'width': 4, 'stage_sizes': (1, 1, 1, 1)},
    'resnet50': {'width': 2, 'stage_sizes': (1, 1, 1, 1)},
    'vit_tiny': {'patch_size': 8, 'dim': 16, 'depth': 1, 'num_heads': 2},
    # Dense encoders (a feature map, for the dense heads): images of a multiple of 8 pixels.
    'dilated_resnet': {'widths': (4, 8, 8, 16), 'stage_sizes': (1, 1, 1, 1), 'block': 'basic'},
    'segnet': {'widths': (8, 16, 16), 'convs_per_stage': (1, 1, 1)},
}


def dgr_term(weight: float = 0.01, num_dummies: int = 1, mode: str = 'fixed') -> dict:
  return dict(
      kind='dgr',
      weight=weight,
      tasks='all',
      num_dummies=num_dummies,
      mode=mode,
      norm='sq_l2',
      head='task',
      init_scale=1.0,
  )


def shrink_for_smoke(config: ml_collections.ConfigDict, data_options: Mapping[str, object]) -> None:
  """A seconds-long run: 6 steps of 16, a tiny encoder, logs and checkpoints every few steps, tiny data."""
  config.total_steps = 6
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every = 2
  config.checkpoint_every = 3
  config.optimizer.warmup_steps = 2
  set_encoder(config, config.encoder.name, **SMOKE_ENCODERS[config.encoder.name])
  # Where the data is (Fashion-MNIST's files, a face recipe's manifests and columns, an image directory) is kept; how
  # much of it is replaced.
  kept = {
      k: v
      for k, v in config.data.options.items()
      if k in ('idx_dir', 'image_root', 'image_dir') or k.endswith(('_manifest', '_column'))
  }
  config.data.options = dict(data_options)
  for key, value in kept.items():
    config.data.options[key] = idx_dir_option()
    config.data.options[key] = value


def shrink_for_cpu(
    config: ml_collections.ConfigDict, data_options: Mapping[str, object], *, encoder_chosen: bool = False
) -> None:
  """A run of minutes on a 2-core CPU: batch 64, 300 steps, a small CNN, one kept checkpoint, ``data_options``
  merged into the data options.

  The small CNN replaces whatever encoder the config file chose (e.g. faces' ResNet-18); only an encoder chosen for
  this run (``encoder_chosen``: an ``encoder=<name>`` token of the variant, or ``--config.encoder.name`` after it)
  other than the CNN keeps its own sizes."""
  config.total_steps = 300
  config.batch_size = 64
  config.eval_batch_size = 512
  config.log_every = 25
  config.checkpoint_every = 300
  config.keep_checkpoints = 1
  config.optimizer.warmup_steps = 20
  if config.encoder.name == 'cnn' or not encoder_chosen:
    set_encoder(config, 'cnn', widths=(16, 32), features=64)
  for key, value in data_options.items():
    config.data.options[key] = value


TERM_KINDS = {'dm': 'distribution_matching', 'coann': 'co_annotation'}

# Every option of a term kind, with the loss's default (docs/maths.md; the signatures of losses.distribution_matching
# and losses.co_annotation, read from mtlmatch.config_schema), so that each can be set with --config.<key>=...
TERM_OPTIONS = {token: config_schema.term_options(token) for token in TERM_KINDS}


def pair_terms(token: str, pairs: Sequence[tuple[str, str]], relatedness: str) -> dict:
  """The ``token`` ('dm' or 'coann') terms for each (task_a, task_b) pair: named ``token`` for a single pair, else
  ``<token>_<task_b>`` (e.g. 'dm_group', 'dm_attributes')."""
  return {
      token
      if len(pairs) == 1
      else f'{token}_{b}': dict(
          kind=TERM_KINDS[token], weight=1.0, task_a=a, task_b=b, relatedness=relatedness, **TERM_OPTIONS[token]
      )
      for a, b in pairs
  }


def token_kind(token: str) -> str:
  """The kind (:data:`TOKEN_KINDS`) of one variant token; anything outside the grammar raises one ValueError."""
  for kind in ('encoder', 'arch', 'weighting', 'single', 'nt'):
    if token.startswith(kind + '='):
      return kind
  if token in ('smoke', 'cpu'):
    return 'size'
  if token in DATA_TOKENS:
    return 'data'
  if all(part in METHOD_TOKENS for part in token.split('+')):
    return 'methods'
  raise ValueError(
      f"config variant: got {token!r}, expected 'smoke', 'cpu', {', '.join(repr(t) for t in DATA_TOKENS)}, "
      "'single=<task>', "
      f"'encoder=<name>', 'arch=<name>', 'weighting=<name>', 'nt=<sweep root>' or a +-joined set of "
      f'{METHOD_TOKENS}'
  )


def parse_variant(arg: Optional[str]) -> dict[str, str]:
  """``{kind: token}`` of ``arg`` in the order of application (rule 3), after checking rules 1 and 2 (module
  docstring); a token outside the grammar, repeated or contradicting another raises one ValueError."""
  where = f'config variant {arg!r}'
  given = {}
  for token in (t for t in (arg or '').split(',') if t):
    kind = token_kind(token)
    if kind in given:
      if kind == 'methods':
        what = "one +-joined method set such as 'dm+coann+dgr'"
      elif kind == 'size':
        what = "at most one of 'cpu' and 'smoke' (two sizes)"
      elif kind == 'data':
        what = 'at most one data token'
      else:
        what = f'at most one {kind}=<...> token'
      raise ValueError(f'{where}: {token!r} after {given[kind]!r}, expected {what}')
    given[kind] = token
  methods = given['methods'].split('+') if 'methods' in given else []
  repeated = sorted({m for m in methods if methods.count(m) > 1})
  if repeated:
    raise ValueError(f'{where}: {given["methods"]!r} names {repeated[0]!r} twice, expected each method once')
  present = {**{m: m for m in methods}, **({'single': given['single']} if 'single' in given else {})}
  for key, (excluded, why) in CONTRADICTIONS.items():
    clash = [m for m in methods if m in excluded]
    if key in present and clash:
      raise ValueError(f'{where}: {present[key]!r} contradicts {clash[0]!r} ({why}), expected one of the two')
  return {kind: given[kind] for kind in TOKEN_KINDS if kind in given}


def apply_variant(
    config: ml_collections.ConfigDict,
    arg: Optional[str],
    *,
    pairs: Sequence[tuple[str, str]],
    relatedness: str,
    smoke_data: Mapping[str, object],
    cpu_data: Optional[Mapping[str, object]] = None,
    data_tokens: Optional[Mapping[str, Any]] = None,
    where: Optional[str] = None,
) -> ml_collections.ConfigDict:
  """Applies the tokens of ``arg`` (the grammar and rules of the module docstring, :func:`parse_variant`).
  ``dm``/``coann`` relate each (task_a, task_b) of ``pairs`` through ``relatedness``; ``smoke`` shrinks the run and
  uses ``smoke_data`` as the data options; ``cpu`` sizes it for a CPU and merges ``cpu_data`` into them;
  ``data_tokens`` {token: fn(config, size)} are the data tokens the file offers (``size``: 'smoke', 'cpu' or None);
  ``where`` names the file in the errors for what it does not offer — a data token, or ``dm``/``coann`` when it
  has no ``pairs`` (default: the calling file, as ``<folder>/<file>``)."""
  parsed = parse_variant(arg)
  where = where or _caller_file()
  terms = [m for m in parsed.get('methods', '').split('+') if m in TERM_KINDS]
  if terms and not pairs:
    raise ValueError(
        f'config variant {arg!r}: got {terms[0]!r}, which {where} does not offer, expected mtl, dgr, single=<task> '
        'or weighting=<name> (DM and co-annotation relate two classification tasks through a relatedness table; '
        f'{where} has no such pair)'
    )
  for kind, token in parsed.items():
    value = token.partition('=')[2]
    if kind == 'encoder' and value != config.encoder.name:
      set_encoder(config, value)
    elif kind == 'arch' and value != config.arch.name:
      set_arch(config, value)
    elif kind == 'weighting' and value != config.weighting.name:
      set_weighting(config, value)
    elif kind == 'methods':
      for part in token.split('+'):
        if part in TERM_KINDS:
          config.objective.terms.update(pair_terms(part, pairs, relatedness))
        elif part == 'dgr':
          config.objective.terms.dgr = dgr_term()
    elif kind == 'single':
      config.tasks = (value,)
    elif kind == 'nt':
      # The negative-transfer monitor against the same seed's single-task runs of a sweep root
      # (experiments/sweep.py's <root>/st_<task>/seed_<seed>), for every task of the pairs.
      root = value.rstrip('/')
      if not root:
        raise ValueError(f"config variant: got {token!r}, expected 'nt=<sweep root holding st_<task>/seed_<k>>'")
      config.nt_reference = {
          t: f'{root}/st_{t}/seed_{{seed}}' for t in dict.fromkeys(t for pair in pairs for t in pair)
      }
    elif token == 'smoke':
      shrink_for_smoke(config, smoke_data)
    elif token == 'cpu':
      shrink_for_cpu(config, cpu_data or {}, encoder_chosen='encoder' in parsed)
    elif kind == 'data':
      offered = dict(data_tokens or {})
      if token not in offered:
        raise ValueError(
            f'config variant: got {token!r}, which {where} does not offer, expected one of {sorted(offered)}'
            if offered
            else f'config variant: got {token!r}, which {where} does not offer (it has no data tokens)'
        )
      offered[token](config, parsed.get('size'))
  return config


def _caller_file() -> str:
  """``<folder>/<file>`` of the config file that called :func:`apply_variant`, for its messages."""
  import inspect  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  caller = inspect.stack()[2].filename
  return os.path.join(os.path.basename(os.path.dirname(caller)), os.path.basename(caller))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/affect.py:dm,smoke'`` → that file's ``get_config('dm,smoke')``, as ``--config=`` does."""
  path, _, arg = spec.partition(':')
  return get_config_fn(path)(arg or None)


# ---------------------------------------------------------------------------------------------------------------
# JSON, dotted keys and the CLI's help.

_BestEffort = ml_collections.config_dict.config_dict._BestEffortCustomJSONEncoder  # pylint: disable=protected-access


class _JSONEncoder(_BestEffort):
  """Best-effort JSON that writes arrays (e.g. a relatedness table given as numpy) as nested lists of numbers."""

  def default(self, obj):
    if isinstance(obj, np.ndarray) or type(obj).__module__.startswith('jax'):
      return np.asarray(obj).tolist()
    if isinstance(obj, np.generic):
      return obj.item()
    return super().default(obj)


def to_json(config: ml_collections.ConfigDict, **kwargs) -> str:
  """``config`` as JSON; arrays become numbers (``to_json_best_effort`` would write "unserializable object")."""
  return config.to_json(json_encoder_cls=_JSONEncoder, **kwargs)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """``{dotted key: value}`` of every leaf (an empty sub-config counts as a leaf)."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out.update(flat_keys(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def get_config_fn(path: str):
  """The ``get_config`` of config file ``path``."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise ValueError(f'config file: got {path!r}, expected an existing file such as configs/affect.py')
  module_spec = importlib.util.spec_from_file_location(f'_mtlmatch_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config


def with_tokens(spec: str, tokens: Sequence[str]) -> str:
  """``spec`` with variant ``tokens``, each replacing the spec's token of its kind in place or else appended
  (``configs/affect.py:mtl,smoke`` + ``dm`` → ``...:dm,smoke``; + ``encoder=mlp`` → ``...:mtl,smoke,encoder=mlp``)."""
  if not tokens:
    return spec
  path, _, arg = spec.partition(':')
  out = [t for t in arg.split(',') if t]
  for token in tokens:
    kinds = [token_kind(t) for t in out]
    if token_kind(token) in kinds:
      out[kinds.index(token_kind(token))] = token
    else:
      out.append(token)
  return f'{path}:{",".join(out)}'


def cli_spec(spec: str, overrides: Mapping[str, str]) -> str:
  """The ``--config`` spec the CLI loads: ``--config.encoder.name=X`` / ``--config.arch.name=A`` /
  ``--config.weighting.name=Y`` become the ``encoder=X`` / ``arch=A`` / ``weighting=Y`` tokens (replacing the spec's
  own, as the command line overrides the file), so the chosen encoder's, architecture's and method's fields exist as
  dotted keys."""
  names = ('encoder.name', 'arch.name', 'weighting.name')
  tokens = [f'{key.split(".")[0]}={overrides[key]}' for key in names if key in overrides]
  return with_tokens(spec, tokens)


def set_keys(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """``config`` with dotted-key ``overrides`` set in place (``{'weighting.hparams.temperature': 3.0}``), like
  ``--config.<key>=<value>``; a key the config lacks raises the CLI's one-line error."""
  for key, value in overrides.items():
    target, (*path, last) = config, key.split('.')
    try:
      for part in path:
        target = target[part]
      if last not in target:
        raise KeyError(last)
    except (KeyError, TypeError, AttributeError):
      raise ValueError(f'--config.{key}: no such key (python -m mtlmatch.main --help lists every key)') from None
    target[last] = value
  return config
