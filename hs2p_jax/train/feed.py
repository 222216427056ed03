"""Host batches -> global device arrays on the mesh (token arrays split over the batch axes)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hs2p_jax.convert.state import place
from hs2p_jax.sharding import DEFAULT_RULES, Rules, batch_split, logical_to_spec

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
    out[k] = np.pad(v, [(0, int(m) - s) for m, s in zip(shape, v.shape)], constant_values=_fill(k))
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
  """A trainer's batch source (`train.trainer`): each step, k micro-batches from `loader` (every
  process's share gathered), stacked and placed on the mesh; counts their tokens for the tokens/s it
  reports."""

  def __init__(self, loader, micro_batches: int, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    self.loader, self.k, self.mesh, self.rules = loader, micro_batches, mesh, rules
    self._it = None

  def begin(self) -> None:
    """Starts reading at the loader's current state (after a restore)."""
    self._it = iter(self.loader)
    self._t0, self._tokens = time.time(), 0

  def next(self, step: int, trainer=None) -> tuple[list[dict[str, jax.Array]], dict[str, float]]:
    """The next step's stacked batch ([k, R, T], ...), on the mesh; no host metrics."""
    micro = [gather_processes(next(self._it)) for _ in range(self.k)]
    self._tokens += sum(int(np.count_nonzero(b["segment_ids"])) for b in micro)
    return [put_batch(stack_micro_batches(micro), self.mesh, self.rules, stacked=True)], {}

  def tokens_per_s(self) -> float:
    """Tokens per second since the previous call (or `begin`)."""
    now = time.time()
    rate = self._tokens / max(now - self._t0, 1e-9)
    self._t0, self._tokens = now, 0
    return rate


def stack_micro_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Pads k host batches to a common [R, T] and stacks them: each array gets a leading k axis."""
  r = max(b["input_ids"].shape[0] for b in batches)
  t = max(b["input_ids"].shape[1] for b in batches)
  out: dict[str, list[np.ndarray]] = {}
  for b in batches:
    for key, arr in b.items():
      if key in ROW_ARRAYS and arr.ndim == 2:
        arr = np.pad(arr, ((0, r - arr.shape[0]), (0, t - arr.shape[1])), constant_values=_fill(key))
      out.setdefault(key, []).append(arr)
  return {k: np.stack(v) for k, v in out.items()}


def _fill(key: str) -> int:
  return -1 if key in PAIR_POINTERS or key == "target_pred" else 0  # padding is no target


def stacked_spec(task: str, examples: int, micro_batches: int, seq_len: int, mesh: Any, rules: Rules = DEFAULT_RULES,
                 num_attributes: int = 9, targets: bool = False,
                 shared: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The stacked batch a `StepFeed` gives at its longest (`seq_len` tokens), as ShapeDtypeStructs placed
  as `put_batch` places them: for `task` regression / pairs / sft, `examples` (pairs) per micro-batch,
  k = `micro_batches`; `targets`: log-prob targets (DPO, SFT); `shared`: pairs sharing their prompt
  (positions, branch_ids). Rows: one per sequence (two per pair), padded to split over the batch axes."""
  k, n, t = micro_batches, examples, seq_len
  split = batch_split(mesh, rules)
  r = -(-n * (2 if task == "pairs" else 1) // split) * split
  i32 = jnp.int32
  shapes: dict[str, tuple[tuple[int, ...], Any]] = {
      "input_ids": ((k, r, t), i32), "segment_ids": ((k, r, t), i32),
      "score_row": ((k, n, 2) if task == "pairs" else (k, n), i32),
      "score_index": ((k, n, 2) if task == "pairs" else (k, n), i32),
      "valid": ((k, n), jnp.bool_), "example_id": ((k, n), i32)}
  if task == "pairs":
    shapes["magnitude"] = ((k, n), jnp.float32)
  if task == "regression":
    shapes.update(labels=((k, n, num_attributes), jnp.float32), label_mask=((k, n, num_attributes), jnp.bool_))
  if targets or task == "sft":
    shapes.update({key: ((k, r, t), i32) for key in ("target_pred", "chosen_pair", "rejected_pair")})
  if shared:
    shapes.update({key: ((k, r, t), i32) for key in ("positions", "branch_ids")})
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(key, shape, mesh, rules, stacked=True))
          for key, (shape, dtype) in shapes.items()}
