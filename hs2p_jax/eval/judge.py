"""A generative judge (the Pairwise Justifier) on preference pairs: greedy justifications, parsed verdicts.

An answer ends at the template's end-of-turn text (matched on the decoded text) or EOS.

Every pair is judged twice, its chosen response as @Response 1 and then as @Response 2
(`data.sft.justifier_prompt`). A verdict is the last "@Response N is ... better" in the generated
text (the statement follows the elaboration); an answer without one is unparsed and counts as
wrong. Reported: accuracy over both orders, per order, the unparsed answers, the position
consistency (pairs whose two verdicts both parse and name the same underlying response) and, for
sets with subsets, per-subset accuracy and RewardBench sections.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from hs2p_jax.data.batching import pad_left
from hs2p_jax.data.encode import encode
from hs2p_jax.data.examples import PairExample, PromptExample
from hs2p_jax.data.sft import justifier_prompt
from hs2p_jax.data.templates import render
from hs2p_jax.feed import host_global
from hs2p_jax.sample import SamplingConfig, generate_from_state
from hs2p_jax.sharding import DEFAULT_RULES, batch_split, use_mesh
from hs2p_jax.stops import cut_at_stop, stop_automaton

VERDICT = re.compile(r"@Response ([12]) is (?:[A-Za-z]+ )*?better")


def parse_verdict(text: str) -> int | None:
  """1 or 2: the response the last verdict in `text` prefers; None when there is none."""
  found = VERDICT.findall(text)
  return int(found[-1]) if found else None


def judge_texts(lm, tokenizer, template: str, prompts: Sequence[str], *, max_length: int, max_new_tokens: int,
                batch_size: int, mesh=None, rules=None) -> list[str]:
  """Greedy generations for `prompts` (rendered in `template`, cut to `max_length` - `max_new_tokens`
  tokens from the start of the prompt), `batch_size` at a time."""
  enc = encode([PromptExample(p, f"prompt {i}") for i, p in enumerate(prompts)], tokenizer, template,
               max_length - max_new_tokens)
  eos = tuple(lm.cfg.eos_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
  end = render(template, "x", "y", tokenizer).tail.strip()  # the template's end of an answer
  stops = [end] if end else []
  pad = tokenizer.pad_token_id or 0
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos, pad_id=pad)
  automaton = stop_automaton(tokenizer, stops, lm.cfg.vocab_size)
  graphdef, state = nnx.split(lm)
  split = batch_split(mesh, rules) if mesh is not None else 1
  out: list[str] = []
  for i in range(0, len(enc.seqs), batch_size):
    seqs = [s[0] for s in enc.seqs[i:i + batch_size]]
    rows = -(-len(seqs) // split) * split
    width = max(len(s) for s in seqs)
    ids, mask = pad_left(seqs + [seqs[0]] * (rows - len(seqs)), width, pad)
    with use_mesh(mesh, rules or DEFAULT_RULES):
      gen = generate_from_state(graphdef, state, ids, mask, jax.random.key(0), cfg, automaton)
    tokens, lengths = host_global(gen.tokens), host_global(gen.lengths)
    for r in range(len(seqs)):
      text = tokenizer.decode([int(t) for t in tokens[r, :lengths[r]]], skip_special_tokens=False)
      out.append(cut_at_stop(text, stops + [s for s in (tokenizer.eos_token, tokenizer.pad_token) if s]).strip())
  return out


def judge_pairs(lm, tokenizer, template: str, pairs: Sequence[PairExample], **kw: Any) -> dict[str, Any]:
  """The report (module docstring) of judging `pairs` in both orders; `kw` as `judge_texts`."""
  n = len(pairs)
  prompts = [justifier_prompt(p.prompt, p.chosen, p.rejected) for p in pairs] + \
            [justifier_prompt(p.prompt, p.rejected, p.chosen) for p in pairs]
  texts = judge_texts(lm, tokenizer, template, prompts, **kw)
  verdicts = [parse_verdict(t) for t in texts]
  first, second = verdicts[:n], verdicts[n:]
  right = np.array([[a == 1, b == 2] for a, b in zip(first, second)], bool).reshape(n, 2)
  consistent = [a is not None and b is not None and (a == 1) == (b == 2) for a, b in zip(first, second)]
  report: dict[str, Any] = {
      "pairs": n, "answers": 2 * n, "accuracy": float(right.mean()) if n else float("nan"),
      "accuracy_chosen_first": float(right[:, 0].mean()) if n else float("nan"),
      "accuracy_chosen_second": float(right[:, 1].mean()) if n else float("nan"),
      "unparsed": sum(v is None for v in verdicts), "position_consistency": float(np.mean(consistent)) if n else float("nan"),
      "examples": [{"prompt": pairs[i].prompt[:200], "chosen_first": texts[i], "chosen_second": texts[n + i]}
                   for i in range(min(n, 3))]}
  by_subset: dict[str, list[float]] = defaultdict(list)
  for p, r in zip(pairs, right):
    if p.subset:
      by_subset[p.subset].append(float(r.mean()))
  if by_subset:
    from hs2p_jax.eval.rewardbench import EXAMPLE_COUNTS, section_scores
    report["subsets"] = {s: float(np.mean(v)) for s, v in sorted(by_subset.items())}
    known = {s: a for s, a in report["subsets"].items() if s in EXAMPLE_COUNTS}
    if known:
      report["sections"] = section_scores(known)
  return report
