"""Reward-model objectives and train/eval steps as pure functions of (params, optimizer state, batch).

Batches (see `hs2p_jax.data.pipeline`): `input_ids`, `segment_ids` [R, T] (and `positions`,
`branch_ids` [R, T] where the two sides of a pair share their prompt); `score_row`,
`score_index` say where each example's reward is read ([P, 2] for pairs: chosen, rejected; [B]
for regression); `valid` [N]; pairs add `magnitude` [P]; regression adds `labels`, `label_mask`
[B, A]. Chosen and rejected sequences of a pair go through the model in one forward pass.

Losses are accumulated as (sum, count) over micro-batches, so a step's loss and gradient equal
those of the whole global batch whatever the micro-batch split or the device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.losses import bt_losses
from hs2p_jax.model import lora, model_from
from hs2p_jax.model.reward import RewardModel
from hs2p_jax.model.scoring import reward_outputs
from hs2p_jax.train.accumulate import apply_mean_grads, summed_grads
from hs2p_jax.train.state import with_base

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a step optimises: "regression" over label_mask, or "bt" (variant) on `weights @ outputs`."""

  kind: str
  bt_variant: str = "scaled"
  weights: tuple[float, ...] = (0, 0, 0, 0, 1, 0, 0, 0, 0)


def loss_terms(model: RewardModel, batch: Batch, objective: Objective) -> tuple[jax.Array, jax.Array, dict]:
  """(loss sum, count, extra sums) for one batch; the loss is sum / count."""
  out = reward_outputs(model, batch)
  valid = batch["valid"].astype(jnp.float32)
  if objective.kind == "regression":
    mask = batch["label_mask"].astype(jnp.float32) * valid[:, None]
    err = (out - batch["labels"].astype(jnp.float32)) ** 2
    return jnp.sum(err * mask), jnp.sum(mask), {"examples": jnp.sum(valid)}
  rewards = out @ jnp.asarray(objective.weights, jnp.float32)  # [P, 2]
  per_pair = bt_losses(rewards[:, 0], rewards[:, 1], batch["magnitude"], objective.bt_variant)
  correct = (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32) * valid
  return jnp.sum(per_pair * valid), jnp.sum(valid), {"correct": jnp.sum(correct), "examples": jnp.sum(valid)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, objective: Objective,
                    schedule: Callable[[Any], Any] | None = None):
  """A pure `step(params, opt_state, frozen, batches) -> (params, opt_state, metrics)` (`frozen`: a LoRA run's base, else {}).

  `batches` holds k micro-batches stacked on a leading axis ([k, R, T], ...); gradients of the
  summed loss are accumulated over them and divided by the total count.
  """

  def sum_loss(params, frozen, key, batch):
    model = lora.training(model_from(graphdef, with_base(params, frozen)), key, batch)
    total, count, extra = loss_terms(model, batch, objective)
    return total, {"loss": total, "count": count, "correct": extra.get("correct", jnp.zeros(())),
                   "examples": extra["examples"]}

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(params, opt_state, frozen, batches):
    # frozen: a LoRA run's base, else {}; the key: adapter dropout's
    grads, sums = summed_grads(grad_fn, params, batches, frozen, lora.dropout_key(opt_state))
    params, opt_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, sums["count"])
    metrics = {"loss": sums["loss"] / jnp.maximum(sums["count"], 1.0), "grad_norm": grad_norm,
               "examples": sums["examples"]}
    if objective.kind == "bt":
      metrics["accuracy"] = sums["correct"] / jnp.maximum(sums["examples"], 1.0)
    return params, opt_state, metrics

  return step


