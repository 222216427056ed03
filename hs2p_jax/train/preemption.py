"""A run's stop signal: SIGTERM (and the TPU runtime's preemption notice) turned into one step every process stops at.

On several processes, jax.distributed's preemption sync manager (started with the runtime) catches
SIGTERM on any process and makes `reached(step)` true on every process at the same step; on one
process a SIGTERM handler does it. The loop then saves that step, waits for the save and raises
`Preempted`, which the command line turns into RESUME_STATUS: run the same command again to resume.
"""

from __future__ import annotations

import signal
import threading

from hs2p_jax.errors import Stopped

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". Not 143 (killed by
# SIGTERM: nothing saved), not 1 (a failure to look at) and not 2 (bad input): a launcher that sees
# 75 relaunches the same command, which resumes from the checkpoint just written.
RESUME_STATUS = 75


class Preempted(Stopped):
  """The run stopped at `step` on a preemption notice, with that step saved under `path`."""

  status = RESUME_STATUS

  def __init__(self, step: int, path: str):
    super().__init__(f"preempted at step {step}: saved {path}; run the same command again to resume "
                     f"(exit status {RESUME_STATUS})")
    self.step, self.path = step, path


class StopSignal:
  """`reached(step)`: whether every process stops after `step` (call it at every step, on every process)."""

  def __init__(self):
    from jax._src import distributed
    self._sync = distributed.global_state.client is not None and \
        distributed.global_state.preemption_sync_manager is not None
    self._flag = False
    self._old = None
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    self._flag = True

  def reached(self, step: int) -> bool:
    if self._sync:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None
