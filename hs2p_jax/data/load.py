"""One entry point from (source, data.format, split, task) to the examples a task consumes."""

from __future__ import annotations

from typing import Optional, Sequence

from hs2p_jax.data.examples import Example, LoadReport, SFTExample
from hs2p_jax.data.helpsteer2 import load_preferences, load_ratings
from hs2p_jax.data.helpsteer3 import load_helpsteer3
from hs2p_jax.data.pairs import load_pairs
from hs2p_jax.data.prompts import distinct_prompts, load_prompts
from hs2p_jax.data.sft import load_sft
from hs2p_jax.errors import UserError

FORMATS = ("helpsteer2", "helpsteer2-preference", "helpsteer3-preference", "pairs", "hh", "rewardbench", "prompts",
           "sft", "justifier")
TASKS = {  # task -> formats that can feed it
    "regression": ("helpsteer2",),
    "pairs": ("helpsteer2-preference", "helpsteer3-preference", "pairs", "hh", "rewardbench"),
    "sft": ("sft", "justifier", "helpsteer2-preference", "helpsteer3-preference", "pairs", "hh"),  # pairs: the chosen
    "prompts": ("helpsteer2", "helpsteer2-preference", "helpsteer3-preference", "pairs", "hh", "rewardbench", "prompts"),
}
_HUB_SPLIT = {"hh": {"validation": "test"}}  # Anthropic/hh-rlhf names its held-out split "test"


def load_examples(source: str, fmt: str, split: Optional[str], task: str, *, attributes: str = "helpfulness",
                  skip_invalid: bool = False, domains: Optional[Sequence[str]] = None,
                  languages: Optional[Sequence[str]] = None) -> tuple[list[Example], LoadReport]:
  """Parsed, filtered examples of `source` for `task` ("regression" | "pairs" | "sft" | "prompts").

  `split` ("train" / "validation") filters HelpSteer2-Preference rows by their `split` field and
  picks the hub split of `hf:` sources; a local file otherwise holds one split. For "prompts",
  ratings and pair sources give their distinct prompts. `domains` / `languages` filter
  HelpSteer3-Preference records."""
  if task not in TASKS:
    raise UserError(f"task {task!r}: expected one of {', '.join(TASKS)}")
  if fmt not in TASKS[task]:
    raise UserError(f"data.format={fmt!r} cannot feed the {task} task (expected one of {', '.join(TASKS[task])})")
  hub_split = _HUB_SPLIT.get(fmt, {}).get(split, split)
  if fmt in ("sft", "justifier"):
    return load_sft(source, fmt, split if fmt == "justifier" else hub_split, skip_invalid)
  if fmt == "helpsteer2":
    examples, report = load_ratings(source, hub_split, attributes, skip_invalid)
  elif fmt == "helpsteer2-preference":
    examples, report = load_preferences(source, split, skip_invalid)
  elif fmt == "helpsteer3-preference":
    examples, report = load_helpsteer3(source, hub_split, skip_invalid, domains, languages)
  elif fmt == "prompts":
    return load_prompts(source, hub_split, skip_invalid)
  else:
    examples, report = load_pairs(source, fmt, hub_split, skip_invalid)
  if task == "prompts":
    return distinct_prompts(examples, report)
  if task == "sft":  # the preferred response of each pair
    return [SFTExample(ex.prompt, ex.chosen, ex.where) for ex in examples], report
  return examples, report
