"""Which machine the code is for: the platform a traced program targets, and whether the host has an accelerator."""

import functools
import glob
import os
import sys

import jax


def target() -> str:
  """The platform that code traced now is lowered for: the context mesh's devices, else the default backend.

  The ahead-of-time compiler (`tarflow_jax.cli.aot`) traces on a CPU host for TPU devices; the
  mesh it sets (`jax.set_mesh`) names the target platform.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


@functools.lru_cache(maxsize=None)
def no_accelerator() -> bool:
  """True on a Linux machine with no TPU on its PCI bus (vendor Google) and no GPU device node.

  Read from the system, before JAX starts a backend. Anywhere else (another OS, a device node of
  any GPU runtime) it is False, and JAX probes its backends as usual.
  """
  if not sys.platform.startswith('linux') or not os.path.isdir('/sys/bus/pci/devices'):
    return False
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == '0x1ae0':
          return False
    except OSError:
      continue
  return not any(os.path.exists(d) for d in ('/dev/nvidiactl', '/dev/nvidia0', '/dev/dxg', '/dev/kfd', '/dev/dri'))


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
  """The size of the CPU's largest cache (the last level, usually L3) in bytes; 0 where the system does not say.

  Linux's sysfs entries of CPU 0, else `os.sysconf`. On a machine whose last-level cache is split
  into parts (AMD's core complexes) this is the part of CPU 0.
  """
  sizes = []
  for path in glob.glob('/sys/devices/system/cpu/cpu0/cache/index*/size'):
    try:
      with open(path) as f:
        text = f.read().strip().upper()
    except OSError:
      continue
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    if text[:-1].isdigit() and text[-1] in units:
      sizes.append(int(text[:-1]) * units[text[-1]])
    elif text.isdigit():
      sizes.append(int(text))
  if sizes:
    return max(sizes)
  for name in ('SC_LEVEL3_CACHE_SIZE', 'SC_LEVEL2_CACHE_SIZE'):
    try:
      size = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
      continue
    if size > 0:
      return size
  return 0
