"""A reward model's head outputs on a batch of packed or padded rows, at each example's score position."""

from __future__ import annotations

import jax
from flax import nnx

from hs2p_jax.model import model_from
from hs2p_jax.model.reward import RewardModel

Batch = dict[str, jax.Array]


def reward_outputs(model: RewardModel, batch: Batch) -> jax.Array:
  """Head outputs at each example's score position: [P, 2, A] (pairs) or [B, A] (regression)."""
  hidden = model.model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch.get("positions"),
                       branch_ids=batch.get("branch_ids"), lengths=batch.get("row_lengths"))  # [R, T, D]
  picked = hidden[batch["score_row"], batch["score_index"]]  # [..., D]
  return model.head(picked)


def make_eval_step(graphdef: nnx.GraphDef):
  """A pure `eval(params, batch) -> outputs` ([P, 2, A] or [B, A] float32); params as
  `model.model_from` takes them."""

  def evaluate(params, batch):
    return reward_outputs(model_from(graphdef, params), batch)

  return evaluate
