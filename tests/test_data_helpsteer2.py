"""HelpSteer2 ratings -> 9-slot labels; HelpSteer2-Preference -> oriented pairs, filtering and validation."""

import json

import numpy as np
import pytest

from hs2p_jax.data.helpsteer2 import load_preferences, load_ratings
from hs2p_jax.errors import UserError
from hs2p_jax.model.reward import ATTRIBUTES

RATING = {"prompt": "p", "response": "r", "helpfulness": 3, "correctness": 4, "coherence": 2, "complexity": 1,
          "verbosity": 0}


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def _pref(split, strength, r1="one", r2="two", prompt="q"):
  return {"split": split, "prompt": prompt, "response_1": r1, "response_2": r2, "preference_strength": strength,
          "preference_statement": "s", "preference_elaboration": "e"}


def test_ratings_labels_and_masks_in_nemo_layout(tmp_path):
  path = _write(tmp_path / "r.jsonl", [RATING])
  (ex,), _ = load_ratings(path, attributes="helpfulness")
  want = np.zeros(9, np.float32)
  want[ATTRIBUTES.index("helpfulness")] = 3
  np.testing.assert_array_equal(ex.labels, want)
  np.testing.assert_array_equal(ex.label_mask, np.arange(9) == 4)
  assert ex.labels.dtype == np.float32 and ex.label_mask.dtype == bool and ex.where == f"{path}:1"

  (ex,), _ = load_ratings(path, attributes="all")
  np.testing.assert_array_equal(ex.labels, [0, 0, 0, 0, 3, 4, 2, 1, 0])
  np.testing.assert_array_equal(ex.label_mask, [False] * 4 + [True] * 5)


def test_helpfulness_mode_needs_only_helpfulness(tmp_path):
  path = _write(tmp_path / "r.jsonl", [{"prompt": "p", "response": "r", "helpfulness": 2}])
  (ex,), _ = load_ratings(path)
  assert ex.labels[4] == 2 and ex.label_mask.sum() == 1
  with pytest.raises(UserError, match=rf"^{path}:1: missing field 'correctness'$"):
    load_ratings(path, attributes="all")


@pytest.mark.parametrize("change, message", [
    ({"helpfulness": 5}, r"field 'helpfulness'=5 is out of range \(0\.\.4\)"),
    ({"coherence": -1}, r"field 'coherence'=-1 is out of range"),
    ({"correctness": 2.5}, r"field 'correctness' must be an integer, got float"),
    ({"verbosity": True}, r"field 'verbosity' must be an integer, got bool"),
    ({"helpfulness": "3"}, r"field 'helpfulness' must be an integer, got str"),
    ({"prompt": "  \n"}, r"field 'prompt' is empty"),
    ({"response": ""}, r"field 'response' is empty"),
    ({"response": 7}, r"field 'response' must be a string, got int"),
    ({"helpfulness": None}, r"missing field 'helpfulness'"),
])
def test_invalid_rating_names_file_and_line(tmp_path, change, message):
  path = _write(tmp_path / "r.jsonl", [RATING, RATING, {**RATING, **change}])
  with pytest.raises(UserError, match=rf"^{path}:3: {message}") as e:
    load_ratings(path, attributes="all")
  assert "\n" not in str(e.value)
  examples, report = load_ratings(path, attributes="all", skip_invalid=True)
  assert len(examples) == 2 and (report.read, report.kept, report.invalid) == (3, 2, 1)
  assert report.first_invalid.startswith(f"{path}:3: ")


def test_preference_orientation_and_magnitude(tmp_path):
  rows = [_pref("train", s, r1=f"first{s}", r2=f"second{s}") for s in (-3, -2, -1, 1, 2, 3)]
  examples, _ = load_preferences(_write(tmp_path / "p.jsonl", rows), "train")
  for ex, s in zip(examples, (-3, -2, -1, 1, 2, 3)):
    # negative strength: response_1 is better
    assert (ex.chosen, ex.rejected) == ((f"first{s}", f"second{s}") if s < 0 else (f"second{s}", f"first{s}"))
    assert ex.magnitude == abs(s) and ex.subset is None and ex.prompt == "q"


def test_preference_filtering_counts_by_reason(tmp_path):
  strengths = {"train": [-3, 0, 2, -100, 1, 0, -1, -100, 0], "validation": [2, 0, -100, -2]}
  rows = [_pref(split, s) for split, ss in strengths.items() for s in ss]
  path = _write(tmp_path / "p.jsonl", rows)
  for split, ss in strengths.items():
    examples, report = load_preferences(path, split)
    other = sum(len(v) for k, v in strengths.items() if k != split)
    assert len(examples) == sum(s not in (0, -100) for s in ss)
    assert report.dropped == {"tie": ss.count(0), "neither_valid": ss.count(-100), "other_split": other}
    assert report.read == len(rows) == report.kept + sum(report.dropped.values()) + report.invalid
    assert f"kept {len(examples)}" in report.summary() and "tie" in report.summary()
  everything, report = load_preferences(path, None)
  assert len(everything) == 6 and "other_split" not in report.dropped
  # A file without ties or -100 rows (the other reading of the released data) loads unchanged.
  clean, report = load_preferences(_write(tmp_path / "c.jsonl", [_pref("train", 1), _pref("train", -2)]), "train")
  assert len(clean) == 2 and report.dropped == {}


def test_preference_without_split_field_belongs_to_every_split(tmp_path):
  row = _pref("train", -1)
  del row["split"]
  path = _write(tmp_path / "p.jsonl", [row])
  assert len(load_preferences(path, "train")[0]) == 1 and len(load_preferences(path, "validation")[0]) == 1


@pytest.mark.parametrize("change, message", [
    ({"preference_strength": 4}, r"field 'preference_strength'=4 is out of range"),
    ({"preference_strength": -99}, r"field 'preference_strength'=-99 is out of range"),
    ({"preference_strength": 1.0}, r"field 'preference_strength' must be an integer, got float"),
    ({"preference_strength": None}, r"missing field 'preference_strength'"),
    ({"response_2": ""}, r"field 'response_2' is empty"),
    ({"response_1": ["a"]}, r"field 'response_1' must be a string, got list"),
    ({"prompt": None}, r"missing field 'prompt'"),
    ({"split": 3}, r"field 'split' must be a string"),
])
def test_invalid_preference_names_file_and_line(tmp_path, change, message):
  path = _write(tmp_path / "p.jsonl", [_pref("train", 1), {**_pref("train", 2), **change}, _pref("train", -1)])
  with pytest.raises(UserError, match=rf"^{path}:2: {message}"):
    load_preferences(path, "train")
  examples, report = load_preferences(path, "train", skip_invalid=True)
  assert len(examples) == 2 and report.invalid == 1 and report.read == 3


def test_skip_invalid_also_skips_undecodable_lines(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps(_pref("train", 1)) + "\n{broken\n" + json.dumps(_pref("train", -1)) + "\n")
  with pytest.raises(UserError, match=rf"^{path}:2: invalid JSON"):
    load_preferences(str(path), "train")
  examples, report = load_preferences(str(path), "train", skip_invalid=True)
  assert len(examples) == 2 and (report.read, report.invalid) == (3, 1)
