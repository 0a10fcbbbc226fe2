"""Writes a manifest's images and labels once as a TFDS dataset in ArrayRecord format, for reading by index.

    python -m mtlmatch.data.prepare --manifest=affectnet/train.csv --out=/data/tfds --name=affectnet_train \
        --image_column=path --label=expression=expression --missing=expression=,8,9,10

    python -m mtlmatch.data.prepare --manifest=emotionet.csv --out=/data/tfds --name=emotionet \
        --image_column=file --label=aus=AU1,AU2,AU4,AU5,AU6,AU9,AU12,AU15,AU17,AU20,AU25,AU26

    python -m mtlmatch.data.prepare --manifest=affectnet/train.csv --out=/data/tfds --name=affectnet_va \
        --image_column=path --label=expression=expression --label=va=valence,arousal --regression=va \
        --missing=expression=,-1,7,8,9,10 --missing=va=,NA,-2

The dataset is ``OUT/mtlmatch_prepared/NAME/1.0.0`` with one split (``--split`` or ``train``; with ``--split_column``
only the rows whose value in that column equals ``--split``) and features ``image``
(the file's bytes, unchanged: no re-encoding), one feature per task: int64 (``[]`` for a single column, ``[C]`` for a
list of columns; ``-1`` = not annotated, as in the manifest's missing codes) or, for a task of ``--regression``, float32
``[d]`` (d columns, ``[1]`` for a single one; NaN = not annotated), ``row`` (the manifest row) and ``file``.
It is read with ``tfds_source(name, DIR, tasks=[...], image_size=(H, W))``: labels once, images by index
(:class:`mtlmatch.data.readers.TfdsReader`). ``--num_shards`` sets the number of ArrayRecord files.

Every row is checked first, decoding included (one parallel pass): a missing or undecodable file is one ValueError
naming the manifest, the row and the file, or with ``--on_bad_image=skip`` a row left out and counted (printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from mtlmatch.data import files as files_lib
from mtlmatch.data._quiet import log_generation

VERSION = '1.0.0'


class PreparedConfig(tfds.core.BuilderConfig):
  """One prepared manifest: its reader (already checked) and the label layout (task → number of columns, 0 for a
  single column of a classification task; the reader's ``regression`` tasks are float32)."""

  def __init__(self, *, reader: files_lib.FilesReader, columns: Mapping[str, int], **kwargs):
    super().__init__(version=VERSION, **kwargs)
    self.reader = reader
    self.columns = dict(columns)


class MtlmatchPrepared(tfds.core.GeneratorBasedBuilder):
  """Images (encoded bytes as in the files) and labels of one manifest."""

  VERSION = tfds.core.Version(VERSION)
  code_path = None  # made from user files: no checksums or metadata files ship with this builder
  _log_download_bytes = log_generation

  def _info(self):
    regression = self.builder_config.reader.regression
    labels = {
        task: tfds.features.Tensor(shape=() if n == 0 else (n,), dtype=np.float32 if task in regression else np.int64)
        for task, n in self.builder_config.columns.items()
    }
    channels = self.builder_config.reader.shape[2]
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Images and labels of manifest {self.builder_config.reader.manifest}.',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, channels)),
                'row': tfds.features.Tensor(shape=(), dtype=np.int64),
                'file': tfds.features.Text(),
                **labels,
            }
        ),
        disable_shuffling=True,  # record i is the i-th kept row, in manifest order
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {self.builder_config.reader.split: self._generate_examples()}

  def _generate_examples(self):
    reader = self.builder_config.reader
    for i, (row, path) in enumerate(zip(reader.rows, reader.paths)):
      with open(path, 'rb') if '://' not in path else _gfile(path) as f:
        image = f.read()
      example = {'image': image, 'row': int(row), 'file': str(path)}
      example.update(
          {t: np.asarray(y[i], np.float32 if t in reader.regression else np.int64) for t, y in reader.labels.items()}
      )
      yield i, example


def _gfile(path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile.GFile(path, 'rb')


def prepare(
    manifest: str,
    out: str,
    *,
    name: str,
    image_column: str,
    labels: Mapping[str, Union[str, Sequence[str]]],
    image_root: Optional[str] = None,
    channels: int = 3,
    missing=None,
    split: Optional[str] = None,
    split_column: Optional[str] = None,
    on_bad_image: str = 'raise',
    num_shards: Optional[int] = None,
    regression: Sequence[str] = (),
) -> str:
  """Checks every row of ``manifest`` (decoding included) and writes it under ``out``; returns the dataset's
  directory (pass it to ``tfds_source``). Arguments as :func:`mtlmatch.data.files.files_source`."""
  if not isinstance(name, str) or not name.replace('_', '').isalnum() or not name[:1].isalpha():
    raise ValueError(f'name: got {name!r}, expected a letter then letters, digits or underscores')
  reader = files_lib.FilesReader(
      manifest,
      image_column=image_column,
      labels=labels,
      image_root=image_root,
      channels=channels,
      missing=missing,
      split=split,
      split_column=split_column,
      on_bad_image=on_bad_image,
      regression=regression,
  )
  if on_bad_image == 'raise':  # the constructor checked existence only; decoding is checked here, for every row
    bad = reader.undecodable(np.arange(len(reader.paths)))
    if len(bad):
      raise ValueError(
          f'{reader.describe(int(bad[0]))}: the file does not decode as an image, expected a readable image file '
          f'({len(bad)} such row(s); fix the manifest or pass --on_bad_image=skip)'
      )
  columns = {t: reader.labels[t].shape[1] if reader.labels[t].ndim == 2 else 0 for t in labels}
  config = PreparedConfig(name=name, reader=reader, columns=columns)
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # TFDS warns that a config made at run time is "custom": it is, by design
  try:
    builder = MtlmatchPrepared(data_dir=os.fspath(out), config=config, file_format='array_record')
    if builder.is_prepared():
      raise ValueError(
          f'--out {out!r} already holds a prepared dataset {name!r} ({builder.data_dir}); expected a new name or an '
          'empty place (it is never overwritten)'
      )
    download_config = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
    builder.download_and_prepare(download_config=download_config)
  finally:
    absl_logger.setLevel(level)
  return os.fspath(builder.data_dir)


def _parse_labels(items: Sequence[str]) -> dict:
  labels = {}
  for item in items:
    task, _, columns = item.partition('=')
    if not task or not columns:
      raise ValueError(f'--label: got {item!r}, expected TASK=COLUMN or TASK=COL1,COL2,... (multilabel)')
    parts = columns.split(',')
    labels[task] = parts[0] if len(parts) == 1 else parts
  return labels


def _parse_missing(items: Sequence[str]):
  if not items:
    return None  # every task its default codes (files_lib.DEFAULT_MISSING; DEFAULT_REGRESSION_MISSING for regression)
  out = {}
  for item in items:
    task, _, values = item.partition('=')
    if not task:
      raise ValueError(f'--missing: got {item!r}, expected TASK=V1,V2,... (a blank value allowed: TASK=,8,9)')
    out[task] = tuple(values.split(','))
  return out


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--manifest', required=True, help='CSV (header first) or JSON-lines table, one row per image')
  parser.add_argument('--out', required=True, help='TFDS data directory to write into')
  parser.add_argument('--name', required=True, help='dataset name (letters, digits, underscores)')
  parser.add_argument('--image_column', required=True)
  parser.add_argument('--label', action='append', default=[], help='TASK=COLUMN or TASK=COL1,COL2,... (repeat)')
  parser.add_argument('--missing', action='append', default=[], help="TASK=V1,V2 codes for 'not annotated' (repeat)")
  parser.add_argument(
      '--regression', action='append', default=[], help='TASK whose columns are float targets, NaN = missing (repeat)'
  )
  parser.add_argument('--image_root', default=None, help="folder the paths are relative to (default: the manifest's)")
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--split', default=None, help="the dataset's split name (default: train)")
  parser.add_argument(
      '--split_column', default=None, help='keep only the rows whose value in this column equals --split'
  )
  parser.add_argument('--on_bad_image', default='raise', choices=files_lib.ON_BAD_IMAGE)
  parser.add_argument('--num_shards', type=int, default=None)
  args = parser.parse_args(argv)
  if not args.label:
    parser.error('at least one --label TASK=COLUMN is required')
  directory = prepare(
      args.manifest,
      args.out,
      name=args.name,
      image_column=args.image_column,
      labels=_parse_labels(args.label),
      image_root=args.image_root,
      channels=args.channels,
      missing=_parse_missing(args.missing),
      split=args.split,
      split_column=args.split_column,
      on_bad_image=args.on_bad_image,
      num_shards=args.num_shards,
      regression=tuple(args.regression),
  )
  print(json.dumps({'directory': directory, 'tasks': list(_parse_labels(args.label))}))
  return directory


if __name__ == '__main__':
  try:
    main()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
