"""Rendered texts -> the token sequences training made of the same examples.

Clients (OpenRLHF, vLLM's `/classify` callers) send the conversation already rendered in the
model's template. Training tokenized each example as five pieces (head, prompt, mid, response,
tail; `data.encode`), so a text is split back into those pieces at the template's frame and
tokenized the same way; a text not in the frame is tokenized whole (counted, and said once). No
special tokens are added: the text spells them out.

Clients send the frame's end in more than one way: OpenRLHF decodes the generated ids, so its text
stops at the end-of-turn token without what the template writes after it (a newline), or ends with
the tokenizer's end-of-sequence token instead. Such a text is completed to the frame's tail and
scores what the fully rendered text scores.

A text longer than `max_length` times the longest token (in characters) is over-long without
tokenizing it: refused, or with truncation cut first (the prompt's start, then the response's end)
to that many characters, then cut as training cuts it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from hs2p_jax.data.encode import assemble, fit_lengths, tokenize_all
from hs2p_jax.data.templates import Pieces, split_rendered, template_frame


class BadText(ValueError):
  """An input the server cannot score: empty, or longer than its length (without truncation)."""


class TextEncoder:
  """`encoder(texts) -> [L] int32 sequences`, each at most `max_length` tokens: longer ones are cut
  as training cuts them (the prompt's start first) with `truncate`, else refused (`BadText`)."""

  def __init__(self, tokenizer: Any, template: str, max_length: int, truncate: bool = False,
               log: Callable[[str], None] | None = None):
    self.tokenizer, self.max_length, self.truncate = tokenizer, max_length, truncate
    self.frame = template_frame(template, tokenizer)
    self.eos = getattr(tokenizer, "eos_token", None) or None
    # an upper bound on one token's characters: a token's text is never longer than its vocabulary entry
    self.max_chars = max_length * max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    self.outside = 0  # texts tokenized whole, outside the template
    self.log = log

  def _forms(self, text: str):
    """`text`, then what it is with the frame's tail completed (an end-of-turn token without what
    follows it; the end-of-sequence token in the tail's place)."""
    yield text
    tail = self.frame.tail
    base = text
    if self.eos and text.endswith(self.eos) and not tail.rstrip().endswith(self.eos):
      base = text[:-len(self.eos)]
      yield base + tail
    for k in range(len(tail) - 1, 0, -1):
      if base.endswith(tail[:k]) and tail[:k].strip():
        yield base + tail[k:]
        return

  def pieces(self, text: str) -> Pieces:
    """The pieces training tokenized separately (a text outside the template: one prompt piece)."""
    for form in self._forms(text):
      split = split_rendered(form, self.frame)
      if split is not None:
        return split
    self.outside += 1
    if self.outside == 1 and self.log is not None:
      self.log(f"hs2p serve: a text outside the {self.frame.head!r}...{self.frame.tail!r} template is tokenized "
               "whole (its reward is read at its last token; /health counts such texts)")
    return Pieces("", text, "", "", "")

  def _fit_chars(self, i: int, pieces: Pieces) -> Pieces:
    """`pieces` within `max_chars` characters: refused, or cut (prompt's start, then response's end)."""
    over = len(pieces.text) - self.max_chars
    if over <= 0:
      return pieces
    if not self.truncate:
      raise BadText(f"input {i} has {len(pieces.text)} characters: more than the server's {self.max_length} "
                    "tokens (start it with --truncate to cut long inputs as training does)")
    head, prompt, mid, response, tail = pieces
    cut = min(over, len(prompt))
    prompt, over = prompt[cut:], over - cut
    if over > 0:
      response = response[:max(0, len(response) - over)]
    return Pieces(head, prompt, mid, response, tail)

  def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
    split = [self._fit_chars(i, self.pieces(t)) for i, t in enumerate(texts)]
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
