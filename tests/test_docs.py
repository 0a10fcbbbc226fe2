"""The documentation site's promises that need no Sphinx (make docs builds and link-checks the site itself):
README fits on a screen or two and keeps the two commands, every public loss and every weighting method has an API
entry with its maths, the config reference is ``--help``'s text, and the link checker finds broken links."""

import importlib
import inspect
import os
import re
import sys

from conftest import REPO
from mtlmatch import config_help, losses, weighting

sys.path.insert(0, str(REPO / 'docs'))
import check_links  # noqa: E402  (docs/ is not a package)
import gen_pages  # noqa: E402


def test_readme_is_short_and_keeps_the_two_commands():
  readme = (REPO / 'README.md').read_text()
  assert len(readme.splitlines()) < 200
  for command in ('make run', 'make test'):
    assert f'```\n{command}\n```' in readme, command
  # The parts the site includes from README (docs/index.md, getting_started.md, howto/own_data.md, citing.md).
  for part in ('intro', 'commands', 'example', 'citing'):
    assert readme.count(f'<!-- {part}:begin') == 1 and readme.count(f'<!-- {part}:end -->') == 1, part


def _documented_modules() -> set[str]:
  names = set()
  for page in (REPO / 'docs' / 'api').glob('*.md'):
    names |= set(re.findall(r'^\.\. automodule:: (\S+)$', page.read_text(), re.M))
  return names


def test_every_api_page_names_a_module_and_the_core_modules_have_pages():
  modules = _documented_modules()
  for name in modules:
    importlib.import_module(name)
  assert {'mtlmatch.losses', 'mtlmatch.weighting', 'mtlmatch.models', 'mtlmatch.data', 'mtlmatch.train'} <= modules


def test_every_loss_and_every_weighting_method_has_an_api_entry_with_its_maths():
  public = {n for n, f in vars(losses).items() if inspect.isfunction(f) and not n.startswith('_')}
  assert public <= set(losses.__all__), sorted(public - set(losses.__all__))  # automodule documents __all__
  for name in public:
    assert len(inspect.getdoc(getattr(losses, name)) or '') > 80, name
  for name, method in weighting.METHODS.items():
    cls = type(method)
    assert cls.__name__ in weighting.__all__ and getattr(weighting, cls.__name__) is cls, name
    assert cls.__doc__ and cls.__doc__ != weighting.WeightingMethod.__doc__, name


def test_config_reference_is_the_help_text():
  page = gen_pages.config_page()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    assert config_help.help_text(gen_pages.HELP_SPEC) in page
  finally:
    os.chdir(cwd)
  for name in weighting.METHODS:
    assert f'`{name} <mtlmatch.weighting.{type(weighting.METHODS[name]).__name__}>`' in page, name


def test_link_checker_finds_missing_pages_and_anchors(tmp_path):
  (tmp_path / 'a.html').write_text('<p id="x"></p><a href="b.html#y">b</a> <a href="a.html#x">a</a>')
  (tmp_path / 'b.html').write_text('<a href="c.html">c</a> <a href="https://example.org/">out</a> <a href="#z">z</a>')
  assert check_links.broken_links(str(tmp_path)) == [
      "a.html: b.html#y (no id 'y' on b.html)",
      'b.html: c.html (no such file)',
      "b.html: #z (no id 'z' on b.html)",
  ]
