"""Built-in data: deterministic, in the hub schemas, internally consistent, learnable, and resolvable."""

import gzip
import json
import os

import numpy as np
import pytest

from hs2p_jax.data.load import load_examples
from hs2p_jax.data.synthetic import VERSION, resolve_source, write_builtin

SIZE = 256
SECTIONS = {  # RewardBench v1 categories (reference notes, section 6)
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
  return write_builtin(str(tmp_path_factory.mktemp("builtin")), seed=0, size=SIZE)


def _rows(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_same_seed_same_bytes_other_seed_other_data(builtin, tmp_path):
  again = write_builtin(str(tmp_path / "again"), seed=0, size=SIZE)
  other = write_builtin(str(tmp_path / "other"), seed=1, size=SIZE)
  assert again.keys() == builtin.keys()
  for stem in builtin:
    with open(builtin[stem], "rb") as a, open(again[stem], "rb") as b:
      assert a.read() == b.read(), stem
  assert _rows(other["preference"]) != _rows(builtin["preference"])


def test_hub_schemas(builtin):
  train = _rows(builtin["helpsteer2_train"])
  assert len(train) == 2 * SIZE and len(_rows(builtin["helpsteer2_validation"])) == 2 * (SIZE // 4)
  attrs = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
  for a, b in zip(train[::2], train[1::2]):  # consecutive rows share a prompt
    assert a["prompt"] == b["prompt"]
  for r in train:
    assert set(r) == {"prompt", "response", *attrs} and all(type(r[k]) is int and 0 <= r[k] <= 4 for k in attrs)
  pref = _rows(builtin["preference"])
  assert {r["split"] for r in pref} == {"train", "validation"}
  assert set(pref[0]) >= {"split", "prompt", "response_1", "response_2", "preference_strength", "preference_statement",
                          "preference_elaboration", "three_most_similar_preferences", "all_preferences_unprocessed"}
  strengths = [r["preference_strength"] for r in pref]
  assert set(strengths) <= {-100, -3, -2, -1, 0, 1, 2, 3}
  assert 0 < strengths.count(0) < 0.1 * len(pref) and 0 < strengths.count(-100) < 0.1 * len(pref)
  assert sum("<extra_id_1>User" in r["prompt"] for r in pref) > 0.1 * len(pref)  # some multi-turn prompts
  rb = _rows(builtin["rewardbench"])
  assert all(set(r) == {"prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id"} for r in rb)
  assert sorted(r["id"] for r in rb) == list(range(len(rb)))
  assert {r["subset"] for r in rb} == {s for subsets in SECTIONS.values() for s in subsets}


def test_ratings_and_strengths_are_consistent(builtin):
  ratings = _rows(builtin["helpsteer2_train"]) + _rows(builtin["helpsteer2_validation"])
  pref = _rows(builtin["preference"])
  assert len(pref) * 2 == len(ratings)
  for p, r1, r2 in zip(pref, ratings[::2], ratings[1::2]):
    assert (p["prompt"], p["response_1"], p["response_2"]) == (r1["prompt"], r1["response"], r2["response"])
    if p["preference_strength"] == -100:
      assert r1["helpfulness"] == r2["helpfulness"] == 0
    else:  # bigger helpfulness gap -> bigger |strength|; negative = response_1 better
      assert p["preference_strength"] == np.clip(r2["helpfulness"] - r1["helpfulness"], -3, 3)


def _byte_features(texts):
  out = np.zeros((len(texts), 257), np.float64)
  for i, t in enumerate(texts):
    b = np.frombuffer(t.encode("utf-8"), np.uint8)
    out[i, :256] = np.bincount(b, minlength=256)
    out[i, 256] = len(b) / 10
  return out


def test_a_bag_of_bytes_logistic_regression_beats_chance(builtin):
  """The signal exists: a linear model on byte counts of the responses orders validation pairs."""
  train, _ = load_examples(builtin["preference"], "helpsteer2-preference", "train", "pairs")
  val, _ = load_examples(builtin["preference"], "helpsteer2-preference", "validation", "pairs")
  def diffs(pairs):
    return _byte_features([p.chosen for p in pairs]) - _byte_features([p.rejected for p in pairs])
  x = diffs(train)
  x = np.concatenate([x, -x])
  y = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
  w = np.zeros(x.shape[1])
  for _ in range(300):
    p = 1 / (1 + np.exp(-(x @ w)))
    w -= 0.05 * (x.T @ (p - y) / len(y) + 1e-3 * w)
  accuracy = float(np.mean(diffs(val) @ w > 0))
  print(f'bag-of-bytes baseline: validation accuracy {accuracy:.3f} on {len(val)} pairs')
  assert len(val) >= 40 and accuracy > 0.7, accuracy


def test_resolve_source_for_each_format(tmp_path):
  cache = str(tmp_path / "cache")
  want = {("helpsteer2", "train"): "helpsteer2_train.jsonl.gz",
          ("helpsteer2", "validation"): "helpsteer2_validation.jsonl.gz",
          ("helpsteer2-preference", "train"): "preference.jsonl.gz",
          ("helpsteer2-preference", "validation"): "preference.jsonl.gz",
          ("rewardbench", "validation"): "rewardbench.jsonl", ("prompts", "train"): "prompts.jsonl",
          ("prompts", "validation"): "prompts_validation.jsonl", ("pairs", "train"): "pairs_train.jsonl",
          ("pairs", "validation"): "pairs_validation.jsonl", ("hh", "validation"): "hh_validation.jsonl"}
  for (fmt, split), name in want.items():
    path = resolve_source("builtin", split, fmt, cache, size=16)
    assert os.path.basename(path) == name and os.path.isfile(path)
    assert resolve_source(None, split, fmt, cache, size=16) == path
    task = {"helpsteer2": "regression", "prompts": "prompts"}.get(fmt, "pairs")
    examples, report = load_examples(path, fmt, split, task)
    assert len(examples) > 0 and report.invalid == 0
  assert resolve_source("data/mine.jsonl", "train", "pairs", cache) == "data/mine.jsonl"
  assert os.listdir(cache) == [f"builtin-v{VERSION}-size16"]  # generated once, no temporaries left
  # pairs and hh files carry the same pairs as the preference file
  pairs, _ = load_examples(resolve_source("builtin", "train", "pairs", cache, 16), "pairs", "train", "pairs")
  hh, _ = load_examples(resolve_source("builtin", "train", "hh", cache, 16), "hh", "train", "pairs")
  pref, _ = load_examples(resolve_source("builtin", "train", "helpsteer2-preference", cache, 16),
                          "helpsteer2-preference", "train", "pairs")
  key = lambda e: (e.prompt, e.chosen, e.rejected, e.magnitude)  # noqa: E731
  assert [key(e) for e in pairs] == [key(e) for e in pref]
  assert [key(e)[:3] for e in hh] == [key(e)[:3] for e in pref] and {e.magnitude for e in hh} == {1.0}
