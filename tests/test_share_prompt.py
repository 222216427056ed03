"""Pairs sharing their prompt in one packed segment: the layout, and rewards, gradients and training
losses equal to those of separately packed chosen and rejected sequences."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.config import DataConfig
from hs2p_jax.data.batching import common_prefix, pack_units, shared_pair
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.model import create
from hs2p_jax.model.config import preset
from hs2p_jax.model.scoring import reward_outputs
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.rm import Objective, loss_terms
from hs2p_jax.train.rm_trainer import trainer as rm_trainer

A = lambda *x: np.array(x, np.int32)


def test_shared_pair_layout():
  (u,) = shared_pair(A(1, 2, 3, 4, 5), A(1, 2, 3, 9), capacity=16)
  np.testing.assert_array_equal(u.ids, [1, 2, 3, 4, 5, 9])
  np.testing.assert_array_equal(u.positions, [0, 1, 2, 3, 4, 3])
  np.testing.assert_array_equal(u.branch, [0, 0, 0, 1, 1, 2])
  assert u.scores == (4, 5)
  # one side a prefix of the other (or both equal): each keeps its last token on its own branch
  (u,) = shared_pair(A(1, 2), A(1, 2, 3), capacity=16)
  np.testing.assert_array_equal(u.ids, [1, 2, 2, 3])
  np.testing.assert_array_equal(u.positions, [0, 1, 1, 2])
  np.testing.assert_array_equal(u.branch, [0, 1, 2, 2])
  assert u.scores == (1, 3) and common_prefix(A(7, 7), A(7, 7)) == 1 and common_prefix(A(7), A(7, 8)) == 0
  # too long to share a row: two ordinary sequences
  c, r = shared_pair(A(1, 2, 3, 4), A(1, 2, 5, 6), capacity=5)
  np.testing.assert_array_equal(c.ids, [1, 2, 3, 4]) and np.testing.assert_array_equal(r.positions, [0, 1, 2, 3])
  assert c.scores == (3,) and not r.branch.any()


def test_pack_units_places_scores_at_the_unit_tokens():
  units = shared_pair(A(1, 2, 3), A(1, 2, 4, 4), 8) + shared_pair(A(5, 6), A(7, 8, 9), 8)
  rows, score_row, score_index = pack_units(units, capacity=8, num_rows=2, pad_id=0)
  ids = rows["input_ids"]
  assert [ids[r, i] for r, i in zip(score_row, score_index)] == [3, 4, 6, 9]
  assert (rows["segment_ids"] != 0).sum() == (3 + 2 + 2 + 3)  # pair 2 shares nothing but the row


def _pair_loaders(path, **kw):
  tok = load_tokenizer("bytes")
  common = dict(train=path, format="pairs", max_length=256, packing=True)
  return [make_loader(DataConfig(**common, share_prompt=share), tok, split="train", task="pairs", batch_size=10,
                      shuffle=False, repeat=False, **kw) for share in (False, True)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = lambda n: " ".join(f"w{int(x)}" for x in rng.integers(0, 100, n))
  rows = [{"prompt": f"q{i} " + words(int(rng.integers(3, 20))), "chosen": words(int(rng.integers(1, 12))),
           "rejected": words(int(rng.integers(1, 12))), "magnitude": float(1 + i % 3)} for i in range(10)]
  return write_jsonl(tmp_path_factory.mktemp("share") / "pairs.jsonl", rows)


@pytest.mark.parametrize("attention", ["reference", "xla", "splash"])  # splash: interpreted, once per branch
def test_shared_batches_give_the_rewards_and_gradients_of_separate_sequences(pairs_file, attention):
  cfg = preset("tiny", num_layers=2, attention=attention)
  graphdef, params = nnx.split(create("reward", cfg, num_attributes=9, seed=1))
  objective = Objective("bt", "scaled", tuple(1.0 if i == 4 else 0.5 for i in range(9)))

  @jax.jit
  def rewards_and_grads(p, batch):
    def loss(p):
      total, count, _ = loss_terms(nnx.merge(graphdef, p), batch, objective)
      return total / count
    return reward_outputs(nnx.merge(graphdef, p), batch), jax.grad(loss)(p)

  plain, shared = _pair_loaders(pairs_file)
  (a,), (b,) = plain, shared  # one batch of all 10 pairs
  assert b["branch_ids"].max() == 2 and (b["segment_ids"] != 0).sum() < (a["segment_ids"] != 0).sum()
  (ra, ga), (rb, gb) = rewards_and_grads(params, a), rewards_and_grads(params, b)
  np.testing.assert_allclose(np.asarray(rb), np.asarray(ra), rtol=1e-4, atol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-6)


def test_training_with_a_shared_prompt_gives_the_same_losses(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  sets = {"data.train": pairs, "data.format": "pairs", "data.packing": True, "train.objective": "bt",
          "train.steps": 3, "train.batch_size": 4, "train.micro_batch_size": 2, "train.lr": 3e-3}
  runs = []
  for share in (False, True):
    cfg = config_lib.load(config_lib.RunConfig, None, tiny_overrides(tmp_path, **sets, **{"data.share_prompt": share}))
    rm_trainer(cfg, str(tmp_path / f"run{share}")).run()
    runs.append(read_metrics(str(tmp_path / f"run{share}" / "metrics.jsonl")))
  for a, b in zip(*runs):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
