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


@dataclasses.dataclass
class Job:
  """One request's token sequences and where its [n] rewards go."""

  seqs: list[np.ndarray]
  future: concurrent.futures.Future
  rewards: np.ndarray  # [n], filled as batches finish
  left: int           # sequences not yet scored


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Batcher:
  """`batcher.submit(seqs) -> Future([n] rewards)`. The scoring thread takes every request waiting
  (after `gather_s`, for requests arriving together), sorts their inputs into length buckets and
  scores each bucket in batches of the engine's rows; one log line a batch. Idle, it ticks the engine."""

  def __init__(self, engine: Engine, gather_s: float = 0.002, tick_s: float = 10.0,
               log: Callable[[str], None] = _log):
    self.engine, self.gather_s, self.tick_s, self.log = engine, gather_s, tick_s, log
    self.batches = 0
    self._queue: queue.Queue[Job | None] = queue.Queue()
    self._thread = threading.Thread(target=self._run, name="hs2p-serve-batcher", daemon=True)

  def start(self) -> "Batcher":
    self._thread.start()
    return self

  def submit(self, seqs: list[np.ndarray]) -> concurrent.futures.Future:
    job = Job(list(seqs), concurrent.futures.Future(), np.zeros(len(seqs), np.float32), len(seqs))
    if not seqs:
      job.future.set_result(job.rewards)
    else:
      self._queue.put(job)
    return job.future

  def close(self) -> None:
    """Scores what was submitted, then stops the thread."""
    self._queue.put(None)
    self._thread.join()

  def _run(self) -> None:
    closing = False
    while not closing:
      try:
        first = self._queue.get(timeout=self.tick_s)
      except queue.Empty:
        self.engine.tick()
        continue
      if first is None:
        break
      time.sleep(self.gather_s)
      jobs = [first]
      while True:
        try:
          job = self._queue.get_nowait()
        except queue.Empty:
          break
        if job is None:
          closing = True  # score what came before the close
          break
        jobs.append(job)
      self._score(jobs)

  def _score(self, jobs: list[Job]) -> None:
    items = sorted(((self.engine.length_for(len(s)), j, i) for j, job in enumerate(jobs)
                    for i, s in enumerate(job.seqs)), key=lambda x: x[0])
    rows = self.engine.rows
    start = 0
    while start < len(items):
      length = items[start][0]
      end = start
      while end < len(items) and end - start < rows and items[end][0] == length:
        end += 1
      chunk = items[start:end]
      seqs = [jobs[j].seqs[i] for _, j, i in chunk]
      t0 = time.perf_counter()
      try:
        rewards = self.engine.score(seqs, length)
      except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
        for _, j, _ in chunk:
          if not jobs[j].future.done():
            jobs[j].future.set_exception(e)
        start = end
        continue
      self.batches += 1
      self.log(f"hs2p serve: batch {self.batches}: {len(seqs)} inputs of {len({j for _, j, _ in chunk})} requests, "
               f"{sum(len(s) for s in seqs)} tokens, length {length}, {1000 * (time.perf_counter() - t0):.1f} ms")
      for (_, j, i), r in zip(chunk, rewards):
        job = jobs[j]
        job.rewards[i] = r
        job.left -= 1
        if job.left == 0 and not job.future.done():
          job.future.set_result(job.rewards)
      start = end
