"""One training run per workdir: a lock file that names the run holding it.

`acquire(workdir)` takes `{workdir}/writer.lock` for this run before the run writes anything
there; `Lock.release` removes it when the run ends. The file (JSON) names the holder: host,
process id and start time, and what tells a live process from a dead one on the same
host: the boot id, the process's own start time (so a reused pid is not taken for the holder)
and its pid namespace (a container on the same host cannot see the holder's processes).

- A live holder: `WorkdirInUseError`, naming the workdir and the holder; nothing is written.
- A holder that died on this host (kill -9, a crash, a reboot): its lock is taken over, with a
  warning naming it.
- A holder on another host (or in another container) cannot be checked from here: refused, and
  the message names the flag that takes the workdir over (`take_over=True`), for a run that is
  known to be dead (a lost host). A lock is never taken over silently.
- The processes of one multi-process run are one writer: process 0 takes the lock and the others
  learn from it whether the run may start.

The file is created with O_EXCL, which local and network file systems (NFSv3 and later) do
atomically; on object storage (gs://...) the check and the write are two steps, so two runs
started within the same moment may both pass.
"""

import dataclasses
import datetime
import json
import os
import secrets
import socket
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np

from tarflow_jax import errors

LOCK_NAME = 'writer.lock'
TAKE_OVER_FLAG = '--take_over_workdir'


class WorkdirInUseError(errors.UserError):
  """Another run holds the workdir; the message names it and what to do."""


class WorkdirNotWritableError(errors.UserError):
  """The workdir cannot be created or written."""


@dataclasses.dataclass
class Lock:
  """The lock this run holds on `path`; `release` removes it if it is still this run's."""
  path: str
  token: str

  def release(self) -> None:
    try:
      holder = _read(self.path)
      if holder is not None and holder.get('token') == self.token:
        epath.Path(self.path).unlink(missing_ok=True)
    except OSError as e:  # a vanished mount: the run's own error, if any, is the one to report
      logging.warning('Could not remove the lock %s (%s); the next run on this host takes it over.', self.path, e)


def acquire(workdir: str, take_over: bool = False) -> Optional[Lock]:
  """Takes `workdir` for this run (creating the folder); returns the lock on process 0, None on the others.

  Raises WorkdirInUseError if another run holds it, WorkdirNotWritableError if it cannot be written.

  Args:
    workdir: the run's directory (local or remote).
    take_over: take a lock held from another host, whose process cannot be checked from here.
  """
  outcome, lock = None, None
  if jax.process_index() == 0:
    try:
      lock = _acquire(workdir, take_over)
    except Exception as e:  # pylint: disable=broad-except  # the others must hear of it before it is raised
      outcome = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    taken = multihost_utils.broadcast_one_to_all(np.int32(outcome is None))
    if not taken and jax.process_index() != 0:
      raise WorkdirInUseError(f'--workdir={workdir}: process 0 of this run could not take it for the run (its error '
                              'says why); nothing was written.')
  if outcome is not None:
    raise outcome
  return lock


def _acquire(workdir: str, take_over: bool) -> Lock:
  path = os.path.join(workdir, LOCK_NAME)
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirNotWritableError(f'Cannot write to --workdir={workdir!r} ({e}); choose a writable '
                                  'directory.') from e
  me = _this_process()
  for _ in range(3):  # a lock that goes away while we look is looked at again
    if _create(path, me):
      return Lock(path, me['token'])
    holder = _read(path)
    if holder is None:
      continue
    if 'unreadable' in holder:
      raise WorkdirInUseError(f'--workdir={workdir}: its lock {path} cannot be read ({holder["unreadable"]}): another '
                              'run may be starting there. If none is, remove that file and rerun.')
    alive = _alive(holder, me)
    if alive:
      command = _command_line(holder['pid'])
      raise WorkdirInUseError(f'--workdir={workdir} is in use by another training run ({_describe(holder)}'
                              f'{f": {command}" if command else ""}); nothing was written. Wait for that run to end, '
                              f'or use another --workdir. (Lock: {path}.)')
    if alive is None and not take_over:
      raise WorkdirInUseError(
          f'--workdir={workdir} is held by a training run on another host ({_describe(holder)}), which cannot be '
          f'checked from here; nothing was written. If that run is no longer running (a lost host), rerun with '
          f'{TAKE_OVER_FLAG} to take the workdir over; otherwise wait for it, or use another --workdir. '
          f'(Lock: {path}.)')
    logging.warning('Taking over --workdir=%s from a run that %s (%s).', workdir,
                    'is no longer running' if alive is False else f'was taken over with {TAKE_OVER_FLAG}',
                    _describe(holder))
    _set_aside(path, holder)
  raise WorkdirInUseError(f'--workdir={workdir}: its lock {path} keeps changing: another run is starting there.')


def _create(path: str, me: dict) -> bool:
  """Writes the lock if there is none; False if there is one."""
  text = json.dumps(me, indent=1)
  try:
    if '://' in path:
      lock = epath.Path(path)
      if lock.exists():
        return False
      lock.write_text(text)
      return True
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  except OSError as e:
    raise WorkdirNotWritableError(f'Cannot write to --workdir={os.path.dirname(path)!r} ({e}); choose a writable '
                                  'directory.') from e
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


def _read(path: str) -> Optional[dict]:
  """The holder written in the lock file; None if there is no file. A file being written reads as an unknown holder."""
  try:
    text = epath.Path(path).read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError as e:
    return {'unreadable': f'{type(e).__name__}: {e}'}
  return holder if isinstance(holder, dict) else {'unreadable': f'not a JSON object: {text[:100]!r}'}


def _set_aside(path: str, holder: dict) -> None:
  """Removes a dead holder's lock, unless another run replaced it since it was read."""
  if _read(path) == holder:
    epath.Path(path).unlink(missing_ok=True)


def _alive(holder: dict, me: dict) -> Optional[bool]:
  """Whether the holder's process runs: True, False, or None where it cannot be checked from here."""
  if holder.get('host') != me['host']:
    return None
  if holder.get('boot_id') and me['boot_id'] and holder['boot_id'] != me['boot_id']:
    return False  # the host was restarted since
  if holder.get('pid_namespace') != me['pid_namespace'] or not isinstance(holder.get('pid'), int):
    return None
  pid = holder['pid']
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  started = _process_start(pid)
  return not (started is not None and holder.get('process_start') not in (None, started))


def _this_process() -> dict:
  return {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
      'processes': jax.process_count(),
      'boot_id': _read_text('/proc/sys/kernel/random/boot_id'),
      'process_start': _process_start(os.getpid()),
      'pid_namespace': _pid_namespace(),
      'token': secrets.token_hex(8),
  }


def _describe(holder: dict) -> str:
  words = f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}'
  if holder.get('started'):
    words += f', started {holder["started"]}'
  if holder.get('processes', 1) > 1:
    words += f', {holder["processes"]} processes'
  return words


def _command_line(pid: int) -> str:
  """The command line of a process on this host (Linux), '' where it cannot be read."""
  text = _read_text(f'/proc/{pid}/cmdline')
  words = ' '.join((text or '').replace('\0', ' ').split())
  return words if len(words) <= 300 else f'{words[:300]}...'


def _process_start(pid: int) -> Optional[int]:
  """The process's start time in clock ticks since boot (Linux), which a reused pid does not share."""
  stat = _read_text(f'/proc/{pid}/stat')
  if not stat:
    return None
  return int(stat.rpartition(')')[2].split()[19])  # field 22; the command name before ')' may hold spaces


def _pid_namespace() -> Optional[str]:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def _read_text(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None
