"""Config loading is light and has one source of defaults (issue 24, item 5).

* loading any config file (``get_config`` / ``config_lib.load_config``) imports none of JAX, Flax, optax, orbax,
  TensorFlow or TFDS, checked in a fresh interpreter per spec;
* ``mtlmatch/config_schema.json`` equals what the code states (encoder dataclass fields, the methods' ``HPARAMS``,
  the loss signatures), so the file read at load time cannot drift from the code;
* the variant grammar's rules: one token of each kind, no contradicting tokens, a fixed order of application.
"""

import dataclasses
import inspect
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from mtlmatch import config_help, config_lib, config_schema, losses, models, weighting

HEAVY = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow', 'tensorflow_datasets')

_LOAD = r"""
import json, sys
from mtlmatch import config_lib
spec = sys.argv[1]
config = config_lib.load_config(spec)
config_lib.set_encoder(config, 'vit_tiny')
config_lib.set_weighting(config, 'cagrad')
config_lib.cli_spec(spec, {'encoder.name': 'mlp', 'weighting.name': 'dwa'})
config_lib.to_json(config)
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2].split(',')))))
"""


@pytest.mark.parametrize(
    'spec',
    [
        'configs/affect.py',
        'configs/faces.py',
        'configs/shopping.py',
        'configs/multi_fashion.py',
        'configs/affect.py:dm+coann,smoke',
        'configs/affect.py:mtl,encoder=resnet18,weighting=pcgrad',
        'configs/faces.py:mtl,smoke',
        'configs/multi_fashion.py:mtl+dgr,cpu',
        'configs/shopping.py:single=item,nt=/sweep',
        'configs/utkface.py',
        'configs/utkface.py:dgr,smoke',
    ],
)
def test_loading_a_config_imports_no_jax_flax_or_tensorflow(spec):
  done = subprocess.run(
      [sys.executable, '-c', _LOAD, spec, ','.join(HEAVY)], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f'{spec} imported {done.stdout}'


def test_priors_and_the_key_error_import_no_jax_either():
  code = (
      'import sys\nfrom mtlmatch import config_help, priors\n'
      "priors.load_prior('expressions_to_aus')\n"
      "assert config_help.key_error('configs/affect.py:mtl', 'weighting.hparams.temperature') is not None\n"
      f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))'
  )
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == '[]', done.stdout


def test_the_schema_file_is_what_the_code_states():
  with open(config_schema.SCHEMA_PATH) as f:
    committed = f.read()
  assert committed == config_schema.to_text(
      config_schema.from_code()
  ), 'mtlmatch/config_schema.json is stale: run `python -m mtlmatch.config_schema --write` (make schema) and commit it'


def test_the_schema_reads_back_the_codes_values_and_types():
  """Tuples stay tuples, ints ints, floats floats: what a config holds is what the code would give."""
  same = lambda a, b: repr(a) == repr(b) and type(a) is type(b)  # noqa: E731
  for name, cls in models.ENCODERS.items():
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ('parent', 'name', 'remat')}
    read = config_schema.encoder_fields(name)
    assert list(read) == list(fields), name
    for key, default in fields.items():
      assert same(read[key], default) or (key == 'dtype' and read[key] == 'float32'), (name, key)
  for name, method in weighting.METHODS.items():
    read = config_schema.hparam_specs(name)
    assert list(read) == list(method.HPARAMS), name
    for key, spec in method.HPARAMS.items():
      doc = read[key]
      assert same(doc.default, spec.default) and same(doc.kind, spec.kind), (name, key)
      assert (doc.expected, doc.doc) == (spec.expected, spec.doc), (name, key)
  for token, fn, names in (
      ('dm', losses.distribution_matching, losses.matching.OPTIONS),
      ('coann', losses.co_annotation, losses.matching.CO_ANNOTATION_OPTIONS),
  ):
    parameters = inspect.signature(fn).parameters
    assert config_lib.TERM_OPTIONS[token] == {n: parameters[n].default for n in names}


def test_a_name_registered_at_run_time_is_read_from_the_live_registry(monkeypatch):
  @dataclasses.dataclass
  class Toy:
    parent: object = None
    name: object = None
    depth: int = 3
    remat: bool = False

  monkeypatch.setitem(models.ENCODERS, 'toy', Toy)
  assert dict(config_lib.encoder_kwargs('toy')) == {'depth': 3}
  assert 'toy' in config_schema.encoder_names()
  with pytest.raises(ValueError, match=r"config.encoder.name: got 'nope', expected one of \[.*'cnn'.*'toy'"):
    config_lib.encoder_kwargs('nope')
  with pytest.raises(ValueError, match=r"config.weighting.name: got 'nope', expected one of \[.*'pcgrad'"):
    config_lib.weighting_hparams('nope')


# ---------------------------------------------------------------------------------------------------------------
# The variant grammar's rules (config_lib's module docstring, --help).


@pytest.mark.parametrize(
    'arg, message',
    [
        ('encoder=mlp,encoder=cnn', "'encoder=cnn' after 'encoder=mlp', expected at most one encoder=<...> token"),
        ('weighting=ew,weighting=dwa', "'weighting=dwa' after 'weighting=ew', expected at most one weighting="),
        ('single=expression,single=aus', "'single=aus' after 'single=expression', expected at most one single="),
        ('nt=/a,nt=/b', "'nt=/b' after 'nt=/a', expected at most one nt="),
        ('dm,coann', "'coann' after 'dm', expected one +-joined method set such as 'dm+coann+dgr'"),
        ('mtl,dm', "'dm' after 'mtl', expected one +-joined method set"),
        ('dm+dm', "'dm+dm' names 'dm' twice, expected each method once"),
        ('smoke,smoke', "'smoke' after 'smoke', expected at most one of 'cpu' and 'smoke'"),
        ('dm,smoke,cpu', "'cpu' after 'smoke', expected at most one of 'cpu' and 'smoke'"),
        ('mtl+dm', "'mtl' contradicts 'dm' (mtl is plain multi-task learning, without DM or co-annotation terms)"),
        ('coann+mtl', "'mtl' contradicts 'coann'"),
        ('single=aus,dm+dgr', "'single=aus' contradicts 'dm' (single=<task> trains one task"),
    ],
)
def test_a_repeated_or_contradicting_token_is_refused_naming_both(arg, message):
  with pytest.raises(ValueError, match=re.escape(f'config variant {arg!r}: {message}')):
    config_lib.load_config(f'configs/affect.py:{arg}')


def test_combinations_the_rules_allow_still_load():
  for arg in ('mtl+dgr', 'dm+coann+dgr', 'single=aus,dgr', 'mtl,single=aus', 'dm,,smoke', 'cpu,mtl'):
    config_lib.load_config(f'configs/affect.py:{arg}')


def test_the_order_of_application_is_fixed_whatever_the_order_written():
  """Rule 3: encoder= and weighting= before the method set, the size last (smoke sizes the chosen encoder)."""
  one = config_lib.load_config('configs/affect.py:smoke,dm,weighting=dwa,encoder=mlp')
  other = config_lib.load_config('configs/affect.py:encoder=mlp,weighting=dwa,dm,smoke')
  assert config_lib.to_json(one) == config_lib.to_json(other)
  assert tuple(one.encoder.kwargs.hidden) == config_lib.SMOKE_ENCODERS['mlp']['hidden']
  assert list(config_lib.parse_variant('va,smoke,nt=/r,single=aus,dgr,weighting=dwa,arch=mmoe,encoder=mlp')) == list(
      config_lib.TOKEN_KINDS
  )


def test_the_arch_token_sets_the_architecture_and_its_kwargs():
  config = config_lib.load_config('configs/affect.py:mtl,arch=dselect_k,smoke')
  assert config.arch.name == 'dselect_k'
  assert dict(config.arch.kwargs) == {'num_experts': 4, 'num_nonzeros': 2, 'gamma': 1.0}
  assert config_lib.load_config('configs/affect.py:mtl').arch.to_dict() == {'name': 'hps', 'kwargs': {}}
  assert config_lib.cli_spec('c.py:mtl', {'arch.name': 'cgc'}) == 'c.py:mtl,arch=cgc'
  with pytest.raises(ValueError, match='at most one arch=<...> token'):
    config_lib.parse_variant('arch=mmoe,arch=cgc')
  with pytest.raises(ValueError, match=r"config.arch.name: got 'moe', expected one of \['cgc'"):
    config_lib.load_config('configs/affect.py:mtl,arch=moe')
  text = config_help.help_text()
  for name in ('hps', 'mmoe', 'cgc', 'ple', 'dselect_k', 'cross_stitch', 'ltb', 'mtan'):
    assert f'\n  {name} ' in text
  assert 'num_experts=4, num_nonzeros=2, gamma=1.0' in text


def test_a_workdir_of_before_arch_resumes_without_drift():
  from mtlmatch import checkpoint  # pylint: disable=g-import-not-at-top

  current = json.loads(config_lib.to_json(config_lib.load_config('configs/affect.py:mtl,smoke')))
  saved = {k: v for k, v in current.items() if k != 'arch'}
  checkpoint.check_config_drift(saved, current)  # arch.name='hps' and no kwargs: what that run did
  other = json.loads(config_lib.to_json(config_lib.load_config('configs/affect.py:mtl,smoke,arch=mmoe')))
  with pytest.raises(ValueError, match='arch.name'):
    checkpoint.check_config_drift(saved, other)


def test_a_new_token_replaces_the_spec_token_of_its_kind():
  assert config_lib.with_tokens('c.py:mtl,smoke', ['dm']) == 'c.py:dm,smoke'
  assert config_lib.with_tokens('c.py:mtl,smoke', ['encoder=mlp']) == 'c.py:mtl,smoke,encoder=mlp'
  spec = config_lib.cli_spec('c.py:encoder=mlp,dm', {'encoder.name': 'cnn', 'weighting.name': 'dwa'})
  assert spec == 'c.py:encoder=cnn,dm,weighting=dwa'  # the command line overrides the file's token


def test_help_states_the_grammar_and_the_rules():
  text = config_help.help_text()
  assert 'variant = [token {"," token}]' in text and 'methods = method {"+" method}' in text
  for number in ('1. one of each', '2. no contradiction', '3. applied in a fixed order'):
    assert number in text
  assert config_lib.VARIANT_HELP.strip() in text
