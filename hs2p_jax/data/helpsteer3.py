"""HelpSteer3-Preference pairs (nvidia/HelpSteer3, data dir "preference") -> examples.

Records: `{domain, language, context, response1, response2, overall_preference, individual_preference}`;
`context` is a list of `{role, content}` turns (user / assistant, starting and ending with a user
turn) or a plain string (one user turn); `overall_preference` is -3..3, negative = response1
better. Ties (0) are dropped and counted ("tie"); `domains` / `languages` keep only the records
whose `domain` / `language` is listed (case-insensitive; others dropped as "other_domain" /
"other_language"). The context becomes a HelpSteer2 multi-turn prompt (`templates.join_turns`),
so the chosen template renders its turns; a pair's subset is its domain (per-domain accuracy).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from hs2p_jax.data import fields
from hs2p_jax.data.examples import Drop, LoadReport, PairExample, collect, invalid_line_counter
from hs2p_jax.data.records import read_records
from hs2p_jax.data.templates import join_turns
from hs2p_jax.errors import UserError

ROLES = ("user", "assistant")


def context_prompt(context: Any, where: str) -> str:
  """A HelpSteer3 `context` (turn list or string) -> a HelpSteer2 multi-turn prompt string."""
  if isinstance(context, str):
    if not context.strip():
      raise UserError(f"{where}: field 'context' is empty")
    return context
  if not isinstance(context, (list, tuple)) or not context:
    raise UserError(f"{where}: field 'context' must be a string or a non-empty list of {{role, content}} turns")
  turns = []
  for i, turn in enumerate(context):
    if not isinstance(turn, dict):
      raise UserError(f"{where}: context[{i}] must be an object with 'role' and 'content'")
    role, content = turn.get("role"), turn.get("content")
    if role not in ROLES:
      raise UserError(f"{where}: context[{i}].role={role!r}: expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
      raise UserError(f"{where}: context[{i}].content must be a string")
    if i == 0 and role != "user":
      raise UserError(f"{where}: context must start with a user turn (it starts with an assistant turn)")
    turns.append({"role": role, "content": content})
  if turns[-1]["role"] != "user":
    raise UserError(f"{where}: context must end with a user turn (it ends with an assistant turn)")
  return join_turns(turns)


def _allowed(values: Optional[Sequence[str]]) -> Optional[set[str]]:
  return None if not values else {v.lower() for v in values}


def preference_example(where: str, record: dict, domains: Optional[set[str]] = None,
                       languages: Optional[set[str]] = None) -> PairExample | Drop:
  """One HelpSteer3 record -> PairExample (magnitude |overall_preference|, subset = domain), or a Drop."""
  domain = fields.optional_text(record, "domain", where)
  language = fields.optional_text(record, "language", where)
  if "context" not in record or record["context"] is None:
    raise UserError(f"{where}: missing field 'context'")
  prompt = context_prompt(record["context"], where)
  r1, r2 = fields.text(record, "response1", where), fields.text(record, "response2", where)
  strength = fields.integer(record, "overall_preference", where, range(-3, 4))
  if domains is not None and (domain or "").lower() not in domains:
    return Drop("other_domain")
  if languages is not None and (language or "").lower() not in languages:
    return Drop("other_language")
  if strength == 0:
    return Drop("tie")
  chosen, rejected = (r1, r2) if strength < 0 else (r2, r1)
  return PairExample(prompt, chosen, rejected, float(abs(strength)), domain, where)


def load_helpsteer3(source: str, split: Optional[str] = None, skip_invalid: bool = False,
                    domains: Optional[Sequence[str]] = None,
                    languages: Optional[Sequence[str]] = None) -> tuple[list[PairExample], LoadReport]:
  """The pairs of a HelpSteer3-Preference source (a local file holds one split; `split` picks the
  hub split: train / validation)."""
  report = LoadReport(source)
  d, lang = _allowed(domains), _allowed(languages)
  records = read_records(source, split, on_invalid=invalid_line_counter(report) if skip_invalid else None,
                         origin=report.origin)
  return collect(records, lambda w, r: preference_example(w, r, d, lang), report, skip_invalid), report
