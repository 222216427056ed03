"""Stop strings matched on the decoded text, inside the jit-compiled decode loop.

A stop string can be spelled by many token sequences (BPE merges it with its neighbours into
longer tokens, or splits it across several), so matching the token ids of `tokenizer.encode(s)`
misses most of them. Instead each string gets an automaton over token ids: its states are how
many leading characters of the string the decoded text currently ends with (KMP-style), and
`table[i, state, token]` is the state after `token`'s text; the string has occurred when the state
reaches `len(string)` (absorbing). The sampler carries one state per row and string and steps it
with one gather per emitted token.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
  """The decoded text of every token id below `vocab_size` ("" past the tokenizer's vocabulary)."""
  n = min(vocab_size, len(tokenizer))
  texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
  return list(texts) + [""] * (vocab_size - n)


def _advance(text: str, stop: str) -> int:
  """The automaton's state after `text`: len(stop) if it contains `stop`, else the longest k with
  `text` ending in stop[:k]."""
  if stop in text:
    return len(stop)
  for k in range(min(len(stop) - 1, len(text)), 0, -1):
    if text.endswith(stop[:k]):
      return k
  return 0


def automaton(texts: Sequence[str], strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
  """(table int32 [S, L + 1, V], accept int32 [S]) for the non-empty `strings` (L = the longest),
  over tokens whose decoded texts are `texts`; None when there are no strings."""
  strings = [s for s in strings if s]
  if not strings:
    return None
  v, longest = len(texts), max(len(s) for s in strings)
  table = np.zeros((len(strings), longest + 1, v), np.int32)
  empty = [t for t, w in enumerate(texts) if not w]
  for i, stop in enumerate(strings):
    chars = set(stop)
    relevant = [t for t, w in enumerate(texts) if w and not chars.isdisjoint(w)]
    for state in range(len(stop)):
      prefix = stop[:state]
      for t in relevant:  # a token with none of the string's characters resets the state to 0
        table[i, state, t] = _advance(prefix + texts[t], stop)
    table[i, :, empty] = np.arange(longest + 1)[None, :]  # a token with no text changes nothing
    table[i, len(stop):, :] = len(stop)  # found: absorbing
  return table, np.asarray([len(s) for s in strings], np.int32)


def stop_automaton(tokenizer: Any, strings: Sequence[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
  """`automaton` over `tokenizer`'s token texts."""
  if not [s for s in strings if s]:
    return None
  return automaton(token_texts(tokenizer, vocab_size), strings)


def cut_at_stop(text: str, strings: Sequence[str]) -> str:
  """`text` up to the first occurrence of any of `strings`."""
  cut = min((text.find(s) for s in strings if s and s in text), default=-1)
  return text if cut < 0 else text[:cut]
