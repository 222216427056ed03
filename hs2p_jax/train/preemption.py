"""A run's stop signal: SIGTERM (and the TPU runtime's preemption notice) or Ctrl-C turned into one
step every process stops at.

On several processes, jax.distributed's preemption sync manager (started with the runtime) catches
SIGTERM on any process and makes `reached(step)` true on every process at the same step; on one
process a SIGTERM handler does it. Ctrl-C (SIGINT) takes the same path (on several processes it is
passed on as the process's own SIGTERM); a second Ctrl-C exits at once, without saving. The loop
then saves that step, waits for the save and raises `Preempted`, which the command line turns into
RESUME_STATUS: run the same command again to resume.
"""

from __future__ import annotations

import os
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

  def __init__(self, step: int, path: str, why: str = "preempted"):
    super().__init__(f"{why} at step {step}: saved {path}; run the same command again to resume "
                     f"(exit status {RESUME_STATUS})")
    self.step, self.path = step, path


class StopSignal:
  """`reached(step)`: whether every process stops after `step` (call it at every step, on every process)."""

  def __init__(self):
    from jax._src import distributed
    self._sync = distributed.global_state.client is not None and \
        distributed.global_state.preemption_sync_manager is not None
    self._flag = False
    self.interrupted = False  # a Ctrl-C asked for the stop (not a preemption notice)
    self._old: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
      if not self._sync:
        self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

  @property
  def why(self) -> str:
    return "interrupted (Ctrl-C)" if self.interrupted else "preempted"

  def _on_sigterm(self, signum, frame) -> None:
    self._flag = True

  def _on_sigint(self, signum, frame) -> None:
    if self.interrupted:  # the second Ctrl-C: out now, nothing more saved
      raise KeyboardInterrupt
    self.interrupted = True
    os.write(2, b"\nCtrl-C: stopping after this step, saved (exit 75: run the same command again to resume); "
                b"Ctrl-C again exits now without saving\n")
    if self._sync:  # jax's preemption notifier carries it to every process
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag = True

  def reached(self, step: int) -> bool:
    if self._sync:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag

  def close(self) -> None:
    for signum, old in self._old.items():
      signal.signal(signum, old)
    self._old = {}
