"""What the benchmark scripts share: their result tables, their common command-line arguments and the JSON output.

experiments/bench.py, experiments/bench_torch.py and experiments/device_check.py print one fixed-width table of their
rows (a header, a rule of dashes, a line per row) and take some of the same arguments; this module holds that once.
Standard library only, so that it imports before JAX (bench_torch.py sets ``XLA_FLAGS`` first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of a table: its title, width and alignment ('<' or '>'), what a row shows there and how.

  ``value`` is a row key or a function of the row; a value of None is printed as the table's ``missing`` text, any
  other value with ``format(value, fmt)``.
  """

  title: str
  width: int
  value: Union[str, Callable[[dict], Any]]
  fmt: str = ''
  align: str = '>'

  def cell(self, row: dict, missing: str) -> str:
    value = self.value(row) if callable(self.value) else row.get(self.value)
    return format(missing if value is None else format(value, self.fmt), f'{self.align}{self.width}')


def format_table(
    rows: Sequence[dict],
    columns: Sequence[Column],
    *,
    missing: str = '-',
    suffix: Optional[Callable[[dict], str]] = None,
) -> str:
  """The header, a rule as long as the header, then one line per row (cells joined by one space; ``suffix(row)``
  appended to the row's line where given)."""
  header = ' '.join(format(c.title, f'{c.align}{c.width}') for c in columns)
  lines = [header, '-' * len(header)]
  for row in rows:
    lines.append(' '.join(c.cell(row, missing) for c in columns) + (suffix(row) if suffix is not None else ''))
  return '\n'.join(lines)


def ok_mark(meets_target: Optional[bool]) -> str:
  """The 'ok' column: 'yes', 'NO', or '' for a row without a target."""
  return {True: 'yes', False: 'NO', None: ''}[meets_target]


def make_parser(doc: str) -> argparse.ArgumentParser:
  """A parser whose description is the first line of the script's docstring and whose epilog is all of it."""
  return argparse.ArgumentParser(
      description=doc.split('\n', 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
  )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--json', default=None, help='write the rows as a JSON list to this file')


def add_timing_arguments(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    warmup: int,
    steps_help: str = 'timed steps per row (median reported)',
    warmup_help: Optional[str] = 'untimed steps after compiling',
) -> None:
  """``--steps`` (timed steps or rounds) and ``--warmup`` (untimed steps after compiling)."""
  parser.add_argument('--steps', type=int, default=steps, help=steps_help)
  parser.add_argument('--warmup', type=int, default=warmup, help=warmup_help)


def comma_list(text: Optional[str]) -> list[str]:
  """'a,b,,c' -> ['a', 'b', 'c'] (empty items dropped; None or '' -> [])."""
  return [item for item in (text or '').split(',') if item]


def check_fast_compile(parser: argparse.ArgumentParser, args: argparse.Namespace, backend: str) -> None:
  """``--fast_compile`` sets XLA:CPU options: refuse it on any other backend."""
  if args.fast_compile and backend != 'cpu':
    parser.error(f'--fast_compile: XLA:CPU options, got backend {backend!r}')


def write_json(rows: list[dict], path: Optional[str]) -> None:
  """The rows as an indented JSON list at ``path`` (nothing when it is None)."""
  if path:
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
