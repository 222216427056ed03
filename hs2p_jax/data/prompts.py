"""Prompts for RL: `{prompt}` records, or the distinct prompts of any ratings or pair data."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from hs2p_jax.data import fields
from hs2p_jax.data.examples import Example, LoadReport, PromptExample, collect, invalid_line_counter
from hs2p_jax.data.records import read_records


def prompt_example(where: str, record: dict) -> PromptExample:
  """`{prompt, ...}` -> PromptExample (other fields are ignored)."""
  return PromptExample(fields.text(record, "prompt", where), where)


def load_prompts(source: str, split: Optional[str] = None,
                 skip_invalid: bool = False) -> tuple[list[PromptExample], LoadReport]:
  """The prompts of a `{prompt}` file (duplicates kept)."""
  report = LoadReport(source)
  records = read_records(source, split, on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  return collect(records, prompt_example, report, skip_invalid), report


def distinct_prompts(examples: Sequence[Example], report: LoadReport) -> tuple[list[PromptExample], LoadReport]:
  """The first example of each distinct prompt, in order; repeats are counted as "duplicate_prompt"."""
  seen: set[str] = set()
  out = []
  for ex in examples:
    if ex.prompt in seen:
      continue
    seen.add(ex.prompt)
    out.append(PromptExample(ex.prompt, ex.where))
  report = dataclasses.replace(report, dropped=dict(report.dropped))
  if len(examples) > len(out):
    report.drop("duplicate_prompt", len(examples) - len(out))
  report.kept = len(out)
  return out, report
