"""DPO: sequence log-probs of packed / shared-prompt pair batches against per-sequence forwards in
numpy, the quickstart run's validation accuracy rising, exact resume."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.checkpoint import load_model
from hs2p_jax.data.encode import encode
from hs2p_jax.data.load import load_examples
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.model import create, preset
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.dpo import pair_logprobs
from hs2p_jax.train.metrics import read_metrics

REPO = os.path.join(os.path.dirname(__file__), "..")


def _pairs(n: int):
  # responses sharing a start ("The answer is ..."), so the shared-prompt layout's common prefix
  # runs into the responses: those tokens are targets of both sides
  return [{"prompt": f"Q{i}: what is {i} + {i}?" + " more" * (i % 3), "chosen": f"The answer is {2 * i}.",
           "rejected": "The answer is unknown" + "!" * i, "magnitude": 1 + i % 3} for i in range(n)]


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("packing,share", [(False, False), (True, False), (True, True)])
def test_pair_logprobs_equal_per_sequence_forwards(tmp_path, packing, share):
  path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(5))
  cfg = config_lib.DataConfig(train=path, format="pairs", template="chat", max_length=96, pad_multiple=16,
                              packing=packing, share_prompt=share)
  tok = load_tokenizer("bytes")
  loader = make_loader(cfg, tok, split="train", task="pairs", batch_size=5, shuffle=False, repeat=False,
                       cache_dir=str(tmp_path / "c"), targets=True)
  batch = next(iter(loader))
  if share:
    assert "branch_ids" in batch
  lm = create("lm", preset("tiny", num_layers=2), seed=4)
  got, counts = jax.jit(lambda b: pair_logprobs(lm, b))({k: np.asarray(v) for k, v in batch.items()})
  examples, _ = load_examples(path, "pairs", "train", "pairs")
  enc = encode(examples, tok, "chat", 96)
  for k, i in enumerate(batch["example_id"]):
    for side in (0, 1):
      ids, start = enc.seqs[i][side], enc.starts[i][side]
      logp = _np_log_softmax(np.asarray(lm(ids[None]))[0])
      want = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
      assert float(got[k, side]) == pytest.approx(want, rel=1e-4, abs=1e-3), (k, side)
      assert int(counts[k, side]) == len(ids) - start
  # the responses begin after the prompt: the chat template's assistant header is not a target
  assert all(0 < enc.starts[i][0] < len(enc.seqs[i][0]) for i in range(5))


def dpo_config(tmp_path, **extra):
  sets = {"dpo.steps": 40, "dpo.eval_every": 20, "dpo.save_every": 1000, "policy.num_layers": 2,
          "data.builtin_size": 64, "data.buckets": "[160]"}
  sets.update(extra)
  return config_lib.load(config_lib.DPORunConfig, os.path.join(REPO, "configs/quickstart/dpo.yaml"),
                         [f"{k}={v}" for k, v in sets.items()])


def test_dpo_quickstart_learns_the_builtin_preferences(tmp_path):
  from hs2p_jax.train.dpo_trainer import trainer as dpo_trainer
  out = str(tmp_path / "run")
  trainer = dpo_trainer(dpo_config(tmp_path), out)
  start = trainer.evaluate()  # the policy is its reference: z = 0 for every pair
  assert start["val_accuracy"] == 0.0 and start["val_margin"] == 0.0 and start["val_drift"] == 0.0
  trainer.run()
  recs = read_metrics(os.path.join(out, "metrics.jsonl"))
  vals = [r for r in recs if "val_accuracy" in r]
  assert [r["step"] for r in vals] == [20, 40]
  assert vals[-1]["val_accuracy"] > 0.6, vals  # from 0 (z = 0: every pair a tie)
  assert vals[-1]["val_loss"] < vals[0]["val_loss"] < start["val_loss"], (start, vals)
  assert recs[-1]["loss"] < recs[0]["loss"]
  assert {"accuracy", "margin", "chosen_reward", "rejected_reward", "drift", "grad_norm"} <= set(recs[-1])
  assert os.path.isfile(os.path.join(out, "model", "hs2p_model.json"))


def test_dpo_resume_is_exact(tmp_path):
  from hs2p_jax.train.dpo_trainer import trainer as dpo_trainer
  common = {"dpo.eval_every": 0, "data.validation": "null", "dpo.log_every": 1}
  dpo_trainer(dpo_config(tmp_path, **common, **{"dpo.steps": 4}), str(tmp_path / "a")).run()
  dpo_trainer(dpo_config(tmp_path, **common, **{"dpo.steps": 2, "dpo.save_every": 2}), str(tmp_path / "b")).run()
  dpo_trainer(dpo_config(tmp_path, **common, **{"dpo.steps": 4, "dpo.save_every": 2}), str(tmp_path / "b")).run()
  a, b = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("a", "b"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for key in ("loss", "accuracy", "margin", "drift", "grad_norm"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (key, ra, rb)
  pa, pb = (nnx.state(load_model(str(tmp_path / d / "model"))[0]) for d in ("a", "b"))
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
