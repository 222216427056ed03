"""Host batches -> global device arrays on the mesh (rows and examples split over the batch axes).

Each process feeds its own block of a global batch: the mesh's batch axes split the rows into
`slots` equal blocks, each held by the devices of one process (or of several processes alike, which
then read the same examples), and a process's loader reads the examples of its block
(`FeedLayout`). Batch shapes are agreed without talking (every process computes every block's
padded length), so a global array is assembled from process-local data with no host collective, and
the next step's batch is placed while the current step runs (`StepFeed`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hs2p_jax.convert.state import place
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import DEFAULT_RULES, Rules, batch_split, logical_to_spec

# Arrays whose first (row) axis is the batch; everything else is small and replicated.
ROW_ARRAYS = ("input_ids", "segment_ids", "positions", "branch_ids", "prompt_ids", "prompt_mask", "tokens",
              "response_mask", "target_pred", "chosen_pair", "rejected_pair", "row_lengths", "old_logp", "old_values",
              "returns", "advantages", "actor_mask", "ref_logp")
# Arrays with one entry per example (pair), split over the batch axes like the rows; padded with
# entries that score nothing (`valid` False) to split evenly.
EXAMPLE_ARRAYS = ("score_row", "score_index", "valid", "example_id", "magnitude", "labels", "label_mask")
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


@dataclasses.dataclass(frozen=True)
class FeedLayout:
  """How the processes feed a global batch: the batch axes split it into `split` device blocks; this
  process's devices hold `blocks` of them (in global order: not always next to each other, as on a
  TPU pod, where the mesh follows the chips' links), which together are share `slot` of `slots`
  equal shares (processes holding the same blocks read the same examples)."""

  slot: int = 0
  slots: int = 1
  split: int = 1
  blocks: tuple[int, ...] = (0,)

  @property
  def multiple(self) -> int:
    """Rows (and examples) of a share are a multiple of this: the global batch splits evenly."""
    return max(1, self.split // self.slots)

  def positions(self, n: int) -> np.ndarray:
    """The global indices, in order, of this process's share of a batch axis of `n` (a multiple of
    `split`): where its local entries 0, 1, ... go."""
    size = n // self.split
    return np.concatenate([np.arange(b * size, (b + 1) * size) for b in self.blocks]).astype(np.int64)


@functools.lru_cache(maxsize=16)
def feed_layout(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> FeedLayout:
  """This process's share of the global batch on `mesh`. A UserError names the mesh where the
  processes' shares are not equal and disjoint."""
  split = batch_split(mesh, rules)
  if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):  # no devices: one share (analytic plans)
    return FeedLayout(0, 1, split, tuple(range(split)))
  probe = (split, 1)
  sharding = NamedSharding(mesh, logical_to_spec(("act_batch", None), probe, mesh, rules))
  held: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(probe).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(split)[:2]))
  shares = sorted({tuple(sorted(b)) for b in held.values()})
  if sorted(b for share in shares for b in share) != list(range(split)) or len({len(x) for x in shares}) != 1:
    raise UserError(f"mesh {dict(mesh.shape)}: the processes hold unequal or overlapping parts of the batch rows; "
                    f"put mesh.data / mesh.fsdp over the processes and mesh.tensor within one")
  mine = tuple(sorted(held[jax.process_index()]))
  return FeedLayout(shares.index(mine), len(shares), split, mine)


def to_global(batch: dict[str, np.ndarray], layout: FeedLayout, mesh: Mesh | None, rules: Rules = DEFAULT_RULES,
              stacked: bool = False) -> dict[str, jax.Array]:
  """This process's share of a batch -> the global batch on the mesh, assembled from every process's
  share without a host collective: example arrays padded to `layout.multiple`, row and pair pointers
  mapped to the global rows and pairs where the share's entries go."""
  batch = pad_examples(batch, layout.multiple, stacked)
  axis = 1 if stacked else 0
  rows = max((batch[k].shape[axis] for k in ROW_ARRAYS if k in batch), default=0)
  pairs = batch["valid"].shape[axis] if "valid" in batch else 0
  out = {}
  for k, v in batch.items():
    if k in ROW_POINTERS:
      v = layout.positions(rows * layout.slots)[v].astype(v.dtype)
    elif k in PAIR_POINTERS:
      v = np.where(v >= 0, layout.positions(pairs * layout.slots)[np.maximum(v, 0)], -1).astype(v.dtype)
    if mesh is None:
      out[k] = jnp.asarray(v)
      continue
    shape = list(v.shape)
    if k in ROW_ARRAYS or k in EXAMPLE_ARRAYS:
      shape[axis] *= layout.slots
    sharding = batch_sharding(k, tuple(shape), mesh, rules, stacked)
    out[k] = jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v), tuple(shape))
  return out


def micro_batch_rows(key: str, micro: int, rows_per_example: int, mesh: Mesh | None, rules: Rules,
                     allow_padding: bool, packed: bool = False) -> dict[str, int]:
  """A run's micro-batch rows against the devices of the batch axes (its `batch` provenance). Rows
  padded to split over them may be at most a quarter of the step: more is a UserError naming `key`
  (`train.micro_batch_size`, ...) and the mesh, unless `mesh.allow_padding`."""
  split, rows = batch_split(mesh, rules), micro * rows_per_example
  info = {"micro_batch_rows": rows, "batch_split": split}
  padded = -(-rows // split) * split
  if packed or padded == rows:
    return info
  info["padded_rows"] = padded
  if (padded - rows) * 4 > padded and not allow_padding:
    fit = split // math.gcd(split, rows_per_example)
    raise UserError(f"{key}={micro}: {rows} rows per micro-batch are padded to {padded} to split over the mesh's "
                    f"batch axes ({dict(mesh.shape)}: {split} devices), {1 - rows / padded:.0%} of the step computing "
                    f"padding; make {key} a multiple of {fit}, or set mesh.allow_padding=true")
  return info


def pad_examples(batch: dict[str, np.ndarray], multiple: int, stacked: bool = False) -> dict[str, np.ndarray]:
  """Example arrays padded to a multiple of `multiple` entries with entries that score nothing."""
  axis = 1 if stacked else 0
  n = batch["valid"].shape[axis] if "valid" in batch else 0
  extra = -n % multiple
  if not extra:
    return batch
  out = dict(batch)
  for k in EXAMPLE_ARRAYS:
    if k in batch:
      width = [(0, 0)] * batch[k].ndim
      width[axis] = (0, extra)
      fill = -1 if k == "example_id" else 0  # row 0, token 0, invalid, no labels
      out[k] = np.pad(batch[k], width, constant_values=fill)
  return out


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
  """Where batch array `key` of `shape` lives: rows over the batch axes, example arrays too where their
  length divides them (else replicated), anything else replicated."""
  axes = ((None,) if stacked else ()) + ("act_batch",) + (None,) * (len(shape) - 1 - int(stacked))
  if key in ROW_ARRAYS:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
  if key in EXAMPLE_ARRAYS:  # the rows' mesh axes, where they divide (not a config error where they do not)
    table = dict(rules)
    examples = tuple({**table, "act_examples": table.get("act_batch")}.items())
    return NamedSharding(mesh, logical_to_spec(tuple("act_examples" if a == "act_batch" else a for a in axes),
                                               shape, mesh, examples))
  return NamedSharding(mesh, P())


def host_global(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host: gathered from the processes that
  hold its shards where this one does not hold them all."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class StepFeed:
  """A trainer's batch source (`train.trainer`): each step, k micro-batches of this process's block
  from `loader`, stacked and assembled into the global batch on the mesh; the following step's batch
  is read and placed in a background thread while the current step runs. Its position
  (`get_state` / `set_state`) is that of the batches handed out, not of the one read ahead."""

  def __init__(self, loader, micro_batches: int, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    self.data, self.k, self.mesh, self.rules = loader, micro_batches, mesh, rules
    self.layout = feed_layout(mesh, rules)
    self._it = None
    self._ahead: concurrent.futures.Future | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hs2p-feed")
    self._base = self._given = 0

  @property
  def position(self) -> "StepFeed":
    return self

  def begin(self) -> None:
    """Starts reading at the position given to `set_state` (after a restore), else at the start."""
    if self._ahead is not None:
      self._ahead.result()
      self._ahead = None
    self._base, self._given = self.data.get_state()["step"], 0
    self._it = iter(self.data)
    self._t0, self._tokens = time.time(), 0

  def get_state(self) -> dict[str, Any]:
    return {**self.data.get_state(), "step": self._base + self._given}

  def set_state(self, state: dict[str, Any]) -> None:
    self.data.set_state(state)

  def _read(self) -> dict[str, jax.Array]:
    micro = [next(self._it) for _ in range(self.k)]
    return to_global(stack_micro_batches(micro), self.layout, self.mesh, self.rules, stacked=True)

  def next(self, step: int, trainer=None) -> tuple[list[dict[str, jax.Array]], dict[str, float]]:
    """The next step's stacked global batch ([k, R, T], ...), on the mesh; no host metrics."""
    batch = (self._ahead or self._pool.submit(self._read)).result()
    self._given += self.k
    self._tokens = _count_tokens(self._tokens, batch["segment_ids"])  # every process's, on the devices
    self._ahead = self._pool.submit(self._read)
    return [batch], {}

  def tokens_per_s(self) -> float:
    """Tokens (of every process) per second since the previous call (or `begin`): a host sync."""
    now = time.time()
    rate = float(self._tokens) / max(now - self._t0, 1e-9)
    self._t0, self._tokens = now, 0
    return rate

  def specs(self, task: str, examples: int, num_attributes: int = 9, targets: bool = False,
            shared: bool = False) -> list[dict[str, jax.ShapeDtypeStruct]]:
    """Every stacked global batch this feed can give (one per shape of `data.buckets`), as
    ShapeDtypeStructs: what the step is compiled for before the first step."""
    return [stacked_spec(task, examples, self.k, t, self.mesh, self.rules, num_attributes, targets, shared,
                         rows=r * self.layout.slots, right_padded=not self.data.packing)
            for r, t in self.data.shapes()]


@jax.jit
def _count_tokens(total: Any, segment_ids: jax.Array) -> jax.Array:
  return total + jnp.count_nonzero(segment_ids).astype(jnp.float32)


def stack_micro_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Pads k host batches to a common [R, T] and stacks them: each array gets a leading k axis."""
  r = max(b["input_ids"].shape[0] for b in batches)
  t = max(b["input_ids"].shape[1] for b in batches)
  out: dict[str, list[np.ndarray]] = {}
  for b in batches:
    for key, arr in b.items():
      if key in ROW_ARRAYS:  # [R, T], or [R] (row_lengths)
        arr = np.pad(arr, [(0, r - arr.shape[0]), (0, t - arr.shape[-1])][:arr.ndim], constant_values=_fill(key))
      out.setdefault(key, []).append(arr)
  return {k: np.stack(v) for k, v in out.items()}


def _fill(key: str) -> int:
  return -1 if key in PAIR_POINTERS or key == "target_pred" else 0  # padding is no target


def stacked_spec(task: str, examples: int, micro_batches: int, seq_len: int, mesh: Any, rules: Rules = DEFAULT_RULES,
                 num_attributes: int = 9, targets: bool = False, shared: bool = False,
                 rows: int | None = None, right_padded: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The stacked batch a `StepFeed` gives at its longest (`seq_len` tokens), as ShapeDtypeStructs placed
  as `put_batch` places them: for `task` regression / pairs / sft, `examples` (pairs) per micro-batch,
  k = `micro_batches`; `targets`: log-prob targets (DPO, SFT); `shared`: pairs sharing their prompt
  (positions, branch_ids); `right_padded`: one sequence per row, with its length (row_lengths). Rows:
  one per sequence (two per pair), padded to split over the batch axes, or `rows` (packed batches)."""
  k, t = micro_batches, seq_len
  split = batch_split(mesh, rules)
  r = rows or -(-examples * (2 if task == "pairs" else 1) // split) * split
  layout = feed_layout(mesh, rules)  # example arrays: each block's padded to split evenly, as `to_global` pads them
  n = layout.slots * -(-(examples // layout.slots) // layout.multiple) * layout.multiple
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
  if right_padded:
    shapes["row_lengths"] = ((k, r), i32)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(key, shape, mesh, rules, stacked=True))
          for key, (shape, dtype) in shapes.items()}
