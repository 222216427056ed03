"""Examples -> token sequences in a template, fitted to `data.max_length`.

Over-long sequences: "truncate" cuts tokens from the start of the prompt (earliest turns first),
keeping the template's head, the response and the end marker; if the response alone is still too
long, its tail is cut (the end marker stays). Both sides of a pair lose the same prompt tokens, so
they are scored on the same context. "drop" leaves out the example (a pair if either side is too
long). Pieces are tokenized separately (no special tokens added), so a generation prompt's tokens
are exactly the prefix of the training sequence of the same prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hs2p_jax.data.examples import Example, PairExample, PromptExample, RatingExample, SFTExample
from hs2p_jax.data.templates import Pieces, render
from hs2p_jax.errors import UserError

OVERLONG = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class Encoded:
  """The kept examples' token sequences: one per example (ratings, prompts) or two (pair: chosen, rejected)."""

  keep: list[int]                        # indices of the kept examples in the input list
  seqs: list[tuple[np.ndarray, ...]]     # per kept example: int32 [L] token arrays
  truncated: int                         # kept examples that were cut
  dropped: int                           # examples dropped as over-long
  starts: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # per sequence: its response's first token


def fit_lengths(pieces: Sequence[Sequence[int]], max_length: int, prompt_cut: int | None = None) -> tuple[int, int]:
  """(prompt tokens to cut from the start, response tokens to keep) for 5 token pieces of one sequence.
  `prompt_cut`, if given, overrides the computed cut (used to cut both sides of a pair alike)."""
  head, prompt, mid, response, tail = (len(p) for p in pieces)
  fixed = head + mid + tail
  if fixed >= max_length:
    raise UserError(f"data.max_length={max_length}: the template alone takes {fixed} tokens; raise data.max_length")
  if prompt_cut is None:
    prompt_cut = max(0, fixed + prompt + response - max_length)
  prompt_cut = min(prompt, prompt_cut)
  room = max_length - fixed - (prompt - prompt_cut)
  return prompt_cut, min(response, room)


def assemble(pieces: Sequence[np.ndarray], prompt_cut: int, response_keep: int) -> np.ndarray:
  """int32 [L] head + prompt[prompt_cut:] + mid + response[:response_keep] + tail."""
  head, prompt, mid, response, tail = pieces
  return np.concatenate([head, prompt[prompt_cut:], mid, response[:response_keep], tail]).astype(np.int32)


def _renders(ex: Example, template: str, tokenizer: Any) -> list[Pieces]:
  if isinstance(ex, PairExample):
    return [render(template, ex.prompt, ex.chosen, tokenizer), render(template, ex.prompt, ex.rejected, tokenizer)]
  if isinstance(ex, (RatingExample, SFTExample)):
    return [render(template, ex.prompt, ex.response, tokenizer)]
  if isinstance(ex, PromptExample):
    return [render(template, ex.prompt, None, tokenizer)]
  raise TypeError(f"not an example: {type(ex).__name__}")


def tokenize_all(tokenizer: Any, texts: Sequence[str], chunk: int = 1024) -> dict[str, np.ndarray]:
  """Distinct strings -> int32 token arrays (no special tokens added)."""
  unique = list(dict.fromkeys(texts))
  out: dict[str, np.ndarray] = {}
  for i in range(0, len(unique), chunk):
    batch = unique[i:i + chunk]
    for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
      out[text] = np.asarray(ids, np.int32)
  return out


def encode(examples: Sequence[Example], tokenizer: Any, template: str, max_length: int,
           overlong: str = "truncate") -> Encoded:
  """Renders, tokenizes and fits every example (module docstring for the over-long policy)."""
  if overlong not in OVERLONG:
    raise UserError(f"data.overlong={overlong!r}: expected one of {', '.join(OVERLONG)}")
  rendered = [_renders(ex, template, tokenizer) for ex in examples]
  table = tokenize_all(tokenizer, [piece for sides in rendered for p in sides for piece in p])
  keep, seqs, starts, truncated = [], [], [], 0
  for i, sides in enumerate(rendered):
    toks = [[table[piece] for piece in p] for p in sides]
    cut = max(fit_lengths(t, max_length)[0] for t in toks)
    fits = [fit_lengths(t, max_length, cut) for t in toks]
    cut_any = any(c > 0 or r < len(t[3]) for (c, r), t in zip(fits, toks))
    if cut_any and overlong == "drop":
      continue
    truncated += cut_any
    keep.append(i)
    seqs.append(tuple(assemble(t, c, r) for (c, r), t in zip(fits, toks)))
    starts.append(tuple(len(t[0]) + len(t[1]) - c + len(t[2]) for (c, _), t in zip(fits, toks)))
  return Encoded(keep, seqs, truncated, len(examples) - len(keep), starts)
