"""The `hs2p` command line: conversion, scoring, evaluation, ExPO, and one-line errors on bad input."""

from __future__ import annotations

import gzip
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax.checkpoint import load_model
from hs2p_jax.cli import main


def run_cli(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(err: str) -> str:
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny BT reward model trained for a few steps through the CLI."""
  tmp = tmp_path_factory.mktemp("trained")
  pairs = write_jsonl(tmp / "pairs.jsonl", separable_pairs(8))
  cfg = tmp / "c.yaml"
  cfg.write_text("name: cli\n")
  sets = tiny_overrides(tmp, **{"data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                "train.steps": 3, "train.batch_size": 4})
  assert main(["train-rm", "--config", str(cfg), "--out", str(tmp / "run"), "--set", *sets]) == 0
  return tmp


def test_convert_hf_directory_and_score_a_pair(tiny_hf_dir, tmp_path, capsys):
  path, _ = tiny_hf_dir
  from hs2p_jax.tokenizer import byte_tokenizer
  byte_tokenizer().save_pretrained(path)
  code, out, _ = run_cli(capsys, "convert", "--hf", path, "--out", str(tmp_path / "ckpt"), "--score",
                         "What is 2+2?", "4")
  assert code == 0
  report = json.loads(out)
  assert report["layers"] == 3 and set(report["score"]) >= {"helpfulness", "verbosity"}
  code, out, _ = run_cli(capsys, "convert", "--checkpoint", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf"))
  assert code == 0 and os.path.isfile(tmp_path / "hf" / "model.safetensors")
  assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")


def test_eval_rewardbench_format_reports_sections(trained, tmp_path, capsys):
  from hs2p_jax.eval.rewardbench import section_scores
  rows = []
  for i, subset in enumerate(["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-go"]):
    for j in range(3):
      rows.append({"prompt": f"q{i}{j}", "chosen": f"a{j} good", "chosen_model": "x", "rejected": f"a{j} bad",
                   "rejected_model": "y", "subset": subset, "id": len(rows)})
  data = write_jsonl(tmp_path / "rb.jsonl", rows)
  out_file = tmp_path / "report.json"
  code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(trained / "run"), "--data", data, "--format",
                         "rewardbench", "--out", str(out_file), "--max-length", "64")
  assert code == 0
  report = json.loads(out_file.read_text())
  assert report["pairs"] == 15 and set(report["subsets"]) == {r["subset"] for r in rows}
  assert report["sections"] == pytest.approx(section_scores(report["subsets"]))
  assert report["accuracy"] == pytest.approx(np.mean(list(report["subsets"].values())))


def test_expo_fixed_factor_matches_numpy(trained, tmp_path, capsys):
  base_dir = str(trained / "run" / "model")
  from hs2p_jax.checkpoint import save_model
  base, meta = load_model(base_dir)
  g, p = nnx.split(base)
  other = nnx.merge(g, jax.tree.map(lambda a: a * 0.5 + 0.01, p))
  save_model(str(tmp_path / "tuned"), other, meta, None)
  os.symlink(os.path.join(base_dir, "tokenizer"), tmp_path / "tuned" / "tokenizer")
  code, out, _ = run_cli(capsys, "expo", "--base", base_dir, "--tuned", str(tmp_path / "tuned"), "--factor", "1.5",
                         "--out", str(tmp_path / "expo"))
  assert code == 0 and json.loads(out)["factor"] == 1.5
  mixed, _ = load_model(str(tmp_path / "expo"))
  for b, t, m in zip(jax.tree.leaves(p), jax.tree.leaves(nnx.state(other)), jax.tree.leaves(nnx.state(mixed))):
    b, t = np.asarray(b, np.float64), np.asarray(t, np.float64)
    np.testing.assert_allclose(np.asarray(m), b + 1.5 * (t - b), rtol=1e-5, atol=1e-6)


def test_expo_search_writes_plot_and_table(trained, tmp_path, capsys):
  pairs = write_jsonl(tmp_path / "val.jsonl", separable_pairs(6))
  run = trained / "run" / "model"
  code, out, err = run_cli(capsys, "expo", "--base", str(run), "--tuned", str(run), "--search", "0.5:1.5:0.5",
                           "--data", pairs, "--format", "pairs", "--out", str(tmp_path / "expo"), "--max-length", "64")
  assert code == 0, err
  table = json.loads((tmp_path / "expo" / "expo_search.json").read_text())
  assert [r["factor"] for r in table["table"]] == [0.5, 1.0, 1.5]
  assert (tmp_path / "expo" / "expo_search.png").read_bytes()[:4] == b"\x89PNG"


def train_rm_error(tmp_path, capsys, data, fmt: str) -> str:
  """`hs2p train-rm` (BT) on `data`: asserts exit code 2 and returns its one-line error."""
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: bad\n")
  code, _, err = run_cli(capsys, "train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set",
                         *tiny_overrides(tmp_path, **{"data.train": str(data), "data.format": fmt,
                                                      "train.objective": "bt"}))
  assert code == 2
  return one_line_error(err)


def test_malformed_jsonl_is_one_line_naming_file_and_line(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
  assert f"{bad}:2" in train_rm_error(tmp_path, capsys, bad, "pairs")
  assert not os.path.exists(tmp_path / "run" / "model")


@pytest.mark.parametrize("record, needle", [
    ({"split": "train", "prompt": "p", "response_1": "a", "response_2": "b", "preference_strength": 7},
     "preference_strength"),
    ({"split": "train", "prompt": "p", "response_1": "a", "preference_strength": 2}, "response_2"),
])
def test_bad_preference_records_name_the_field(tmp_path, capsys, record, needle):
  path = tmp_path / "pref.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write(json.dumps(record) + "\n")
  line = train_rm_error(tmp_path, capsys, path, "helpsteer2-preference")
  assert f"{path}:1" in line and needle in line


def test_unknown_config_key_and_wrong_shape_checkpoint(trained, tmp_path, capsys):
  cfg = tmp_path / "c.yaml"
  cfg.write_text("train:\n  stepz: 3\n")
  code, _, err = run_cli(capsys, "train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"))
  assert code == 2 and "train.stepz" in one_line_error(err) and str(cfg) in err
  ckpt = tmp_path / "ckpt"
  import shutil
  shutil.copytree(trained / "run" / "model", ckpt)
  meta = json.loads((ckpt / "hs2p_model.json").read_text())
  meta["config"]["intermediate_size"] = 200
  (ckpt / "hs2p_model.json").write_text(json.dumps(meta))
  code, _, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--data", "builtin")
  line = one_line_error(err)
  assert code == 2 and "shape" in line and "mlp" in line


def test_ppo_rounds_restart_actor_and_reference_from_the_last_round(tmp_path, monkeypatch):
  """`ppo_rounds: 2`: round 2 (DIR/ppo_round2) starts the policy (and so its reference, the initial
  policy) from round 1's best actor by validation reward (its final actor where it kept none) and the
  critic again from the reward model; a rerun skips finished rounds."""
  from hs2p_jax.commands import pipeline as pl
  from hs2p_jax.rl import ppo_trainer
  calls = []

  def fake_train(cfg, out_dir):  # what the stage hands the trainer; round 1 kept a best checkpoint
    calls.append((cfg.policy.init_from, cfg.reward_model, cfg.critic, out_dir))
    if out_dir.endswith("/ppo"):
      os.makedirs(os.path.join(out_dir, "best"))
      open(os.path.join(out_dir, "best", "hs2p_model.json"), "w").write("{}")
    return {"step": cfg.ppo.steps}

  monkeypatch.setattr(ppo_trainer, "train_ppo", fake_train)
  root = os.path.join(os.path.dirname(__file__), "..")
  p = pl.Pipeline(os.path.join(root, "configs/quickstart/pipeline.yaml"), ["ppo_rounds=3", "reward_model=/rm"],
                  str(tmp_path / "q"))
  p._ppo()
  q = str(tmp_path / "q")
  assert calls == [(None, "/rm", None, f"{q}/ppo"), (f"{q}/ppo/best", "/rm", None, f"{q}/ppo_round2"),
                   (f"{q}/ppo_round2/model", "/rm", None, f"{q}/ppo_round3")]
  p._ppo()
  assert len(calls) == 3  # every round DONE


@pytest.mark.slow
def test_quickstart_pipeline_runs_short(tmp_path, capsys):
  root = os.path.join(os.path.dirname(__file__), "..")
  code, out, err = run_cli(capsys, "pipeline", "--config", os.path.join(root, "configs/quickstart/pipeline.yaml"),
                           "--out", str(tmp_path / "q"), "--set", "train.steps=4", "reinforce.steps=2",
                           "expo.search=1.0:1.4:0.2", "data.builtin_size=64", "dpo.steps=2", "compare.prompts=8",
                           "compare.max_new_tokens=8", "data.buckets=[160]", "ppo.steps=2", "ppo.critic_warmup_steps=1", "ppo.prompts_per_step=4", "ppo.epochs=1",
                           "ppo.max_new_tokens=8", "reinforce.val_prompts=8", "ppo.val_prompts=8", "ppo_rounds=2")
  assert code == 0, err
  report = (tmp_path / "q" / "report.md").read_text()
  # the paper's round 2 starts from round 1's best checkpoint by validation reward
  round2 = json.loads((tmp_path / "q" / "ppo_round2" / "DONE").read_text())
  assert round2["init_from"] == str(tmp_path / "q" / "ppo" / "best")
  assert "Validation (greedy responses to held-out prompts)" in report
  ppo_recs = [json.loads(line) for line in open(tmp_path / "q" / "ppo" / "metrics.jsonl")]
  best = json.loads((tmp_path / "q" / "ppo" / "best" / "best.json").read_text())
  assert "val_reward" in ppo_recs[-1] and best["step"] == 2 and best["value"] == ppo_recs[-1]["val_reward"]
  for needle in ("Regression, helpfulness only", "Scaled BT + ExPO", "expo_search.png", "reinforce_curves.png",
                 "dpo_curves.png", "ppo_curves.png", "Policy dpo on held-out prompts",
                 "Policy reinforce on held-out prompts", "| ppo | ", "| PPO | 8.74 | 1842.8 | 43.8 | 58.6 |",
                 "| REINFORCE | 8.98 | 2199.8 | 57.6 | 85.0 |", "| Scaled DPO | 8.74 | 1514.8 | 41.0 | 52.9 |"):
    assert needle in report, needle
  stages = {json.loads(l)["stage"] for l in open(tmp_path / "q" / "metrics.jsonl")}
  assert stages == {"regression", "bt", "reinforce", "ppo", "ppo_round2", "dpo"}
  assert json.loads((tmp_path / "q" / "ppo" / "DONE").read_text())["reward_model"] == str(tmp_path / "q" / "expo" / "model")
  summary = json.loads((tmp_path / "q" / "summary.json").read_text())
  assert "RewardBench 2 scores" in report and len(summary["rewardbench2"]) == 3  # regression, BT, ExPO
  for rb2 in summary["rewardbench2"].values():
    assert rb2["Overall"] == pytest.approx(np.mean([v for k, v in rb2.items() if k != "Overall"]))
  policies = summary["policies"]
  assert set(policies) == {"reference", "reinforce", "ppo", "dpo"} and policies["reference"]["kl"] == 0.0
  assert all(p["kl"] != 0.0 for name, p in policies.items() if name != "reference")
  umask = os.umask(0)
  os.umask(umask)
  for name in ("report.md", "summary.json", "provenance.json", "rm_curves.png", "regression/config.json",
               "bt/provenance.json", "reinforce/provenance.json", "eval/scores.json"):
    assert os.stat(tmp_path / "q" / name).st_mode & 0o777 == 0o666 & ~umask, name
  prov = json.loads((tmp_path / "q" / "provenance.json").read_text())
  assert set(prov["data"]) == {"expo_search", "eval"} and len(prov["data"]["eval"]["origin"]["sha256"]) == 64
  assert json.loads((tmp_path / "q" / "reinforce" / "provenance.json").read_text())["data"]["prompts"]["kept"] > 0
  # a rerun finds every stage done and only rewrites the report
  code, _, err = run_cli(capsys, "pipeline", "--config", os.path.join(root, "configs/quickstart/pipeline.yaml"),
                         "--out", str(tmp_path / "q"), "--set", "train.steps=4", "reinforce.steps=2",
                         "expo.search=1.0:1.4:0.2", "data.builtin_size=64", "dpo.steps=2", "compare.prompts=8",
                         "compare.max_new_tokens=8", "data.buckets=[160]", "ppo.steps=2", "ppo.critic_warmup_steps=1", "ppo.prompts_per_step=4", "ppo.epochs=1",
                         "ppo.max_new_tokens=8", "reinforce.val_prompts=8", "ppo.val_prompts=8", "ppo_rounds=2")
  assert code == 0 and "stage: regression" not in err and "stage: compare" not in err
  # a changed stage key runs that stage again, and every stage that reads it; the report says which ran
  code, _, err = run_cli(capsys, "pipeline", "--config", os.path.join(root, "configs/quickstart/pipeline.yaml"),
                         "--out", str(tmp_path / "q"), "--set", "train.steps=4", "reinforce.steps=2",
                         "expo.search=1.0:1.4:0.2", "data.builtin_size=64", "dpo.steps=2", "compare.prompts=8",
                         "compare.max_new_tokens=8", "data.buckets=[160]", "ppo.steps=2", "ppo.critic_warmup_steps=1",
                         "ppo.prompts_per_step=4", "ppo.epochs=1", "ppo.max_new_tokens=8", "reinforce.val_prompts=8",
                         "ppo.val_prompts=8", "ppo_rounds=2", "dpo.dpo.beta=0.2")
  assert code == 0, err
  assert "== pipeline stage dpo: stale (dpo.beta 0.1 -> 0.2): running it again" in err
  assert "== pipeline stage compare: stale (dpo changed): running it again" in err
  assert "== pipeline stage: dpo" in err and "== pipeline stage: compare" in err and "stage: regression" not in err
  summary = json.loads((tmp_path / "q" / "summary.json").read_text())
  assert {s for s, k in summary["stage_keys"].items() if k["ran"]} == {"dpo", "compare", "eval"}
  assert json.loads((tmp_path / "q" / "dpo" / "config.json").read_text())["dpo"]["beta"] == 0.2
  assert [r["stage"] for r in map(json.loads, open(tmp_path / "q" / "metrics.jsonl"))].count("dpo") == 1  # once


def test_eval_and_convert_take_data_keys(trained, tiny_hf_dir, tmp_path, capsys):
  """`--set data.template=...` (and data.max_length) change how eval reads pairs; convert records
  the template it is given; keys that do not apply are one-line errors."""
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  reports = {}
  for name, sets in {"checkpoint's (chat)": [], "steerlm": ["data.template=steerlm", "data.max_length=200"],
                     "short": ["data.max_length=40"]}.items():
    out = tmp_path / f"{len(reports)}.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(trained / "run"), "--data", data, "--format", "pairs",
                           "--out", str(out), *(["--set", *sets] if sets else []))  # default: trained at 64
    assert code == 0, err
    reports[name] = json.loads(out.read_text())
  assert [r["template"] for r in reports.values()] == ["chat", "steerlm", "chat"]
  truncated = {k: int(r["load"].split("truncated ")[1].split(",")[0]) for k, r in reports.items()}
  # the SteerLM system prompt alone takes 183 bytes; the chat template's far fewer
  assert truncated == {"checkpoint's (chat)": 0, "steerlm": 8, "short": 8}

  code, _, err = run_cli(capsys, "eval", "--checkpoint", str(trained / "run"), "--data", data, "--format", "pairs",
                         "--set", "data.train=x.jsonl")
  assert code == 2 and "data.train" in one_line_error(err) and "hs2p eval" in err
  code, _, err = run_cli(capsys, "eval", "--checkpoint", str(trained / "run"), "--data", data, "--set",
                         "data.template=fancy")
  assert code == 2 and "data.template" in one_line_error(err)

  path, _ = tiny_hf_dir
  from hs2p_jax.tokenizer import byte_tokenizer
  byte_tokenizer().save_pretrained(path)
  code, out, err = run_cli(capsys, "convert", "--hf", path, "--out", str(tmp_path / "ckpt"), "--head", "reward",
                           "--set", "data.template=chat", "--score", "What is 2+2?", "4")
  assert code == 0, err
  assert json.loads((tmp_path / "ckpt" / "hs2p_model.json").read_text())["template"] == "chat"
  code, _, err = run_cli(capsys, "convert", "--hf", path, "--out", str(tmp_path / "c2"), "--set", "data.max_length=9")
  assert code == 2 and "data.max_length" in one_line_error(err) and not os.path.exists(tmp_path / "c2")


def test_a_run_that_turns_nan_stops_at_that_step_without_saving_it(tmp_path, capsys):
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: nan\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": 6, "train.batch_size": 4, "train.lr": 1e12, "train.grad_clip": 0,
                                     "train.warmup_steps": 0, "train.save_every": 1})
  code, _, err = run_cli(capsys, "train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", *sets)
  lines = [l for l in err.splitlines() if "error:" in l]  # after the progress lines of the good steps
  assert code == 2 and len(lines) == 1 and "not finite" in lines[0] and "Traceback" not in err
  line = lines[0]
  bad = int(line.split("step ")[1].split(":")[0])
  assert 1 < bad <= 6
  saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert saved and max(saved) == bad - 1 and f"step {bad - 1}" in line  # the last good one, nothing after
  assert not os.path.exists(tmp_path / "run" / "model")
  steps = [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert steps == list(range(1, bad))  # every logged step is finite
  assert all(np.isfinite(json.loads(l)["loss"]) for l in open(tmp_path / "run" / "metrics.jsonl"))


def _truncate_largest(root) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)
  return big


def test_an_unreadable_checkpoint_is_one_line_and_resume_falls_back_to_the_previous(tmp_path, capsys):
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: ckpt\n")
  base = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "train.batch_size": 4, "train.save_every": 2, "train.keep_checkpoints": 3,
                                     "train.lr": 3e-3})
  runs = {}
  for name, steps in (("straight", 8), ("damaged", 6)):
    assert run_cli(capsys, "train-rm", "--config", str(cfg), "--out", str(tmp_path / name), "--set", *base,
                   f"train.steps={steps}")[0] == 0
  _truncate_largest(tmp_path / "damaged" / "checkpoints" / "6" / "state")
  code, _, err = run_cli(capsys, "train-rm", "--config", str(cfg), "--out", str(tmp_path / "damaged"), "--set",
                         *base, "train.steps=8")
  assert code == 0, err
  assert "checkpoints/6: unreadable" in err and "trying the previous checkpoint" in err
  for name in ("straight", "damaged"):
    runs[name] = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
  assert [r["step"] for r in runs["damaged"]] == list(range(1, 9))  # each step once, 5..8 from checkpoint 4
  assert [r["loss"] for r in runs["damaged"]] == pytest.approx([r["loss"] for r in runs["straight"]], rel=1e-6)
  # a model checkpoint with a damaged file: one line naming it, no traceback
  _truncate_largest(tmp_path / "straight" / "model" / "params")
  code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "straight"), "--data", data, "--format",
                         "pairs", "--max-length", "64")
  line = one_line_error(err)
  assert code == 2 and "straight/model" in line and "cannot read" in line
