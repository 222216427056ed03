"""HelpSteer3-Preference records: orientation, ties and filters counted, multi-turn contexts in both
templates, malformed records named by file and line, the hub path through `datasets`."""

from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_overrides, write_jsonl
from hs2p_jax.data.load import load_examples
from hs2p_jax.data.templates import ASSISTANT_MARK, STEERLM_HEAD, STEERLM_TAIL, USER_MARK, render
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import byte_tokenizer

CONTEXT = [{"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": "Hello Ana!"},
           {"role": "user", "content": "What is my name?"}]


def record(**kw):
  base = {"domain": "general", "language": "english", "context": CONTEXT, "response1": "Your name is Ana.",
          "response2": "I don't know.", "overall_preference": -2,
          "individual_preference": [{"score": -2, "reasoning": "@Response 1 is right."}]}
  return {**base, **kw}


def load(path, split="train", **kw):
  return load_examples(path, "helpsteer3-preference", split, "pairs", **kw)


def test_orientation_magnitude_ties_and_filters(tmp_path):
  rows = [record(), record(overall_preference=3, domain="stem"), record(overall_preference=0),
          record(overall_preference=-1, language="german", domain="multilingual"), record(context="Just a question?")]
  path = write_jsonl(tmp_path / "hs3.jsonl", rows)
  pairs, report = load(path)
  assert report.read == 5 and report.kept == 4 and report.dropped == {"tie": 1}
  assert (pairs[0].chosen, pairs[0].rejected, pairs[0].magnitude) == ("Your name is Ana.", "I don't know.", 2.0)
  assert (pairs[1].chosen, pairs[1].magnitude, pairs[1].subset) == ("I don't know.", 3.0, "stem")
  assert pairs[3].prompt == "Just a question?"
  pairs, report = load(path, domains=["STEM", "general", "multilingual"], languages=["english"])
  assert len(pairs) == 3 and report.dropped == {"tie": 1, "other_language": 1}
  _, report = load(path, domains=["stem"])
  assert report.dropped == {"other_domain": 4} and report.kept == 1


def test_three_turn_context_in_both_templates(tmp_path):
  path = write_jsonl(tmp_path / "hs3.jsonl", [record()])
  (pair,), _ = load(path)
  steerlm = render("steerlm", pair.prompt, pair.chosen).text
  assert steerlm == (f"{STEERLM_HEAD}My name is Ana.{ASSISTANT_MARK}Hello Ana!{USER_MARK}What is my name?"
                     f"{ASSISTANT_MARK}Your name is Ana.{STEERLM_TAIL}")
  tok = byte_tokenizer()
  chat = render("chat", pair.prompt, pair.chosen, tok)
  expected = tok.apply_chat_template(CONTEXT + [{"role": "assistant", "content": "Your name is Ana."}], tokenize=False)
  assert chat.text == expected and chat.response == "Your name is Ana."
  assert chat.prompt.startswith("My name is Ana.") and chat.prompt.endswith("What is my name?")


@pytest.mark.parametrize("change,message", [
    ({"overall_preference": 4}, r"field 'overall_preference'=4 is out of range"),
    ({"context": CONTEXT[:2]}, r"context must end with a user turn"),
    ({"context": [{"role": "system", "content": "x"}]}, r"context\[0\].role='system'"),
    ({"context": []}, r"field 'context' must be a string or a non-empty list"),
    ({"response2": None}, r"missing field 'response2'"),
])
def test_malformed_record_names_file_and_line(tmp_path, change, message):
  path = write_jsonl(tmp_path / "hs3.jsonl", [record(), record(**change)])
  with pytest.raises(UserError, match=r"hs3.jsonl:2: " + message):
    load(path)
  _, report = load(path, skip_invalid=True)
  assert report.invalid == 1 and report.kept == 1


def test_hub_source_reads_train_and_validation_splits(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  os.makedirs(tmp_path / "HelpSteer3" / "preference")
  write_jsonl(tmp_path / "HelpSteer3" / "preference" / "train.jsonl", [record(), record(overall_preference=0)])
  write_jsonl(tmp_path / "HelpSteer3" / "preference" / "validation.jsonl", [record(overall_preference=1)])
  source = f"hf:{tmp_path}/HelpSteer3:preference"
  train, report = load(source, "train")
  assert len(train) == 1 and report.dropped == {"tie": 1} and train[0].prompt.endswith("What is my name?")
  (val,), _ = load(source, "validation")
  assert val.chosen == "I don't know."


def test_cli_trains_on_helpsteer3_and_names_a_bad_record(tmp_path, capsys):
  from hs2p_jax.cli import main
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: hs3\n")
  rows = [record(), record(overall_preference=2), record(overall_preference=0)] * 3
  good = write_jsonl(tmp_path / "train.jsonl", rows)
  sets = tiny_overrides(tmp_path, **{"data.train": good, "data.validation": good, "data.format": "helpsteer3-preference",
                                     "train.objective": "bt", "train.steps": 2, "train.batch_size": 2})
  assert main(["train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", *sets]) == 0
  lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [m["step"] for m in lines if "loss" in m][-1] == 2
  capsys.readouterr()
  bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [record(context=CONTEXT[:2])])
  code = main(["train-rm", "--config", str(cfg), "--out", str(tmp_path / "run2"), "--set",
               *tiny_overrides(tmp_path, **{"data.train": bad, "data.format": "helpsteer3-preference",
                                            "train.objective": "bt", "train.steps": 2})])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "bad.jsonl:3: context must end with a user turn" in err[0]
  code = main(["train-rm", "--config", str(cfg), "--out", str(tmp_path / "run3"), "--set",
               *tiny_overrides(tmp_path, **{"data.train": good, "data.domains": "[stem]", "train.objective": "bt"})])
  err = capsys.readouterr().err
  assert code == 2 and "data.domains filters helpsteer3-preference records" in err
