"""HelpSteer2 ratings and HelpSteer2-Preference pairs (nvidia/HelpSteer2 schemas) -> examples.

Ratings: `{prompt, response, helpfulness, correctness, coherence, complexity, verbosity}`, each
rating an integer 0..4, mapped to the NeMo 9-slot layout (HelpSteer's five at indices 4..8).

Preferences (`preference/preference.jsonl.gz`): `{split, prompt, response_1, response_2,
preference_strength, ...justifications}`; strength -3..3, negative = response_1 better, or -100 =
"neither response is valid". Whether the released file still holds ties (0) and -100 rows is not
verified, so both readings are handled the same way: such rows are dropped and counted under the
reasons "tie" and "neither_valid"; a file without them loads unchanged. The justification fields
are not used.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hs2p_jax.data import fields
from hs2p_jax.data.examples import (Drop, LoadReport, NUM_LABELS, PairExample, RatingExample, collect,
                                    invalid_line_counter)
from hs2p_jax.data.records import read_records
from hs2p_jax.errors import UserError
from hs2p_jax.model.reward import ATTRIBUTES

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ATTRIBUTE_MODES = {"helpfulness": ("helpfulness",), "all": HELPSTEER_ATTRIBUTES}
NEITHER_VALID = -100
STRENGTHS = (NEITHER_VALID, -3, -2, -1, 0, 1, 2, 3)
SPLITS = ("train", "validation")


def rating_example(where: str, record: dict, attributes: str = "helpfulness") -> RatingExample:
  """One ratings record -> RatingExample. `attributes`: "helpfulness" labels index 4 only; "all"
  labels indices 4..8. The labelled ratings are required; the others are checked when present."""
  if attributes not in ATTRIBUTE_MODES:
    raise UserError(f"data.attributes={attributes!r}: expected one of {', '.join(ATTRIBUTE_MODES)}")
  prompt = fields.text(record, "prompt", where)
  response = fields.text(record, "response", where)
  labels = np.zeros(NUM_LABELS, np.float32)   # [9]
  mask = np.zeros(NUM_LABELS, bool)           # [9]
  for name in HELPSTEER_ATTRIBUTES:
    used = name in ATTRIBUTE_MODES[attributes]
    if not used and record.get(name) is None:
      continue
    value = fields.integer(record, name, where, range(0, 5))
    if used:
      labels[ATTRIBUTES.index(name)] = value
      mask[ATTRIBUTES.index(name)] = True
  return RatingExample(prompt, response, labels, mask, where)


def preference_example(where: str, record: dict, split: Optional[str] = None) -> PairExample | Drop:
  """One preference record -> PairExample (chosen = response_1 when strength < 0, magnitude |strength|),
  or a Drop: "tie" (0), "neither_valid" (-100), "other_split" (its `split` field is not `split`).
  A record without a `split` field belongs to every split."""
  record_split = fields.optional_text(record, "split", where)
  prompt = fields.text(record, "prompt", where)
  r1 = fields.text(record, "response_1", where)
  r2 = fields.text(record, "response_2", where)
  strength = fields.integer(record, "preference_strength", where, STRENGTHS)
  if split is not None and record_split is not None and record_split != split:
    return Drop("other_split")
  if strength == 0:
    return Drop("tie")
  if strength == NEITHER_VALID:
    return Drop("neither_valid")
  chosen, rejected = (r1, r2) if strength < 0 else (r2, r1)
  return PairExample(prompt, chosen, rejected, float(abs(strength)), None, where)


def load_ratings(source: str, split: Optional[str] = None, attributes: str = "helpfulness",
                 skip_invalid: bool = False) -> tuple[list[RatingExample], LoadReport]:
  """All rating examples of `source` (a file holds one split; `split` picks the hub split)."""
  report = LoadReport(source)
  records = read_records(source, split, on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  examples = collect(records, lambda w, r: rating_example(w, r, attributes), report, skip_invalid)
  return examples, report


def load_preferences(source: str, split: Optional[str] = None,
                     skip_invalid: bool = False) -> tuple[list[PairExample], LoadReport]:
  """The preference pairs of `split` ("train" / "validation" / None = all) of a preference file.
  Both splits live in one file (hub split "train"), told apart by each record's `split` field."""
  if split is not None and split not in SPLITS:
    raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
  report = LoadReport(source)
  records = read_records(source, "train", on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  examples = collect(records, lambda w, r: preference_example(w, r, split), report, skip_invalid)
  return examples, report
