"""Preference pairs from generic `{prompt, chosen, rejected}` files, HH-RLHF dialogues and RewardBench.

HH-RLHF records are `{chosen, rejected}` whole dialogues (`\\n\\nHuman: ...\\n\\nAssistant: ...`) that
share every turn but the last assistant turn. The shared turns become a HelpSteer2 multi-turn
prompt (`templates.join_turns`), the two last assistant turns the responses. Real HH files have a
few damaged dialogues; they are dropped and counted: "prompt_mismatch" (the two dialogues differ
before their last assistant turn), "malformed" (no turns, or not starting with a Human turn),
"empty_response" and "identical" (both final responses equal).
"""

from __future__ import annotations

import re
from typing import Optional

from hs2p_jax.data import fields
from hs2p_jax.data.examples import Drop, LoadReport, PairExample, collect, invalid_line_counter
from hs2p_jax.data.records import read_records
from hs2p_jax.data.templates import join_turns

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def pair_example(where: str, record: dict) -> PairExample:
  """`{prompt, chosen, rejected[, magnitude][, subset]}` -> PairExample (magnitude defaults to 1.0)."""
  prompt = fields.text(record, "prompt", where)
  chosen = fields.text(record, "chosen", where)
  rejected = fields.text(record, "rejected", where)
  magnitude = fields.positive_number(record, "magnitude", where, default=1.0)
  return PairExample(prompt, chosen, rejected, magnitude, fields.optional_text(record, "subset", where), where)


def rewardbench_example(where: str, record: dict) -> PairExample:
  """A RewardBench row `{prompt, chosen, chosen_model, rejected, rejected_model, subset, id}`."""
  prompt = fields.text(record, "prompt", where)
  chosen = fields.text(record, "chosen", where)
  rejected = fields.text(record, "rejected", where)
  return PairExample(prompt, chosen, rejected, 1.0, fields.text(record, "subset", where), where)


def split_dialogue(dialogue: str) -> Optional[tuple[str, str]]:
  """An HH dialogue -> (HelpSteer2 prompt of all turns but the last assistant turn, last assistant
  turn), or None if it does not start with a Human turn or has no assistant turn."""
  last = dialogue.rfind(ASSISTANT)
  if last < 0 or not dialogue.startswith(HUMAN):
    return None
  parts = _HH_TURN.split(dialogue[:last])  # ["", role, text, role, text, ...]
  messages = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
              for role, text in zip(parts[1::2], parts[2::2])]
  return join_turns(messages), dialogue[last + len(ASSISTANT):].strip()


def hh_example(where: str, record: dict) -> PairExample | Drop:
  """An HH-RLHF `{chosen, rejected}` record -> PairExample (magnitude 1.0), or a Drop (module doc)."""
  chosen = fields.text(record, "chosen", where)
  rejected = fields.text(record, "rejected", where)
  if chosen[:chosen.rfind(ASSISTANT)] != rejected[:rejected.rfind(ASSISTANT)]:
    return Drop("prompt_mismatch")
  c, r = split_dialogue(chosen), split_dialogue(rejected)
  if c is None or r is None:
    return Drop("malformed")
  if not c[1] or not r[1]:
    return Drop("empty_response")
  if c[1] == r[1]:
    return Drop("identical")
  return PairExample(c[0], c[1], r[1], 1.0, None, where)


_CONVERTERS = {"pairs": pair_example, "hh": hh_example, "rewardbench": rewardbench_example}
_HUB_SPLITS = {"rewardbench": "filtered"}


def load_pairs(source: str, fmt: str = "pairs", split: Optional[str] = None,
               skip_invalid: bool = False) -> tuple[list[PairExample], LoadReport]:
  """Pairs of a `pairs`, `hh` or `rewardbench` source. `split` is the hub split (RewardBench: always
  "filtered"); local files hold one split."""
  convert = _CONVERTERS[fmt]
  report = LoadReport(source)
  records = read_records(source, _HUB_SPLITS.get(fmt, split),
                         on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  return collect(records, convert, report, skip_invalid), report
