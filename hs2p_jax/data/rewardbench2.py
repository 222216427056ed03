"""RewardBench 2 rows (allenai/reward-bench-2, split "test") -> prompts with their completions.

A row: `{id, prompt, chosen: [str, ...], rejected: [str, ...], num_correct, subset, ...}`; the
`chosen` list holds the correct completions (`num_correct` of them), `rejected` the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hs2p_jax.data import fields
from hs2p_jax.data.examples import LoadReport, collect, invalid_line_counter
from hs2p_jax.data.records import read_records
from hs2p_jax.errors import UserError

HUB_SPLIT = "test"


@dataclasses.dataclass(frozen=True)
class CompletionGroup:
  """One prompt and every completion to score, the `num_correct` correct ones first."""

  id: str
  prompt: str
  completions: tuple[str, ...]
  num_correct: int
  subset: str
  where: str


def _texts(record: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
  value = record.get(key)
  if value is None:
    raise UserError(f"{where}: missing field {key!r}")
  if isinstance(value, str) or not hasattr(value, "__len__") or len(value) == 0:
    raise UserError(f"{where}: field {key!r} must be a non-empty list of strings")
  for i, v in enumerate(value):
    if not isinstance(v, str):
      raise UserError(f"{where}: field {key!r}[{i}] must be a string, got {type(v).__name__}")
  return tuple(value)


def group_example(where: str, record: dict[str, Any]) -> CompletionGroup:
  """A RewardBench 2 row -> CompletionGroup; `num_correct` must equal the length of `chosen`, and a
  Ties row's id must be "ref:N" or "tied:N" (a tied row with several correct completions)."""
  if record.get("id") is None:
    raise UserError(f"{where}: missing field 'id'")
  prompt = fields.text(record, "prompt", where)
  chosen, rejected = _texts(record, "chosen", where), _texts(record, "rejected", where)
  num_correct = fields.integer(record, "num_correct", where, range(1, len(chosen) + 1))
  if num_correct != len(chosen):
    raise UserError(f"{where}: num_correct={num_correct} but 'chosen' holds {len(chosen)} completions")
  subset, rid = fields.text(record, "subset", where), str(record["id"])
  if subset.lower() == "ties":  # the Ties formula pairs "ref:N" and "tied:N" rows
    kind, _, num = rid.partition(":")
    if kind not in ("ref", "tied") or not num.strip().isdigit():
      raise UserError(f"{where}: Ties row id {rid!r}: expected 'ref:N' or 'tied:N'")
    if kind == "tied" and num_correct < 2:
      raise UserError(f"{where}: Ties row {rid!r} has {num_correct} correct completion (a tied prompt needs several)")
  return CompletionGroup(rid, prompt, chosen + rejected, num_correct, subset, where)


def load_groups(source: str, skip_invalid: bool = False) -> tuple[list[CompletionGroup], LoadReport]:
  """The rows of a RewardBench 2 source (a local file, or `hf:allenai/reward-bench-2`, split "test")."""
  report = LoadReport(source)
  records = read_records(source, HUB_SPLIT, on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  return collect(records, group_example, report, skip_invalid), report
