"""Ends a run whose peer died or whose step hangs: quickly, with one line, before jax's own fatal abort.

Every process of a multi-process run writes a heartbeat counter into jax.distributed's key-value
store every few seconds and reads everyone's (one directory read). A peer whose counter has not
moved for `dist.heartbeat_timeout` seconds, or a store that no longer answers (process 0, which
hosts it, is gone), ends this process with one line naming the lost process. A loop step (with
its log and save) still running `dist.step_timeout` seconds after it began ends the run the same
way: a peer that is alive but stuck keeps heartbeating, so only the step's duration shows it (a
run's first step, which compiles, is not timed). Both exit with `RESUME_STATUS`: relaunching
every process resumes from the last checkpoint. Hearts beat from before the run compiles, and a
peer whose heart has not beaten yet is not taken for lost before the first step is done (a process
that started slower than its peers is not lost; after the first step, every one has started). The
exit skips the interpreter's shutdown, where
jax would wait at its shutdown barrier for the lost process and then abort with a C++ stack trace;
jax's own heartbeat timeout is set longer than this one (`distributed.initialize`).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

from hs2p_jax.errors import Stopped
from hs2p_jax.train.preemption import RESUME_STATUS

_KEY = "hs2p/heartbeat/"
# errors of a collective or of the coordination service that a lost peer causes on the survivors
_TRANSPORT = ("Gloo", "UNAVAILABLE", "Connection reset", "Connection refused", "DEADLINE_EXCEEDED", "heartbeat",
              "coordination service", "Socket closed", "Broken pipe")


class PeerLost(Stopped):
  """A process of the run is gone (or hangs): this one stops (`stop_now`: no interpreter shutdown)."""

  status = RESUME_STATUS


class Watchdog:
  """Heartbeats and the step timer of one process (module docstring); `close()` stops it."""

  def __init__(self, heartbeat_timeout: float, step_timeout: float, resume_hint: str):
    from jax._src import distributed
    self.client = distributed.global_state.client if jax.process_count() > 1 else None
    self.heartbeat_timeout, self.step_timeout, self.hint = heartbeat_timeout, step_timeout, resume_hint
    self.interval = max(0.2, min(2.0, heartbeat_timeout / 10))
    self.me = jax.process_index()
    self._seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in
                                                       range(jax.process_count()) if p != self.me}
    self._step: tuple[int, float] | None = None
    self._timed = False
    self._met = False  # a step has finished: every peer has started (its first beat is due)
    self._stop = threading.Event()
    self._thread = None
    if self.client is not None or step_timeout > 0:
      self._thread = threading.Thread(target=self._watch, name="hs2p-watchdog", daemon=True)
      self._thread.start()

  # -- the loop's side -----------------------------------------------------------------------

  def step_begins(self, step: int) -> None:
    self._step = (step, time.monotonic()) if self._timed else None
    self._timed = True  # every step after this run's first (which compiles)

  def step_ends(self) -> None:
    self._step = None
    self._met = True

  def saved(self, step: int, path: str) -> None:
    self.hint = f"resume from {path} (step {step})"

  def lost(self, error: BaseException) -> PeerLost | None:
    """For an error the main thread got: a `PeerLost` if a peer is gone (waiting up to the heartbeat
    timeout for its heartbeats to show it), None if the error is not a lost peer's."""
    if self.client is None or not any(s in str(error) for s in _TRANSPORT):
      return None
    deadline = time.monotonic() + self.heartbeat_timeout + 2 * self.interval
    while time.monotonic() < deadline:
      why = self._check_peers()
      if why:
        return PeerLost(self._message(why))
      time.sleep(self.interval)
    return None

  def close(self) -> None:
    self._stop.set()

  # -- the watching thread -------------------------------------------------------------------

  def _message(self, why: str) -> str:
    return f"{why}; every process of this run stops: run the same command again on every process to {self.hint}"

  def _check_peers(self) -> str | None:
    """Why the run cannot go on (a peer lost), or None; beats this process's heart."""
    now = time.monotonic()
    try:
      self.client.key_value_set(f"{_KEY}{self.me}", f"{now:.3f}", allow_overwrite=True)
      beats = dict(self.client.key_value_dir_get(_KEY))
    except Exception:  # noqa: BLE001 - the store itself is gone
      return "process 0 (which hosts the coordination service) stopped answering" if self.me != 0 else None
    for peer, (last, since) in list(self._seen.items()):
      beat = beats.get(f"{_KEY}{peer}")
      if beat != last or (beat is None and not self._met):  # not started yet: no clock runs for it
        self._seen[peer] = (beat, now)
      elif now - since > self.heartbeat_timeout:
        return f"process {peer} stopped answering (no heartbeat for {now - since:.0f} s, dist.heartbeat_timeout)"
    return None

  def _watch(self) -> None:
    while not self._stop.wait(self.interval):
      why = self._check_peers() if self.client is not None else None
      step = self._step
      if why is None and step is not None and self.step_timeout > 0 and time.monotonic() - step[1] > self.step_timeout:
        why = (f"step {step[0]} has not finished after {self.step_timeout:.0f} s (dist.step_timeout): a process "
               "hangs or waits for one that does")
      if why is not None and not self._stop.is_set():
        stop_now(PeerLost(self._message(why)))


def stop_now(e: Stopped) -> None:
  """Prints `e` as the command's last line and ends the process with its status at once."""
  print(f"hs2p: {e}", file=sys.__stderr__, flush=True)
  os._exit(e.status)
