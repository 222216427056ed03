"""Generic pairs, RewardBench rows, HH-RLHF dialogues (synthetic and the real file) and RL prompts."""

import gzip
import json
import os
import re

import pytest

from hs2p_jax.data.load import load_examples
from hs2p_jax.data.pairs import load_pairs, split_dialogue
from hs2p_jax.data.templates import split_turns
from hs2p_jax.errors import UserError

HH_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def test_generic_pairs_magnitude_and_subset(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                       {"prompt": "q2", "chosen": "c", "rejected": "d", "magnitude": 2.5, "subset": "s"}])
  (a, b), report = load_pairs(path, "pairs")
  assert (a.prompt, a.chosen, a.rejected, a.magnitude, a.subset) == ("q", "a", "b", 1.0, None)
  assert (b.magnitude, b.subset, b.where) == (2.5, "s", f"{path}:2")
  assert report.kept == 2


@pytest.mark.parametrize("change, message", [
    ({"magnitude": 0}, r"field 'magnitude'=0 must be a positive"),
    ({"magnitude": "big"}, r"field 'magnitude' must be a number"),
    ({"chosen": ""}, r"field 'chosen' is empty"),
    ({"rejected": None}, r"missing field 'rejected'"),
])
def test_invalid_pairs(tmp_path, change, message):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", **change}])
  with pytest.raises(UserError, match=rf"^{path}:1: {message}"):
    load_pairs(path, "pairs")
  assert load_pairs(path, "pairs", skip_invalid=True)[1].invalid == 1


def test_rewardbench_rows_keep_their_subset(tmp_path):
  row = {"prompt": "q", "chosen": "good", "chosen_model": "m1", "rejected": "bad", "rejected_model": "m2",
         "subset": "llmbar-natural", "id": 17}
  (ex,), _ = load_pairs(_write(tmp_path / "rb.jsonl", [row]), "rewardbench")
  assert (ex.prompt, ex.chosen, ex.rejected, ex.subset, ex.magnitude) == ("q", "good", "bad", "llmbar-natural", 1.0)
  with pytest.raises(UserError, match=r":1: missing field 'subset'"):
    load_pairs(_write(tmp_path / "rb2.jsonl", [{**row, "subset": None}]), "rewardbench")


def test_hh_multi_turn_dialogue_to_helpsteer2_prompt(tmp_path):
  shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman:  What is 2+2? "
  rows = [{"chosen": shared + "\n\nAssistant: It is 4.", "rejected": shared + "\n\nAssistant: It is 5."},
          {"chosen": shared + "\n\nAssistant: Same", "rejected": shared + "\n\nAssistant: Same"},
          {"chosen": shared + "\n\nAssistant: x", "rejected": "\n\nHuman: other\n\nAssistant: y"},
          {"chosen": shared + "\n\nAssistant: ", "rejected": shared + "\n\nAssistant: y"},
          {"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}]
  examples, report = load_pairs(_write(tmp_path / "hh.jsonl", rows), "hh")
  (ex,) = examples
  assert ex.prompt == "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nWhat is 2+2?"
  assert (ex.chosen, ex.rejected, ex.magnitude) == ("It is 4.", "It is 5.", 1.0)
  assert report.dropped == {"identical": 1, "prompt_mismatch": 1, "empty_response": 1, "malformed": 1}


def test_hh_real_file_every_pair_shares_its_prompt():
  if not os.path.exists(HH_FILE):
    pytest.skip(f"real HH-RLHF file not present at {HH_FILE}")
  raw = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")]
  examples, report = load_pairs(HH_FILE, "hh")
  assert report.read == len(raw) == 2312
  # Independently: a pair is usable when both dialogues have the same turns before the last
  # assistant turn and two different, non-empty final answers.
  def turns(d):
    return re.findall(r"\n\n(Human|Assistant): ?(.*?)(?=\n\nHuman:|\n\nAssistant:|$)", d, flags=re.S)
  usable = [i for i, r in enumerate(raw)
            if turns(r["chosen"])[:-1] == turns(r["rejected"])[:-1]
            and r["chosen"].rsplit("\n\nAssistant:", 1)[0] == r["rejected"].rsplit("\n\nAssistant:", 1)[0]
            and turns(r["chosen"])[-1][1].strip() and turns(r["rejected"])[-1][1].strip()
            and turns(r["chosen"])[-1][1].strip() != turns(r["rejected"])[-1][1].strip()]
  assert len(examples) == len(usable) == report.kept > 2290
  assert report.read == report.kept + sum(report.dropped.values())
  for ex in examples:
    r = raw[int(ex.where.rsplit(":", 1)[1]) - 1]
    t_c, t_r = turns(r["chosen"]), turns(r["rejected"])
    assert ex.chosen != ex.rejected and ex.chosen and ex.rejected
    assert ex.chosen == t_c[-1][1].strip() and ex.rejected == t_r[-1][1].strip()
    msgs = split_turns(ex.prompt)
    assert [m["role"] for m in msgs] == ["user" if role == "Human" else "assistant" for role, _ in t_c[:-1]]
    assert [m["content"] for m in msgs] == [text.strip() for _, text in t_c[:-1]]
    assert msgs[-1]["role"] == "user"


def test_split_dialogue_rejects_non_human_start():
  assert split_dialogue("\n\nAssistant: hi") is None
  assert split_dialogue("\n\nHuman: a\n\nAssistant: b") == ("a", "b")


def test_prompts_from_prompt_files_and_from_pairs(tmp_path):
  path = _write(tmp_path / "q.jsonl", [{"prompt": "a"}, {"prompt": "b", "extra": 1}])
  examples, _ = load_examples(path, "prompts", "train", "prompts")
  assert [e.prompt for e in examples] == ["a", "b"]
  pref = _write(tmp_path / "p.jsonl", [
      {"split": "train", "prompt": p, "response_1": "x", "response_2": "y", "preference_strength": s}
      for p, s in [("a", 1), ("b", 0), ("a", -2), ("c", 3)]])
  examples, report = load_examples(pref, "helpsteer2-preference", "train", "prompts")
  assert [e.prompt for e in examples] == ["a", "c"] and examples[0].where == f"{pref}:1"
  assert report.dropped == {"tie": 1, "duplicate_prompt": 1} and report.kept == 2


def test_format_task_mismatch():
  with pytest.raises(UserError, match="data.format='hh' cannot feed the regression task"):
    load_examples("x.jsonl", "hh", "train", "regression")
