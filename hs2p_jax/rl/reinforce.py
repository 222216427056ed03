"""REINFORCE's learner (NeMo-Aligner's): the policy-gradient loss and update step, pure functions.

The loss is -mean over all response tokens of logp_t * (R_i - b_i) (the advantages of `rl.rloo`:
the reward-model score less beta times the KL to the reference, less the leave-one-out baseline),
with no ratio or clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import lora, model_from
from hs2p_jax.model.logprobs import _logprobs
from hs2p_jax.rl.kl import masked_mean
from hs2p_jax.train.accumulate import apply_mean_grads, interleave, summed_grads
from hs2p_jax.train.state import with_base


def reinforce_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """-masked mean over all response tokens of logp * advantage. logp, mask [N, T]; advantages [N]."""
  return -masked_mean(logp * advantages[:, None], mask)


def make_policy_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, share_prompt_k: int | None = None,
                     temperature: float = 1.0, micro_batches: int = 1):
  """A pure `step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)` (`frozen`: a LoRA run's base) on a rollout minibatch
  (`prompt_ids`, `prompt_mask`, `tokens`, `response_mask`, `advantages`); with `share_prompt_k`,
  rows come in groups of k sharing a prompt, computed once (`shared_prompt_logprobs`). Log-probs
  under softmax(logits / temperature) (`objective_temperature`). With `micro_batches` m, the rows
  go through the model m slices at a time and the gradient of the summed loss is accumulated, so
  the step equals the one-pass step (the loss is one masked mean over all the minibatch's tokens)."""

  def sum_loss(params, frozen, key, batch):  # (sum over response tokens of -logp * advantage, token count)
    lm = lora.training(model_from(graphdef, with_base(params, frozen)), key, batch)
    logp = _logprobs(lm, batch, share_prompt_k, temperature)
    m = batch["response_mask"].astype(jnp.float32)
    total = -jnp.sum(logp * batch["advantages"][:, None] * m)
    return total, {"loss": total, "tokens": jnp.sum(m)}

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(params, opt_state, frozen, batch):
    # frozen: a LoRA run's base, else {} (the KL term is in the advantages, computed before the update)
    key = lora.dropout_key(opt_state)
    if micro_batches == 1:
      (_, sums), grads = grad_fn(params, frozen, key, batch)
    else:
      stacked = jax.tree.map(lambda a: interleave(a, micro_batches, share_prompt_k or 1), batch)
      grads, sums = summed_grads(grad_fn, params, stacked, frozen, key)
    params, opt_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, sums["tokens"])
    return params, opt_state, {"loss": sums["loss"] / jnp.maximum(sums["tokens"], 1.0), "grad_norm": grad_norm}

  return step


