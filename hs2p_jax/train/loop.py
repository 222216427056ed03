"""The one training loop: restore, steps, logging, the non-finite guard, checkpoints, final save.

The loop holds every side effect of a run; a trainer (`train.trainer.Trainer`, or any object with
these members) gives it:
  loader                     its batch source's position (`get_state()` / `set_state()`), checkpointed
  checkpoint_target()        the abstract tree a checkpoint holds (ShapeDtypeStructs with shardings)
  snapshot_targets()         {name: abstract tree} of frozen models derived from the source, which the
                             run keeps once under DIR/frozen/ (the DPO / REINFORCE reference)
  start(restored, snapshots) fill the state: from a checkpoint (`restored`, and the snapshots found) or,
                             with `restored` None, from the source weights
  checkpoint_state()         the tree to checkpoint;  snapshot(name): a frozen model to keep
  provenance()               write provenance.json and print the start-of-run data report
  begin(start)               start reading batches at step `start` (after a restore)
  step(step) -> metrics      run one optimizer step; metrics may stay on the device; a `_samples` entry
                             (a list of dicts) is appended to samples.jsonl
  record(step, metrics)      the host record to log at `step` (fetches)
  evaluate() -> dict         validation metrics, merged into the record every `eval_every` steps
                             and at the last step (logged there whatever `log_every` says)
  best(), save_best(step, v) (with `keep_best`) the best value kept so far, and keeping step's model as it
  save_final()               write the final model
Running the same loop again on the same directory resumes from the newest readable checkpoint
without reading the source weights, and `metrics.jsonl` then holds each step once with the numbers
of an uninterrupted run. A preemption notice (SIGTERM on any process) stops every process after the
same step, saved (`train.preemption`); a save that fails stops the run naming the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from typing import Any, Protocol

import jax

from hs2p_jax import storage
from hs2p_jax.train.checkpoints import RunCheckpoints
from hs2p_jax.train.guard import FiniteGuard
from hs2p_jax.train.metrics import MetricsWriter
from hs2p_jax.train.preemption import Preempted, StopSignal
from hs2p_jax.train.watchdog import Watchdog, stop_now


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  log_every: int = 1           # 0: log the last step (and evaluations) only
  save_every: int = 50         # 0: save the last step (and a preempted one) only
  keep_checkpoints: int = 2
  async_checkpoint: bool = False
  name: str | None = None
  eval_every: int = 0          # 0: evaluate at the last step only
  heartbeat_timeout: float = 30.0  # s without a peer's heartbeat before the run stops (train.watchdog)
  step_timeout: float = 0.0    # s a step may run (0: no limit)
  keep_best: str | None = None  # an evaluation metric (higher: better): its best step's model kept (save_best)


def due(step: int, every: int) -> bool:
  """Whether a cadence of `every` steps falls on `step` (0: never)."""
  return every > 0 and step % every == 0


class Trainer(Protocol):
  loader: Any

  def checkpoint_target(self) -> Any: ...
  def snapshot_targets(self) -> dict[str, Any]: ...
  def start(self, restored: Any | None, snapshots: dict[str, Any]) -> None: ...
  def checkpoint_state(self) -> Any: ...
  def snapshot(self, name: str) -> Any: ...
  def provenance(self) -> None: ...
  def begin(self, start: int) -> None: ...
  def step(self, step: int) -> dict[str, Any]: ...
  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]: ...
  def evaluate(self) -> dict[str, Any]: ...
  def save_final(self) -> None: ...


def run(trainer: Trainer, loop: LoopConfig, out_dir: str) -> dict[str, Any]:
  """Trains (or resumes) `trainer` to `loop.steps` in `out_dir` (a local path or a `gs://` URL);
  returns the last logged record."""
  storage.makedirs(out_dir)
  logs = LibraryLog(out_dir)
  try:
    return _run(trainer, loop, out_dir)
  finally:
    logs.close()


def _run(trainer: Trainer, loop: LoopConfig, out_dir: str) -> dict[str, Any]:
  trainer.provenance()
  ckpts = RunCheckpoints(out_dir, loop.keep_checkpoints, loop.async_checkpoint)
  start, state, data_state = ckpts.restore_latest(trainer.checkpoint_target())
  # hearts beat from here: a peer still restoring or compiling is not taken for lost
  watch = Watchdog(loop.heartbeat_timeout, loop.step_timeout,
                   f"resume from {ckpts.step_path(start)}" if start else "start again (no checkpoint was written)")
  try:
    snapshots = trainer.snapshot_targets()
    if start:
      trainer.start(state, {name: ckpts.restore_snapshot(name, target) for name, target in snapshots.items()})
      trainer.loader.set_state(data_state["loader"])
    else:
      trainer.start(None, {})
      for name in snapshots:
        ckpts.save_snapshot(name, trainer.snapshot(name))
    trainer.begin(start)
  except BaseException:
    watch.close()
    raise
  writer = MetricsWriter(out_dir, loop.steps, start, stage=loop.name)
  guard = FiniteGuard(out_dir, start or None)
  stop = StopSignal()
  last: dict[str, Any] = {}
  best = trainer.best() if loop.keep_best else None
  try:
    for step in range(start + 1, loop.steps + 1):
      watch.step_begins(step)
      metrics = trainer.step(step)
      samples = metrics.pop("_samples", None)
      guard.update(step, metrics)  # on the device: no sync here
      final = step == loop.steps
      evaluating = final or due(step, loop.eval_every)
      if due(step, loop.log_every) or evaluating:
        guard.check()
        rec = trainer.record(step, metrics)
        if evaluating:
          rec.update(trainer.evaluate())
          value = rec.get(loop.keep_best) if loop.keep_best else None
          if value is not None and (best is None or value > best):
            trainer.save_best(step, value)
            best = value
        last = writer.log(step, rec)
      if samples:
        writer.samples(step, samples)
      preempted = stop.reached(step) and not final  # every process agrees on this step
      if due(step, loop.save_every) or final or preempted:
        guard.check()  # never a checkpoint of non-finite params
        writer.flush()  # the logged steps reach the run directory before the checkpoint that covers them
        ckpts.save(step, trainer.checkpoint_state(), {"loader": trainer.loader.get_state()}, force=final or preempted)
        guard.saved(step)
        watch.saved(step, ckpts.step_path(step))
      if preempted:
        ckpts.wait()
        raise Preempted(step, ckpts.step_path(step), stop.why)
      watch.step_ends()
    guard.check()
    ckpts.wait()
    trainer.save_final()
  except Exception as e:
    lost = watch.lost(e)  # a collective that failed because a process is gone: one line, out at once
    if lost is not None:
      stop_now(lost)
    raise
  finally:
    watch.close()
    stop.close()
    failing = sys.exc_info()[0] is not None
    ckpts.close(quiet=failing)
    writer.close(quiet=failing)
  return last


class LibraryLog:
  """While a run lasts, what the libraries report on their own (Orbax's tracebacks of a failed save,
  absl warnings, errors printed by background threads) goes to DIR/logs/process_<i>.log instead of
  the terminal, which keeps the run's own lines (written by the main thread). A run on object storage
  writes it in this host's cache and uploads it when the run ends."""

  def __init__(self, out_dir: str):
    name = f"process_{jax.process_index()}.log"
    self.url = storage.join(out_dir, "logs", name) if storage.is_url(out_dir) else None
    local = storage.local_dir(out_dir, "logs")
    os.makedirs(local, exist_ok=True)
    self.file = open(os.path.join(local, name), "a", encoding="utf-8")
    self.logger = logging.getLogger("absl")
    self.handler = _QuietHandler(self.file)
    self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    self.logger.addHandler(self.handler)
    self.propagate, self.logger.propagate = self.logger.propagate, False
    self.stderr, sys.stderr = sys.stderr, _MainThreadOnly(sys.stderr, self.file)

  def close(self) -> None:
    sys.stderr = self.stderr
    self.logger.removeHandler(self.handler)
    self.logger.propagate = self.propagate
    try:
      self.file.close()
    except OSError:  # the disk the run failed to save on is full: what the log held is lost, not the run's error
      pass
    if self.url:
      try:
        with open(self.file.name, "rb") as f:
          storage.upload(self.url, f.read())
      except Exception as e:  # noqa: BLE001 - the log is a convenience; the run's own outcome stands
        print(f"warning: {e}; the library log stays in {self.file.name}", file=sys.stderr, flush=True)


class _MainThreadOnly:
  """A stderr whose writes from other threads go to `log`."""

  def __init__(self, stream, log):
    self._stream, self._log = stream, log

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self._stream.write(text)
    try:
      return self._log.write(text)
    except (OSError, ValueError):  # a full disk, or the log closed: the message is dropped
      return len(text)

  def flush(self) -> None:
    self._stream.flush()
    try:
      self._log.flush()
    except (OSError, ValueError):
      pass

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


class _QuietHandler(logging.StreamHandler):
  """A log handler whose failures to write (a full disk) drop the record instead of printing a traceback."""

  def handleError(self, record) -> None:
    pass


def host_record(metrics: dict[str, Any]) -> dict[str, float]:
  """A step's metrics fetched to the host as floats."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
