"""host_memory: a compiled program's later calls find their temporary buffer mapped (no page faults through it).

Each case is a fresh process (the setting must precede JAX's CPU backend): a jitted program with
a temporary buffer of about 100 MiB is called three times to warm up, then ten times (0.1 s apart,
so that the previous call has freed its buffer), each counting the process's minor page faults.
By default every call faults through its whole buffer again; kept, the heap settles after a few
calls (it may grow by a buffer now and then as allocations of other threads fragment it) and most
calls fault nothing.
"""

import os
import subprocess
import sys

import pytest

_PROGRAM = r'''
import resource, sys, time
mode = sys.argv[1]
if mode == 'call':
  from tarflow_jax import host_memory
  assert host_memory.reuse_freed_memory()
elif mode == 'command':
  from tarflow_jax.cli import _common
  _common.prepare_process()  # what every command line's `_common.run` does first
import jax, jax.numpy as jnp

def f(x):  # x (1024, 8192) float32, 32 MiB; temporaries of its size
  y = jnp.cumsum(x * 2.0, axis=1)
  return (jnp.cumsum(y, axis=0) * jnp.cumsum(y[::-1], axis=1)).sum()

x = jax.random.normal(jax.random.key(0), (1024, 8192))
compiled = jax.jit(f).lower(x).compile()
temp_pages = compiled.memory_analysis().temp_size_in_bytes // 4096
for _ in range(3):
  compiled(x).block_until_ready()
faults = []
for _ in range(10):
  time.sleep(0.1)  # the previous call's buffer is freed on a worker thread after its result is ready
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(temp_pages, *faults)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the setting is for glibc on Linux')
def test_reused_buffers_are_not_faulted_in_again_at_each_call():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # one CPU device, compiled as a user's program is
  runs = {mode: subprocess.Popen([sys.executable, '-c', _PROGRAM, mode], stdout=subprocess.PIPE, text=True, env=env)
          for mode in ('default', 'call', 'command')}
  faulting = {}  # mode: the number of calls (of 10) that faulted through half their buffer or more
  for mode, process in runs.items():
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, mode
    temp_pages, *faults = map(int, out.split())
    faulting[mode] = sum(f >= temp_pages // 2 for f in faults)
  assert temp_pages * 4096 >= 64 << 20
  if faulting['default'] < 9:
    pytest.skip(f'this platform does not map the buffers afresh at each call ({faulting})')
  assert faulting['call'] <= 5, faulting
  assert faulting['command'] <= 5, faulting
