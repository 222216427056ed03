"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class UserError(ValueError):
  """Bad input from a user: a file, record, config key or shape. The message names which."""
