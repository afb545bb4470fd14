"""Host memory of a CPU process: keep freed memory for reuse instead of returning it to the system.

Each call of a compiled XLA program on the CPU allocates its temporary buffer (the activations a
training step keeps for its backward pass: 110 MB for `configs/demo.py`) and frees it at the end.
Under glibc's default malloc, a thread other than the main one allocates from its own arena,
which cannot hold a block that large, so the block is mapped afresh from the system at every call
and unmapped after it: the step then page-faults through all of it again each time (27,000 faults
of 4 KiB per demo step). `reuse_freed_memory` turns that off for the process: one arena for every
thread, no mapping of large blocks, no trimming below 1 GiB of free memory at the top of the heap,
so that the second call of a program finds its buffer already mapped (docs/benchmarks.md).

It must run before JAX starts its CPU backend and before TensorFlow is imported: the threads they
start pick their arena on their first allocation, and a thread keeps its arena. The command lines
call it on start-up on the CPU (`cli/_common.run`), except `sample`: sequential decoding, thousands
of small steps, runs about 10% slower with it (docs/benchmarks.md); a script or notebook that
trains on the CPU calls it first. The process keeps the memory it has freed (up to 1 GiB at the
top of its heap) instead of handing it back.
"""

import ctypes
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_AT_TOP = 1 << 30  # bytes of free memory at the top of the heap kept before trimming


def reuse_freed_memory() -> bool:
  """Makes this process's malloc keep and reuse freed memory (module docstring); True where it applied.

  Only on Linux with glibc; elsewhere (macOS, musl) it does nothing and returns False.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):  # not glibc
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_AT_TOP)))
