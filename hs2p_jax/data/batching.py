"""Token sequences -> fixed-shape numpy rows: right padding to a bucket length, first-fit packing,
left-padded generation prompts, and the padding fraction of a batch."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def bucket_length(longest: int, pad_multiple: int, max_length: int) -> int:
  """T for a batch whose longest sequence has `longest` tokens: rounded up to `pad_multiple`, capped."""
  return min(round_up(max(longest, 1), pad_multiple), max_length)


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


def pack(seqs: Sequence[np.ndarray], capacity: int, num_rows: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """First-fit packs `seqs` into `num_rows` rows of `capacity` tokens.

  Returns input_ids, segment_ids int32 [num_rows, capacity] (segments 1..k per row in placement
  order, 0 = pad), and per sequence its row and the index of its last token, int32 [len(seqs)]."""
  rows = first_fit([len(s) for s in seqs], capacity)
  if rows and max(rows) >= num_rows:
    raise ValueError(f"{max(rows) + 1} rows needed, {num_rows} given")
  ids = np.full((num_rows, capacity), pad_id, np.int32)
  seg = np.zeros((num_rows, capacity), np.int32)
  fill = np.zeros(num_rows, np.int64)
  count = np.zeros(num_rows, np.int64)
  last = np.zeros(len(seqs), np.int32)
  for i in sorted(range(len(seqs)), key=lambda i: (rows[i], i)):
    r, n = rows[i], len(seqs[i])
    count[r] += 1
    ids[r, fill[r]:fill[r] + n] = seqs[i]
    seg[r, fill[r]:fill[r] + n] = count[r]
    fill[r] += n
    last[i] = fill[r] - 1
  return ids, seg, np.asarray(rows, np.int32), last


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """Pad tokens / all tokens of a batch (training batches: segment_ids; prompt batches: prompt_mask)."""
  mask = batch["segment_ids"] if "segment_ids" in batch else batch["prompt_mask"]
  return float(np.mean(np.asarray(mask) == 0))
