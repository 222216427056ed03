"""Parsed examples (ratings, preference pairs, SFT responses, prompts) and the report of how they were loaded."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, TypeVar, Union

import numpy as np

from hs2p_jax.errors import UserError
from hs2p_jax.model.reward import ATTRIBUTES

NUM_LABELS = len(ATTRIBUTES)  # the NeMo 9-slot label layout


@dataclasses.dataclass(frozen=True, eq=False)
class RatingExample:
  """One rated response: labels [9] float32 in the NeMo layout, label_mask [9] bool (True = labelled)."""

  prompt: str
  response: str
  labels: np.ndarray
  label_mask: np.ndarray
  where: str


@dataclasses.dataclass(frozen=True)
class PairExample:
  """A preference pair: `chosen` is preferred to `rejected` by `magnitude` (1..3 for HelpSteer2-Preference)."""

  prompt: str
  chosen: str
  rejected: str
  magnitude: float
  subset: Optional[str]
  where: str


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """A prompt and the response to learn (supervised fine-tuning; the Pairwise Justifier)."""

  prompt: str
  response: str
  where: str


@dataclasses.dataclass(frozen=True)
class PromptExample:
  """A prompt to generate from (RL)."""

  prompt: str
  where: str


Example = Union[RatingExample, PairExample, SFTExample, PromptExample]
E = TypeVar("E")


@dataclasses.dataclass
class LoadReport:
  """Counts of one load. Invariant: read == kept + sum(dropped.values()) + invalid + dropped_overlong."""

  source: str
  read: int = 0
  kept: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  invalid: int = 0
  truncated: int = 0          # kept examples cut to data.max_length
  dropped_overlong: int = 0   # examples dropped for exceeding data.max_length (overlong=drop)
  first_invalid: Optional[str] = None
  origin: dict = dataclasses.field(default_factory=dict)  # what was read (records.file_origin / hub_origin)

  def drop(self, reason: str, count: int = 1) -> None:
    self.dropped[reason] = self.dropped.get(reason, 0) + count

  def summary(self) -> str:
    """One line: the counts, drop reasons sorted by name."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
    dropped = sum(self.dropped.values())
    return (f"{self.source}: read {self.read}, kept {self.kept}, dropped {dropped}"
            + (f" ({reasons})" if reasons else "")
            + f", invalid {self.invalid}, truncated {self.truncated}, dropped_overlong {self.dropped_overlong}")


class Drop(str):
  """Returned by a record converter instead of an example: the reason the record is left out."""


def collect(records: Iterable[tuple[str, dict]], convert: Callable[[str, dict], Union[E, Drop]],
            report: LoadReport, skip_invalid: bool) -> list[E]:
  """Applies `convert` to every record, counting reads, drops and (with skip_invalid) invalid records."""
  out = []
  for where, record in records:
    report.read += 1
    try:
      result = convert(where, record)
    except UserError as e:
      if not skip_invalid:
        raise
      note_invalid(report, str(e))
      continue
    if isinstance(result, Drop):
      report.drop(str(result))
    else:
      out.append(result)
  report.kept = len(out)
  return out


def note_invalid(report: LoadReport, message: str) -> None:
  """Counts one skipped invalid record (`skip_invalid=True`), keeping the first message."""
  report.invalid += 1
  if report.first_invalid is None:
    report.first_invalid = message


def invalid_line_counter(report: LoadReport) -> Callable[[str], None]:
  """An `on_invalid` callback for `read_records`: a bad line counts as read and invalid."""
  def on_invalid(message: str) -> None:
    report.read += 1
    note_invalid(report, message)
  return on_invalid
