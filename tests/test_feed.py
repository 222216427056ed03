"""Feeding the step: each process's share of a batch placed where its devices hold it, batch shapes
fixed up front (the step compiled for all of them before step 1), padding that is a config error."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import lowerings, tiny_overrides, write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.errors import UserError


def test_each_share_of_a_batch_points_at_its_own_rows_where_its_blocks_interleave():
  """Pointers of a process's share are mapped to where its rows land in the global batch, also when its
  devices' blocks are not next to each other (a TPU pod's mesh): pure index arithmetic, checked by
  assembling the global host batch as `jax.make_array_from_process_local_data` does (sorted order)."""
  from hs2p_jax.feed import FeedLayout, pad_examples
  split = 4
  shares = [FeedLayout(0, 2, split, (0, 2)), FeedLayout(1, 2, split, (1, 3))]
  local_rows = 4  # and one pair per process, padded to 2 entries (split / slots)
  global_ids = np.zeros((2 * local_rows, 3), np.int32)
  global_rows = np.zeros((2 * 2, 2), np.int64)
  for p, layout in enumerate(shares):
    ids = np.full((local_rows, 3), 100 * (p + 1), np.int32) + np.arange(local_rows)[:, None]
    batch = pad_examples({"input_ids": ids, "score_row": np.array([[0, 1]], np.int32),
                          "valid": np.array([True])}, layout.multiple)
    assert batch["valid"].tolist() == [True, False] and batch["score_row"].tolist() == [[0, 1], [0, 0]]
    rows = layout.positions(2 * local_rows)
    global_ids[rows] = ids
    global_rows[layout.positions(2 * len(batch["valid"]))] = rows[batch["score_row"]]
  assert shares[0].positions(8).tolist() == [0, 1, 4, 5] and shares[1].positions(8).tolist() == [2, 3, 6, 7]
  for p, pair in ((0, 0), (1, 1)):  # each real pair reads its own process's chosen and rejected rows
    assert global_ids[global_rows[pair], 0].tolist() == [100 * (p + 1), 100 * (p + 1) + 1]



def _pairs_of_many_lengths(n: int) -> list[dict]:
  rng = np.random.default_rng(0)
  return [{"prompt": "Q" + "x" * int(rng.integers(1, 150)) + "?", "chosen": f"A {i} good", "rejected": f"A {i} bad"}
          for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_the_step_compiles_once_per_bucket_before_step_1(tmp_path, packing):
  """Rows of many lengths: every compilation of the train step happens before step 1, one per shape
  `data.buckets` allows (pow2: a handful), however many lengths the data has."""
  from hs2p_jax.train import rm_trainer
  with lowerings() as events:
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs_of_many_lengths(48))
    sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                       "train.steps": 8, "train.batch_size": 4, "data.max_length": 256,
                                       "data.pad_multiple": 16, "data.packing": packing, "train.log_every": 4,
                                       "data.buckets": "pow2"})
    cfg = config_lib.load(config_lib.RunConfig, None, sets)
    t = rm_trainer.trainer(cfg, str(tmp_path / "run"))
    shapes = t.source.data.shapes()
    t.run()
  steps = [after for name, after in events if name == "jit(step)"]  # lowerings of the train step
  assert len(steps) == len(shapes) and not any(steps), (shapes, steps)
  assert len(shapes) == (3 if packing else 5)  # rows 2, 4, 8 (4 pairs: 8 units at most); T 16, 32, ..., 256


def test_over_a_quarter_of_padding_rows_is_a_config_error(tmp_path):
  from hs2p_jax.sharding import DEFAULT_RULES, MESH_AXES
  from hs2p_jax.feed import micro_batch_rows
  mesh = jax.sharding.AbstractMesh((1, 8, 1), MESH_AXES)
  assert micro_batch_rows("train.micro_batch_size", 4, 2, mesh, DEFAULT_RULES, False) == \
      {"micro_batch_rows": 8, "batch_split": 8}
  with pytest.raises(UserError, match=r"train.micro_batch_size=1: 2 rows .* padded to 8 .* multiple of 4"):
    micro_batch_rows("train.micro_batch_size", 1, 2, mesh, DEFAULT_RULES, False)
  assert micro_batch_rows("train.micro_batch_size", 3, 2, mesh, DEFAULT_RULES, False)["padded_rows"] == 8  # 25 %
  assert micro_batch_rows("train.micro_batch_size", 1, 2, mesh, DEFAULT_RULES, True)["padded_rows"] == 8


def test_every_per_row_array_of_an_rl_update_is_split_like_its_rows():
  """PPO's advantages (and actor mask, reference log-probs) lie where their rows' tokens do, not on
  every device whole."""
  from jax.sharding import AbstractMesh

  from hs2p_jax.feed import batch_sharding
  from hs2p_jax.sharding import DEFAULT_RULES
  mesh = AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))  # a layout only: no devices needed
  tokens = batch_sharding("tokens", (8, 16), mesh, DEFAULT_RULES)
  assert tokens.spec[0] is not None  # rows over the batch axes
  for key in ("old_logp", "advantages", "returns", "actor_mask", "ref_logp"):
    assert batch_sharding(key, (8, 16), mesh, DEFAULT_RULES).spec == tokens.spec, key
  assert batch_sharding("advantages", (8,), mesh, DEFAULT_RULES).spec[0] == tokens.spec[0]  # REINFORCE's, per row
