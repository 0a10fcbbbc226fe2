"""TFDS's messages that are wrong or idle for this project's data, replaced or dropped.

* The one line a generated TFDS builder prints when it prepares its data (instead of TFDS's "Downloading and
  preparing dataset Unknown size (download: Unknown size, ...)", which is wrong: nothing is downloaded).
* :class:`TfdsNoise`: two warnings TFDS repeats every time a benchmark is built (so once per row of a benchmark
  script): "Using custom data configuration" (this project's builders make their configs at run time, by design) and
  "`FeatureConnector.dtype` is deprecated" (TFDS's own ``as_dataset`` reads the deprecated field). Only these two,
  and only from TFDS's files; every other warning passes. Installed on absl's logger when ``mtlmatch.data`` is
  imported.
"""

import logging

TFDS_NOISE = ('Using custom data configuration', '`FeatureConnector.dtype` is deprecated')


def log_generation(builder) -> None:
  """Used as a builder's ``_log_download_bytes``: an INFO line, shown under the CLI, silent in a notebook."""
  logging.info('Generating %s into %s (once; read from there afterwards)', builder.info.full_name, builder.data_dir)


class TfdsNoise(logging.Filter):
  """Drops the :data:`TFDS_NOISE` warnings logged from TFDS's own modules."""

  def filter(self, record) -> bool:
    return not (
        record.levelno == logging.WARNING
        and record.name == 'absl'
        and record.module in ('dataset_builder', 'feature')
        and 'tensorflow_datasets' in record.pathname
        and str(record.msg).startswith(TFDS_NOISE)
    )


def drop_tfds_noise() -> None:
  """Installs :class:`TfdsNoise` on absl's logger (once; idempotent)."""
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, TfdsNoise) for f in absl_logger.filters):
    absl_logger.addFilter(TfdsNoise())
