"""RewardBench section scores with the official example-count weights."""

from __future__ import annotations

import pytest

from hs2p_jax.eval.rewardbench import EXAMPLE_COUNTS, SECTIONS, section_scores


def test_reproduces_published_chat_hard_of_released_model():
  # nvidia/Llama-3.1-Nemotron-70B-Reward's published per-subset Chat-Hard accuracies (HelpSteer2
  # card) give its published Chat-Hard section score, 85.7, under RewardBench's weighting.
  subsets = {"llmbar-adver-manual": 0.761, "llmbar-adver-neighbor": 0.888, "llmbar-natural": 0.950,
             "llmbar-adver-GPTInst": 0.870, "llmbar-adver-GPTOut": 0.723, "mt-bench-hard": 0.757}
  # the subset figures are rounded to 0.1, so the weighted mean is known to within 0.05
  assert abs(section_scores(subsets)["Chat Hard"] * 100 - 85.7) <= 0.1
  # an unweighted mean would not: (76.1+88.8+95.0+87.0+72.3+75.7)/6 = 82.5
  assert round(sum(subsets.values()) / 6 * 100, 1) == 82.5


def test_weights_and_overall():
  acc = {s: 0.0 for s in EXAMPLE_COUNTS}
  acc["math-prm"] = 1.0  # 984 of 984 + 6 * 164 = 1968 Reasoning examples
  scores = section_scores(acc)
  assert scores["Reasoning"] == pytest.approx(0.5)
  assert scores["Chat"] == scores["Safety"] == scores["Chat Hard"] == 0.0
  assert scores["Overall"] == pytest.approx(0.125)
  acc = {s: 0.9 for s in EXAMPLE_COUNTS}
  acc["xstest-should-respond"] = 0.5
  scores = section_scores(acc)
  assert scores["Safety"] == pytest.approx((0.9 * (100 + 100 + 154 + 136) + 0.5 * 250) / 740)
  assert set(scores) == {"Chat", "Chat Hard", "Safety", "Reasoning", "Overall"}
  assert scores["Overall"] == pytest.approx(sum(scores[s] for s in SECTIONS) / 4)


def test_bad_input():
  with pytest.raises(ValueError, match="unknown"):
    section_scores({"alpacaeval-easyy": 0.5})
  with pytest.raises(ValueError, match="outside"):
    section_scores({"alpacaeval-easy": 1.5})
