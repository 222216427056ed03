"""Rendered texts -> the token sequences training made of the same examples.

Clients (OpenRLHF, vLLM's `/classify` callers) send the conversation already rendered in the
model's template. Training tokenized each example as five pieces (head, prompt, mid, response,
tail; `data.encode`), so a text is split back into those pieces at the template's frame and
tokenized the same way; a text not in the frame is tokenized whole. No special tokens are added:
the text spells them out.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hs2p_jax.data.encode import assemble, fit_lengths, tokenize_all
from hs2p_jax.data.templates import Pieces, split_rendered, template_frame


class BadText(ValueError):
  """An input the server cannot score: empty, or longer than its length (without truncation)."""


class TextEncoder:
  """`encoder(texts) -> [L] int32 sequences`, each at most `max_length` tokens: longer ones are cut
  as training cuts them (the prompt's start first) with `truncate`, else refused (`BadText`)."""

  def __init__(self, tokenizer: Any, template: str, max_length: int, truncate: bool = False):
    self.tokenizer, self.max_length, self.truncate = tokenizer, max_length, truncate
    self.frame = template_frame(template, tokenizer)

  def pieces(self, text: str) -> Pieces:
    """The pieces training tokenized separately (a text outside the template: one prompt piece)."""
    return split_rendered(text, self.frame) or Pieces("", text, "", "", "")

  def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
    split = [self.pieces(t) for t in texts]
    table = tokenize_all(self.tokenizer, [p for pieces in split for p in pieces])
    out = []
    for i, pieces in enumerate(split):
      toks = [table[p] for p in pieces]
      n = sum(len(t) for t in toks)
      if n == 0:
        raise BadText(f"input {i} is empty")
      if n > self.max_length and not self.truncate:
        raise BadText(f"input {i} has {n} tokens, more than the server's {self.max_length} "
                      "(start it with --truncate to cut long inputs as training does)")
      if sum(len(t) for t in (toks[0], toks[2], toks[4])) >= self.max_length:
        raise BadText(f"input {i}: the template alone takes the server's {self.max_length} tokens")
      out.append(assemble(toks, *fit_lengths(toks, self.max_length)))
    return out
