"""The CLI's help and its one-line error for a misspelt ``--config.<key>`` (``python -m mtlmatch.main``).

:func:`help_text` is the body of ``--help`` (from which the docs' "Every switch" table is generated): the variant
grammar (:data:`mtlmatch.config_lib.VARIANT_HELP`), the encoders with their fields, the weighting methods with their
hyper-parameters, the evaluators and every config key of a spec. :func:`key_error` names the closest valid keys and
the variant or ``--config.<name>=...`` choice that creates a missing one. Both read the defaults from
:mod:`mtlmatch.config_schema`; only the evaluators' table imports JAX.
"""

from __future__ import annotations

import difflib
import json
from typing import Optional

import ml_collections

from mtlmatch import config_lib
from mtlmatch import config_schema


def key_error(spec: str, key: str, config: Optional[ml_collections.ConfigDict] = None) -> Optional[str]:
  """None if ``--config.<key>`` exists in the config of ``spec``, else one line: the key, the closest valid names
  and the variant (or ``--config.<name>=...`` choice) that creates it."""
  config = config if config is not None else config_lib.load_config(spec)
  keys = config_lib.flat_keys(config)
  if key in keys or any(k.startswith(key + '.') for k in keys):
    return None
  get_config = config_lib.get_config_fn(spec.partition(':')[0])
  with_tokens = config_lib.with_tokens
  tries = [(f'the `{t}` variant (--config={with_tokens(spec, [t])})', [t]) for t in config_lib.METHOD_TOKENS]
  tries += [(f'--config.encoder.name={e}', [f'encoder={e}']) for e in config_schema.encoder_names()]
  tries += [(f'--config.arch.name={a}', [f'arch={a}']) for a in config_schema.arch_names()]
  tries += [(f'--config.weighting.name={m}', [f'weighting={m}']) for m in config_schema.weighting_names()]
  found = []
  for label, tokens in tries:
    try:
      other = config_lib.flat_keys(get_config(with_tokens(spec, tokens).partition(':')[2] or None))
    except ValueError:
      continue
    if key in other or any(k.startswith(key + '.') for k in other):
      found.append(label)
  close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
  message = f'--config.{key}: no such key in {spec}'
  if found:
    message += f'; it exists with {" or ".join(found[:4])}{" or ..." if len(found) > 4 else ""}'
  if close:
    message += f'; closest valid: {", ".join(close)}'
  return message + ' (python -m mtlmatch.main --help lists every key)'


def help_text(spec: Optional[str] = None) -> str:
  """The CLI's ``--help`` body (also README's "Every switch"): variants, encoders with their fields, weighting
  methods with their hyper-parameters, and every config key of ``spec`` with its value there."""
  lines = [
      *config_lib.VARIANT_HELP.strip('\n').splitlines(),
      '',
      'Encoders (--config.encoder.name; fields: --config.encoder.kwargs.<field>=...):',
  ]
  for name in config_schema.encoder_names():
    fields = config_lib.flat_keys(config_lib.encoder_kwargs(name))
    lines.append(f'  {name:<10s} ' + ', '.join(f'{k}={_show(v)}' for k, v in fields.items()))
  lines += [
      '',
      'Architectures (arch=<name> or --config.arch.name; --config.arch.kwargs.<kwarg>=...; docs/maths.md §12):',
  ]
  for name in config_schema.arch_names():
    entry = config_schema.arch_spec(name)
    kwargs = ', '.join(f'{k}={_show(v)}' for k, v in entry['kwargs'].items()) or 'no kwargs'
    levels = '; encoders with levels: cnn, resnet18, resnet50' if entry['needs_levels'] else ''
    lines.append(f"  {name:<13s}{entry['summary']} ({entry['paper']}{levels}); {kwargs}")
  lines += ['', 'Weighting methods (--config.weighting.name; --config.weighting.hparams.<name>=...):']
  for name in config_schema.weighting_names():
    specs = config_schema.hparam_specs(name)
    parts = [f'{k}={_show(s.default)} ({expected_text(s)}{"; " + s.doc if s.doc else ""})' for k, s in specs.items()]
    lines.append(f'  {name:<12s}' + ('; '.join(parts) if parts else '(no hyper-parameters)'))
  from mtlmatch import evaluators  # pylint: disable=g-import-not-at-top  (JAX and the data layer: only here)

  lines += [
      '',
      'Evaluators (--config.evals.<name>.kind; each entry: every = steps, None = eval_every, 0 = end only; '
      'enabled):',
  ]
  for kind, cls in sorted(evaluators.EVALUATORS.items()):
    options = ', '.join(f'{k}={_show(v)}' for k, v in cls.OPTIONS.items())
    lines.append(f'  {kind:<15s} ' + ' '.join(p for p in (options, f'({cls.HELP})' if cls.HELP else '') if p))
  if spec:
    lines += ['', f'Config keys of {spec} (--config.<key>=<value>):']
    lines += [f'  {k} = {_show(v)}' for k, v in config_lib.flat_keys(config_lib.load_config(spec)).items()]
  return '\n'.join(lines)


def _show(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    return json.dumps(value.to_dict()) if len(value) else '{}'
  return repr(value) if isinstance(value, str) else str(value)


def expected_text(spec) -> str:
  """How --help states what a hyper-parameter accepts (a choice, or its kind and check)."""
  if isinstance(spec.kind, tuple):
    return 'one of ' + '|'.join(spec.kind)
  return f'{spec.kind}{" " + spec.expected if spec.expected else ""}'
