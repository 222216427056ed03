"""SFT and the Pairwise Justifier: response log-probs against per-sequence numpy forwards, the
justifier's records, training lowering the validation loss, and the generative judge's accounting."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.data.encode import encode
from hs2p_jax.data.load import load_examples
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.data.sft import justifier_example, justifier_prompt
from hs2p_jax.errors import UserError
from hs2p_jax.eval import judge
from hs2p_jax.model import create, preset
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.sft import example_logprobs

REPO = os.path.join(os.path.dirname(__file__), "..")


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("packing", [False, True])
def test_sft_logprobs_equal_per_sequence_forwards(tmp_path, packing):
  rows = [{"prompt": f"Say {i}" + " please" * (i % 3), "response": "ok " * (i + 1)} for i in range(5)]
  path = write_jsonl(tmp_path / "sft.jsonl", rows)
  cfg = config_lib.DataConfig(train=path, format="sft", template="chat", max_length=96, pad_multiple=16,
                              packing=packing)
  tok = load_tokenizer("bytes")
  loader = make_loader(cfg, tok, split="train", task="sft", batch_size=5, shuffle=False, repeat=False,
                       cache_dir=str(tmp_path / "c"))
  batch = next(iter(loader))
  lm = create("lm", preset("tiny", num_layers=2), seed=5)
  sums, counts = jax.jit(lambda b: example_logprobs(lm, b))({k: np.asarray(v) for k, v in batch.items()})
  examples, _ = load_examples(path, "sft", "train", "sft")
  enc = encode(examples, tok, "chat", 96)
  for k, i in enumerate(batch["example_id"]):
    ids, start = enc.seqs[i][0], enc.starts[i][0]
    logp = _np_log_softmax(np.asarray(lm(ids[None]))[0])
    assert float(sums[k]) == pytest.approx(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))), rel=1e-4)
    assert int(counts[k]) == len(ids) - start


def test_justifier_records_and_sources(tmp_path):
  rec = {"split": "train", "prompt": "Q?", "response_1": "A", "response_2": "B", "preference_strength": 2,
         "preference_statement": "@Response 2 is better.", "preference_elaboration": "B is right."}
  ex = justifier_example("f:1", rec, "train")
  assert ex.prompt == justifier_prompt("Q?", "A", "B") == ("Q? @Response 1:\nA\n@Response 2:\nB\n"
                                                          "Between @Response 1 and @Response 2, which is better?")
  assert ex.response == "B is right.\n@Response 2 is better."
  assert justifier_example("f:1", rec, "validation") == "other_split"
  assert justifier_example("f:1", {**rec, "preference_statement": " "}, "train") == "no_statement"
  path = write_jsonl(tmp_path / "p.jsonl", [rec, {**rec, "response_2": None}])
  with pytest.raises(UserError, match=r"p.jsonl:2.*response_2"):
    load_examples(path, "justifier", "train", "sft")
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])
  (sft_ex,), _ = load_examples(pairs, "pairs", "train", "sft")  # pair data trains on the chosen side
  assert (sft_ex.prompt, sft_ex.response) == ("Q", "good")


def test_parse_verdict_reads_the_last_statement():
  assert judge.parse_verdict("@Response 1 is wrong; @Response 2 is terse.\n@Response 2 is better.") == 2
  assert judge.parse_verdict("@Response 1 is much better.") == 1
  assert judge.parse_verdict("@Response 2 is slightly better than @Response 1.") == 2
  assert judge.parse_verdict("Both responses are about the same.") is None
  assert judge.parse_verdict("@Response 3 is better.") is None


def test_judge_pairs_counts_both_orders_unparsed_and_consistency(monkeypatch):
  from hs2p_jax.data.examples import PairExample
  pairs = [PairExample(f"q{i}", f"c{i}", f"r{i}", 1.0, "s" if i < 2 else None, f"f:{i}") for i in range(4)]
  # chosen first, then chosen second, for pairs 0..3: right/right, right/wrong (position bias),
  # unparsed/right, wrong/wrong
  answers = {justifier_prompt("q0", "c0", "r0"): "@Response 1 is better.",
             justifier_prompt("q0", "r0", "c0"): "@Response 2 is better.",
             justifier_prompt("q1", "c1", "r1"): "@Response 1 is better.",
             justifier_prompt("q1", "r1", "c1"): "@Response 1 is better.",
             justifier_prompt("q2", "c2", "r2"): "I cannot tell.",
             justifier_prompt("q2", "r2", "c2"): "@Response 2 is better.",
             justifier_prompt("q3", "c3", "r3"): "@Response 2 is better.",
             justifier_prompt("q3", "r3", "c3"): "@Response 1 is better."}
  monkeypatch.setattr(judge, "judge_texts", lambda lm, tok, template, prompts, **kw: [answers[p] for p in prompts])
  r = judge.judge_pairs(None, None, "chat", pairs)
  assert r["pairs"] == 4 and r["answers"] == 8 and r["unparsed"] == 1
  assert r["accuracy"] == pytest.approx(4 / 8)
  assert r["accuracy_chosen_first"] == pytest.approx(2 / 4) and r["accuracy_chosen_second"] == pytest.approx(2 / 4)
  assert r["position_consistency"] == pytest.approx(2 / 4)  # pairs 0 and 3 name the same response twice
  assert r["subsets"] == {"s": pytest.approx(0.75)}


def test_justifier_quickstart_trains_and_the_judge_runs(tmp_path):
  from hs2p_jax.train.sft_trainer import train_sft
  out = tmp_path / "run"
  cfg = config_lib.load(config_lib.SFTRunConfig, os.path.join(REPO, "configs/quickstart/justifier.yaml"),
                        ["sft.steps=30", "sft.eval_every=15", "sft.batch_size=8", "policy.num_layers=2", "data.builtin_size=32",
                         "data.buckets=[512]"])
  train_sft(cfg, str(out))
  recs = read_metrics(str(out / "metrics.jsonl"))
  vals = [r["val_loss"] for r in recs if "val_loss" in r]
  assert len(vals) == 2 and vals[1] < vals[0] and recs[-1]["loss"] < recs[0]["loss"]
  from hs2p_jax.cli import main
  report = tmp_path / "judge.json"
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                                                  "rejected": f"{2 * i + 1}."} for i in range(6)])
  rc = main(["eval", "--judge", "generative", "--checkpoint", str(out / "model"), "--data", pairs, "--format",
             "pairs", "--max-length", "256", "--max-new-tokens", "32", "--batch-size", "8",
             "--out", str(report), "--set", "data.template=chat"])
  assert rc == 0
  r = json.loads(report.read_text())
  assert r["pairs"] == 6 and r["answers"] == 12 and 0 <= r["unparsed"] <= r["answers"]
  assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["position_consistency"] <= 1.0


def test_pipeline_justifier_stage_trains_judges_and_reports(tmp_path, capsys):
  from hs2p_jax.cli import main
  out = tmp_path / "p"
  argv = ["pipeline", "--config", os.path.join(REPO, "configs/quickstart/pipeline.yaml"), "--out", str(out),
          "--set", "stages=[justifier]", "justifier.sft.steps=4", "justifier.sft.batch_size=4",
          "justifier.policy.num_layers=1", "data.builtin_size=32", "judge.pairs=3", "judge.max_new_tokens=16"]
  assert main(argv) == 0
  judge = json.loads((out / "justifier" / "judge.json").read_text())
  assert judge["pairs"] == 3 and judge["answers"] == 6
  summary = json.loads((out / "summary.json").read_text())
  assert summary["justifier"] == {k: judge[k] for k in ("accuracy", "pairs", "unparsed", "answers",
                                                        "position_consistency")}
  assert "Pairwise Justifier (generative baseline): accuracy" in (out / "report.md").read_text()
  assert [r["step"] for r in read_metrics(str(out / "justifier" / "metrics.jsonl")) if "loss" in r][-1] == 4
  capsys.readouterr()
  assert main(argv) == 0 and "stage: justifier" not in capsys.readouterr().err  # done: not rerun
