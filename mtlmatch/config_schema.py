"""The defaults a config states, read from a committed file so that loading a config imports neither JAX nor Flax.

A config names every field of its encoder (``encoder.kwargs``), every hyper-parameter of its weighting method
(``weighting.hparams``) and every option of its DM / co-annotation terms. Their one source of truth stays the code
that uses them: the Linen dataclass fields of ``mtlmatch/models/encoders.py``, the ``HPARAMS`` of the method classes
in ``mtlmatch/weighting/*.py`` and the signatures of ``losses.distribution_matching`` / ``losses.co_annotation``.
Reading them there means importing JAX, Flax and optax (seconds, and a config file is plain data), so
``config_schema.json`` next to this module holds exactly those defaults, generated from the code by
:func:`from_code`::

    python -m mtlmatch.config_schema --write      # or: make schema

and ``tests/test_config_light.py`` regenerates it in memory and asserts that it equals the committed file, so it
cannot drift: change a default in the code, rerun the command, commit both. This is the simpler of the two honest
designs: moving the declarations themselves (dataclass field defaults, HParam specs with their checks, loss
signatures) into JAX-free modules would split each encoder, method and loss from its own defaults.

:func:`encoder_fields` and :func:`hparam_specs` read the file for the built-in names; a name registered at run time
(``models.ENCODERS[...] = ...``, e.g. tests/test_seams.py) is read from the live registry, which is then imported
already. In the file JSON arrays stand for tuples (every sequence default in the code is a tuple); ``dtype`` fields
are dtype names ('float32'), as a config holds them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Mapping

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config_schema.json')
# Encoder fields that are not ``encoder.kwargs``: Linen's own, and those set from a top-level key (config.remat).
ENCODER_FIELDS_FROM_CONFIG = ('remat',)
_NOT_KWARGS = ('parent', 'name', *ENCODER_FIELDS_FROM_CONFIG)
# The loss function and the option names (``losses.matching``) behind each term token of a config variant.
TERM_LOSSES = {'dm': ('distribution_matching', 'OPTIONS'), 'coann': ('co_annotation', 'CO_ANNOTATION_OPTIONS')}


@dataclasses.dataclass(frozen=True)
class HParamDoc:
  """What a config and ``--help`` need of a ``weighting.HParam``: its default, kind and texts (its check stays in
  the method class and runs when the method is bound)."""

  default: Any
  kind: Any  # 'float' | 'int' | 'floats' | a tuple of string choices
  expected: str = ''
  doc: str = ''


# ---------------------------------------------------------------------------------------------------------------
# From the code (imports JAX, Flax and optax): what the file must hold.


def _encoder_fields_of(cls) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top

  fields = {}
  for f in dataclasses.fields(cls):
    if f.name not in _NOT_KWARGS:
      default = f.default
      if f.name == 'dtype' and not isinstance(default, str):
        default = np.dtype(default).name
      fields[f.name] = default
  return fields


def _hparam_docs_of(specs) -> dict:
  return {k: HParamDoc(s.default, s.kind, s.expected, s.doc) for k, s in specs.items()}


def from_code() -> dict:
  """The schema as the code states it: ``{'encoders': {name: {field: default}}, 'weighting': {name: {hparam:
  {default, kind, expected, doc}}}, 'terms': {token: {option: default}}, 'architectures': {name: {summary, paper,
  needs_levels, kwargs}}}`` (JSON-ready: tuples as lists)."""
  import inspect  # pylint: disable=g-import-not-at-top

  from mtlmatch import losses, models, weighting  # pylint: disable=g-import-not-at-top

  terms = {}
  for token, (fn, names) in TERM_LOSSES.items():
    parameters = inspect.signature(getattr(losses, fn)).parameters
    terms[token] = {n: parameters[n].default for n in getattr(losses.matching, names)}
  schema = {
      'encoders': {name: _encoder_fields_of(cls) for name, cls in models.ENCODERS.items()},
      'weighting': {
          name: {k: dataclasses.asdict(d) for k, d in _hparam_docs_of(method.HPARAMS).items()}
          for name, method in weighting.METHODS.items()
      },
      'terms': terms,
      'architectures': {
          name: {'summary': a.summary, 'paper': a.paper, 'needs_levels': a.needs_levels, 'kwargs': dict(a.defaults)}
          for name, a in models.architectures.ARCHITECTURES.items()
      },
  }
  return json.loads(json.dumps(schema))  # tuples as lists, exactly as the file holds them


def to_text(schema: Mapping) -> str:
  return json.dumps(schema, indent=1, allow_nan=False) + '\n'


# ---------------------------------------------------------------------------------------------------------------
# From the file (plain Python): what a config reads.


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@functools.cache
def load() -> dict:
  """The committed schema, JSON arrays as tuples."""
  with open(SCHEMA_PATH) as f:
    raw = json.load(f)
  return {
      'encoders': {n: {k: _tuples(v) for k, v in fields.items()} for n, fields in raw['encoders'].items()},
      'weighting': {
          n: {k: HParamDoc(**{a: _tuples(v) for a, v in spec.items()}) for k, spec in specs.items()}
          for n, specs in raw['weighting'].items()
      },
      'terms': {t: {k: _tuples(v) for k, v in options.items()} for t, options in raw['terms'].items()},
      'architectures': raw['architectures'],
  }


def _live(module: str, registry: str) -> Mapping:
  """A registry of ``module`` if that module is imported already (a name registered at run time), else {}."""
  return getattr(sys.modules[module], registry) if module in sys.modules else {}


def encoder_names() -> list[str]:
  return sorted({*load()['encoders'], *_live('mtlmatch.models', 'ENCODERS')})


def weighting_names() -> list[str]:
  return sorted({*load()['weighting'], *_live('mtlmatch.weighting', 'METHODS')})


def encoder_fields(name: str) -> dict:
  """``{field: default}`` of encoder ``name`` (its ``encoder.kwargs``); an unknown name raises one ValueError."""
  if name in load()['encoders']:
    return dict(load()['encoders'][name])
  live = _live('mtlmatch.models', 'ENCODERS')
  if name in live:
    return _encoder_fields_of(live[name])
  raise ValueError(f'config.encoder.name: got {name!r}, expected one of {encoder_names()}')


def hparam_specs(name: str) -> dict[str, HParamDoc]:
  """``{hparam: HParamDoc}`` of weighting method ``name``; an unknown name raises one ValueError."""
  if name in load()['weighting']:
    return dict(load()['weighting'][name])
  live = _live('mtlmatch.weighting', 'METHODS')
  if name in live:
    return _hparam_docs_of(live[name].HPARAMS)
  raise ValueError(f'config.weighting.name: got {name!r}, expected one of {weighting_names()}')


def arch_names() -> list[str]:
  return sorted(load()['architectures'])


def arch_spec(name: str) -> dict:
  """``{'summary', 'paper', 'needs_levels', 'kwargs': {kwarg: default}}`` of architecture ``name``; an unknown name
  raises one ValueError listing the names."""
  if name not in load()['architectures']:
    raise ValueError(f'config.arch.name: got {name!r}, expected one of {arch_names()}')
  return load()['architectures'][name]


def term_options(token: str) -> dict:
  """``{option: the loss's default}`` of a term token ('dm' or 'coann')."""
  return dict(load()['terms'][token])


def main(argv) -> int:
  if argv[1:] == ['--write']:
    with open(SCHEMA_PATH, 'w') as f:
      f.write(to_text(from_code()))
    print(f'wrote {SCHEMA_PATH}')
    return 0
  if argv[1:] == ['--check']:
    with open(SCHEMA_PATH) as f:
      same = f.read() == to_text(from_code())
    print(f'{SCHEMA_PATH}: ' + ('up to date' if same else 'stale: run python -m mtlmatch.config_schema --write'))
    return 0 if same else 1
  print('usage: python -m mtlmatch.config_schema --write | --check', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv))
