"""Pages made at build time (by conf.py) into docs/_generated/, so that nothing in them is a hand-kept copy.

* ``config.md``: the body of ``python -m mtlmatch.main --help`` (:func:`mtlmatch.config_help.help_text`) for the
  default config with every term on, and a table of every weighting method's hyper-parameters from
  :func:`mtlmatch.weighting.hparam_specs`.
* ``tutorials/*.ipynb``: the notebooks of experiments/, as stored (with their outputs; never executed here).
* ``results/``: experiments/results/SUMMARY.md and each study's REPORT.md with its plots.
"""

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('compose_losses.ipynb', 'own_data.ipynb')
STUDIES = ('affect', 'shopping', 'multi_fashion')
HELP_SPEC = 'configs/affect.py:dm+coann+dgr'


def _write(path: str, text: str) -> None:
  """Writes ``text`` unless the file already holds it (an unchanged file keeps Sphinx's incremental build)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def _copy(src: str, dst: str) -> None:
  with open(src, 'rb') as f:
    data = f.read()
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.exists(dst):
    with open(dst, 'rb') as f:
      if f.read() == data:
        return
  shutil.copyfile(src, dst)


def _cell(text: str) -> str:
  return text.replace('|', '\\|')


def config_page() -> str:
  """The config reference: ``--help``'s body and the weighting methods' hyper-parameters."""
  from mtlmatch import config_help, weighting  # pylint: disable=g-import-not-at-top  (after conf.py's sys.path)

  cwd = os.getcwd()
  os.chdir(REPO)  # help_text loads the config by its repository-relative path
  try:
    body = config_help.help_text(HELP_SPEC)
  finally:
    os.chdir(cwd)
  rows = []
  for name in sorted(weighting.METHODS):
    cls = type(weighting.METHODS[name])
    target = f'{{py:class}}`{name} <mtlmatch.weighting.{cls.__name__}>`'
    specs = weighting.hparam_specs(name)
    if not specs:
      rows.append(f'| {target} | — | | |')
    for key, spec in specs.items():
      expected = config_help.expected_text(spec)  # the --help text's wording
      rows.append(
          f'| {target} | `{key}` | `{spec.default!r}` | {_cell("; ".join(filter(None, (expected, spec.doc))))} |'
      )
      target = ''
  return '\n'.join(
      [
          '# Config keys and switches',
          '',
          'Generated when the site is built, from the code that prints `python -m mtlmatch.main --help`',
          '(`mtlmatch.config_help.help_text`), so it is always the current list. Any key is set with',
          "`--config.<key>=<value>`; choosing an encoder or a weighting method resets its fields to that encoder's or",
          "method's defaults. With `--config=...` given, `--help` lists that config's keys.",
          '',
          '(weighting-hyper-parameters)=',
          "## Weighting methods' hyper-parameters",
          '',
          "`--config.weighting.name=<name>`, then `--config.weighting.hparams.<key>=<value>`. Each method's paper,",
          'kind and cost are in {doc}`the method table </reference/methods>`; its exact rule in its API entry (the',
          "name's link).",
          '',
          '| method | key | default | expected; meaning |',
          '|---|---|---|---|',
          *rows,
          '',
          f'## `--help` for `{HELP_SPEC}`',
          '',
          '```text',
          body,
          '```',
          '',
      ]
  )


def generate(out: str) -> None:
  _write(os.path.join(out, 'config.md'), config_page())
  for name in NOTEBOOKS:
    _copy(os.path.join(REPO, 'experiments', name), os.path.join(out, 'tutorials', name))
  results = os.path.join(REPO, 'experiments', 'results')
  _copy(os.path.join(results, 'SUMMARY.md'), os.path.join(out, 'results', 'SUMMARY.md'))
  for study in STUDIES:
    for name in sorted(os.listdir(os.path.join(results, study))):
      if name.endswith(('.md', '.png')):
        _copy(os.path.join(results, study, name), os.path.join(out, 'results', study, name))
