"""Fitting templated sequences to data.max_length: truncation keeps the response and end marker, drop drops."""

import json

import numpy as np
import pytest

from hs2p_jax.config import DataConfig
from hs2p_jax.data.encode import encode, fit_lengths
from hs2p_jax.data.examples import PairExample, PromptExample
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.data.templates import ASSISTANT_MARK, STEERLM_HEAD, STEERLM_TAIL, join_turns, steerlm_text
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import load_tokenizer

TOK = load_tokenizer("bytes")
MAX = 256
FIXED = len(TOK(STEERLM_HEAD + ASSISTANT_MARK + STEERLM_TAIL, add_special_tokens=False)["input_ids"])
LONG_PROMPT = join_turns([{"role": "user", "content": "first question " * 5},
                          {"role": "assistant", "content": "first answer " * 5},
                          {"role": "user", "content": "And the second one?"}])


def _decode(ids) -> str:
  return TOK.decode(list(ids))


def test_fit_lengths_arithmetic():
  pieces = [[0] * 10, [0] * 50, [0] * 5, [0] * 20, [0] * 2]  # head, prompt, mid, response, tail
  assert fit_lengths(pieces, 100) == (0, 20)    # 87 tokens fit
  assert fit_lengths(pieces, 60) == (27, 20)    # cut 27 prompt tokens
  assert fit_lengths(pieces, 30) == (50, 13)    # prompt gone, response cut to 13
  assert fit_lengths(pieces, 60, prompt_cut=40) == (40, 20)
  with pytest.raises(UserError, match="data.max_length=17: the template alone takes 17 tokens"):
    fit_lengths(pieces, 17)


def test_truncate_cuts_the_prompt_start_and_keeps_response_and_end_marker():
  ex = PairExample(LONG_PROMPT, "short chosen", "a somewhat longer rejected answer", 2.0, None, "x:1")
  enc = encode([ex], TOK, "steerlm", MAX, "truncate")
  assert enc.keep == [0] and enc.truncated == 1 and enc.dropped == 0
  chosen, rejected = (_decode(s) for s in enc.seqs[0])
  assert len(enc.seqs[0][1]) == MAX  # the longer side fills max_length exactly
  for text, response in ((chosen, ex.chosen), (rejected, ex.rejected)):
    assert text.startswith(STEERLM_HEAD) and text.endswith(ASSISTANT_MARK + response + STEERLM_TAIL)
    kept_prompt = text[len(STEERLM_HEAD):-len(ASSISTANT_MARK + response + STEERLM_TAIL)]
    assert LONG_PROMPT.endswith(kept_prompt) and len(kept_prompt) < len(LONG_PROMPT)
  # both sides keep the same prompt tokens (the same context)
  assert chosen[:-len(ex.chosen + STEERLM_TAIL)] == rejected[:-len(ex.rejected + STEERLM_TAIL)]
  assert len(rejected.encode()) - len(ex.rejected) < len(chosen.encode())  # bytes == tokens here


def test_truncate_cuts_the_response_tail_when_the_response_alone_is_too_long():
  response = "".join(f"word{i} " for i in range(60))
  enc = encode([PairExample("q", response, "ok", 1.0, None, "x:1")], TOK, "steerlm", MAX, "truncate")
  chosen, rejected = enc.seqs[0]
  assert len(chosen) == MAX and _decode(chosen) == STEERLM_HEAD + ASSISTANT_MARK + response[:MAX - FIXED] + STEERLM_TAIL
  assert _decode(rejected) == STEERLM_HEAD + ASSISTANT_MARK + "ok" + STEERLM_TAIL  # same (empty) prompt cut
  assert TOK.convert_ids_to_tokens(int(chosen[-1])) == "<extra_id_2>"


def test_short_examples_are_untouched_and_generation_prompts_cut_from_the_start():
  enc = encode([PairExample("q", "a", "b", 1.0, None, "x:1")], TOK, "steerlm", MAX)
  assert _decode(enc.seqs[0][0]) == steerlm_text("q", "a") and enc.truncated == 0
  enc = encode([PromptExample("z" * 300, "x:1")], TOK, "steerlm", MAX)
  (ids,) = enc.seqs[0]
  assert len(ids) == MAX and _decode(ids).endswith("z" * (MAX - FIXED + 2) + ASSISTANT_MARK)


def test_drop_policy_and_report_counts(tmp_path):
  rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
          {"prompt": LONG_PROMPT, "chosen": "a", "rejected": "b"},        # prompt too long
          {"prompt": "q", "chosen": "a", "rejected": "x" * 400},           # one side too long
          {"prompt": "q2", "chosen": "c", "rejected": "d"}]
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  for overlong, kept, truncated, dropped in (("truncate", 4, 2, 0), ("drop", 2, 0, 2)):
    cfg = DataConfig(train=str(path), format="pairs", max_length=MAX, overlong=overlong)
    loader = make_loader(cfg, TOK, split="train", task="pairs", batch_size=2, repeat=False, cache_dir=str(tmp_path))
    r = loader.report
    assert (r.kept, r.truncated, r.dropped_overlong) == (kept, truncated, dropped)
    assert r.read == r.kept + sum(r.dropped.values()) + r.invalid + r.dropped_overlong
    assert len(loader.examples) == kept and f"dropped_overlong {dropped}" in r.summary()
    if overlong == "drop":
      assert [e.prompt for e in loader.examples] == ["q", "q2"]
      ids = np.concatenate([b["example_id"][b["valid"]] for b in loader])
      assert sorted(ids.tolist()) == [0, 1]
