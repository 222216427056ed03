"""Host batches -> global device arrays on the mesh (token arrays split over the batch axes)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hs2p_jax.convert.state import place
from hs2p_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

# Arrays whose first (row) axis is the batch; everything else is small and replicated.
ROW_ARRAYS = ("input_ids", "segment_ids", "positions", "branch_ids", "prompt_ids", "prompt_mask", "tokens",
              "response_mask", "target_pred", "chosen_pair", "rejected_pair")
# Arrays holding row numbers of the global batch: offset when local batches are concatenated.
ROW_POINTERS = ("score_row",)
# Arrays holding pair numbers (-1: none), offset likewise by the pairs of the processes before.
PAIR_POINTERS = ("chosen_pair", "rejected_pair")


def gather_processes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates every process's local batch into the global batch (axis 0 of every array), after
  padding to common shapes; row pointers are offset to index the concatenated rows."""
  if jax.process_count() == 1:
    return batch
  from jax.experimental import multihost_utils

  out = {}
  for k, v in batch.items():
    shape = np.max(multihost_utils.process_allgather(np.asarray(v.shape)), axis=0)
    fill = -1 if k in PAIR_POINTERS or k == "target_pred" else 0  # padding is no target
    out[k] = np.pad(v, [(0, int(m) - s) for m, s in zip(shape, v.shape)], constant_values=fill)
  rows = max((out[k].shape[0] for k in ROW_ARRAYS if k in out), default=0)
  for k in ROW_POINTERS:
    if k in out:
      out[k] = out[k] + jax.process_index() * rows
  pairs = out["valid"].shape[0] if "valid" in out else 0  # examples (pairs) per process, padded
  for k in PAIR_POINTERS:
    if k in out:
      out[k] = np.where(out[k] >= 0, out[k] + jax.process_index() * pairs, -1).astype(out[k].dtype)
  return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in out.items()}


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None, rules: Rules = DEFAULT_RULES,
              stacked: bool = False) -> dict[str, jax.Array]:
  """Places a global host batch: row arrays split over the mesh's batch axes (where they divide),
  the rest replicated. `stacked` batches carry a leading micro-batch axis."""
  out = {}
  for k, v in batch.items():
    if mesh is None:
      out[k] = jax.numpy.asarray(v)
      continue
    out[k] = place(v, batch_sharding(k, v.shape, mesh, rules, stacked))
  return out


def batch_sharding(key: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   stacked: bool = False) -> NamedSharding:
  """Where `put_batch` places batch array `key` of `shape`: rows over the batch axes, or replicated."""
  if key not in ROW_ARRAYS:
    return NamedSharding(mesh, P())
  axes = ((None,) if stacked else ()) + ("act_batch",) + (None,) * (len(shape) - 1 - int(stacked))
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def host_global(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host: gathered from the processes that
  hold its shards where this one does not hold them all."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class StepFeed:
  """A trainer's batch source: each step, k micro-batches from `loader` (every process's share
  gathered), stacked and placed on the mesh; counts their tokens for the tokens/s it reports."""

  def __init__(self, loader, micro_batches: int, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    self.loader, self.k, self.mesh, self.rules = loader, micro_batches, mesh, rules
    self._it = None

  def begin(self) -> None:
    """Starts reading at the loader's current state (after a restore)."""
    import time
    self._it = iter(self.loader)
    self._t0, self._tokens = time.time(), 0

  def next(self) -> dict[str, jax.Array]:
    """The next step's stacked batch ([k, R, T], ...), on the mesh."""
    from hs2p_jax.train.rm import stack_micro_batches
    micro = [gather_processes(next(self._it)) for _ in range(self.k)]
    self._tokens += sum(int(np.count_nonzero(b["segment_ids"])) for b in micro)
    return put_batch(stack_micro_batches(micro), self.mesh, self.rules, stacked=True)

  def tokens_per_s(self) -> float:
    """Tokens per second since the previous call (or `begin`)."""
    import time
    now = time.time()
    rate = self._tokens / max(now - self._t0, 1e-9)
    self._t0, self._tokens = now, 0
    return rate
