"""Kill a training run at random moments, restart it each time, and check it ends bitwise where an uninterrupted run
ends.

  python experiments/kill_test.py --kills 20                  # + 2 SIGTERMs during checkpoint writes (default)
  python experiments/kill_test.py --kills 5 --sigterms 0 --config=configs/affect.py:mtl,smoke --set seed=3

What it does (about 10-15 s per process on a 2-core CPU, most of it importing TensorFlow and JAX):

1. a *reference* run of ``--config`` (default ``configs/affect.py:dm+coann+dgr,smoke`` with the stateful FAMO
   weighting, checkpoints every step, an evaluation every 2 steps) in its own workdir, without interruption
   (it runs alongside step 2);
2. a *victim* run of the same config in another workdir, interrupted by a planned sequence of events: ``--kills``
   SIGKILLs (kill -9) aimed in turn at each of three phases — a train step, a checkpoint write (the part of the
   asynchronous orbax save the loop waits for; the rest of the write, with its clean-up of old steps, runs during the
   next steps, so a kill in a step may also land in a write) and an evaluation — and ``--sigterms`` SIGTERMs (what
   a preempted cloud VM receives) aimed at checkpoint writes. Each event waits for the 1st or 2nd start of its phase
   in that process, then for a random fraction of that phase's shortest observed duration, then signals. The victim
   is restarted after each event and resumes from its workdir; after the last event it runs to the end;
3. compares every leaf of the final train state read back from each run's last checkpoint (params, batch
   statistics, optimizer and weighting state, RNG, step, skipped count) byte for byte, and the final metrics.

The processes run ``train.train_and_evaluate`` itself, with markers printed around each phase (``@@ save begin 7``)
so the driver can aim and can tell from the victim's last marker where it actually died. Every process shares a
persistent XLA compilation cache, so a restart does not recompile (as a production restart with a cache would not).
Checked: no kill leaves an unreadable step behind (nothing is ever moved to ``checkpoints_corrupt``), no temporary
orbax directory survives the next start, a SIGTERM'd process exits 0 after saving, and its successor
resumes from exactly that step. Exit status 0 when all of it holds. The quick CI version is
``tests/test_faults.py::test_kill_restart_is_bitwise_equal`` (3 kills: in a step, a checkpoint write, an evaluation);
a SIGTERM inside a checkpoint write is tested in-process there too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ('step', 'save', 'eval')
DEFAULT_CONFIG = 'configs/affect.py:dm+coann+dgr,smoke'
DEFAULT_SET = {'weighting.name': 'famo', 'checkpoint_every': 1, 'log_every': 1, 'eval_every': 2}
# Before a phase has been seen, aim within this many seconds of its start.
DEFAULT_DURATION = {'step': 0.05, 'save': 0.3, 'eval': 0.2}
MARK = '@@'


@dataclasses.dataclass(frozen=True)
class Event:
  """One interruption: ``signal`` ('kill' = SIGKILL, 'term' = SIGTERM) sent during the ``occurrence``-th start of
  ``phase`` in a process, ``fraction`` of the phase's shortest observed duration after it began."""

  signal: str
  phase: str
  occurrence: int
  fraction: float


@dataclasses.dataclass
class ChildRun:
  """What one process did: exit code, the markers it printed, where it died, how long it took."""

  event: Optional[Event]
  returncode: int
  markers: list
  restored: Optional[int]  # the step it resumed from (0: fresh start)
  died_in: str  # 'step 5', 'save 6', 'eval 4', 'between', or 'finished'/'interrupted 7'
  sent_during: str  # the phase (and step) in progress when the signal was sent, or 'between'
  sigterm_phase: Optional[str]  # the phase the SIGTERM handler saw, if any
  seconds: float
  log: str


def plan(kills: int, sigterms: int, seed: int) -> list[Event]:
  """Kills spread evenly over the three phases (in a random order), SIGTERMs at checkpoint writes, shuffled."""
  rng = random.Random(seed)
  phases = [PHASES[i % len(PHASES)] for i in range(kills)]
  events = [Event('kill', p, rng.randint(1, 2), rng.random()) for p in phases]
  # SIGTERMs aim at the first half of the shortest write seen, so that they land inside one.
  events += [Event('term', 'save', rng.randint(1, 2), 0.5 * rng.random()) for _ in range(sigterms)]
  rng.shuffle(events)
  return events


def _child_env(cache_dir: str) -> dict:
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    flags += ' --xla_force_host_platform_device_count=8'
  if '--xla_cpu_collective_call_terminate_timeout_seconds' not in flags:
    # On an oversubscribed CPU a fake device's thread can wait past XLA's default 40 s at a collective and abort.
    flags += ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
  env['XLA_FLAGS'] = flags.strip()
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_child(
    config: str,
    overrides: dict,
    workdir: str,
    *,
    env: dict,
    log_path: str,
    dump: Optional[str] = None,
    event: Optional[Event] = None,
    durations: Optional[dict] = None,
    timeout: float = 600,
    started: Optional[threading.Event] = None,
) -> ChildRun:
  """Runs one training process in ``workdir`` and, if ``event`` is given, interrupts it as planned.

  ``started`` is set once the process has built its experiment (its data are prepared) or has ended.
  """
  durations = durations if durations is not None else {}
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      '--child',
      f'--config={config}',
      f'--workdir={workdir}',
      f'--overrides={json.dumps(overrides)}',
  ] + ([f'--dump={dump}'] if dump else [])
  t0 = time.monotonic()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)
    lines: queue.Queue = queue.Queue()

    def read():
      for line in proc.stdout:
        lines.put(line)
      lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    markers: list = []
    try:
      returncode, sent_at = _follow(proc, lines, markers, durations, event, workdir, log_path, t0, timeout, started)
    finally:
      if started is not None:
        started.set()
  words = [w for w, _ in markers]
  restored = next((int(w[1]) for w in words if w[0] == 'restored'), None)
  sigterm = next((w[1] for w in words if w[0] == 'sigterm'), None)
  ended = [w for w in words if w[0] in ('finished', 'interrupted')]
  phase_marks = [w for w in words if w[0] in PHASES]
  if ended:
    died_in = ' '.join(ended[-1][:2])
  elif phase_marks and phase_marks[-1][1] == 'begin':
    died_in = f'{phase_marks[-1][0]} {phase_marks[-1][2]}'
  else:
    died_in = 'between'
  # Where the signal was sent, by the process's own clock stamps: the phase begun before and not ended by then.
  sent_during = 'between'
  begun = [w for w, t in markers if w[0] in PHASES and w[1] == 'begin' and sent_at is not None and t <= sent_at]
  if begun:
    ends = [t for w, t in markers if w == [begun[-1][0], 'end', begun[-1][2]]]
    if not ends or ends[0] > sent_at:
      sent_during = f'{begun[-1][0]} {begun[-1][2]}'
  with open(log_path) as f:
    log_text = f.read()
  return ChildRun(event, returncode, words, restored, died_in, sent_during, sigterm, time.monotonic() - t0, log_text)


def _follow(proc, lines, markers, durations, event, workdir, log_path, t0, timeout, started):
  """Reads the process's markers until it ends, sending ``event``'s signal when its moment comes."""
  began, seen, sent_at = {}, 0, None
  while True:
    try:
      item = lines.get(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except queue.Empty:
      proc.kill()
      raise RuntimeError(f'training process in {workdir} hung for {timeout} s; see {log_path}') from None
    if item is None:
      break
    if not item.startswith(MARK):
      continue
    *words, stamp = item.split()[1:]
    markers.append((words, float(stamp)))
    if started is not None and words[0] == 'restored':
      started.set()
    if len(words) == 3 and words[1] == 'begin':
      began[words[0]] = float(stamp)
    elif len(words) == 3 and words[1] == 'end' and words[0] in began:
      durations[words[0]] = min(durations.get(words[0], float('inf')), float(stamp) - began[words[0]])
    if event is not None and sent_at is None and words[:2] == [event.phase, 'begin']:
      seen += 1
      if seen == event.occurrence:
        time.sleep(event.fraction * durations.get(event.phase, DEFAULT_DURATION[event.phase]))
        sent_at = time.time()
        proc.send_signal(signal.SIGKILL if event.signal == 'kill' else signal.SIGTERM)
  return proc.wait(), sent_at


def load_dump(path: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top

  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def compare_dumps(a: dict, b: dict) -> list[str]:
  """Names of the leaves that differ in any byte (or exist in one dump only)."""
  return sorted(
      k
      for k in set(a) | set(b)
      if k not in a
      or k not in b
      or a[k].dtype != b[k].dtype
      or a[k].shape != b[k].shape
      or a[k].tobytes() != b[k].tobytes()
  )


def run_kill_test(
    *,
    kills: int = 0,
    sigterms: int = 0,
    events: Optional[list[Event]] = None,
    config: str = DEFAULT_CONFIG,
    overrides: Optional[dict] = None,
    workroot: Optional[str] = None,
    seed: int = 0,
    total_steps: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> dict:
  """The whole test (see the module docstring); returns a summary dict whose ``ok`` says whether everything held.

  ``events``: an explicit plan instead of ``plan(kills, sigterms, seed)``.
  """
  t_start = time.monotonic()
  workroot = workroot or tempfile.mkdtemp(prefix='kill_test_')
  os.makedirs(os.path.join(workroot, 'logs'), exist_ok=True)
  events = list(events) if events is not None else plan(kills, sigterms, seed)
  overrides = {**DEFAULT_SET, **(overrides or {})}
  overrides.setdefault('total_steps', total_steps or 3 * len(events) + 6)
  env = _child_env(os.path.join(workroot, 'jax_cache'))
  problems = []

  log(f'config {config} {json.dumps(overrides)}; workroot {workroot}')
  # The uninterrupted reference runs alongside the victim's sequence (it shares nothing with it but the XLA cache),
  # from when the first victim has its data prepared (two processes must not generate the same TFDS data at once).
  reference: list = []
  data_ready = threading.Event()

  def run_reference():
    data_ready.wait()
    reference.append(
        run_child(
            config,
            overrides,
            os.path.join(workroot, 'reference'),
            env=env,
            log_path=os.path.join(workroot, 'logs', 'reference.log'),
            dump=os.path.join(workroot, 'reference.npz'),
        )
    )

  ref_thread = threading.Thread(target=run_reference, daemon=True)
  ref_thread.start()

  victim = os.path.join(workroot, 'victim')
  durations: dict = {}
  runs, previous = [], None
  for i, event in enumerate(events + [None]):
    run = run_child(
        config,
        overrides,
        victim,
        env=env,
        log_path=os.path.join(workroot, 'logs', f'victim_{i}.log'),
        dump=os.path.join(workroot, 'victim.npz'),
        event=event,
        durations=durations,
        started=data_ready if i == 0 else None,
    )
    runs.append(run)
    what = (
        'to the end' if event is None else f'{event.signal} at {event.phase} #{event.occurrence} +{event.fraction:.2f}'
    )
    log(
        f'#{i:2d} {what:<30s} resumed from {run.restored!s:>3s}  '
        f'{"" if event is None else "sent during " + run.sent_during:<20s} rc {run.returncode:3d}  '
        f'{"died in" if run.returncode < 0 else "ended"}: {run.died_in:<15s}'
        f'{"handler ran during " + run.sigterm_phase if run.sigterm_phase else ""}  {run.seconds:5.1f} s'
    )
    if previous is not None and previous.event is not None and previous.event.signal == 'term':
      stopped = [int(w[1]) for w in previous.markers if w[0] == 'interrupted']
      if stopped and run.restored != stopped[0]:
        problems.append(f'run {i} resumed from {run.restored}, expected the SIGTERM checkpoint {stopped[0]}')
    if event is None:
      if run.returncode != 0 or run.died_in.split()[0] != 'finished':
        problems.append(f'the final run failed (rc {run.returncode}): {run.log[-2000:]}')
    elif run.returncode == 0 and run.died_in.split()[0] == 'finished':
      problems.append(f'run {i} finished before its {event.signal} landed: use more total_steps')
      break
    elif event.signal == 'kill' and run.returncode != -signal.SIGKILL:
      problems.append(f'run {i}: expected death by SIGKILL, got rc {run.returncode}: {run.log[-2000:]}')
    elif event.signal == 'term' and (run.returncode != 0 or run.died_in.split()[0] != 'interrupted'):
      problems.append(
          f'run {i}: expected a clean exit after SIGTERM, got rc {run.returncode}, {run.died_in}: ' f'{run.log[-2000:]}'
      )
    previous = run

  ref_thread.join()
  ref = reference[0] if reference else None
  if ref is None or ref.returncode != 0 or ref.died_in.split()[0] != 'finished':
    raise RuntimeError(f'the reference run failed:\n{ref.log[-3000:] if ref else "(no result)"}')
  log(f'reference run (alongside): rc {ref.returncode}, {ref.seconds:.1f} s')

  checkpoints = os.path.join(victim, 'checkpoints')
  leftovers = [n for n in os.listdir(checkpoints) if 'tmp' in n] if os.path.isdir(checkpoints) else []
  corrupt = (
      sorted(os.listdir(os.path.join(victim, 'checkpoints_corrupt')))
      if os.path.isdir(os.path.join(victim, 'checkpoints_corrupt'))
      else []
  )
  if leftovers:
    problems.append(f'temporary checkpoint directories left behind: {leftovers}')
  if corrupt:
    problems.append(f'kills produced unreadable checkpoints (moved aside): {corrupt}')
  mismatched, metrics_equal = ['<no final state>'], False
  if os.path.exists(os.path.join(workroot, 'victim.npz')):
    mismatched = compare_dumps(
        load_dump(os.path.join(workroot, 'reference.npz')), load_dump(os.path.join(workroot, 'victim.npz'))
    )
    with open(os.path.join(workroot, 'reference', 'results.json')) as f1, open(
        os.path.join(victim, 'results.json')
    ) as f2:
      metrics_equal = json.load(f1)['metrics'] == json.load(f2)['metrics']
  if mismatched:
    problems.append(f'final train state differs from the reference in {len(mismatched)} leaves: {mismatched[:5]}')
  if not metrics_equal:
    problems.append('final metrics differ from the reference')

  interrupted = [r for r in runs if r.event is not None]
  landed = [
      r
      for r in interrupted
      if (r.returncode == -signal.SIGKILL and r.event.signal == 'kill')
      or (r.returncode == 0 and r.event.signal == 'term' and r.died_in.startswith('interrupted'))
  ]
  summary = {
      'config': config,
      'overrides': overrides,
      'events_planned': len(events),
      'kills_tried': sum(e.signal == 'kill' for e in events),
      'kills_landed': sum(r.event.signal == 'kill' for r in landed),
      'kills_by_phase_at_death': _count(r.died_in.split()[0] for r in landed if r.event.signal == 'kill'),
      'sigterms_tried': sum(e.signal == 'term' for e in events),
      'sigterms_clean_exit': sum(r.event.signal == 'term' for r in landed),
      'sigterms_sent_during': _count(r.sent_during.split()[0] for r in landed if r.event.signal == 'term'),
      'sigterm_handler_ran_during': _count(r.sigterm_phase or 'never' for r in landed if r.event.signal == 'term'),
      'restarts': len(runs) - 1,
      'resumed_from': [r.restored for r in runs],
      'bitwise_equal': not mismatched,
      'leaves_compared': len(load_dump(os.path.join(workroot, 'reference.npz'))),
      'metrics_equal': metrics_equal,
      'tmp_dirs_left': leftovers,
      'moved_to_corrupt': corrupt,
      'wall_s': round(time.monotonic() - t_start, 1),
      'workroot': workroot,
      'problems': problems,
      'ok': not problems,
  }
  return summary


def _count(items) -> dict:
  out: dict = {}
  for item in items:
    out[item] = out.get(item, 0) + 1
  return out


# ----------------------------------------------------------------------------------------------------------------
# The training process: train_and_evaluate with markers around each phase.


def _child(config_spec: str, workdir: str, overrides: dict, dump: Optional[str]) -> int:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import logging  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(asctime)s %(levelname)s %(message)s')
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mtlmatch import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mtlmatch import config_lib  # pylint: disable=g-import-not-at-top
  from mtlmatch import evaluators  # pylint: disable=g-import-not-at-top
  from mtlmatch import train  # pylint: disable=g-import-not-at-top
  from mtlmatch import experiment as experiment_lib

  phase = {'now': 'start', 'step': 0}

  def mark(*words):
    print(MARK, *words, f'{time.time():.6f}', flush=True)

  def around(name, fn, step_of):
    def wrapped(*args, **kwargs):
      step = step_of(*args, **kwargs)
      phase['now'] = name
      mark(name, 'begin', step)
      out = fn(*args, **kwargs)
      if name == 'step':
        out = jax.block_until_ready(out)
      mark(name, 'end', step)
      phase['now'] = 'loop'
      return out

    return wrapped

  build, restore_latest = experiment_lib.build_experiment, ckpt_lib.Checkpointer.restore_latest

  def build_marked(*args, **kwargs):
    exp = build(*args, **kwargs)

    def step_of(state, batch):
      del state, batch
      phase['step'] += 1
      return phase['step']  # the step this call produces, counted here: no device sync to know it

    return dataclasses.replace(exp, step_fn=around('step', exp.step_fn, step_of))

  def restore_marked(self, *args, **kwargs):
    restored = restore_latest(self, *args, **kwargs)
    phase['step'] = 0 if restored is None else int(restored[1]['step'])
    mark('restored', phase['step'])
    return restored

  handler = train.Preemption._handler  # pylint: disable=protected-access

  def handler_marked(self, signum, frame):
    mark('sigterm', phase['now'])
    handler(self, signum, frame)

  experiment_lib.build_experiment = build_marked
  evaluators.classification_metrics = around('eval', evaluators.classification_metrics, lambda *a, **k: phase['step'])
  ckpt_lib.Checkpointer.save = around('save', ckpt_lib.Checkpointer.save, lambda self, step, *a, **k: step)
  ckpt_lib.Checkpointer.restore_latest = restore_marked
  train.Preemption._handler = handler_marked  # pylint: disable=protected-access

  config = config_lib.load_config(config_spec)
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for part in path:
      target = target[part]
    target[last] = value
  results = train.train_and_evaluate(config, workdir)
  if results.get('interrupted'):
    mark('interrupted', results['step'])
    return 0
  mark('finished', results['step'])
  if dump:
    ckpt_lib.Checkpointer.restore_latest = restore_latest
    exp = build(config)
    state = restore_latest(ckpt_lib.Checkpointer(workdir), ckpt_lib.abstract_like(exp.init_state()))[0]
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    name = lambda path: '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
    np.savez(dump, **{name(path): np.asarray(leaf) for path, leaf in leaves})
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20, help='SIGKILLs, spread over step / save / eval')
  parser.add_argument('--sigterms', type=int, default=2, help='SIGTERMs during checkpoint writes')
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument(
      '--set',
      action='append',
      default=[],
      metavar='KEY=JSON',
      help=f'config override (default {DEFAULT_SET}), e.g. --set seed=3',
  )
  parser.add_argument('--total_steps', type=int, default=None, help='default: 3 per event + 6')
  parser.add_argument(
      '--data_dir', default=None, help='TFDS data dir (default $MTLMATCH_DATA_DIR or ~/tensorflow_datasets)'
  )
  parser.add_argument('--workroot', default=None, help='default: a new temporary directory')
  parser.add_argument('--seed', type=int, default=0, help='seed of the interruption plan')
  parser.add_argument('--json', default=None, help='also write the summary here')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', help=argparse.SUPPRESS)
  parser.add_argument('--overrides', default='{}', help=argparse.SUPPRESS)
  parser.add_argument('--dump', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _child(args.config, args.workdir, json.loads(args.overrides), args.dump)
  overrides = {}
  for item in args.set:
    key, _, value = item.partition('=')
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  if args.data_dir:
    overrides['data.data_dir'] = args.data_dir
  summary = run_kill_test(
      kills=args.kills,
      sigterms=args.sigterms,
      config=args.config,
      overrides=overrides,
      workroot=args.workroot,
      seed=args.seed,
      total_steps=args.total_steps,
  )
  print(json.dumps(summary, indent=1))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=1)
  return 0 if summary['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
