"""Supervised fine-tuning: masked cross-entropy on the response tokens; the pure train and eval steps.

Batches are SFT batches (`data.pipeline.make_loader(..., task="sft")`): `input_ids`, `segment_ids`
[R, T] (packed or not), `target_pred` [R, T] (the row position predicting each response token,
-1 elsewhere), `chosen_pair` [R, T] (the example each response token belongs to), `valid` [N]. The
loss is the mean negative log-likelihood over all response tokens of the valid examples (the end
marker included), accumulated as (sum, count) over micro-batches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import lora, model_from
from hs2p_jax.model.logprobs import per_owner, target_logprobs
from hs2p_jax.train.accumulate import apply_mean_grads, summed_grads
from hs2p_jax.train.state import with_base

Batch = dict[str, jax.Array]


def example_logprobs(lm, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(response log-prob sums, response token counts) per example, each [N] float32."""
  return per_owner(target_logprobs(lm, batch), batch["chosen_pair"], batch["valid"].shape[0])


def make_sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """A pure `step(params, opt_state, frozen, batches) -> (params, opt_state, metrics)` (`frozen`: a LoRA run's base) over k stacked
  micro-batches: the token-mean NLL of the valid examples' responses, gradients accumulated."""

  def sum_loss(params, frozen, key, batch):
    sums, counts = example_logprobs(lora.training(model_from(graphdef, with_base(params, frozen)), key, batch), batch)
    valid = batch["valid"].astype(jnp.float32)
    loss = -jnp.sum(sums * valid)
    return loss, {"loss": loss, "tokens": jnp.sum(counts * valid)}

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(params, opt_state, frozen, batches):
    # frozen: a LoRA run's base, else {}; the key: adapter dropout's
    grads, sums = summed_grads(grad_fn, params, batches, frozen, lora.dropout_key(opt_state))
    params, opt_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, sums["tokens"])
    return params, opt_state, {"loss": sums["loss"] / jnp.maximum(sums["tokens"], 1.0), "grad_norm": grad_norm,
                               "target_tokens": sums["tokens"]}

  return step


def make_sft_eval(graphdef: nnx.GraphDef) -> Callable:
  """A pure `eval(params, batch) -> [N, 2]`: each example's response log-prob sum and token count;
  params as `model.model_from` takes them."""

  def evaluate(params, batch):
    sums, counts = example_logprobs(model_from(graphdef, params), batch)
    return jnp.stack([sums, counts], axis=1)

  return evaluate


def eval_metrics(out: Any) -> dict[str, float]:
  """Token-mean NLL (`loss`) and its perplexity over eval outputs [N, 2] (`make_sft_eval`)."""
  out = jnp.asarray(out, jnp.float32)
  loss = -jnp.sum(out[:, 0]) / jnp.maximum(jnp.sum(out[:, 1]), 1.0)
  return {"loss": float(loss), "perplexity": float(jnp.exp(loss))}
