"""Command line: ``python -m mtlmatch.main --config=configs/affect.py:dm --workdir=DIR [--config.x=y ...]``.

Modes: ``--mode=train`` (default; resumes from the workdir's checkpoints), ``--mode=eval`` (evaluates the newest
checkpoint of the workdir on every eval source and writes ``results.json`` afresh; never trains) and
``--mode=predict`` (per-example probabilities of every task for ``--source`` into ``predictions/<source>.npz``).
``--help`` lists the variants, encoders, weighting methods and every config key.

On CPU every core is used: one XLA:CPU device per core (``mtlmatch.cpu_devices``), unless ``XLA_FLAGS`` already
sets ``--xla_force_host_platform_device_count``.

Multi-host: add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process (each process
reads its own slice of every source; the global batch is ``config.batch_size``).
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtlmatch import cpu_devices  # noqa: E402  (imports no JAX)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/affect.py:dm.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, config.json and results.json.')
flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval', 'predict'],
    'train (resume if the workdir has checkpoints) | eval (the newest checkpoint on every eval source, '
    'results.json afresh) | predict (probabilities per example into predictions/<source>.npz).',
)
flags.DEFINE_string('source', None, 'predict: the source to predict (default: every eval source).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def prepare_argv(argv: list[str]) -> list[str]:
  """Before absl parses ``argv``: ``--help`` prints every switch; ``--config.encoder.name`` /
  ``--config.weighting.name`` choose the encoder / method before its fields are overridden; a misspelt
  ``--config.<key>`` exits with one line (the key, the closest valid names, the variant that creates it)."""
  from mtlmatch import config_help, config_lib  # pylint: disable=g-import-not-at-top

  spec_at = next((i for i, a in enumerate(argv) if re.match(r'^--?config(=|$)', a)), None)
  spec = None
  if spec_at is not None:
    spec = argv[spec_at].split('=', 1)[1] if '=' in argv[spec_at] else (argv[spec_at + 1 :] or [None])[0]
  if any(a in ('-h', '--help', '--helpshort', '-?') for a in argv[1:]):
    flag_lines = [line for line in FLAGS.main_module_help().splitlines() if line.startswith(' ')]
    print(
        __doc__.strip()
        + '\n\nFlags:\n'
        + '\n'.join(flag_lines)
        + '\n\n'
        + config_help.help_text(spec or 'configs/affect.py:dm+coann+dgr')
    )
    sys.exit(0)
  overrides = {}
  for i, arg in enumerate(argv):
    match = re.match(r'^--?config\.([^=]+)(?:=(.*))?$', arg)
    if match:  # --config.k=v, or --config.k v
      value = match.group(2)
      if value is None and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
        value = argv[i + 1]
      overrides[match.group(1)] = value
  if spec is None or not overrides:
    return argv
  try:
    new_spec = config_lib.cli_spec(spec, overrides)
    config = config_lib.load_config(new_spec)
    errors = [e for e in (config_help.key_error(new_spec, k, config) for k in overrides) if e]
  except ValueError as e:
    errors = [str(e)]
  if errors:
    sys.exit('error: ' + '\nerror: '.join(errors))
  argv = list(argv)
  if '=' in argv[spec_at]:
    argv[spec_at] = f'--config={new_spec}'
  else:
    argv[spec_at + 1] = new_spec
  return argv


def _fmt(name: str, value) -> str:
  """Counts as integers, scores with four decimals."""
  return str(int(value)) if name == 'count' or isinstance(value, int) else f'{value:.4f}'


def _print_metrics(metrics) -> None:
  # Per-label F1s, per-class recalls and the prediction entropy are in results.json.
  for task, values in metrics.items():
    shown = {k: v for k, v in values.items() if not k.startswith(('f1_', 'recall_')) and k != 'mean_entropy'}
    print(f'  {task:>14s}: ' + '  '.join(f'{k} {_fmt(k, v)}' for k, v in shown.items()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from mtlmatch import progress  # pylint: disable=g-import-not-at-top

  progress.quiet_libraries()
  if not (FLAGS.coordinator_address or FLAGS.num_processes):
    # Every core on CPU: one fake device per core (dividing the batch sizes), set before JAX's backend starts;
    # an XLA_FLAGS device count of the user's wins. (Multi-host runs keep their per-host setting.)
    os.environ['XLA_FLAGS'] = cpu_devices.xla_flags_with_cores(
        os.environ.get('XLA_FLAGS'),
        cpu_devices.available_cores(),
        (FLAGS.config.batch_size, FLAGS.config.eval_batch_size),
    )
  import tensorflow as tf  # TF only feeds data: keep it off every accelerator.

  tf.config.set_visible_devices([], 'GPU')
  import jax

  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
    )
  from mtlmatch import modes, train  # pylint: disable=g-import-not-at-top

  logging.info(
      'JAX devices: %d global, %d local (process %d of %d)',
      jax.device_count(),
      jax.local_device_count(),
      jax.process_index(),
      jax.process_count(),
  )
  if FLAGS.mode == 'predict':
    paths = modes.predict(FLAGS.config, FLAGS.workdir, source=FLAGS.source)
    if jax.process_index() == 0:
      print('Predictions written: ' + ', '.join(paths))
    return
  if FLAGS.mode == 'eval':
    results = modes.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  else:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0 and 'metrics' in results:
    print(
        f'Final metrics at step {results["step"]} ({results["wall_time_s"]:.0f} s), written to '
        f'{FLAGS.workdir}/results.json:'
    )
    if not results['metrics']:
      print('  none: the benchmark has no eval source')
    _print_metrics(results['metrics'])
    selection = results.get('selection') or {}
    if selection.get('best_step') is not None and selection['best_step'] != results['step']:
      print(
          f'Test metrics at the best-validation step {selection["best_step"]} (validation score '
          f'{selection["best_score"]:.4f}):'
      )
      _print_metrics(selection['metrics'])


if __name__ == '__main__':
  app.run(main, argv=prepare_argv(sys.argv))
