"""The package's layout rules, checked on its source: no file over 700 lines, no function over 100 (the train step
under 80), and no module reaching into another package's private names (a private module of one package, such as
``losses/_checks.py``, is shared by that package's modules only)."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / 'mtlmatch'
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 100
MAX_STEP_LINES = 80


def _modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts)


def _package_of(path: pathlib.Path) -> str:
  return '.'.join(path.relative_to(REPO).parent.parts)


def test_no_file_or_function_is_too_long():
  too_long = []
  for path in _modules():
    source = path.read_text()
    if source.count('\n') > MAX_FILE_LINES:
      too_long.append(f'{path.relative_to(REPO)}: {source.count(chr(10))} lines')
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        limit = MAX_STEP_LINES if (path.name, node.name) == ('step.py', 'train_step') else MAX_FUNCTION_LINES
        if length > limit:
          too_long.append(f'{path.relative_to(REPO)}:{node.name}: {length} lines (> {limit})')
  assert not too_long, too_long


def test_no_module_uses_another_packages_private_names():
  offences = []
  for path in _modules():
    package = _package_of(path)
    tree = ast.parse(path.read_text())
    aliases = {}  # local name -> the mtlmatch module it is bound to
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('mtlmatch'):
        for alias in node.names:
          target = f'{node.module}.{alias.name}'
          # A private submodule of the importer's own package is shared by that package (losses/_checks.py).
          if alias.name.startswith('_') and not alias.name.startswith('__') and node.module != package:
            offences.append(f'{path.relative_to(REPO)}: from {node.module} import {alias.name}')
          aliases[alias.asname or alias.name] = target
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith('mtlmatch'):
            aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
      if (
          isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name)
          and node.value.id in aliases
          and node.attr.startswith('_')
          and not node.attr.startswith('__')
      ):
        module = aliases[node.value.id]
        if module.rsplit('.', 1)[0] != package and module != package:
          offences.append(f'{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr} ({module})')
  assert not offences, offences
