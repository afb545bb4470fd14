"""The exception types for mistakes in what the user gave: flags, config values, paths, data, set-up.

Library code raises `UserError` (or a subclass) for input the user must change, with a message that
says what to change; the command lines (tarflow_jax/cli) print those as one `error: ...` line
instead of a traceback. Every other exception is a bug and keeps its traceback. The subclasses
also derive from the built-in type a caller would catch (FileNotFoundError, ImportError, ...).
"""


class UserError(ValueError):
  """A mistake in the user's input; its message names the input and what to change."""


class NotFound(UserError, FileNotFoundError):
  """A file, directory or dataset the user named is not there."""


class AlreadyExists(UserError, FileExistsError):
  """An output path the user named already holds something that would be overwritten."""


class NotWritable(UserError, PermissionError):
  """An output directory the user named cannot be written to."""


class MissingExtra(UserError, ImportError):
  """The input needs an optional dependency that is not installed; the message gives the pip command."""


class NonFinite(UserError, FloatingPointError):
  """Training or sampling produced NaN or infinite values; the message says which setting to change."""
