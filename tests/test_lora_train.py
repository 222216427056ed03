"""`hs2p train-rm` with `model.lora`: only the adapters and the head train (optimizer state for them
alone), the base stays as it was, the run resumes exactly, and the model it writes scores as trained."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from flax import nnx

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.train.metrics import read_metrics


def _cfg(tmp_path, **extra):
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(16))
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.validation": data, "data.format": "pairs",
                                     "train.objective": "bt", "train.steps": 6, "train.batch_size": 4,
                                     "train.lr": 3e-3, "train.eval_every": 6, "model.lora.rank": 4,
                                     "model.lora.targets": "[q_proj,v_proj,down_proj]", **extra})
  return config_lib.load(config_lib.RunConfig, None, sets)


def _flat(state) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_lora_train_rm_trains_the_adapters_and_the_head_over_an_unchanged_base(tmp_path):
  from hs2p_jax.checkpoint import load_model
  from hs2p_jax.train import rm_trainer
  from hs2p_jax.train.model_init import load_source
  cfg = _cfg(tmp_path)
  t = rm_trainer.trainer(cfg, str(tmp_path / "run"))
  trainable = set(_flat(t.state.params))
  assert trainable == {"head_kernel", "head_bias", *(f"model/layers/{m}/{w}_lora_{s}" for m, w in
                                                      (("attn", "wq"), ("attn", "wv"), ("mlp", "down")) for s in "ab")}
  res = t.state.resident_bytes()
  assert res["optimizer"] <= 2 * res["params"] + 64  # AdamW moments of the adapters and the head only
  assert res["base"] > 10 * res["params"]
  t.run()
  recs = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
  assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["val_accuracy"] > 0.5

  model, meta = load_model(str(tmp_path / "run" / "model"))
  assert meta.config.lora_rank == 4
  trained = _flat(nnx.state(model, nnx.Param))
  plain = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, rank=0))
  from hs2p_jax.sharding import make_mesh, rules_from
  mesh = make_mesh(cfg.mesh)  # the run's initial weights: the same seed, initialised on the same mesh
  base = _flat(nnx.state(load_source(plain, mesh, rules_from(cfg.mesh.rules)), nnx.Param))
  for name, value in base.items():
    if name == "head_bias":
      continue  # a BT loss does not move it (it cancels between chosen and rejected)
    if name == "head_kernel":
      assert not np.array_equal(trained[name], value), name  # the head trained in full
    else:
      np.testing.assert_array_equal(trained[name], value, err_msg=name)  # the base did not move
  assert np.abs(trained["model/layers/attn/wq_lora_b"]).max() > 0  # B left zero
  # the written model scores as the run's evaluation did: above chance on the separable pairs
  ids = np.asarray([[3 + (b % 200) for b in "Answer 1 good".encode()]], np.int32)
  assert np.isfinite(np.asarray(model(ids))).all()


def test_lora_train_rm_resumes_exactly_with_adapter_dropout(tmp_path):
  """Dropout masks come from the optimizer's step count: a resumed run draws the ones it would have."""
  from hs2p_jax.train import rm_trainer
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  sets = {"train.save_every": 2, "train.steps": 4, "train.eval_every": 0, "model.lora.dropout": 0.3}
  rm_trainer.trainer(_cfg(tmp_path, **sets), straight).run()
  rm_trainer.trainer(_cfg(tmp_path, **{**sets, "train.steps": 2}), stopped).run()
  rm_trainer.trainer(_cfg(tmp_path, **sets), stopped).run()
  a, b = read_metrics(os.path.join(straight, "metrics.jsonl")), read_metrics(os.path.join(stopped, "metrics.jsonl"))
  assert [r["step"] for r in b] == list(range(1, 5))
  for ra, rb in zip(a, b):
    assert ra["loss"] == rb["loss"], (ra["step"], ra["loss"], rb["loss"])
  assert os.path.isdir(os.path.join(stopped, "frozen", "base"))  # the base kept once, not in every checkpoint
  rm_trainer.trainer(_cfg(tmp_path, **{**sets, "model.lora.dropout": 0.0}), str(tmp_path / "plain")).run()
  plain = read_metrics(os.path.join(tmp_path, "plain", "metrics.jsonl"))
  assert plain[0]["loss"] == a[0]["loss"]  # B = 0 at step 1: dropping the adapters' input changes nothing yet
  assert plain[-1]["loss"] != a[-1]["loss"]  # then it does


def test_a_frozen_head_stays_with_the_base(tmp_path):
  from hs2p_jax.train import rm_trainer
  t = rm_trainer.trainer(_cfg(tmp_path, **{"model.lora.train_head": "false"}), str(tmp_path / "run"))
  assert all("_lora_" in p for p in _flat(t.state.params))
  assert {"head_kernel", "head_bias"} <= set(_flat(t.state.frozen["base"]))


def test_lora_settings_not_yet_supported_are_named(tmp_path):
  from hs2p_jax.errors import UserError
  from hs2p_jax.train import rm_trainer
  with pytest.raises(UserError, match=r"model.lora.dropout=1.5: expected a rate in \[0, 1\)"):
    rm_trainer.trainer(_cfg(tmp_path, **{"model.lora.dropout": 1.5}), str(tmp_path / "a"))
  with pytest.raises(UserError, match="model.lora.targets: qkv unknown"):
    rm_trainer.trainer(_cfg(tmp_path, **{"model.lora.targets": "[qkv]"}), str(tmp_path / "b"))


def test_the_lora_plan_counts_optimizer_state_for_the_adapters_only():
  import json
  import subprocess
  import sys
  repo = os.path.join(os.path.dirname(__file__), "..")
  plan = lambda *sets: json.loads(subprocess.run(  # noqa: E731
      [sys.executable, "-m", "hs2p_jax", "plan", "--config", os.path.join(repo, "configs/quickstart/regression.yaml"),
       "--devices", "1", "--chip", "h100", "--compile", "none", "--set", *sets], env={**os.environ, "JAX_PLATFORMS": "cpu"},
      check=True, capture_output=True, text=True).stdout)
  full, lora = plan("model.lora.rank=0"), plan("model.lora.rank=8")
  a, b = full["analytic"], lora["analytic"]
  assert b["frozen_base"] + b["params"] >= a["params"] > b["frozen_base"]  # the base: all but the head
  assert b["optimizer"] < a["optimizer"] / 4 and b["gradients"] < a["gradients"] / 4


def test_the_quickstart_lora_config_learns(tmp_path):
  """configs/quickstart/scaled_bt_lora.yaml (half its steps): adapters alone lift validation accuracy above chance."""
  from hs2p_jax.train import rm_trainer
  repo = os.path.join(os.path.dirname(__file__), "..")
  cfg = config_lib.load(config_lib.RunConfig, os.path.join(repo, "configs/quickstart/scaled_bt_lora.yaml"),
                        ["train.steps=40", "train.eval_every=40", "train.save_every=1000", "data.buckets=[160]"])
  assert cfg.model.lora.rank == 8
  t = rm_trainer.trainer(cfg, str(tmp_path / "run"))
  start = t.evaluate()
  t.run()
  recs = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
  assert recs[-1]["val_accuracy"] > 0.6 and recs[-1]["val_loss"] < start["val_loss"], (start, recs[-1])
