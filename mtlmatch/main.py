"""Command line: ``python -m mtlmatch.main --config=configs/affect.py:dm --workdir=DIR [--config.x=y ...]``.

Modes: ``--mode=train`` (default; resumes from the workdir's checkpoints; a first Ctrl-C checkpoints and exits 130,
a second stops at once), ``--mode=eval`` (evaluates the newest checkpoint of the workdir on every eval source into
``eval/<step>-<time>.json``, leaving training's ``results.json`` as it is; never trains) and ``--mode=predict``
(per-example predictions of every task for ``--source`` into ``predictions/<source>.npz``). Eval and predict use the
workdir's ``config.json`` when ``--config`` is not given. An error in the input (config, data, a refused resume) is
one line, exit 1; ``--traceback`` shows the whole traceback.
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
    'train (resume if the workdir has checkpoints) | eval (the newest checkpoint on every eval source, into '
    'eval/<step>-<time>.json) | predict (probabilities per example into predictions/<source>.npz); eval and '
    "predict use the workdir's config.json when --config is not given.",
)
flags.DEFINE_string('source', None, 'predict: the source to predict (default: every eval source).')
flags.DEFINE_bool('traceback', False, 'On an error, print the whole traceback (default: one line naming the problem).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['workdir'])  # --config too, but eval and predict default to the workdir's


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
  if spec is None:
    return argv
  try:  # a bad variant or config file: one line here, not absl's traceback of the config file's loading
    new_spec = config_lib.cli_spec(spec, overrides)
    config = config_lib.load_config(new_spec)
    errors = [e for e in (config_help.key_error(new_spec, k, config) for k in overrides) if e]
  except ValueError as e:
    if '--traceback' in argv:
      raise
    errors = [str(e)]
  if errors:
    sys.exit('error: ' + '\nerror: '.join(errors))
  if not overrides:
    return argv
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
  # Per-label F1s, per-class recalls, per-output regression metrics and the prediction entropy are in results.json.
  per_class = ('f1_', 'recall_', 'mae_', 'rmse_', 'pearson_', 'ccc_', 'iou_')
  for task, values in metrics.items():
    shown = {k: v for k, v in values.items() if not k.startswith(per_class) and k != 'mean_entropy'}
    print(f'  {task:>14s}: ' + '  '.join(f'{k} {_fmt(k, v)}' for k, v in shown.items()))


# What a user's input can raise (a bad config value, a missing file, bad data, a refused resume): one line, exit 1.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    run(FLAGS.config if FLAGS.config is not None else None)
  except USER_ERRORS as e:
    if FLAGS.traceback:
      raise
    sys.exit(f'error: {e} (--traceback shows where)')
  except KeyboardInterrupt:
    sys.exit(130)  # a second Ctrl-C: stopped at once


def run(config) -> None:
  """The chosen mode on ``FLAGS.workdir`` (the config: ``--config``, else for eval/predict the workdir's)."""
  from mtlmatch import progress  # pylint: disable=g-import-not-at-top

  progress.quiet_libraries()
  if config is None and FLAGS.mode == 'train':
    raise ValueError('--config: missing, expected a config file such as --config=configs/affect.py:dm to train')
  if not (FLAGS.coordinator_address or FLAGS.num_processes):
    # Every core on CPU: one fake device per core (dividing the batch sizes), set before JAX's backend starts;
    # an XLA_FLAGS device count of the user's wins. (Multi-host runs keep their per-host setting.)
    sizes = (config.batch_size, config.eval_batch_size) if config is not None else saved_batch_sizes(FLAGS.workdir)
    os.environ['XLA_FLAGS'] = cpu_devices.xla_flags_with_cores(
        os.environ.get('XLA_FLAGS'), cpu_devices.available_cores(), sizes
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
  workdir = os.path.abspath(FLAGS.workdir)
  config = config if config is not None else modes.saved_config(workdir)
  main_process = jax.process_index() == 0
  if FLAGS.mode == 'predict':
    paths = modes.predict(config, workdir, source=FLAGS.source)
    if main_process:
      print('Predictions written: ' + ', '.join(paths))
    return
  if FLAGS.mode == 'eval':
    results = modes.evaluate_checkpoint(config, workdir)
    where = results['path']
  else:
    results = train.train_and_evaluate(config, workdir)
    where = os.path.join(FLAGS.workdir, 'results.json')
  if results.get('interrupted'):
    if results.get('signal') == 'SIGINT':
      print(f'Stopped by Ctrl-C at step {results["step"]}, checkpoint saved; run the same command to resume.')
      sys.exit(130)
    return
  if main_process:
    print(f'Final metrics at step {results["step"]} ({results["wall_time_s"]:.0f} s), written to {where}:')
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


def saved_batch_sizes(workdir: str) -> tuple[int, int]:
  """``(batch_size, eval_batch_size)`` of a trained workdir's config.json (to size the CPU devices before JAX
  starts); (1, 1) when it has none (the mode then fails with its own message)."""
  import json  # pylint: disable=g-import-not-at-top

  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    return int(saved['batch_size']), int(saved['eval_batch_size'])
  except (OSError, ValueError, KeyError):
    return 1, 1


if __name__ == '__main__':
  app.run(main, argv=prepare_argv(sys.argv))
