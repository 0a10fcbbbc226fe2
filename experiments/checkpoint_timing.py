"""How long the train loop is blocked in ``Checkpointer.save``, asynchronous against synchronous, for a config's state.

  python experiments/checkpoint_timing.py configs/affect.py:dm+coann,cpu async 8 10
  python experiments/checkpoint_timing.py configs/affect.py:dm+coann,cpu sync 8 10
  python experiments/checkpoint_timing.py configs/affect.py:dm+coann,cpu,encoder=resnet18 async 4 3

Arguments: config spec, ``async`` or ``sync``, the number of saves, the steps between saves. Like the loop of
``train.train_and_evaluate``: compile and take 2 steps, then step, and at a save step fetch the metrics and save;
``close`` at the end (it waits for the last write). Prints one JSON line: the state's size, the time each ``save``
blocked, their median, ``close``'s time and the whole loop's. The machine's load changes the numbers: run the two
modes one after the other on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from mtlmatch import checkpoint as ckpt_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from mtlmatch import experiment as experiment_lib


def main(argv) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('spec', help='config spec, e.g. configs/affect.py:dm+coann,cpu')
  parser.add_argument('mode', choices=('async', 'sync'))
  parser.add_argument('saves', type=int, help='number of saves')
  parser.add_argument('every', type=int, help='steps between saves')
  args = parser.parse_args(argv)
  spec, mode, saves, every = args.spec, args.mode, args.saves, args.every
  config = config_lib.load_config(spec)
  exp = experiment_lib.build_experiment(config)
  state = exp.init_state()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  batches = exp.train_batches(0)
  for _ in range(2):  # compile, warm up
    state, metrics = exp.step_fn(state, next(batches))
  jax.block_until_ready(state)
  meta = {'config': json.loads(config_lib.to_json(config))}
  checkpointer = ckpt_lib.Checkpointer(tempfile.mkdtemp(), keep=2, asynchronous=mode == 'async')
  blocked, start = [], time.perf_counter()
  for step in range(1, saves * every + 1):
    state, metrics = exp.step_fn(state, next(batches))
    if step % every:
      continue
    jax.device_get(metrics)
    t = time.perf_counter()
    checkpointer.save(step, state, {**meta, 'step': step})
    blocked.append(time.perf_counter() - t)
  t = time.perf_counter()
  checkpointer.close()
  close_s = time.perf_counter() - t
  result = {
      'spec': spec,
      'mode': mode,
      'state_MiB': round(nbytes / 2**20, 1),
      'saves': saves,
      'every': every,
      'save_blocked_s': [round(b, 3) for b in blocked],
      'save_blocked_median_s': round(float(np.median(blocked)), 3),
      'close_s': round(close_s, 3),
      'loop_incl_close_s': round(time.perf_counter() - start, 2),
  }
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
