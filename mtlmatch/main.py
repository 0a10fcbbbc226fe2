"""Command line: ``python -m mtlmatch.main --config=configs/affect.py:dm --workdir=DIR [--config.x=y ...]``.

On CPU every core is used: one XLA:CPU device per core (``mtlmatch.cpu_devices``), unless ``XLA_FLAGS`` already
sets ``--xla_force_host_platform_device_count``.

Multi-host: add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process (each process
reads its own slice of every source; the global batch is ``config.batch_size``).
"""
from __future__ import annotations

import logging as pylogging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtlmatch import cpu_devices  # noqa: E402  (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/affect.py:dm.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, config.json and results.json.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries:
  """Keeps INFO lines from mtlmatch and clu (the progress line, metrics) and drops the libraries' INFO chatter
  (orbax, TFDS, JAX); warnings and errors from everyone pass."""

  def filter(self, record) -> bool:
    return record.levelno > pylogging.INFO or any(f'/{p}/' in record.pathname for p in ('mtlmatch', 'clu'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pylogging.getLogger('absl').addFilter(_QuietLibraries())
  if not (FLAGS.coordinator_address or FLAGS.num_processes):
    # Every core on CPU: one fake device per core (dividing the batch sizes), set before JAX's backend starts;
    # an XLA_FLAGS device count of the user's wins. (Multi-host runs keep their per-host setting.)
    os.environ['XLA_FLAGS'] = cpu_devices.xla_flags_with_cores(
        os.environ.get('XLA_FLAGS'), cpu_devices.available_cores(),
        (FLAGS.config.batch_size, FLAGS.config.eval_batch_size))
  import tensorflow as tf  # TF only feeds data: keep it off every accelerator.
  tf.config.set_visible_devices([], 'GPU')
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  from mtlmatch import train
  logging.info('JAX devices: %d global, %d local (process %d of %d)', jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count())
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0 and 'metrics' in results:
    print(f'Final metrics at step {results["step"]} ({results["wall_time_s"]:.0f} s), written to '
          f'{FLAGS.workdir}/results.json:')
    for task, metrics in results['metrics'].items():
      shown = {k: v for k, v in metrics.items() if not k.startswith('f1_')}  # per-label F1s are in results.json
      print(f'  {task:>14s}: ' + '  '.join(f'{k} {v:.4f}' for k, v in shown.items()))


if __name__ == '__main__':
  app.run(main)
