"""The one exception type for mistakes in what the user gave: flags, config values, paths, data.

Library code raises it (or one of the library's own specific errors, such as
data.DatasetNotFoundError) with a message that says what to change; the command lines
(tarflow_jax/cli) print such messages as one `error: ...` line instead of a traceback.
"""


class UserError(ValueError):
  """A mistake in the user's input; its message names the input and what to change."""
