"""Reward-model training: learning known signals, accumulation, init from regression, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import requires_smollm2, separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.checkpoint import load_model
from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.rm_trainer import trainer as rm_trainer


def run_config(tmp_path, **overrides):
  return config_lib.load(config_lib.RunConfig, None, tiny_overrides(tmp_path, **overrides))


@pytest.mark.parametrize("variant", ["regular", "margin", "scaled"])
def test_bt_learns_a_separable_preference(tmp_path, variant):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  cfg = run_config(tmp_path, **{"data.train": pairs, "data.validation": pairs, "data.format": "pairs",
                                "train.objective": "bt", "train.bt_variant": variant, "train.steps": 40,
                                "train.batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 5})
  trainer = rm_trainer(cfg, str(tmp_path / "run"))
  before = trainer.evaluate()
  last = trainer.run()
  assert last["val_accuracy"] == 1.0, (variant, before, last)
  recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in recs] == list(range(1, 41))
  assert np.mean([r["loss"] for r in recs[-5:]]) < np.mean([r["loss"] for r in recs[:5]])


def test_regression_predictions_approach_targets(tmp_path):
  rows = []
  for i in range(8):
    h = i % 5
    rows.append({"prompt": f"Rate {i}", "response": "x" * (h + 1), "helpfulness": h, "correctness": 2,
                 "coherence": 3, "complexity": 1, "verbosity": 4 - h})
  data = write_jsonl(tmp_path / "ratings.jsonl", rows)
  cfg = run_config(tmp_path, **{"data.train": data, "data.validation": data, "data.format": "helpsteer2",
                                "data.attributes": "all", "train.objective": "regression", "train.steps": 60,
                                "train.batch_size": 8, "train.lr": 3e-3})
  trainer = rm_trainer(cfg, str(tmp_path / "run"))
  start = trainer.evaluate()["val_loss"]
  last = trainer.run()
  assert last["val_loss"] < 0.05 < start
  model, _ = load_model(str(tmp_path / "run" / "model"))
  ids = np.asarray([trainer.tokenizer.encode(
      trainer.tokenizer.apply_chat_template([{"role": "user", "content": "Rate 3"}, {"role": "assistant",
                                              "content": "xxxx"}], tokenize=False), add_special_tokens=False)])
  pred = np.asarray(model(ids))[0]
  np.testing.assert_allclose(pred[4:], [3, 2, 3, 1, 1], atol=0.5)  # helpfulness..verbosity of example 3


def test_micro_batches_give_the_full_batch_step(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  common = {"data.train": pairs, "data.format": "pairs", "train.objective": "bt", "train.steps": 1,
            "train.batch_size": 4, "train.lr": 1e-2}
  full = rm_trainer(run_config(tmp_path, **common), str(tmp_path / "a"))
  micro = rm_trainer(run_config(tmp_path, **common, **{"train.micro_batch_size": 2}), str(tmp_path / "b"))
  la, lb = full.run(), micro.run()
  assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_bt_initialised_from_regression_keeps_its_head(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(4))
  reg = rm_trainer(run_config(tmp_path, **{"data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                          "train.steps": 2}), str(tmp_path / "reg"))
  reg.run()
  bt = rm_trainer(run_config(tmp_path, **{"data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                         "train.steps": 1, "model.init_from": str(tmp_path / "reg" / "model")}),
                 str(tmp_path / "bt"))
  bt.start(None, {})
  for a, b in zip(jax.tree.leaves(reg.params), jax.tree.leaves(bt.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cmd(out, config, extra=()):
  return [sys.executable, "-m", "hs2p_jax", "train-rm", "--config", config, "--out", out, "--set", *extra]


def test_killed_run_resumes_with_identical_losses(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(12))
  config = str(tmp_path / "cfg.yaml")
  with open(config, "w") as f:
    f.write("name: resume\n")
  sets = tiny_overrides(tmp_path, **{"data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": 8, "train.batch_size": 4, "train.micro_batch_size": 2,
                                     "train.save_every": 3, "train.lr": 3e-3})
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  straight = str(tmp_path / "straight")
  subprocess.run(_cmd(straight, config, sets), check=True, env=env, capture_output=True)
  crashed = str(tmp_path / "crashed")
  proc = subprocess.Popen(_cmd(crashed, config, sets), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = os.path.join(crashed, "checkpoints", "3", "commit_success.txt")
  deadline = time.time() + 300
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(marker), "the run never reached its step-3 checkpoint"
  assert not os.path.isdir(os.path.join(crashed, "model")), "killed too late: the run had finished"
  subprocess.run(_cmd(crashed, config, sets), check=True, env=env, capture_output=True)
  a = read_metrics(os.path.join(straight, "metrics.jsonl"))
  b = read_metrics(os.path.join(crashed, "metrics.jsonl"))
  assert [r["step"] for r in b] == list(range(1, 9))
  for ra, rb in zip(a, b):
    assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
  assert a[-1].get("val_accuracy") == b[-1].get("val_accuracy")


@pytest.mark.slow
@requires_smollm2
def test_smollm2_regression_and_scaled_bt_steps_reduce_loss_on_a_fixed_batch():
  from hs2p_jax.convert import load_gguf
  from hs2p_jax.train.optim import make_optimizer
  from hs2p_jax.train.rm import Objective, make_train_step
  rm = load_gguf("smollm2", head="reward", num_attributes=9)
  graphdef, params0 = nnx.split(rm)
  rng = np.random.RandomState(0)
  t, rows = 24, 4
  ids = rng.randint(100, 40000, (1, rows, t)).astype(np.int32)
  seg = np.ones((1, rows, t), np.int32)
  weights = tuple(1.0 if i == 4 else 0.0 for i in range(9))
  batches = {
      "regression": {"input_ids": ids, "segment_ids": seg, "score_row": np.arange(rows, dtype=np.int32)[None],
                     "score_index": np.full((1, rows), t - 1, np.int32), "valid": np.ones((1, rows), bool),
                     "labels": np.tile(np.arange(9, dtype=np.float32) % 5, (1, rows, 1)),
                     "label_mask": np.tile(np.eye(9, dtype=bool)[4], (1, rows, 1))},
      "bt": {"input_ids": ids, "segment_ids": seg, "score_row": np.arange(rows, dtype=np.int32).reshape(1, 2, 2),
             "score_index": np.full((1, 2, 2), t - 1, np.int32), "valid": np.ones((1, 2), bool),
             "magnitude": np.array([[1.0, 3.0]], np.float32)},
  }
  for kind, batch in batches.items():
    tx = make_optimizer(1e-5, warmup_steps=0)
    step = jax.jit(make_train_step(graphdef, tx, Objective(kind, "scaled", weights)))
    params = jax.tree.map(lambda a: a, params0)
    opt = tx.init(params)
    losses = []
    for _ in range(3):
      params, opt, m = step(params, opt, {}, batch)
      losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], (kind, losses)
