"""What every command line shares: quiet start-up, flag parsing, the user-error boundary, reports.

`run(main)` is `absl.app.run(main)` with one difference: a mistake in the user's input (a flag,
a config value, a path, a dataset not prepared, a damaged or foreign checkpoint) ends the
program with one line, `error: ...`, on stderr and exit status 2, instead of a traceback. Real
bugs keep their traceback; `--traceback` (or TARFLOW_TRACEBACK=1) shows it for user errors too.

Start-up, on import (`tarflow_jax.cli` imports this module before any command's own imports):
the C++ start-up notes of TensorFlow (tf.data) are kept off the screen, and the INFO lines of JAX,
Optax, TensorFlow and Orbax are dropped; `--verbosity=1` shows them. Then `run` prepares the
process (`prepare_process`): on a machine with no accelerator JAX does not probe for one, and on
a CPU freed host memory is kept for reuse (except for `sample`, `run(main, reuse_freed_memory=False)`).
`run(main, exit_at_once=True)` ends the process as soon as `main` has returned and the output is
flushed, skipping the interpreter's teardown of the libraries' native state.
`check_choices` and `report` are the --what check and the table-and-JSON ending of the measuring
commands (bench, aot).
"""

import difflib
import functools
import json
import logging as py_logging
import os
import re
import sys
from typing import Callable, Optional

from tarflow_jax.cli import _quiet_import


def _verbosity_asked() -> bool:
  """Whether the command line asks absl for more than INFO (--verbosity=N or -v N, N >= 1), read before parsing."""
  argv = sys.argv[1:]
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith(('--verbosity=', '-v=')):
      value = arg.partition('=')[2]
    elif arg in ('--verbosity', '-v') and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


if not _verbosity_asked():
  # Before TensorFlow is imported: its C++ logging is read once, then.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's INFO logs once its logging has started
  _quiet_import.install(('tensorflow',))  # and the notes it prints while it loads, before that (oneDNN, CPU features)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from tarflow_jax import config_lib, errors, host_memory, platforms  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_bool('traceback', False, 'Show the traceback of user errors too (also: TARFLOW_TRACEBACK=1).')

EXIT_USER_ERROR = 2
_OVERRIDE = re.compile(r'--config\.(?P<field>[\w.]+)(=|$)')


_LIBRARY_PATHS = tuple(f'{os.sep}{name}{os.sep}' for name in ('orbax', 'jax', 'jaxlib', 'optax', 'tensorflow', 'tensorstore'))


class DropOrbaxInfo(py_logging.Filter):
  """Drops the INFO chatter of Orbax (per save), JAX (backend probes) and TensorFlow so that logs stay readable.

  Warnings and errors always pass; so does everything at absl's --verbosity=1 or more.
  """

  def filter(self, record):
    if record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1:
      return True
    return not any(part in record.pathname for part in _LIBRARY_PATHS)


def run(main: Callable[[list], Optional[int]], exit_at_once: bool = False, platform: Optional[str] = None,
        reuse_freed_memory: bool = True) -> None:
  """Prepares the process (`prepare_process`), then runs `main(argv)` as absl.app.run does, with user
  errors reported as one `error: ...` line.

  exit_at_once: once `main` returns, flush the output, run the atexit handlers and end the process
  (os._exit) instead of letting the interpreter finalise every native object of TensorFlow, JAX and
  TensorStore, which can keep a finished run alive for a long while. `main` must have closed what
  it wrote (checkpoints, metric writers) itself.
  platform: the JAX platform to run on unless JAX_PLATFORMS names one (the ahead-of-time compiler: 'cpu').
  reuse_freed_memory: on the CPU, `host_memory.reuse_freed_memory` (False: glibc's malloc as it is).
  """
  prepare_process(platform, reuse_freed_memory)
  app.run(functools.partial(_guarded, main, exit_at_once), flags_parser=_parse_flags)


def prepare_process(platform: Optional[str] = None, reuse_freed_memory: bool = True) -> None:
  """Chooses JAX's platform and the host's malloc settings, before JAX starts a backend or TensorFlow its threads.

  The command lines import TensorFlow and start JAX's backends only inside `main`, so `run` calls
  this first. On a machine with no accelerator (`platforms.no_accelerator`) JAX runs on the CPU
  without probing for a TPU (no "Unable to initialize backend", no libtpu warnings; `--verbosity=1`
  lets it probe), and on the CPU freed host memory is kept for reuse (`host_memory`: each training
  step would otherwise map its buffers afresh) unless `reuse_freed_memory` is False: sequential
  decoding, thousands of small steps, runs about 10% slower with that setting (docs/benchmarks.md,
  "Sequential decoding against f209483").
  """
  import jax  # pylint: disable=g-import-not-at-top
  if 'JAX_PLATFORMS' not in os.environ and 'JAX_FORCE_TPU_INIT' not in os.environ:
    if platform is None and not _verbosity_asked() and platforms.no_accelerator():
      platform = 'cpu'
    if platform:
      os.environ['JAX_PLATFORMS'] = platform  # for the processes this one starts
      jax.config.update('jax_platforms', platform)
  on_cpu = (jax.config.jax_platforms or '').split(',')[0] == 'cpu' or platforms.no_accelerator()
  if on_cpu and reuse_freed_memory:
    host_memory.reuse_freed_memory()


def check_choices(flag: str, given: list, allowed) -> None:
  """A usage error naming the values of the list flag --`flag` that are not in `allowed`."""
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise app.UsageError(f'--{flag} takes {", ".join(allowed)}; got {unknown}')


def report(table: str, result: dict, json_path: Optional[str]) -> None:
  """Prints a measurement's table and, with a path, writes its figures there as JSON."""
  print(table)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=1)


def _guarded(main, exit_at_once, argv):
  logging.get_absl_handler().addFilter(DropOrbaxInfo())
  try:
    code = main(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None or _show_traceback():
      raise
    _exit(message)
  if exit_at_once:
    _end_process(code)
  return code


def _end_process(code) -> None:
  """Ends the process now with `code`'s status, after the atexit handlers and with all output flushed."""
  import atexit  # pylint: disable=g-import-not-at-top
  jax = sys.modules.get('jax')
  if jax is not None and jax.process_count() > 1:
    jax.distributed.shutdown()  # the other processes leave the coordination service in order
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  py_logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code if isinstance(code, int) else 0)  # pylint: disable=protected-access


def _show_traceback() -> bool:
  return os.environ.get('TARFLOW_TRACEBACK', '') not in ('', '0') or (FLAGS.is_parsed() and FLAGS.traceback)


def _exit(message: str, hint: str = '') -> None:
  line = ' '.join(message.split())  # one line, whatever the message's own line breaks
  print(f'error: {line}{f" ({hint})" if hint else ""}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def user_error_message(e: BaseException) -> Optional[str]:
  """The message to show for `e` if it is a user error, else None (a bug: keep the traceback).

  User errors, by type: absl's app.UsageError, errors.UserError and its subclasses (which the
  library raises for input the user must change), and an OSError naming a file (a path given that
  does not exist or cannot be read). Whatever else was raised, and where, is a bug.
  """
  if isinstance(e, app.UsageError):
    return f'{e} (--helpshort lists the flags)'
  if isinstance(e, errors.UserError):
    return str(e)
  if isinstance(e, OSError) and e.filename:
    return f'{e.strerror or e}: {e.filename}'
  return None


def _parse_flags(argv: list) -> list:
  """absl's flag parsing, with its errors and config files that cannot be loaded as one `error:` line."""
  try:
    parsed = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # ml_collections raises more than flags.Error
    spec = _config_spec(argv)
    message = spec and (_config_file_error(spec) or _unknown_field(spec, argv))
    if message:
      _exit(message)
    if not isinstance(e, flags.Error) and user_error_message(e) is None:
      raise
    caused = e.__cause__ or e.__context__  # a config file's own error needs no hint about flags
    _exit(_root_message(e), '' if caused else '--helpshort lists the flags')
  spec = _config_spec(argv)
  message = spec and _config_file_error(spec)
  if message:
    _exit(message)
  return parsed


def _config_spec(argv: list) -> Optional[str]:
  """The value of --config in `argv` if the program has a config-file flag named so and it is given."""
  if 'config' not in FLAGS or not config_flags.config_flags.is_config_flag(FLAGS['config']):
    return None
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      spec = arg.partition('=')[2]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _config_file_error(spec: str) -> Optional[str]:
  """Why the config file `spec` cannot be loaded, or None."""
  try:
    config_lib.load(spec)
  except Exception as e:  # pylint: disable=broad-except  # whatever the file raises is the user's to fix
    return _root_message(e)
  return None


def _unknown_field(spec: str, argv: list) -> Optional[str]:
  """The first `--config.<field>=` override in `argv` that names no field of the config, as a message."""
  config = config_lib.load(spec)
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    node, path = config, match.group('field').split('.')
    for depth, name in enumerate(path):
      if not hasattr(node, 'keys') or name not in node:
        known = list(node.keys()) if hasattr(node, 'keys') else []
        close = difflib.get_close_matches(name, known, n=1)
        parent = 'config' + ''.join(f'.{p}' for p in path[:depth])
        hint = f' (did you mean --{parent}.{close[0]}?)' if close else f' (its fields: {", ".join(sorted(known))})'
        return f'--config.{match.group("field")}: {parent} has no field {name!r}{hint}.'
      node = node[name]
  return None


def _root_message(e: BaseException) -> str:
  """The message of the first user error in `e` and its chain of causes, else `e`'s own."""
  for cause in _chain(e):
    message = user_error_message(cause)
    if message is not None:
      return message
  return str(e)


def _chain(e: BaseException):
  """`e`, then its causes (`raise ... from`) and contexts, innermost last."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen
