"""Imports TensorFlow without the notices its C++ code prints while it loads.

TensorFlow writes its start-up notes ("oneDNN custom operations are on", the CPU-feature note)
to the process's stderr while it loads, on some CPUs before its logging reads
`TF_CPP_MIN_LOG_LEVEL`, so that variable alone does not hide them. `install()` makes the first
import of each named module run with the native stderr (file descriptor 2) captured; what was
captured is then written back without glog's INFO records and absl's "before InitializeLog"
preamble. Warnings, errors and anything else written meanwhile pass through.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

# A glog record's first line: severity, date, time, thread and source, e.g. "I0000 00:00:1796574559.36  7121 port.cc:153] ".
_RECORD = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^\]]+\] ")
_PREAMBLE = 'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR'


def without_start_up_notices(text: str) -> str:
  """`text` less its INFO records (with their continuation lines) and absl's preamble line."""
  kept, in_info = [], False
  for line in text.splitlines(keepends=True):
    if line.rstrip('\n') == _PREAMBLE:
      in_info = False
      continue
    if _RECORD.match(line):
      in_info = line.startswith('I')
    if not in_info:
      kept.append(line)
  return ''.join(kept)


@contextlib.contextmanager
def native_stderr_filtered():
  """Captures file descriptor 2 for the duration, then writes it back through `without_start_up_notices`."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        captured.seek(0)
        kept = without_start_up_notices(captured.read().decode(errors='replace'))
        if kept:
          sys.stderr.write(kept)
          sys.stderr.flush()
  finally:
    os.close(saved)


class _QuietFinder(importlib.abc.MetaPathFinder):
  """Finds the named top-level modules as usual, and loads each the first time with native stderr filtered."""

  def __init__(self, names):
    self._pending = set(names)

  def find_spec(self, name, path, target=None):
    if name not in self._pending:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
      return spec
    exec_module = spec.loader.exec_module

    def exec_quietly(module):
      self._pending.discard(name)  # loaded once; a probe such as importlib.util.find_spec loads nothing
      with native_stderr_filtered():
        exec_module(module)

    spec.loader.exec_module = exec_quietly  # this spec's own loader object
    return spec


def install(names=('tensorflow',)) -> None:
  """Makes the first import of each module in `names` quiet (a module imported already is left as it is)."""
  pending = [name for name in names if name not in sys.modules]
  if pending:
    sys.meta_path.insert(0, _QuietFinder(pending))
