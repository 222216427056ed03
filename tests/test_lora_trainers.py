"""DPO, SFT and REINFORCE with `policy.lora`: the adapters train over a frozen base, the reference
is the initial adapters over that base (no second copy of it), a LoRA policy starts as its base
computes (its first step equals the full fine-tune's), and the sampler's merged copy samples what
the unmerged adapters do."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from conftest import write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.train.metrics import read_metrics
from test_reinforce import letter_reward, rl_config

REPO = os.path.join(os.path.dirname(__file__), "..")


def _paths(state) -> set[str]:
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def _flat(state) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_lora_dpo_trains_adapters_against_the_initial_adapters_over_one_base(tmp_path):
  from hs2p_jax.checkpoint import load_model
  from hs2p_jax.train.dpo_trainer import trainer as dpo_trainer
  sets = {"dpo.steps": 6, "dpo.eval_every": 6, "dpo.save_every": 1000, "policy.num_layers": 2, "dpo.lr": 1e-3,
          "data.builtin_size": 64, "data.buckets": "[160]", "policy.lora.rank": 4}
  cfg = config_lib.load(config_lib.DPORunConfig, os.path.join(REPO, "configs/quickstart/dpo.yaml"),
                        [f"{k}={v}" for k, v in sets.items()])
  out = str(tmp_path / "run")
  t = dpo_trainer(cfg, out)
  assert all("_lora_" in p for p in _paths(t.state.params))
  res = t.state.resident_bytes()
  assert res["reference"] == res["params"] and res["base"] > 10 * res["params"]  # no second base
  start = t.evaluate()  # the policy is its reference
  assert start["val_drift"] == 0.0 and start["val_margin"] == 0.0
  base = _flat(t.frozen["base"])
  t.run()
  recs = read_metrics(os.path.join(out, "metrics.jsonl"))
  assert recs[-1]["val_loss"] < start["val_loss"] and recs[-1]["val_accuracy"] > 0.5, (start, recs[-1])
  model, meta = load_model(os.path.join(out, "model"))
  assert meta.config.lora_rank == 4
  trained = _flat(nnx.state(model, nnx.Param))
  for name, value in base.items():
    np.testing.assert_array_equal(trained[name], value, err_msg=name)  # the base did not move
  assert np.abs(trained["model/layers/attn/wq_lora_b"]).max() > 0
  assert _paths(t.frozen["reference"]) == _paths(t.state.params)  # the initial adapters, kept once
  assert os.path.isdir(os.path.join(out, "frozen", "base")) and os.path.isdir(os.path.join(out, "frozen", "reference"))


def test_lora_sft_starts_where_the_full_fine_tune_starts_and_learns(tmp_path):
  from hs2p_jax.train.sft_trainer import train_sft
  rows = [{"prompt": f"Count to {i % 4 + 1}", "response": " ".join(str(j) for j in range(1, i % 4 + 2))}
          for i in range(16)]
  data = write_jsonl(tmp_path / "sft.jsonl", rows)
  runs = {}
  for rank in (0, 4):
    sets = {"policy.preset": "tiny", "policy.num_layers": 2, "policy.tokenizer": "bytes", "data.train": data,
            "data.format": "sft", "data.template": "chat", "data.max_length": 64, "data.pad_multiple": 16, "data.buckets": "[64]",
            "sft.steps": 5, "sft.batch_size": 4, "sft.lr": 3e-3, "sft.log_every": 1, "sft.save_every": 1000,
            "policy.lora.rank": rank, "mesh.data": 1}
    cfg = config_lib.load(config_lib.SFTRunConfig, None, [f"{k}={v}" for k, v in sets.items()])
    train_sft(cfg, str(tmp_path / f"r{rank}"))
    runs[rank] = read_metrics(str(tmp_path / f"r{rank}" / "metrics.jsonl"))
  assert runs[4][0]["loss"] == pytest.approx(runs[0][0]["loss"], rel=1e-6)  # B = 0: the base computes
  assert runs[4][1]["loss"] != runs[0][1]["loss"]  # then different parameters train
  assert runs[4][-1]["loss"] < runs[4][0]["loss"] - 0.1


def test_lora_reinforce_samples_from_the_merged_copy_as_from_the_adapters(tmp_path):
  from hs2p_jax.rl.reinforce_trainer import trainer as reinforce_trainer
  runs = {}
  for name, extra in (("full", {}), ("lora", {"policy.lora.rank": 4}),
                      ("lora_nocopy", {"policy.lora.rank": 4, "reinforce.rollout_copy": "false"})):
    t = reinforce_trainer(rl_config(tmp_path, **{"reinforce.steps": 3, **extra}), str(tmp_path / name),
                          scorer=letter_reward)
    if name == "lora":
      assert all("_lora_" in p for p in _paths(t.state.params))
      assert t.source.phases.layout is not None  # sampling from the merged copy
    t.run()
    runs[name] = read_metrics(str(tmp_path / name / "metrics.jsonl"))
  keys = ("reward", "kl", "loss", "response_length")
  for key in keys:  # step 1: the LoRA policy is its base, sampled with the same key
    assert runs["lora"][0][key] == pytest.approx(runs["full"][0][key], rel=1e-6, abs=1e-9), key
  assert runs["lora"][0]["kl"] == 0.0 and runs["lora"][-1]["kl"] > 0.0  # the reference: the initial adapters
  assert runs["lora"][1]["kl"] != runs["full"][1]["kl"]
  for a, b in zip(runs["lora"], runs["lora_nocopy"]):  # the merged decode copy = the adapters unmerged
    for key in keys:
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
