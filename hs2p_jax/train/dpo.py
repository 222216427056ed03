"""DPO (regular, margin, scaled): sequence log-probs of both responses of a pair under the policy
and a frozen reference, and the pure train and eval steps.

Batches are pair batches with log-prob targets (`data.pipeline.make_loader(..., targets=True)`):
`input_ids`, `segment_ids` [R, T] (and `positions`, `branch_ids` where the two sides share their
prompt in one packed segment), `target_pred` [R, T] (the row position whose logits predict each
response token; -1 elsewhere), `chosen_pair` / `rejected_pair` [R, T] (the pair each response token
belongs to, -1 elsewhere), `magnitude`, `valid` [P]. Chosen and rejected go through the model in one
forward; a sequence's log-prob is the sum over its response tokens (the end marker included).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.losses import dpo_losses, dpo_rewards
from hs2p_jax.model import lora, model_from
from hs2p_jax.model.llama import LlamaForCausalLM
from hs2p_jax.model.logprobs import per_owner, target_logprobs
from hs2p_jax.train.accumulate import apply_mean_grads, summed_grads
from hs2p_jax.train.state import with_base

Batch = dict[str, jax.Array]


def pair_logprobs(lm: LlamaForCausalLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(sequence log-probs, response token counts), each [P, 2] (chosen, rejected) float32."""
  lp = target_logprobs(lm, batch)  # [R, T]
  p = batch["magnitude"].shape[0]
  (c, nc), (r, nr) = per_owner(lp, batch["chosen_pair"], p), per_owner(lp, batch["rejected_pair"], p)
  return jnp.stack([c, r], axis=1), jnp.stack([nc, nr], axis=1)


def _sums(logp: jax.Array, ref: jax.Array, counts: jax.Array, batch: Batch, variant: str, beta: float) -> dict:
  """Per-batch sums of the step's metrics (divided by their counts after all micro-batches)."""
  valid = batch["valid"].astype(jnp.float32)
  losses = dpo_losses(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], batch["magnitude"], variant, beta)
  z = dpo_rewards(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta)
  tokens = jnp.sum(counts, axis=1) * valid
  return {"loss": jnp.sum(losses * valid), "pairs": jnp.sum(valid), "correct": jnp.sum((z > 0) * valid),
          "margin": jnp.sum(z * valid), "chosen_reward": jnp.sum(beta * (logp[:, 0] - ref[:, 0]) * valid),
          "rejected_reward": jnp.sum(beta * (logp[:, 1] - ref[:, 1]) * valid),
          "drift": jnp.sum(jnp.sum(logp - ref, axis=1) * valid), "tokens": jnp.sum(tokens)}


def make_dpo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, variant: str, beta: float):
  """A pure `step(params, opt_state, frozen, batches) -> (params, opt_state, metrics)`: the mean
  DPO loss over the valid pairs of k stacked micro-batches ([k, R, T], ...), gradients accumulated;
  the reference (`frozen["reference"]`)'s log-probs are computed in the same step (forward only).
  A LoRA run's `frozen` also holds the base, under the policy's adapters and the reference's."""

  def sum_loss(params, frozen, key, batch):
    logp, counts = pair_logprobs(lora.training(model_from(graphdef, with_base(params, frozen)), key, batch), batch)
    ref, _ = pair_logprobs(model_from(graphdef, with_base(frozen["reference"], frozen)), batch)
    sums = _sums(logp, jax.lax.stop_gradient(ref), counts, batch, variant, beta)
    return sums["loss"], sums

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(params, opt_state, frozen, batches):
    grads, sums = summed_grads(grad_fn, params, batches, frozen, lora.dropout_key(opt_state))
    params, opt_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, sums["pairs"])
    return params, opt_state, {"grad_norm": grad_norm, **metrics_of(sums)}

  return step


def metrics_of(sums: dict[str, Any]) -> dict[str, Any]:
  """Means from summed metrics: loss, accuracy (z > 0), margin (mean z), chosen / rejected
  implicit rewards, drift (mean logp_pi - logp_ref per response token)."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  return {"loss": sums["loss"] / pairs, "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
          "chosen_reward": sums["chosen_reward"] / pairs, "rejected_reward": sums["rejected_reward"] / pairs,
          "drift": sums["drift"] / jnp.maximum(sums["tokens"], 1.0), "pairs": sums["pairs"]}


def make_dpo_eval(graphdef: nnx.GraphDef) -> Callable:
  """A pure `eval(params, ref_params, batch) -> [P, 6]`: policy log-probs (chosen, rejected),
  reference log-probs (chosen, rejected), response token counts (chosen, rejected); params as
  `model.model_from` takes them."""

  def evaluate(params, ref_params, batch):
    logp, counts = pair_logprobs(model_from(graphdef, params), batch)
    ref, _ = pair_logprobs(model_from(graphdef, ref_params), batch)
    return jnp.concatenate([logp, ref, counts], axis=1)

  return evaluate


def eval_metrics(out: Any, magnitude: Any, variant: str, beta: float) -> dict[str, float]:
  """`metrics_of` over the valid pairs' eval outputs [N, 6] (`make_dpo_eval`) and magnitudes [N]."""
  out = jnp.asarray(out, jnp.float32)
  batch = {"valid": jnp.ones(out.shape[0]), "magnitude": jnp.asarray(magnitude, jnp.float32)}
  m = metrics_of(_sums(out[:, 0:2], out[:, 2:4], out[:, 4:6], batch, variant, beta))
  return {k: float(v) for k, v in m.items()}
