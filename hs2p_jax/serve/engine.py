"""The server's scoring on the mesh: batches of fixed shapes ([R, T]: T a power-of-two length
bucket, R a power of two times the mesh's batch split, up to the batch rows, so that a lone short
request is not padded to a full batch), all compiled before the first request; every process
computes, process 0 leads.

On several processes, process 0 (which serves HTTP) broadcasts each batch's tokens to the others
before the forward pass they all take part in; while idle it sends a tick now and then, so the
followers' waiting collective never outlives a transport timeout.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
from jax import monitoring

from hs2p_jax.data.batching import bucket_length, bucket_lengths, bucket_rows, pad_right, row_buckets
from hs2p_jax.eval.scorer import RewardScorer
from hs2p_jax.sharding import batch_split

STOP, SCORE, TICK = 0, 1, 2
MIN_LENGTH = 32  # the shortest bucket, as the scorers use

_compilations = {"count": 0}
_listening = threading.Lock()


def _count(name: str, secs: float, **kwargs) -> None:
  if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
    _compilations["count"] += 1


def compilations() -> int:
  """Programs lowered in this process since the first `Engine` (each new shape or function is one)."""
  return _compilations["count"]


class Engine:
  """`engine.score(seqs, length) -> [n] rewards` (process 0) / `engine.follow()` (the others)."""

  def __init__(self, scorer: RewardScorer):
    with _listening:
      if not getattr(_count, "registered", False):
        monitoring.register_event_duration_secs_listener(_count)
        _count.registered = True
    self.scorer = scorer
    self.rows = scorer.rows
    self.max_length = scorer.max_length
    self.lengths = bucket_lengths(MIN_LENGTH, self.max_length, "pow2")
    self.split = batch_split(scorer.mesh, scorer.rules)
    self.row_sizes = row_buckets(self.split, self.rows, "pow2")
    self.leader = jax.process_index() == 0
    self.multi = jax.process_count() > 1

  def length_for(self, tokens: int) -> int:
    """The bucket a sequence of `tokens` tokens is scored in."""
    return bucket_length(tokens, MIN_LENGTH, self.max_length, "pow2")

  def rows_for(self, n: int) -> int:
    """The row bucket a batch of `n` sequences runs in."""
    return bucket_rows(n, self.split, self.rows, "pow2")

  def warm_up(self) -> None:
    """Compiles the forward pass for every length and row bucket (every process, in the same order)."""
    for t in self.lengths:
      for r in self.row_sizes:
        self.scorer.forward([np.zeros(1, np.int32)], t, r)

  def score(self, seqs: list[np.ndarray], length: int) -> np.ndarray:
    """[n] rewards of up to `rows` sequences of at most `length` tokens (process 0)."""
    if self.multi:
      self._send(SCORE, seqs, length)
    return self.scorer.forward(seqs, length, self.rows_for(len(seqs)))

  def tick(self) -> None:
    if self.multi:
      self._send(TICK)

  def stop(self) -> None:
    """Releases the followers (process 0, once, at shutdown)."""
    if self.multi:
      self._send(STOP)

  def follow(self) -> None:
    """Takes part in process 0's forward passes until it stops (processes other than 0)."""
    from jax.experimental import multihost_utils
    while True:
      op, length, n = (int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(3, np.int32))))
      if op == STOP:
        return
      if op == TICK:
        continue
      ids, lens = (np.asarray(a) for a in multihost_utils.broadcast_one_to_all(
          (np.zeros((self.rows, length), np.int32), np.zeros(self.rows, np.int32))))
      self.scorer.forward([ids[i, :lens[i]] for i in range(n)], length, self.rows_for(n))

  def _send(self, op: int, seqs: list[np.ndarray] | None = None, length: int = 0) -> None:
    from jax.experimental import multihost_utils
    multihost_utils.broadcast_one_to_all(np.asarray([op, length, len(seqs or ())], np.int32))
    if op == SCORE:
      ids = np.zeros((self.rows, length), np.int32)
      ids[:len(seqs)] = pad_right(seqs, length, 0)[0]
      lens = np.zeros(self.rows, np.int32)
      lens[:len(seqs)] = [len(s) for s in seqs]
      multihost_utils.broadcast_one_to_all((ids, lens))
