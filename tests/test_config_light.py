"""``mtlmatch/config_schema.json`` equals what the code states (encoder dataclass fields, the methods' ``HPARAMS``,
the loss signatures), so the file a config reads cannot drift from the code (issue 24, item 5).
"""

import dataclasses
import inspect

from mtlmatch import config_schema, losses, models, weighting


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
    assert config_schema.term_options(token) == {n: parameters[n].default for n in names}
