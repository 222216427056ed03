"""Which examples each process reads at each step: one global order, split across processes.

All examples form one stream of epochs, each a fresh permutation from (seed, epoch); global step k
takes stream items k*G .. k*G+G-1 (G = global batch size), and process p reads the slice
p*L .. p*L+L-1 of them (L = G / P). The examples of a global step therefore do not depend on the
number of processes, so a run on 2 processes sees the batches a 1-process run sees (the mesh
changes where arrays live, not the numbers). With `repeat` the stream is endless and batches are
always full; without it, one epoch is read in ceil(N / G) steps and slots past its end are
fillers (id -1). Every process can compute every other process's ids, which is what lets all
processes agree on each step's padded shape.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from hs2p_jax.errors import UserError

FILLER = -1


@functools.lru_cache(maxsize=32)
def _permutation(size: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  if not shuffle:
    return np.arange(size)
  return np.random.default_rng([seed, epoch]).permutation(size)


class Order:
  """Example ids per (step, process): int64 [local_batch], FILLER for padding slots."""

  def __init__(self, num_examples: int, batch_size: int, process_count: int = 1, *, seed: int = 0,
               shuffle: bool = True, repeat: bool = True):
    if batch_size <= 0 or batch_size % process_count:
      raise UserError(f"batch size {batch_size} must be a positive multiple of the process count {process_count}")
    if num_examples == 0 or (repeat and num_examples < process_count):
      raise UserError(f"{num_examples} examples are too few for {process_count} process(es)")
    self.num_examples = num_examples
    self.process_count = process_count
    self.local_batch = batch_size // process_count
    self.seed, self.shuffle, self.repeat = seed, shuffle, repeat
    self.num_steps: Optional[int] = None if repeat else -(-num_examples // batch_size)

  def ids(self, step: int, process: int) -> np.ndarray:
    """[local_batch] example ids process `process` reads at `step`."""
    n = self.num_examples
    pos = step * self.local_batch * self.process_count + process * self.local_batch + np.arange(self.local_batch)
    out = np.full(self.local_batch, FILLER, np.int64)
    if not self.repeat:
      inside = pos < n
      out[inside] = _permutation(n, self.seed, 0, self.shuffle)[pos[inside]]
      return out
    epochs, offsets = pos // n, pos % n
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = _permutation(n, self.seed, int(e), self.shuffle)[offsets[sel]]
    return out
