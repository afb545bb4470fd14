"""Test set-up: eight fake CPU devices, so sharding is tested on any machine, fast compiles, one compilation
cache, and a few parallel workers.

The suite's time is mostly XLA compiling tiny programs that then run a few steps. LLVM's
optimisations are off (`--xla_backend_optimization_level=0`: the same optimised HLO, plainer machine
code), which compiles each program about twice as fast; subprocesses with another device count take
`xla_flags(devices)`. Many tests compile the same programs (the smoke model's train step, its
sampler); a persistent compilation cache shared by the whole session, subprocesses included (they
inherit the variables), compiles each once. It lives in a fresh directory, removed at the end, so
every session starts cold. pytest.ini runs the tests in parallel, one worker per core up to four
(each worker holds eight fake devices and its own compiled programs).
"""

import os
import re
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='tarflow_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

  def pytest_unconfigure(config):
    del config
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
  del config
  return min(4, os.cpu_count() or 1)


def xla_flags(devices: int) -> str:
  """This session's XLA_FLAGS for a subprocess with `devices` fake CPU devices (1: the plain CPU)."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ['XLA_FLAGS']).split()
  return ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'] * (devices > 1))
