"""Test set-up: 8 fake CPU devices before JAX starts, and TensorFlow kept off any GPU."""

import os
import tempfile

# XLA:CPU runs each fake device on its own thread and meets them at every collective; on an oversubscribed 2-core
# host a thread can be starved past the default 40 s, which aborts the process. Allow 10 minutes instead.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
    ' --xla_cpu_collective_call_warn_stuck_timeout_seconds=60'
).strip()
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache per test session (inherited by the CLI subprocesses): most tests compile the same
# few smoke train steps, and a resume test compiles its step twice; a cached executable is the same program, so
# bitwise checks are unaffected. (A resume test: 98 → 53 s on 2 cores.) Set JAX_COMPILATION_CACHE_DIR to keep
# one across sessions.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='mtlmatch-test-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import gzip  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_idx(path, array: np.ndarray) -> None:
  """An IDX file: magic 0 0 0x08 (uint8) ndim, big-endian int32 dims, raw bytes; gzipped."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope='session')
def fashion_idx_dir(tmp_path_factory) -> str:
  """A tiny stand-in for Debian's Fashion-MNIST IDX files (600 train / 200 test images of 28×28)."""
  d = tmp_path_factory.mktemp('fashion_idx')
  rng = np.random.default_rng(0)
  for split, n in (('train', 600), ('t10k', 200)):
    items = np.arange(n) % 10
    images = (rng.random((n, 28, 28)) * 60 + items[:, None, None] * 19).astype(np.uint8)
    write_idx(d / f'{split}-images-idx3-ubyte.gz', images)
    write_idx(d / f'{split}-labels-idx1-ubyte.gz', items.astype(np.uint8))
  return str(d)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS cache for the session, so each generated dataset is prepared once."""
  return str(tmp_path_factory.mktemp('tfds'))


FAST_COMPILE = {
    'xla_cpu_use_fusion_emitters': False,
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
}


def compile_fast(lowered):
  """Compiles a lowered program with cheap XLA:CPU options (the tests' programs are tiny: compile time dominates)."""
  try:
    return lowered.compile(compiler_options=FAST_COMPILE)
  except Exception as e:  # pylint: disable=broad-except
    if 'No such compile option' not in str(e):  # an XLA without these options: compile as the train loop does
      raise
    return lowered.compile()


def set_keys(config, **overrides):
  """``set_keys(config, **{'weighting.name': 'pcgrad'})``: `config_lib.set_keys` with keyword overrides."""
  from mtlmatch import config_lib  # pylint: disable=g-import-not-at-top  (after the device flags above)

  return config_lib.set_keys(config, overrides)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
