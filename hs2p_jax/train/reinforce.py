"""REINFORCE with a leave-one-out baseline and a KL penalty to a frozen reference: pure functions.

Following NeMo-Aligner's REINFORCE: for k samples of each prompt, reward R_i = r_RM(x, y_i) -
beta * KL_i, where KL_i is the masked mean over y_i's tokens of a per-token estimator (absolute
|logp - logp_ref| by default, as the reference); the baseline b_i is the mean R of the other
samples of the same prompt that ended properly (b_i = R_i, no signal, when none did); the loss is
-mean over all response tokens of logp_t * (R_i - b_i), with no ratio or clipping.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import lora, model_from
from hs2p_jax.model.llama import LlamaForCausalLM
from hs2p_jax.train.accumulate import apply_mean_grads, summed_grads
from hs2p_jax.train.logprobs import token_logprobs
from hs2p_jax.train.state import with_base


def rloo_baseline(rewards: jax.Array, ended: jax.Array) -> jax.Array:
  """Leave-one-out baseline. rewards, ended [P, K] (K samples per prompt) -> [P, K]."""
  e = ended.astype(jnp.float32)
  r = rewards.astype(jnp.float32)
  others_sum = jnp.sum(r * e, axis=1, keepdims=True) - r * e
  others_n = jnp.sum(e, axis=1, keepdims=True) - e
  return jnp.where(others_n > 0, others_sum / jnp.maximum(others_n, 1.0), r)


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: str = "absolute") -> jax.Array:
  """Per-token KL estimates of policy vs reference from the sampled tokens' log-probs. [N, T] -> [N, T]."""
  d = logp - ref_logp
  if estimator == "absolute":
    return jnp.abs(d)
  if estimator == "k1":
    return d
  if estimator == "k3":  # (r - 1) - log r with r = p_ref / p: non-negative, unbiased
    return jnp.expm1(-d) + d
  raise ValueError(f"kl estimator {estimator!r}: expected absolute, k1 or k3")


def masked_mean(x: jax.Array, mask: jax.Array, axis: Any = None) -> jax.Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def response_logprobs(lm: LlamaForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                      response_mask: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Log-probs of each response token given what precedes it. prompt_* [N, Tp] (left-padded),
  tokens / response_mask [N, Tr] -> [N, Tr] float32 (the LM head runs on response positions only,
  in chunks: `token_logprobs`)."""
  ids = jnp.concatenate([prompt_ids, tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  hidden = lm.model(ids, mask)  # [N, Tp + Tr, D]
  tp, tr = prompt_ids.shape[1], tokens.shape[1]
  return token_logprobs(lm, hidden[:, tp - 1:tp - 1 + tr], tokens, temperature=temperature)  # t predicts t + 1


def shared_prompt_logprobs(lm: LlamaForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                           response_mask: jax.Array, k: int, temperature: float = 1.0) -> jax.Array:
  """`response_logprobs` for N = P * k rows ordered prompt-major (rows i * k .. i * k + k - 1 share
  prompt i), computing each prompt once: one row [prompt | sample 1 | ... | sample k] per prompt,
  sample j on branch j + 1 (it sees the prompt and itself, `attention.branch_mask`), its positions
  continuing the prompt's. Same shapes in and out as `response_logprobs`; prompts left-aligned."""
  n, tp = prompt_ids.shape
  tr = tokens.shape[1]
  p = n // k
  seg = jnp.concatenate([prompt_mask[::k], response_mask.reshape(p, k * tr)], axis=1).astype(jnp.int32)
  ids = jnp.concatenate([prompt_ids[::k], tokens.reshape(p, k * tr)], axis=1)  # [P, Tp + k * Tr]
  prompt_len = jnp.sum(prompt_mask[::k] != 0, axis=1, dtype=jnp.int32)[:, None]  # [P, 1]
  t = jnp.arange(tr, dtype=jnp.int32)
  positions = jnp.concatenate([jnp.maximum(jnp.cumsum(seg[:, :tp], axis=1) - 1, 0),
                               jnp.tile(prompt_len + t[None], (1, k))], axis=1)
  branch = jnp.concatenate([jnp.zeros((tp,), jnp.int32), jnp.repeat(jnp.arange(1, k + 1, dtype=jnp.int32), tr)])
  hidden = lm.model(ids, segment_ids=seg, positions=positions, branch_ids=jnp.broadcast_to(branch, ids.shape),
                    branches=k)
  # sample j's token t is predicted at its token t - 1, or for t = 0 at the prompt's last slot
  pred = jnp.where(t[None] == 0, tp - 1, tp + jnp.arange(k, dtype=jnp.int32)[:, None] * tr + t[None] - 1)
  out = token_logprobs(lm, hidden[:, pred.reshape(-1)], tokens.reshape(p, k * tr), temperature=temperature)
  return out.reshape(n, tr)


def _logprobs(lm: LlamaForCausalLM, batch: dict, share_prompt_k: int | None, temperature: float) -> jax.Array:
  args = (lm, batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"])
  if share_prompt_k:
    return shared_prompt_logprobs(*args, share_prompt_k, temperature=temperature)
  return response_logprobs(*args, temperature=temperature)


def objective_temperature(sampling_temperature: float) -> float:
  """The temperature of the distribution the loss and KL read log-probs under: the sampler's
  (greedy decoding reports, and is scored under, the model's own distribution: 1).

  Top-k and top-p are not applied to them: under the reference model's own truncation, or after a
  first minibatch update, a sampled token can fall outside the kept set, giving a -inf log-prob and
  an infinite KL. With top_k=0 and top_p=1 (the paper configs) the objective's distribution is
  exactly the sampler's."""
  return sampling_temperature if sampling_temperature > 0 else 1.0


def reinforce_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """-masked mean over all response tokens of logp * advantage. logp, mask [N, T]; advantages [N]."""
  return -masked_mean(logp * advantages[:, None], mask)


def advantages(rm_scores: jax.Array, kl: jax.Array, ended: jax.Array, beta: float, k: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(rewards R, baselines b, advantages R - b), each [N], for N = P * k rows ordered prompt-major."""
  rewards = rm_scores - beta * kl
  base = rloo_baseline(rewards.reshape(-1, k), ended.reshape(-1, k)).reshape(-1)
  return rewards, base, rewards - base


def interleave(a: jax.Array, m: int, group: int = 1) -> jax.Array:
  """[N, ...] rows -> [m, N / m, ...] micro-batches taking every m-th group of `group` rows, so that
  each device's shard of the rows (a contiguous block) holds its part of every micro-batch."""
  n = a.shape[0]
  x = a.reshape(n // (group * m), m, group, *a.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(m, n // m, *a.shape[1:])


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


def make_logprob_fn(graphdef: nnx.GraphDef, share_prompt_k: int | None = None, temperature: float = 1.0):
  """A pure `logprobs(params, batch) -> [N, Tr]` under the model `params` describe (as
  `model.model_from` takes them), at `temperature`."""

  def fn(params, batch):
    return _logprobs(model_from(graphdef, params), batch, share_prompt_k, temperature)

  return fn
