"""Stop strings matched on decoded text, however BPE spells them: the automaton against a brute-force
text search, and the sampler stopping on a string that no `encode()` token sequence would match."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_smollm2
from hs2p_jax.stops import automaton, cut_at_stop

# a vocabulary in which "<end>" is one token, is merged into longer ones, and can be split
TEXTS = ["a", "b", "<", "end", ">", "<end>", "x<end>y", "<e", "nd>", "", "<end", "nd", "e", "<<"]


def _run(table, accept, tokens):
  state = np.zeros(table.shape[0], np.int32)
  for i, t in enumerate(tokens):
    state = table[np.arange(table.shape[0]), state, t]
    if np.any(state == accept):
      return i
  return None


def _first_hit(tokens, strings):
  text = ""
  for i, t in enumerate(tokens):
    text += TEXTS[t]
    if any(s in text for s in strings):
      return i
  return None


@pytest.mark.parametrize("strings", [["<end>"], ["<end>", "ab"], ["<<e"], ["nd>nd"]])
def test_automaton_stops_exactly_where_the_text_first_contains_a_string(strings):
  table, accept = automaton(TEXTS, strings)
  rng = np.random.RandomState(0)
  for _ in range(400):
    tokens = rng.randint(0, len(TEXTS), rng.randint(1, 12)).tolist()
    assert _run(table, accept, tokens) == _first_hit(tokens, strings), [TEXTS[t] for t in tokens]
  # the spellings encode() would miss: merged into a longer token, split across two or three
  for spelled in (["x<end>y"], ["<e", "nd>"], ["<", "end", ">"], ["<end", ">"], ["a", "<e", "nd", ">"]):
    ids = [TEXTS.index(w) for w in spelled]
    assert _run(table, accept, ids) == len(ids) - 1 or "<end>" not in strings
  assert automaton(TEXTS, ["", None or ""]) is None
  assert cut_at_stop("hello<end>world<end>", ["<end>"]) == "hello" and cut_at_stop("hi", ["<end>"]) == "hi"


@requires_smollm2
@pytest.mark.slow
def test_the_sampler_stops_on_a_string_spanning_a_token_boundary():
  """SmolLM2's BPE tokenizer, a random model of its vocabulary: the stop string is the end of one
  greedy token and the start of the next, which no token id sequence of encode(stop) matches."""
  from hs2p_jax.model import create, preset
  from hs2p_jax.sample import generate
  from hs2p_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("gguf:smollm2")
  lm = create("lm", preset("tiny", num_layers=1, vocab_size=len(tok)), seed=0)
  ids = np.asarray([tok.encode("The quick brown fox jumps over", add_special_tokens=False)], np.int32)
  free = generate(lm, ids, max_new_tokens=8, eos_ids=())
  toks = np.asarray(free.tokens)[0].tolist()
  texts = [tok.decode([t]) for t in toks]
  j = next(j for j in range(1, 7) if len(texts[j]) >= 2 and len(texts[j + 1]) >= 1 and texts[j].strip())
  stop = texts[j][-2:] + texts[j + 1][:1]
  first = next(i for i in range(8) if stop in "".join(texts[:i + 1]))
  encoded = tok.encode(stop, add_special_tokens=False)
  assert not any(toks[i:i + len(encoded)] == encoded for i in range(8))  # token-id matching would not stop
  out = generate(lm, ids, max_new_tokens=8, eos_ids=(), stop_strings=[stop], tokenizer=tok)
  assert int(out.lengths[0]) == first + 1 and bool(out.ended[0])
  assert np.asarray(out.tokens)[0, :first + 1].tolist() == toks[:first + 1]
