"""Supervised fine-tuning examples: `{prompt, response}` records, the chosen side of any pair data,
and the Pairwise Justifier's task built from HelpSteer2-Preference records.

The justifier (the paper's generative baseline) reads both responses and writes NVIDIA's
justification: its input is `justifier_prompt(prompt, response_1, response_2)`, its target the
record's `preference_elaboration` followed by its `preference_statement` (e.g. "@Response 2 is
better."). Rows of other splits are dropped ("other_split"), rows without a statement too
("no_statement"); ties and "neither valid" rows are kept: their statements are answers to learn.
"""

from __future__ import annotations

from typing import Optional

from hs2p_jax.data import fields
from hs2p_jax.data.examples import Drop, LoadReport, SFTExample, collect, invalid_line_counter
from hs2p_jax.data.records import read_records

JUSTIFIER_QUESTION = "Between @Response 1 and @Response 2, which is better?"


def justifier_prompt(prompt: str, response_1: str, response_2: str) -> str:
  """The Pairwise Justifier's input for one pair, in the paper's layout."""
  return f"{prompt} @Response 1:\n{response_1}\n@Response 2:\n{response_2}\n{JUSTIFIER_QUESTION}"


def justifier_target(elaboration: str, statement: str) -> str:
  return f"{elaboration.strip()}\n{statement.strip()}" if elaboration.strip() else statement.strip()


def sft_example(where: str, record: dict) -> SFTExample:
  """`{prompt, response}` -> SFTExample."""
  return SFTExample(fields.text(record, "prompt", where), fields.text(record, "response", where), where)


def justifier_example(where: str, record: dict, split: Optional[str] = None) -> SFTExample | Drop:
  """A HelpSteer2-Preference record -> the justifier's (input, justification) example, or a Drop."""
  record_split = fields.optional_text(record, "split", where)
  prompt = fields.text(record, "prompt", where)
  r1, r2 = fields.text(record, "response_1", where), fields.text(record, "response_2", where)
  statement = fields.optional_text(record, "preference_statement", where)
  elaboration = fields.optional_text(record, "preference_elaboration", where) or ""
  if split is not None and record_split is not None and record_split != split:
    return Drop("other_split")
  if not statement or not statement.strip():
    return Drop("no_statement")
  return SFTExample(justifier_prompt(prompt, r1, r2), justifier_target(elaboration, statement), where)


def load_sft(source: str, fmt: str, split: Optional[str] = None,
             skip_invalid: bool = False) -> tuple[list[SFTExample], LoadReport]:
  """SFT examples of a `sft` ({prompt, response}) or `justifier` (HelpSteer2-Preference) source;
  a preference file holds both splits (hub split "train"), told apart by each record's `split`."""
  report = LoadReport(source)
  on_invalid = invalid_line_counter(report) if skip_invalid else None
  if fmt == "justifier":
    records = read_records(source, "train", on_invalid=on_invalid, origin=report.origin)
    return collect(records, lambda w, r: justifier_example(w, r, split), report, skip_invalid), report
  records = read_records(source, split, on_invalid=on_invalid, origin=report.origin)
  return collect(records, sft_example, report, skip_invalid), report
