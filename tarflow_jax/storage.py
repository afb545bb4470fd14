"""Writing to storage that can refuse: why a write failed, outputs whole or not at all, quiet background I/O.

- `WriteError`: what a run raises when storage refuses one of its writes.
- `write_failure_cause`: "no space left on device (ENOSPC)" for a write that the file system or
  storage refused (no space, a quota, permission, a read-only or vanished mount); None for
  anything else, which is a bug and keeps its traceback. `what_to_do` and `free_space` complete
  the message.
- `atomic_output` (and `save_npz`, `save_json`): a file that appears whole under its name or not at all.
- `quiet_background_io` / `join_background_writers`: Orbax (checkpoints) and clu (TensorBoard)
  write and read in background threads. A failure there is re-raised in the caller's thread, where
  the caller reports it once; the threads also log it, each with a traceback, and Orbax abandons
  the item's other writes or reads, which then print "Event loop is closed", "exception was never
  retrieved" and, when collected (at interpreter shutdown if not before), "Exception ignored"
  tracebacks. Those duplicates are dropped, and after a failed write the writer threads are
  waited for and their writes collected.
"""

import contextlib
import errno
import gc
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
import traceback
from typing import Optional

from etils import epath
import numpy as np

from tarflow_jax import errors

# What a user does about each refusal of the file system.
_FIXES = {
    errno.ENOSPC: 'Free space on that file system (or use a --workdir on another), then rerun.',
    errno.EDQUOT: 'Free space within your quota there (or use a --workdir elsewhere), then rerun.',
    errno.EFBIG: 'That file system takes no file this large: use a --workdir on another.',
    errno.EACCES: 'Make the workdir writable for this user, then rerun.',
    errno.EPERM: 'Make the workdir writable for this user, then rerun.',
    errno.EROFS: 'The file system is mounted read-only: remount it writable (or use another --workdir), then rerun.',
    errno.ENOENT: 'The workdir (or its file system) went away while writing: check that it is mounted, then rerun.',
    errno.ESTALE: 'The network file system went away while writing: check that it is mounted, then rerun.',
    errno.ENOTCONN: 'The file system went away while writing: check that it is mounted, then rerun.',
    errno.ENODEV: 'The file system went away while writing: check that it is mounted, then rerun.',
    errno.EIO: 'The disk reported an I/O error: check it (dmesg) before rerunning.',
}
# Storage that reports no errno (cloud buckets through TensorStore) names its refusal by a status code.
_STATUS_CODES = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'NOT_FOUND', 'UNAVAILABLE', 'DEADLINE_EXCEEDED',
                 'UNAUTHENTICATED', 'DATA_LOSS')
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_BACKGROUND_IO = tuple(f'{os.sep}{name}{os.sep}' for name in ('orbax', 'clu'))
_JOIN_TIMEOUT_S = 120.0


class WriteError(errors.UserError):
  """Storage refused a write (no space, a quota, permission, a vanished mount); says what, where and why."""


def write_failure_cause(error: BaseException) -> Optional[str]:
  """Why a write failed, if the storage refused it ("no space left on device (ENOSPC)"); else None.

  Reads, through the chain of causes, an OSError's errno, TensorStore's `os_error_code` and the
  errno texts in TensorFlow's messages, then the status codes of remote storage.
  """
  chain = _chain(error)
  for e in chain:
    code = e.errno if isinstance(e, OSError) else None
    match = _OS_ERROR_CODE.search(str(e))
    if code not in _FIXES and match:
      code = int(match.group(1))
    if code not in _FIXES:
      code = next((c for c in _FIXES if os.strerror(c) in str(e)), None)
    if code is not None:
      text = os.strerror(code)
      return f'{text[0].lower()}{text[1:]} ({errno.errorcode[code]})'
  for e in chain:
    lines = str(e).strip().splitlines()
    if lines and lines[0].startswith(_STATUS_CODES):
      return lines[0][:300]
  return None


def what_to_do(cause: str) -> str:
  """The advice for a cause from `write_failure_cause`."""
  code = next((c for c in _FIXES if f'({errno.errorcode[c]})' in cause), None)
  return _FIXES[code] if code is not None else 'Fix the storage, then rerun.'


def free_space(path: str) -> str:
  """'the file system at /mnt: 12.0 KiB of 4.0 MiB free' for a local path; '' where unknown."""
  if '://' in path:
    return ''
  mount = os.path.abspath(path)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  try:
    usage = shutil.disk_usage(mount)
  except OSError:
    return ''
  return f'the file system at {mount}: {_bytes(usage.free)} of {_bytes(usage.total)} free'


@contextlib.contextmanager
def atomic_output(path: str, mode: str = 'wb'):
  """Opens `path` for writing so that it appears whole or not at all; makes its folder.

  A local file is written under a temporary name in its folder and renamed over `path` once
  closed (os.replace: readers see the old file or the new one, never part of it); if writing
  fails, the temporary file is removed and `path` is as it was. A remote object (gs://...) is
  written directly: it appears only once its upload completes.
  """
  if '://' in path:
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open(mode) as f:
      yield f
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
  try:
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:  # 0o666 less the umask
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def save_npz(path: str, **arrays) -> str:
  """np.savez by way of `atomic_output`; as np.savez, a path without .npz gets it. Returns the path written."""
  path = path if path.endswith('.npz') else f'{path}.npz'
  with atomic_output(path) as f:
    np.savez(f, **arrays)
  return path


def save_json(path: str, value) -> None:
  """`value` as indented JSON, by way of `atomic_output`."""
  with atomic_output(path, 'w') as f:
    json.dump(value, f, indent=2)


class _DuplicateReports(logging.Filter):
  """Drops the ERROR records with a traceback that Orbax's and clu's threads log (their callers re-raise it), and
  asyncio's "exception was never retrieved" of an abandoned write that storage refused (raised in TensorStore,
  its exception carries no Python traceback to tell where it came from)."""

  def filter(self, record):
    if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
      return True
    if record.name == 'asyncio' and write_failure_cause(record.exc_info[1]) is not None:
      return False
    files = [record.pathname] + [frame.filename for frame in traceback.extract_tb(record.exc_info[2])]
    return not any(name in f for f in files for name in _BACKGROUND_IO)


_quiet = False


def quiet_background_io() -> None:
  """Drops, for this process, the duplicate reports of a failed write or read (see the module's docstring).

  Idempotent.
  """
  global _quiet
  if _quiet:
    return
  _quiet = True
  for name in ('absl', 'asyncio'):  # Orbax and clu log through absl; a dropped asyncio task through asyncio
    logging.getLogger(name).addFilter(_DuplicateReports())
  previous = sys.unraisablehook

  def hook(unraisable):
    exc, code = unraisable.exc_value, getattr(unraisable.object, 'cr_code', None)
    abandoned = ((isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed')
                 or (code is not None and any(name in code.co_filename for name in _BACKGROUND_IO)))
    if not abandoned:
      previous(unraisable)

  sys.unraisablehook = hook


def join_background_writers() -> None:
  """After a failed write: waits for Orbax's writer threads and collects the writes it abandoned.

  Orbax's own wait ends at the first failed write, while its other writer threads may still run;
  left running they would write and log during interpreter shutdown.
  """
  deadline = time.monotonic() + _JOIN_TIMEOUT_S
  for thread in threading.enumerate():
    if type(thread).__module__.startswith('orbax.') and thread is not threading.current_thread():
      with contextlib.suppress(Exception):  # Orbax's threads raise their failure (the one reported) from join
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
  gc.collect()


def _chain(error: BaseException) -> list:
  """`error`, then its causes and contexts."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024:
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'
