"""Token sequences -> fixed-shape numpy rows: right padding to a bucket length, first-fit packing
(optionally with the two sides of a pair sharing their prompt), left-padded generation prompts, and
the padding fraction of a batch."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def bucket_length(longest: int, pad_multiple: int, max_length: int, buckets="multiple") -> int:
  """T for a batch whose longest sequence has `longest` tokens, capped at `max_length`, by `buckets`:
  "multiple" rounds up to `pad_multiple` (least padding; up to max_length / pad_multiple shapes),
  "pow2" to the next power of two of at least `pad_multiple` (log2 shapes: fewer compilations),
  a list of lengths to the first one that holds it."""
  n = max(longest, 1)
  if buckets == "multiple":
    t = round_up(n, pad_multiple)
  elif buckets == "pow2":
    t = max(pad_multiple, 1 << (n - 1).bit_length())
  else:
    t = next((b for b in sorted(buckets) if b >= n), max_length)
  return min(t, max_length)


def bucket_lengths(pad_multiple: int, max_length: int, buckets="multiple") -> list[int]:
  """Every T `bucket_length` can give: the sequence lengths a run's batches come in."""
  return sorted({bucket_length(n, pad_multiple, max_length, buckets) for n in range(1, max_length + 1)})


def bucket_rows(rows: int, multiple: int, most: int, buckets="multiple") -> int:
  """R for a packed batch needing `rows` rows (`multiple` divides every R; at most `most`, the rows
  of one unit each): the least multiple with "multiple" buckets, else `multiple` times a power of two
  (log2 shapes)."""
  if buckets == "multiple":
    return round_up(rows, multiple)
  return min(multiple << max(0, -(-rows // multiple) - 1).bit_length(), round_up(most, multiple))


def row_buckets(multiple: int, most: int, buckets="multiple") -> list[int]:
  """Every R `bucket_rows` can give."""
  return sorted({bucket_rows(r, multiple, most, buckets) for r in range(1, most + 1)})


def pad_right(seqs: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One sequence per row: input_ids, segment_ids int32 [R, length] (segment 1 = tokens, 0 = pad)."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  seg = np.zeros((len(seqs), length), np.int32)
  for r, s in enumerate(seqs):
    ids[r, :len(s)] = s
    seg[r, :len(s)] = 1
  return ids, seg


def pad_left(seqs: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Generation prompts: ids, mask int32 [B, length], tokens at the right end (mask 1)."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for r, s in enumerate(seqs):
    if len(s):
      ids[r, length - len(s):] = s
      mask[r, length - len(s):] = 1
  return ids, mask


def first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
  """Row of each sequence under first-fit decreasing (longest first, each into the first row with
  room); every length must be <= capacity."""
  free: list[int] = []
  rows = [0] * len(lengths)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for r, room in enumerate(free):
      if lengths[i] <= room:
        break
    else:
      r = len(free)
      free.append(capacity)
    free[r] -= lengths[i]
    rows[i] = r
  return rows


def num_packed_rows(lengths: Sequence[int], capacity: int) -> int:
  rows = first_fit(lengths, capacity)
  return max(rows) + 1 if rows else 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  """Tokens that `a` and `b` share at their start, leaving each at least its last token of its own."""
  n = min(len(a), len(b)) - 1
  if n <= 0:
    return 0
  diff = np.flatnonzero(a[:n] != b[:n])
  return int(diff[0]) if diff.size else n


CHOSEN, REJECTED = 1, 2  # target bits: a response token of the chosen / rejected side (both where shared)


@dataclasses.dataclass(frozen=True)
class Unit:
  """A run of tokens placed whole in one packed row, as one segment: ids, positions, branch ids
  int32 [L] and the offsets of the tokens whose rewards are read. For log-prob targets (DPO):
  `pred` [L] the offset of the token whose logits predict each token (-1: none) and `side` [L]
  its target bits (CHOSEN | REJECTED: a response token of that side; 0: not a target)."""

  ids: np.ndarray
  positions: np.ndarray
  branch: np.ndarray
  scores: tuple[int, ...]
  pred: np.ndarray | None = None
  side: np.ndarray | None = None

  @classmethod
  def sequence(cls, ids: np.ndarray, start: int | None = None, bit: int = 0) -> "Unit":
    """One sequence; with `start`, its tokens from `start` on are targets with `bit`."""
    n = len(ids)
    idx = np.arange(n, dtype=np.int32)
    side = None if start is None else np.where((idx >= max(start, 1)), bit, 0).astype(np.int32)
    return cls(ids, idx, np.zeros(n, np.int32), (n - 1,), idx - 1, side)


def shared_pair(chosen: np.ndarray, rejected: np.ndarray, capacity: int,
                starts: tuple[int, int] | None = None) -> list[Unit]:
  """A pair as [prefix | chosen suffix | rejected suffix] with branch ids 0 / 1 / 2 and each suffix's
  positions following the prefix: one unit whose two scores are the suffixes' last tokens, attention
  masked so that a branch sees the prefix and itself only (see `branch_mask`). A pair whose shared
  layout exceeds `capacity` stays two sequences. `starts` (each side's first response token) marks
  the log-prob targets: a response token in the prefix is a target of both sides."""
  p = common_prefix(chosen, rejected)
  c, r = len(chosen), len(rejected)
  if c + r - p > capacity:
    if starts is None:
      return [Unit.sequence(chosen), Unit.sequence(rejected)]
    return [Unit.sequence(chosen, starts[0], CHOSEN), Unit.sequence(rejected, starts[1], REJECTED)]
  ids = np.concatenate([chosen, rejected[p:]]).astype(np.int32)
  positions = np.concatenate([np.arange(c), np.arange(p, r)]).astype(np.int32)
  branch = np.concatenate([np.zeros(p), np.ones(c - p), np.full(r - p, 2)]).astype(np.int32)
  pred = side = None
  if starts is not None:
    q = np.arange(p, r)  # the rejected suffix's positions; its token q follows position q - 1
    pred = np.concatenate([np.arange(c) - 1, np.where(q - 1 < p, q - 1, c + q - 1 - p)]).astype(np.int32)
    j = np.arange(c)
    side = np.concatenate([np.where(j >= max(starts[0], 1), CHOSEN, 0)
                           | np.where((j < p) & (j >= max(starts[1], 1)), REJECTED, 0),
                           np.where(q >= max(starts[1], 1), REJECTED, 0)]).astype(np.int32)
  return [Unit(ids, positions, branch, (c - 1, c + r - p - 1), pred, side)]


def unit_targets(units: Sequence[Unit], placement: Sequence[tuple[int, int]], pair_of: Sequence[int],
                 shape: tuple[int, int]) -> dict[str, np.ndarray]:
  """Log-prob targets of placed units (row, start each): `target_pred` int32 [R, T] the row index
  of each target token's predicting position (-1: not a target), `chosen_pair` / `rejected_pair`
  int32 [R, T] the pair whose chosen / rejected response the token belongs to (-1: none)."""
  out = {k: np.full(shape, -1, np.int32) for k in ("target_pred", "chosen_pair", "rejected_pair")}
  for u, (row, start), pair in zip(units, placement, pair_of):
    span = slice(start, start + len(u.ids))
    target = u.side != 0
    out["target_pred"][row, span] = np.where(target, start + u.pred, -1)
    out["chosen_pair"][row, span] = np.where(u.side & CHOSEN, pair, -1)
    out["rejected_pair"][row, span] = np.where(u.side & REJECTED, pair, -1)
  return out


def pack_units(units: Sequence[Unit], capacity: int, num_rows: int, pad_id: int,
               placement: list | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """First-fit packs `units` into `num_rows` rows of `capacity` tokens.

  Returns the rows (input_ids, segment_ids, positions, branch_ids int32 [num_rows, capacity];
  segments 1..k per row in placement order, 0 = pad) and, for every score of every unit in order,
  its row and token index, int32 [sum of len(unit.scores)]. A `placement` list is filled with
  each unit's (row, start)."""
  rows = first_fit([len(u.ids) for u in units], capacity)
  if rows and max(rows) >= num_rows:
    raise ValueError(f"{max(rows) + 1} rows needed, {num_rows} given")
  out = {"input_ids": np.full((num_rows, capacity), pad_id, np.int32),
         "segment_ids": np.zeros((num_rows, capacity), np.int32),
         "positions": np.zeros((num_rows, capacity), np.int32),
         "branch_ids": np.zeros((num_rows, capacity), np.int32)}
  fill = np.zeros(num_rows, np.int64)
  count = np.zeros(num_rows, np.int64)
  start = np.zeros(len(units), np.int64)
  for i in sorted(range(len(units)), key=lambda i: (rows[i], i)):
    r, u = rows[i], units[i]
    span = slice(fill[r], fill[r] + len(u.ids))
    count[r] += 1
    out["input_ids"][r, span], out["segment_ids"][r, span] = u.ids, count[r]
    out["positions"][r, span], out["branch_ids"][r, span] = u.positions, u.branch
    start[i] = fill[r]
    fill[r] += len(u.ids)
  score_row = np.array([rows[i] for i, u in enumerate(units) for _ in u.scores], np.int32)
  score_index = np.array([start[i] + o for i, u in enumerate(units) for o in u.scores], np.int32)
  if placement is not None:
    placement[:] = [(rows[i], int(start[i])) for i in range(len(units))]
  return out, score_row, score_index


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """Pad tokens / all tokens of a batch (training batches: segment_ids; prompt batches: prompt_mask)."""
  mask = batch["segment_ids"] if "segment_ids" in batch else batch["prompt_mask"]
  return float(np.mean(np.asarray(mask) == 0))
