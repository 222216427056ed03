"""RewardBench 2 scoring against an independent computation (allenai's formulas), ties included;
`hs2p eval --format rewardbench2` on a scored file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import tiny_overrides, write_jsonl
from hs2p_jax.data.rewardbench2 import load_groups
from hs2p_jax.errors import UserError
from hs2p_jax.eval.rewardbench2 import SUBSETS, overall, subset_score, ties_terms


def ref_best_of_n(rows):
  """Mean over prompts: 0 if any completion beats the first, else 1 / (how many equal the first)."""
  total = 0.0
  for r in rows:
    first = r["scores"][0]
    if any(s > first for s in r["scores"]):
      continue
    total += 1.0 / sum(1 for s in r["scores"] if s == first)
  return total / len(rows)


def ref_ties(rows):
  """RewardBench 2's Ties score written out prompt number by prompt number."""
  prompts = {}
  for r in rows:
    kind, num = r["id"].split(":")
    entry = prompts.setdefault((kind, int(num)), {"good": [], "bad": []})
    for j, s in enumerate(r["scores"]):
      entry["good" if j < r["num_correct"] else "bad"].append(s)

  def gap(e):
    return min(e["good"]) - max(e["bad"])

  ref = {n: e for (k, n), e in prompts.items() if k == "ref"}
  tied = {n: e for (k, n), e in prompts.items() if k == "tied"}
  ref_acc = sum(gap(e) > 0 for e in ref.values()) / len(ref) if ref else 0.0
  tied_acc = sum(gap(e) > 0 for e in tied.values()) / len(tied) if tied else 0.0
  pref = hard = margin = 0.0
  both = [n for n in tied if n in ref]
  for n in both:
    spread = max(tied[n]["good"]) - min(tied[n]["good"])
    low = min(gap(ref[n]), gap(tied[n]))
    pref += gap(tied[n]) > spread
    hard += low > spread
    if spread == 0:
      margin += 0.0 if low == 0 else math.copysign(1.0, low)  # tanh(+-inf)
    else:
      margin += math.tanh(low / spread - 1)
  k = len(both)
  return 0.3 * tied_acc + 0.3 * ref_acc + 0.2 * pref / k + 0.2 * hard / k + 0.01 * margin / k


def random_rows(rng, n, kinds=None, low=0, high=4):
  """Rows with small-integer scores (many ties); `kinds` gives Ties ids."""
  rows = []
  for i in range(n):
    correct = int(rng.integers(2, 4)) if kinds and kinds[i].startswith("tied") else 1
    total = correct + int(rng.integers(1, 4))
    rows.append({"id": kinds[i] if kinds else str(i), "num_correct": correct,
                 "scores": [float(x) for x in rng.integers(low, high, total)]})
  return rows


@pytest.mark.parametrize("seed", range(5))
def test_best_of_n_subsets_equal_the_independent_computation(seed):
  rng = np.random.default_rng(seed)
  rows = random_rows(rng, 40)
  assert subset_score("Focus", rows) == pytest.approx(ref_best_of_n(rows), abs=1e-12)
  rows[0]["scores"] = [2.0, 2.0, 2.0, 1.0]  # a three-way tie at the top counts 1/3
  rows[1]["scores"] = [1.0, 2.0, 2.0, 0.0]  # the correct completion below the top counts 0
  assert subset_score("Math", rows[:2]) == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_ties_subset_equals_the_independent_computation(seed):
  rng = np.random.default_rng(100 + seed)
  n = 12
  ids = [f"ref:{i}" for i in range(n)] + [f"tied:{i}" for i in range(n)] + [f"tied:{n + 1}", f"ref:{n + 2}"]
  rows = random_rows(rng, len(ids), ids, high=3 + seed)  # small ranges: tied scores and zero spreads
  assert subset_score("Ties", rows) == pytest.approx(ref_ties(rows), abs=1e-12)
  assert subset_score("ties", rows) == subset_score("Ties", rows)


def test_ties_worked_example():
  rows = [{"id": "ref:0", "scores": [3, 1, 2], "num_correct": 1},       # gap 1: accurate
          {"id": "tied:0", "scores": [5, 4, 1, 4.5], "num_correct": 2},  # gap -0.5, spread 1
          {"id": "ref:1", "scores": [1, 2], "num_correct": 1},           # gap -1
          {"id": "tied:1", "scores": [6, 5, 2], "num_correct": 2}]       # gap 3, spread 1
  t = ties_terms(rows)
  assert (t["tied_accuracy"], t["ref_accuracy"]) == (0.5, 0.5)
  assert (t["correctness_preferred"], t["correctness_preferred_hard"]) == (0.5, 0.0)
  assert t["correctness_margin"] == pytest.approx((math.tanh(-1.5) + math.tanh(-2.0)) / 2)
  assert t["score"] == pytest.approx(0.4 + 0.01 * (math.tanh(-1.5) + math.tanh(-2.0)) / 2)
  # rows that share an id are one prompt (allenai groups by id)
  split = rows[:1] + [{"id": "tied:0", "scores": [5, 1], "num_correct": 1},
                      {"id": "tied:0", "scores": [4, 4.5], "num_correct": 1}] + rows[2:]
  assert ties_terms(split)["tied_accuracy"] == 0.5
  # a zero spread with a zero gap counts 0 in the tanh term, a positive gap over zero spread counts 1
  zero = [{"id": "ref:0", "scores": [2, 2], "num_correct": 1}, {"id": "tied:0", "scores": [2, 2, 2], "num_correct": 2},
          {"id": "ref:1", "scores": [3, 1], "num_correct": 1}, {"id": "tied:1", "scores": [4, 4, 1], "num_correct": 2}]
  assert ties_terms(zero)["correctness_margin"] == pytest.approx(0.5)


def test_overall_is_the_mean_of_the_six_and_bad_rows_are_named():
  scores = dict(zip(SUBSETS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]))
  assert overall(scores) == pytest.approx(0.4)
  with pytest.raises(ValueError, match="missing Ties"):
    overall({k: v for k, v in scores.items() if k != "Ties"})
  with pytest.raises(ValueError, match="id 'x:1'"):
    subset_score("Ties", [{"id": "x:1", "scores": [1, 0], "num_correct": 1}])
  with pytest.raises(ValueError, match="num_correct=2"):
    subset_score("Math", [{"id": "3", "scores": [1, 0], "num_correct": 2}])


def test_malformed_rows_are_named_by_file_and_line(tmp_path):
  good = {"id": "1", "prompt": "q", "chosen": ["a"], "rejected": ["b", "c"], "num_correct": 1, "subset": "Math"}
  for bad, needle in [({"chosen": "a"}, "'chosen' must be a non-empty list"),
                      ({"num_correct": 2}, "'num_correct'=2 is out of range"), ({"rejected": []}, "'rejected' must be a non-empty list"),
                      ({"subset": "Ties", "id": "7"}, "Ties row id '7': expected 'ref:N' or 'tied:N'"),
                      ({"subset": "Ties", "id": "tied:7"}, "a tied prompt needs several")]:
    path = write_jsonl(tmp_path / "rb2.jsonl", [good, {**good, **bad}])
    with pytest.raises(UserError, match=f"rb2.jsonl:2: .*{needle}"):
      load_groups(path)


@pytest.fixture(scope="module")
def hs3_model(tmp_path_factory):
  """A tiny Scaled-BT model trained on the built-in HelpSteer3-Preference records."""
  from hs2p_jax.cli import main
  tmp = tmp_path_factory.mktemp("hs3")
  cfg = tmp / "c.yaml"
  cfg.write_text("name: hs3\n")
  sets = tiny_overrides(tmp, **{"data.train": "builtin", "data.validation": "builtin",
                                "data.format": "helpsteer3-preference", "data.builtin_size": 64,
                                "train.objective": "bt", "train.steps": 4, "train.batch_size": 4})
  assert main(["train-rm", "--config", str(cfg), "--out", str(tmp / "run"), "--set", *sets]) == 0
  return tmp / "run"


def test_eval_rewardbench2_scores_every_completion_as_the_scorer_does(hs3_model, tmp_path, capsys):
  from hs2p_jax.cli import main
  from hs2p_jax.data.synthetic import write_builtin
  from hs2p_jax.eval.scorer import RewardScorer
  path = write_builtin(str(tmp_path / "b"), size=128)["rewardbench2"]
  out = tmp_path / "rb2.json"
  assert main(["eval", "--checkpoint", str(hs3_model), "--data", path, "--format", "rewardbench2", "--out", str(out),
               "--max-length", "64", "--batch-size", "6"]) == 0
  printed = json.loads(capsys.readouterr().out)
  report = json.loads(out.read_text())
  assert printed["subsets"] == report["subsets"] and set(report["subsets"]) == set(SUBSETS)
  assert report["overall"] == pytest.approx(np.mean(list(report["subsets"].values())))
  # the same completions scored one at a time (batches of 1) give the same subset scores
  groups, _ = load_groups(path)
  scorer = RewardScorer.load(str(hs3_model), batch_size=1, max_length=64)
  rows = {}
  for g in groups:
    s = scorer([g.prompt] * len(g.completions), list(g.completions))
    rows.setdefault(g.subset, []).append({"id": g.id, "scores": s.tolist(), "num_correct": g.num_correct})
  for name, rs in rows.items():
    expect = ref_ties(rs) if name == "Ties" else ref_best_of_n(rs)
    assert report["subsets"][name] == pytest.approx(expect, abs=1e-5), name
  assert report["prompts"] == len(groups) and report["completions"] == sum(len(g.completions) for g in groups)


def test_eval_helpsteer3_pairs_reports_per_domain_accuracy(hs3_model, tmp_path, capsys):
  from hs2p_jax.cli import main
  from hs2p_jax.data.load import load_examples
  from hs2p_jax.data.synthetic import write_builtin
  path = write_builtin(str(tmp_path / "b"), size=512)["helpsteer3_validation"]
  out = tmp_path / "hs3.json"
  assert main(["eval", "--checkpoint", str(hs3_model), "--data", path, "--format", "helpsteer3-preference",
               "--out", str(out), "--max-length", "64"]) == 0
  report = json.loads(out.read_text())
  pairs, load = load_examples(path, "helpsteer3-preference", "validation", "pairs")
  assert report["pairs"] == len(pairs) and load.dropped.get("tie", 0) > 0 and f"tie {load.dropped['tie']}" in report["load"]
  assert set(report["subsets"]) == {p.subset for p in pairs} == {"general", "stem"}


def test_hub_source_reads_the_test_split(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  rows = [{"id": "ref:1", "prompt": "q", "chosen": ["a"], "rejected": ["b", "c"], "num_correct": 1, "subset": "Ties"},
          {"id": "tied:1", "prompt": "q2", "chosen": ["a", "d"], "rejected": ["b"], "num_correct": 2, "subset": "Ties"}]
  (tmp_path / "rb2").mkdir()
  write_jsonl(tmp_path / "rb2" / "test.jsonl", rows)
  groups, report = load_groups(f"hf:{tmp_path}/rb2")
  assert [g.completions for g in groups] == [("a", "b", "c"), ("a", "d", "b")] and report.origin["split"] == "test"


def test_eval_rewardbench2_bad_row_is_one_line_and_writes_nothing(hs3_model, tmp_path, capsys):
  from hs2p_jax.cli import main
  good = {"id": "ref:1", "prompt": "q", "chosen": ["a"], "rejected": ["b"], "num_correct": 1, "subset": "Ties"}
  path = write_jsonl(tmp_path / "rb2.jsonl", [good, {**good, "id": "tied:1"}])
  capsys.readouterr()
  code = main(["eval", "--checkpoint", str(hs3_model), "--data", path, "--format", "rewardbench2",
               "--out", str(tmp_path / "out.json"), "--max-length", "64"])
  err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
  assert code == 2 and len(err) == 1 and "rb2.jsonl:2: Ties row 'tied:1'" in err[0]
  assert not (tmp_path / "out.json").exists()
