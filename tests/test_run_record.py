"""Runs that say what they did: a run directory keeps the config it started with and refuses another
(continuation keys aside), every step checkpoint is a model, evaluation scores at the trained length,
cadences of 0 mean never, the tokenizer follows the weights."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import requires_smollm2, separable_pairs, tiny_hf_model, tiny_overrides, write_jsonl
from hs2p_jax import run_record
from hs2p_jax.cli import main
from hs2p_jax.errors import UserError


def run_cli(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def tree_digest(path) -> dict[str, str]:
  """{relative path: sha256} of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _rm(tmp_path, steps: int, **extra) -> list[str]:
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  return tiny_overrides(tmp_path, **{"data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": steps, "train.batch_size": 4, **extra})


def test_a_changed_config_is_refused_and_a_longer_run_continues(tmp_path, capsys):
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: record\n")
  out = str(tmp_path / "run")
  train = ["train-rm", "--config", str(cfg), "--out", out, "--set"]
  code, _, err = run_cli(capsys, *train, *_rm(tmp_path, 3))
  assert code == 0, err
  assert "devices: 1 x cpu" in err and "compiling the step for 1 batch shape" in err and "compiled in" in err
  assert f"done: the model is {out}/model (step 3); next: hs2p eval --checkpoint {out}/model" in err
  before = tree_digest(out)

  code, _, err = run_cli(capsys, *train, *_rm(tmp_path, 3, **{"train.lr": 5e-4}))
  assert code == 2 and "train.lr 2e-06 -> 0.0005" in err and len(err.strip().splitlines()) == 1, err
  assert tree_digest(out) == before  # config.json, provenance.json, every checkpoint: untouched
  code, _, err = run_cli(capsys, "train-dpo", "--config", str(cfg), "--out", out, "--set", "policy.preset=tiny")
  assert code == 2 and "holds a train-rm run" in err and tree_digest(out) == before, err

  code, _, err = run_cli(capsys, *train, *_rm(tmp_path, 5, **{"train.log_every": 2}))  # continuation keys only
  assert code == 0 and "from step 3 with train.log_every 1 -> 2, train.steps 3 -> 5" in err, err
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 3  # the record of how the run started
  with open(os.path.join(out, "run.json")) as f:
    record = json.load(f)
  assert record["command"] == "train-rm" and [s["from_step"] for s in record["sessions"]] == [0, 3]
  assert record["sessions"][1]["changed"] == {"train.log_every": [1, 2], "train.steps": [3, 5]}
  with open(os.path.join(out, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]

  code, _, err = run_cli(capsys, *train, *_rm(tmp_path, 4))  # fewer steps than the run has done
  assert code == 2 and "train.steps=4, but the run has a checkpoint at step 5" in err, err
  code, _, err = run_cli(capsys, *train, *_rm(tmp_path, 6, **{"train.lr": 5e-4}), "--allow-config-change")
  assert code == 0, err
  with open(os.path.join(out, "run.json")) as f:
    last = json.load(f)["sessions"][-1]
  assert last["allowed_by"] == "--allow-config-change" and last["changed"]["train.lr"] == [2e-6, 5e-4]


def test_claim_compares_with_the_current_config_and_new_default_keys(tmp_path):
  out = str(tmp_path / "run")
  cfg, defaults = {"train": {"lr": 1.0, "steps": 2}, "mesh": {"data": 1}}, {"train": {"new": 0}}
  run_record.claim(out, "train-rm", cfg, defaults).commit()
  run_record.claim(out, "train-rm", {"train": {"lr": 2.0, "steps": 2}}, defaults).commit()  # no state yet: afresh
  assert json.load(open(os.path.join(out, "config.json")))["train"]["lr"] == 2.0
  os.makedirs(os.path.join(out, "checkpoints", "2"))
  c = run_record.claim(out, "train-rm", {"train": {"lr": 2.0, "steps": 4, "new": 0}, "mesh": {"data": 2}}, defaults)
  c.commit()
  assert c.session["changed"] == {"mesh.data": [run_record._ABSENT, 2], "train.steps": [2, 4]}
  # compared with the run's current config: the continuation above is no change now
  assert run_record.claim(out, "train-rm", {"train": {"lr": 2.0, "steps": 4}, "mesh": {"data": 2}},
                          defaults).session["changed"] == {}
  with pytest.raises(UserError, match=r"train.new 0 -> 1"):
    run_record.claim(out, "train-rm", {"train": {"lr": 2.0, "steps": 4, "new": 1}, "mesh": {"data": 2}}, defaults)
  with pytest.raises(UserError, match="holds a train-rm run"):
    run_record.claim(out, "reinforce", {}, {})


def _tiny_run(tmp_path, capsys, name: str, *extra: str) -> str:
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: steps\n")
  out = str(tmp_path / name)
  code, _, err = run_cli(capsys, "train-rm", "--config", str(cfg), "--out", out, "--set",
                         *_rm(tmp_path, 2, **{"train.save_every": 1, "train.keep_checkpoints": 3}), *extra)
  assert code == 0, err
  return out


def test_every_step_checkpoint_is_a_model(tmp_path, capsys):
  from hs2p_jax.checkpoint import load_model, read_meta
  from hs2p_jax.eval.scorer import RewardScorer
  out = _tiny_run(tmp_path, capsys, "run")
  step2, model = os.path.join(out, "checkpoints", "2"), os.path.join(out, "model")
  assert read_meta(step2) == read_meta(model) and read_meta(model).max_length == 64
  reports = []
  for ckpt in (step2, model, os.path.join(out, "checkpoints", "1")):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", str(tmp_path / "pairs.jsonl"),
                           "--format", "pairs", "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    reports.append(json.load(open(tmp_path / "e.json")))
  assert reports[0]["loss"] == reports[1]["loss"] and reports[2]["loss"] != reports[1]["loss"]
  texts = (["Question 1?", "Question 2?"], ["Answer 1 good", "Answer 2 bad"])
  np.testing.assert_array_equal(RewardScorer.load(step2)(*texts), RewardScorer.load(model)(*texts))  # what serve runs
  exports = []
  for i, ckpt in enumerate((step2, model)):
    assert run_cli(capsys, "convert", "--checkpoint", ckpt, "--to-hf", str(tmp_path / f"hf{i}"))[0] == 0
    exports.append(tree_digest(tmp_path / f"hf{i}"))
  assert exports[0] == exports[1]
  with open(tmp_path / "hf0" / "config.json") as f:
    assert list(json.load(f)["id2label"].values())[4] == "helpfulness"  # the nine attributes by name
  os.makedirs(tmp_path / "unfinished" / "checkpoints" / "7")
  with pytest.raises(UserError, match="newest step checkpoint is a model"):
    load_model(str(tmp_path / "unfinished"))


def test_a_lora_step_checkpoint_is_its_run_s_model_and_its_adapter_names_the_base(tmp_path, capsys):
  from flax import nnx

  from hs2p_jax.checkpoint import load_model
  src = tmp_path / "src"
  tiny_hf_model(vocab_size=512).save_pretrained(src, safe_serialization=True)  # room for the byte tokenizer
  out = _tiny_run(tmp_path, capsys, "lora", f"model.source=hf:{src}", "model.lora.rank=2")
  (a, _), (b, _) = (load_model(p) for p in (os.path.join(out, "checkpoints", "2"), os.path.join(out, "model")))
  for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))
  assert run_cli(capsys, "convert", "--checkpoint", os.path.join(out, "checkpoints", "1"), "--adapter",
                 "--to-hf", str(tmp_path / "adapter"))[0] == 0
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == str(src)


def test_eval_scores_at_the_trained_length_and_says_what_it_cut(tmp_path, capsys):
  out = _tiny_run(tmp_path, capsys, "run")  # trained at data.max_length 64
  long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Q" * 200, "chosen": "good", "rejected": "bad"}] * 3)
  code, _, err = run_cli(capsys, "eval", "--checkpoint", out, "--data", long, "--format", "pairs")
  assert code == 0 and "truncated 3 of 3 pairs to 64 tokens" in err, err
  assert not os.path.exists(".hs2p_data")  # built-in data goes to the cache, not the working directory
  code, _, err = run_cli(capsys, "eval", "--checkpoint", out, "--data", long, "--format", "pairs", "--max-length",
                         "32", "--set", "data.max_length=48")
  assert code == 2 and "--max-length 32 and --set data.max_length=48 disagree" in err


def test_a_cadence_of_zero_means_never(tmp_path, capsys):
  from hs2p_jax.train.metrics import read_metrics
  out = _tiny_run(tmp_path, capsys, "run", "train.save_every=0", "train.log_every=0", "train.steps=3")
  assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [3]
  assert os.listdir(os.path.join(out, "checkpoints")) == ["3"]
  with pytest.raises(UserError, match="train.save_every=-1: must be >= 0"):
    from hs2p_jax.config import RunConfig, load
    load(RunConfig, None, ["train.save_every=-1"])


@pytest.mark.slow
@requires_smollm2
def test_the_tokenizer_follows_the_weights(tmp_path, capsys):
  """The quickstart config (no tokenizer key) over SmolLM2's weights trains with SmolLM2's tokenizer;
  the byte tokenizer set over them is one line, before any data is read or step compiled."""
  from hs2p_jax.checkpoint import load_checkpoint_tokenizer
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart", "regression.yaml")
  sets = ["model.source=gguf:smollm2", "model.num_layers=1", "train.steps=1", "train.batch_size=2",
          "data.builtin_size=16", "data.validation=null", "data.eval_pairs=null", "data.buckets=[160]", "mesh.data=1"]
  out = str(tmp_path / "smol")
  code, _, err = run_cli(capsys, "train-rm", "--config", config, "--out", out, "--set", *sets)
  assert code == 0, err
  assert len(load_checkpoint_tokenizer(os.path.join(out, "model"))) == 49152
  code, _, err = run_cli(capsys, "train-rm", "--config", config, "--out", str(tmp_path / "bytes"), "--set", *sets,
                         "model.tokenizer=bytes")
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert "model.tokenizer=bytes: the weights of model.source=gguf:smollm2 come with another tokenizer (49152" in err
  assert not os.path.exists(tmp_path / "bytes" / "data") and not os.path.exists(tmp_path / "bytes" / "config.json")
