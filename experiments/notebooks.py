"""Runs the notebooks of ``experiments/`` so they are stored with their outputs (and tests that they run).

  python experiments/notebooks.py                 # executes every notebook in place, at its default sizes
  python experiments/notebooks.py own_data        # just one

:func:`execute` runs a notebook with the kernel of this interpreter (a kernelspec made in a temporary directory, so
no Jupyter set-up is needed); ``params`` become ``MTLMATCH_NB_<KEY>`` environment variables, which the notebooks'
parameter cells read (the test suite runs them small). TFDS's data-generation progress bars are dropped from the
stored outputs (they name a temporary directory); everything else the cells print or plot is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Mapping, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('compose_losses', 'own_data')
_NOISE = (
    'Generating ',
    'Shuffling ',
    'Dataset mtlmatch_',
    'Downloading and preparing',
    'IProgress not found',
    'Using custom data configuration',
    'FeatureConnector.dtype',
)


def _noise(output) -> bool:
  """TFDS's data generation (progress bars, their cursor moves, the temporary data directory) and its warnings."""
  if output.output_type != 'stream':
    return False
  text = output.text.replace('\x1b[A', '')
  return not text.strip() or any(n in text for n in _NOISE)


def execute(name: str, *, params: Optional[Mapping[str, object]] = None, timeout: int = 900):
  """The executed notebook ``experiments/<name>.ipynb`` (an nbformat node; the file is not written)."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top

  if name not in NOTEBOOKS:
    raise ValueError(f'notebook: got {name!r}, expected one of {NOTEBOOKS}')
  nb = nbformat.read(os.path.join(REPO, 'experiments', f'{name}.ipynb'), as_version=4)
  saved = dict(os.environ)
  with tempfile.TemporaryDirectory() as tmp:
    spec_dir = os.path.join(tmp, 'jupyter', 'kernels', 'mtlmatch')
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, 'kernel.json'), 'w') as f:
      json.dump(
          {
              'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
              'display_name': 'mtlmatch',
              'language': 'python',
          },
          f,
      )
    os.environ['JUPYTER_PATH'] = os.path.join(tmp, 'jupyter')
    os.environ['PYTHONPATH'] = REPO + os.pathsep + os.environ.get('PYTHONPATH', '')
    os.environ.setdefault('MTLMATCH_DATA_DIR', os.path.join(tmp, 'tfds'))
    os.environ['MTLMATCH_NB_WORKDIR'] = os.path.join(tmp, 'workdir')
    for key, value in (params or {}).items():
      os.environ[f'MTLMATCH_NB_{key.upper()}'] = str(value)
    try:
      nbclient.NotebookClient(
          nb, kernel_name='mtlmatch', timeout=timeout, resources={'metadata': {'path': tmp}}
      ).execute()
    finally:
      os.environ.clear()
      os.environ.update(saved)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs = [o for o in cell.outputs if not _noise(o)]
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
  return nb


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('names', nargs='*', choices=NOTEBOOKS, help='the notebooks to run (default: all of them)')
  args = parser.parse_args(argv[1:])
  import nbformat  # pylint: disable=g-import-not-at-top

  for name in args.names or NOTEBOOKS:
    nb = execute(name)
    nbformat.write(nb, os.path.join(REPO, 'experiments', f'{name}.ipynb'))
    print(f'experiments/{name}.ipynb executed and stored with its outputs')


if __name__ == '__main__':
  main(sys.argv)
