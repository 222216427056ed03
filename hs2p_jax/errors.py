"""The exceptions the command line turns into one line and an exit status (bugs keep their traceback).

`UserError`: bad input (a file, record, config key or shape), exit 2. `Stopped`: a run that stopped
for a reason outside its input (a preemption notice, a failed save, a lost process), its own status.
"""


class UserError(ValueError):
  """Bad input from a user: a file, record, config key or shape. The message names which."""


class Stopped(Exception):
  """A run stopped by its environment; the message says why and what to do, `status` is the exit status."""

  status = 1
