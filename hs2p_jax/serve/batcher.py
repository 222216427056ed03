"""Concurrent requests' inputs gathered into the engine's batches, scored by one thread."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import sys
import threading
import time
from typing import Callable

import numpy as np

from hs2p_jax.serve.engine import Engine


@dataclasses.dataclass(eq=False)  # jobs are compared by identity
class Job:
  """One request's token sequences and where its [n] rewards go."""

  seqs: list[np.ndarray]
  future: concurrent.futures.Future
  rewards: np.ndarray  # [n], filled as batches finish
  todo: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (length bucket, index) not yet scored
  since: float = 0.0   # when it was queued (time.monotonic)
  cancelled: bool = False  # its client went away: its inputs are not scored

  def cancel(self) -> None:
    self.cancelled = True


class QueueFull(RuntimeError):
  """More inputs than the server queues (`max_queued`): the client should retry later."""


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Batcher:
  """`batcher.submit(seqs) -> Job` (its `future`: the [n] rewards). One thread scores: each batch
  takes the request with the fewest inputs left (so a lone input waits one batch, not behind a
  request of thousands), fills its rows with other requests' inputs of the same length bucket, and
  looks at the queue again; a cancelled request's inputs are dropped. At most `max_queued` inputs
  wait (`QueueFull` beyond). One log line a batch; idle, it ticks the engine."""

  def __init__(self, engine: Engine, gather_s: float = 0.002, tick_s: float = 10.0,
               log: Callable[[str], None] = _log, max_queued: int = 65536):
    self.engine, self.gather_s, self.tick_s, self.log = engine, gather_s, tick_s, log
    self.max_queued = max_queued
    self.batches = 0
    self.queued = 0  # inputs submitted and not yet scored
    self._pending: list[Job] = []
    self._lock = threading.Lock()
    self._queue: queue.Queue[Job | None] = queue.Queue()
    self._thread = threading.Thread(target=self._run, name="hs2p-serve-batcher", daemon=True)

  def start(self) -> "Batcher":
    self._thread.start()
    return self

  def submit(self, seqs: list[np.ndarray]) -> Job:
    job = Job(list(seqs), concurrent.futures.Future(), np.zeros(len(seqs), np.float32), since=time.monotonic())
    if not seqs:
      job.future.set_result(job.rewards)
      return job
    with self._lock:
      if self.queued + len(seqs) > self.max_queued:
        raise QueueFull(f"{self.queued} inputs are waiting; {len(seqs)} more would pass the server's "
                        f"{self.max_queued} (--max-queued)")
      self.queued += len(seqs)
    job.todo = sorted((self.engine.length_for(len(s)), i) for i, s in enumerate(seqs))
    self._queue.put(job)
    return job

  def stats(self) -> dict[str, float]:
    """Inputs waiting, requests waiting, and how long the oldest has waited (s)."""
    with self._lock:
      pending = [j for j in self._pending if not j.cancelled]
      queued = self.queued
    now = time.monotonic()
    return {"queued_inputs": queued, "queued_requests": len(pending),
            "oldest_wait_s": round(max((now - j.since for j in pending), default=0.0), 3)}

  def close(self) -> None:
    """Scores what was submitted, then stops the thread."""
    self._queue.put(None)
    self._thread.join()

  def _take(self, block: bool) -> bool:
    """Moves submitted jobs to the pending list; False once closed (after what came before)."""
    try:
      job = self._queue.get(timeout=self.tick_s) if block else self._queue.get_nowait()
    except queue.Empty:
      if block:
        self.engine.tick()
      return True
    if block:
      time.sleep(self.gather_s)  # requests arriving together share batches
    while True:
      if job is None:
        return False
      with self._lock:
        self._pending.append(job)
      try:
        job = self._queue.get_nowait()
      except queue.Empty:
        return True

  def _run(self) -> None:
    open_ = True
    while open_ or self._pending:
      if open_:
        open_ = self._take(block=not self._pending)
      self._drop_cancelled()
      if self._pending:
        self._score_one()

  def _drop_cancelled(self) -> None:
    with self._lock:
      for job in [j for j in self._pending if j.cancelled]:
        self._pending.remove(job)
        self.queued -= len(job.todo)
        if not job.future.done():
          job.future.cancel()

  def _score_one(self) -> None:
    lead = min(self._pending, key=lambda j: (len(j.todo), j.since))
    length = lead.todo[0][0]
    chunk: list[tuple[Job, int]] = []
    for job in [lead] + [j for j in self._pending if j is not lead]:
      while job.todo and job.todo[0][0] == length and len(chunk) < self.engine.rows:
        chunk.append((job, job.todo.pop(0)[1]))
    seqs = [job.seqs[i] for job, i in chunk]
    t0 = time.perf_counter()
    try:
      rewards = self.engine.score(seqs, length)
    except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
      for job, _ in chunk:
        if not job.future.done():
          job.future.set_exception(e)
        job.cancelled = True
      rewards = None
    with self._lock:
      self.queued -= len(chunk)
    if rewards is None:
      return
    self.batches += 1
    self.log(f"hs2p serve: batch {self.batches}: {len(seqs)} inputs of {len({id(j) for j, _ in chunk})} requests, "
             f"{sum(len(s) for s in seqs)} tokens, length {length}, {1000 * (time.perf_counter() - t0):.1f} ms")
    for (job, i), r in zip(chunk, rewards):
      job.rewards[i] = r
    with self._lock:
      for job in {id(j): j for j, _ in chunk}.values():
        if not job.todo and job in self._pending:
          self._pending.remove(job)
          if not job.future.done():
            job.future.set_result(job.rewards)
