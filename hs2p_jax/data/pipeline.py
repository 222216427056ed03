"""The trainer's data interface: `make_loader` -> a grain-backed iterator of fixed-shape numpy batches.

Batch layout (local to this process; N = batch_size // process_count examples or pairs):
  every training task: input_ids, segment_ids int32 [R, T] (segment 0 = pad; an unpacked row is
    segment 1), valid bool [N] (False = filler of the last batch when repeat=False), example_id
    int32 [N] (index into `loader.examples`, -1 for fillers).
  pairs: score_row, score_index int32 [N, 2] (row / token index of the last token of the chosen
    (column 0) and rejected (column 1) sequence), magnitude float32 [N] (0 for fillers).
    Unpacked: R = 2N (+ padding rows), row 2i = chosen i, row 2i+1 = rejected i.
  regression: score_row, score_index int32 [N], labels float32 [N, 9], label_mask bool [N, 9]
    (all False for fillers). Unpacked: R = N (+ padding rows).
  prompts: prompt_ids, prompt_mask int32 [N, T] left-padded generation prompts (template up to the
    assistant turn; never packed), valid, example_id; no input_ids / segment_ids.
Unpacked rows are right-padded to T = the step's longest sequence rounded up to data.pad_multiple,
capped at data.max_length. Packed rows (data.packing) have T = data.max_length and R = the rows
first-fit packing needs, rounded up to a multiple of 2. With `row_multiple`, rows of padding
(segment 0 throughout, scored by nothing) make the global rows a multiple of the mesh's batch
axes, so that the batch always splits over them. With data.share_prompt, a pair is packed as
one segment [shared prefix | chosen suffix | rejected suffix] (`batching.shared_pair`), and the
batch adds positions, branch_ids int32 [R, T]. T and R are computed over the whole global
step (every process's share), so all processes of a multi-host run build arrays of the same shape.
Fillers repeat example 0 (finite attention everywhere) and are marked by `valid`.
`loader.examples` are the examples left after parsing, filtering and the over-long policy, so that
a repeat=False pass yields each of them exactly once; `padding_fraction(batch)` measures padding.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import grain
import numpy as np

from hs2p_jax import storage
from hs2p_jax.config import DataConfig
from hs2p_jax.data.batching import (CHOSEN, REJECTED, Unit, bucket_length, bucket_lengths, bucket_rows, num_packed_rows,
                                    pack_units, pad_left, pad_right, round_up, row_buckets, shared_pair, unit_targets)
from hs2p_jax.data.encode import encode
from hs2p_jax.data.examples import LoadReport
from hs2p_jax.data.load import load_examples
from hs2p_jax.data.order import FILLER, Order
from hs2p_jax.data.synthetic import resolve_source
from hs2p_jax.errors import UserError

SPLITS = ("train", "validation")
PACKED_ROW_MULTIPLE = 2
_ENDLESS = 2 ** 62


class _Batches:
  """Step index -> this process's batch dict (picklable, so grain workers can run it)."""

  def __init__(self, task: str, seqs: list[tuple[np.ndarray, ...]], extras: dict[str, np.ndarray], order: Order,
               process_index: int, cfg: DataConfig, pad_id: int, row_multiple: int = 1,
               starts: list[tuple[int, ...]] | None = None):
    self.task, self.seqs, self.extras, self.order = task, seqs, extras, order
    self.starts = starts  # pairs with log-prob targets (DPO): each side's first response token
    self.process_index, self.pad_id = process_index, pad_id
    self.row_multiple = row_multiple  # local rows: a multiple of this (the global rows divide the batch axes)
    self.max_length, self.pad_multiple, self.buckets = cfg.max_length, cfg.pad_multiple, cfg.buckets
    self.packing = cfg.packing and task != "prompts"
    self.share_prompt = self.packing and cfg.share_prompt and task == "pairs"
    self.lengths = np.array([[len(s) for s in sides] for sides in seqs], np.int64)  # [E, 1 or 2]
    # packed units of each example: its sequences, or a pair's shared-prompt unit (or two, if too long)
    self.unit_lengths = [[len(u.ids) for u in self.units(i)] for i in range(len(seqs))] if self.share_prompt else None

  @property
  def packed_multiple(self) -> int:
    return math.lcm(PACKED_ROW_MULTIPLE, self.row_multiple)

  @property
  def most_units(self) -> int:
    """The most packed units a batch can hold: one row each at worst."""
    return self.order.local_batch * (2 if self.task == "pairs" else 1)

  def shapes(self) -> list[tuple[int, int]]:
    """Every (R, T) of this process's token arrays [R, T] the batches can come in."""
    if self.packing:
      return [(r, self.max_length) for r in row_buckets(self.packed_multiple, self.most_units, self.buckets)]
    rows = round_up(self.most_units, self.row_multiple)
    return [(rows, t) for t in bucket_lengths(self.pad_multiple, self.max_length, self.buckets)]

  def units(self, i: int) -> list[Unit]:
    starts = self.starts[i] if self.starts is not None else None
    if self.share_prompt:
      return shared_pair(*self.seqs[i], self.max_length, starts)
    if starts is None:
      return [Unit.sequence(s) for s in self.seqs[i]]
    return [Unit.sequence(s, st, bit) for s, st, bit in zip(self.seqs[i], starts, (CHOSEN, REJECTED))]

  def _packed_rows(self, ids: np.ndarray) -> int:
    ids = np.maximum(ids, 0)
    lengths = ([n for i in ids for n in self.unit_lengths[i]] if self.share_prompt
               else self.lengths[ids].ravel().tolist())
    return num_packed_rows(lengths, self.max_length)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    ids_all = [self.order.ids(step, p) for p in range(self.order.process_count)]
    ids = ids_all[self.process_index]
    valid = ids != FILLER
    src = np.where(valid, ids, 0)
    seqs = [s for i in src for s in self.seqs[i]]  # pairs: chosen i, rejected i interleaved
    out: dict[str, np.ndarray] = {}
    if self.task == "prompts":
      t = bucket_length(max(int(self.lengths[np.maximum(i, 0)].max()) for i in ids_all), self.pad_multiple,
                        self.max_length, self.buckets)
      out["prompt_ids"], out["prompt_mask"] = pad_left(seqs, t, self.pad_id)
    elif self.packing:
      rows = bucket_rows(max(self._packed_rows(i) for i in ids_all), self.packed_multiple, self.most_units,
                         self.buckets)
      per_example = [self.units(i) for i in src]
      units = [u for us in per_example for u in us]
      placement: list = []
      packed, out["score_row"], out["score_index"] = pack_units(units, self.max_length, rows, self.pad_id, placement)
      keys = ("input_ids", "segment_ids") + (("positions", "branch_ids") if self.share_prompt else ())
      out.update({k: packed[k] for k in keys})
      if self.starts is not None:
        pair_of = [k for k, us in enumerate(per_example) for _ in us]
        out.update(unit_targets(units, placement, pair_of, packed["input_ids"].shape))
    else:
      t = bucket_length(max(int(self.lengths[np.maximum(i, 0)].max()) for i in ids_all), self.pad_multiple,
                        self.max_length, self.buckets)
      filler_rows = [seqs[0][:0]] * (round_up(len(seqs), self.row_multiple) - len(seqs))  # all padding
      out["input_ids"], out["segment_ids"] = pad_right(seqs + filler_rows, t, self.pad_id)
      out["row_lengths"] = out["segment_ids"].sum(axis=1, dtype=np.int32)  # right-padded: kernels take lengths
      out["score_row"] = np.arange(len(seqs), dtype=np.int32)
      out["score_index"] = np.array([len(s) - 1 for s in seqs], np.int32)
      if self.starts is not None:  # pairs: row 2k chosen of pair k, row 2k + 1 its rejected
        units = [u for i in src for u in self.units(i)]
        owner = [k for k, i in enumerate(src) for _ in self.seqs[i]]  # the example of each row
        out.update(unit_targets(units, [(r, 0) for r in range(len(units))], owner, out["input_ids"].shape))
    if self.task == "pairs":
      out["score_row"] = out["score_row"].reshape(-1, 2)
      out["score_index"] = out["score_index"].reshape(-1, 2)
      out["magnitude"] = np.where(valid, self.extras["magnitude"][src], 0).astype(np.float32)
    elif self.task == "regression":
      out["labels"] = self.extras["labels"][src]
      out["label_mask"] = self.extras["label_mask"][src] & valid[:, None]
    out["valid"] = valid
    out["example_id"] = np.where(valid, ids, -1).astype(np.int32)
    return out


class _StepIterator:
  """Batches from `step` on, counting the steps it has handed out (its state)."""

  def __init__(self, loader: "Loader", step: int):
    self._loader = loader
    self.seek(step)

  def seek(self, step: int) -> None:
    self.close()
    self.step = step
    self._inner = iter(self._loader._grain_dataset(step))

  def close(self) -> None:
    inner = getattr(self, "_inner", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()
    self._inner = None

  def __iter__(self) -> "_StepIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._inner)
    self.step += 1
    return batch


class Loader:
  """Iterable of local batches (module docstring). `iter(loader)` starts a new pass at the beginning,
  or at the state given to `set_state` since the last `iter`. `get_state()` is the JSON-serialisable
  position of the latest iterator (the number of batches it yielded, plus what identifies the data
  order); `set_state(state)` moves the latest iterator (if any) there, and otherwise the next one, so
  that it yields exactly the batches that followed `get_state()`, with any `num_workers`."""

  def __init__(self, batches: _Batches, examples: list, report: LoadReport, fingerprint: dict, num_workers: int):
    self.examples = examples
    self.report = report
    self.num_batches: Optional[int] = batches.order.num_steps  # per pass; None = endless (repeat)
    self._batches = batches
    self._fingerprint = fingerprint
    self._num_workers = num_workers
    self._it: Optional[_StepIterator] = None
    self._pending: Optional[int] = None

  def _grain_dataset(self, start: int) -> grain.IterDataset:
    """Batches start, start + 1, ... as a grain pipeline: one prefetch thread, or worker processes."""
    ds = grain.MapDataset.range(start, self.num_batches or _ENDLESS).map(self._batches)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if self._num_workers > 0:
      from absl import flags  # grain's worker processes read absl flags, which must count as parsed
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
      ds = ds.map(_own_memory)  # copies out of grain's shared memory, which the consumer would pin
    return ds

  def shapes(self) -> list[tuple[int, int]]:
    """Every (R, T) of this process's token arrays the batches can come in (`data.buckets`)."""
    return self._batches.shapes()

  def length_buckets(self) -> list[int]:
    """The padded lengths T its batches can come in, given its examples: the buckets of their lengths."""
    b = self._batches
    return sorted({bucket_length(int(n), b.pad_multiple, b.max_length, b.buckets) for n in np.ravel(b.lengths)})

  @property
  def packing(self) -> bool:
    """Whether rows are packed (else one right-padded sequence a row, with `row_lengths`)."""
    return self._batches.packing

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an endless (repeat=True) loader has no length")
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self._it = _StepIterator(self, self._pending or 0)
    self._pending = None
    return self._it

  def close(self) -> None:
    """Stops the latest iterator's worker processes (num_workers > 0)."""
    if self._it is not None:
      self._it.close()
    self._it = None

  def get_state(self) -> dict[str, Any]:
    step = self._it.step if self._it is not None else (self._pending or 0)
    return {"step": step, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise UserError("data iterator state: expected the mapping returned by get_state()")
    for key, value in self._fingerprint.items():
      if state.get(key) != value:
        raise UserError(f"data iterator state: {key}={state.get(key)!r} does not match this loader's {value!r}")
    if self._it is not None:
      self._it.seek(step)
    else:
      self._pending = step


def _own_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in batch.items()}


def _extras(task: str, examples: list) -> dict[str, np.ndarray]:
  if task == "pairs":
    return {"magnitude": np.array([ex.magnitude for ex in examples], np.float32)}
  if task == "regression":
    return {"labels": np.stack([ex.labels for ex in examples]).astype(np.float32),
            "label_mask": np.stack([ex.label_mask for ex in examples]).astype(bool)}
  return {}


def default_cache_dir() -> str:
  """Where built-in data is generated when no cache_dir is given: the host's cache (`storage.cache_root`)."""
  return storage.cache_root()


def make_loader(cfg: DataConfig, tokenizer: Any, *, split: str, task: str, batch_size: int, seed: int = 0,
                shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
                cache_dir: Optional[str] = None, row_multiple: int = 1, targets: bool = False) -> Loader:
  """A Loader over `cfg.train` or `cfg.validation` (None or "builtin" = generated data) for `task`
  ("regression" | "pairs" | "sft" | "prompts"); `batch_size` is global (examples, or pairs for "pairs").
  The global rows of every training batch (all processes') are a multiple of `row_multiple` (the
  mesh's batch-axis size: `sharding.batch_split`), made so with rows of padding. `targets` (pairs):
  batches also carry the response tokens' log-prob targets (`batching.unit_targets`), for DPO."""
  if split not in SPLITS:
    raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
  if not 0 <= process_index < process_count:
    raise UserError(f"process index {process_index} out of range for {process_count} process(es)")
  if not 1 <= cfg.pad_multiple <= cfg.max_length:
    raise UserError(f"data.pad_multiple={cfg.pad_multiple}: must be in 1..data.max_length={cfg.max_length}")
  spec = cfg.train if split == "train" else cfg.validation
  source = resolve_source(spec, split, cfg.format, cache_dir or default_cache_dir(), size=cfg.builtin_size)
  examples, report = load_examples(source, cfg.format, split, task, attributes=cfg.attributes,
                                   skip_invalid=cfg.skip_invalid, domains=cfg.domains, languages=cfg.languages)
  encoded = encode(examples, tokenizer, cfg.template, cfg.max_length, cfg.overlong)
  examples = [examples[i] for i in encoded.keep]
  report.truncated, report.dropped_overlong, report.kept = encoded.truncated, encoded.dropped, len(examples)
  if not examples:
    raise UserError(f"{source}: no {split} examples left ({report.summary()})")
  order = Order(len(examples), batch_size, process_count, seed=seed, shuffle=shuffle, repeat=repeat)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  local_multiple = row_multiple // math.gcd(row_multiple, process_count)  # P * local rows divide row_multiple
  targets = targets or task == "sft"
  if targets and task not in ("pairs", "sft"):
    raise ValueError("log-prob targets are for pairs and SFT")
  batches = _Batches(task, encoded.seqs, _extras(task, examples), order, process_index, cfg, pad_id, local_multiple,
                     encoded.starts if targets else None)
  # what fixes the order of the batches; not this process's index: every process of a run reads the
  # same number of steps, and the state one process saves restores on each
  fingerprint = {"examples": len(examples), "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
                 "repeat": repeat, "processes": process_count, "task": task + ("+targets" * targets)}
  return Loader(batches, examples, report, fingerprint, cfg.num_workers)
