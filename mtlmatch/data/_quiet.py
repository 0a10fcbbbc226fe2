"""The one line a generated TFDS builder prints when it prepares its data (instead of TFDS's "Downloading and
preparing dataset Unknown size (download: Unknown size, ...)", which is wrong: nothing is downloaded)."""

import logging


def log_generation(builder) -> None:
  """Used as a builder's ``_log_download_bytes``: an INFO line, shown under the CLI, silent in a notebook."""
  logging.info('Generating %s into %s (once; read from there afterwards)', builder.info.full_name, builder.data_dir)
