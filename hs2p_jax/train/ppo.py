"""PPO (the paper's RLHF baseline, as NeMo-Aligner runs it): pure functions of arrays.

Per response token t of row i (mask m [N, T], response tokens left-aligned):
  reward   r_t = -beta * |logp_t - logp_ref_t|, plus the reward model's score at the row's last token
  GAE      delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1}
           (after the last token V = the bootstrap value for a row cut at max_new_tokens, 0 for one
           that ended), returns R_t = A_t + V_t
  policy   -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - logp_old)
  value    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
each loss a masked mean over all response tokens of the minibatch. Advantages are whitened over
the rollout batch's response tokens. GRPO's group-normalised advantage is here too, for the same trainer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import model_from
from hs2p_jax.model.actor_critic import response_values
from hs2p_jax.train.accumulate import apply_mean_grads, summed_grads
from hs2p_jax.train.reinforce import interleave, kl_per_token, masked_mean, response_logprobs
from hs2p_jax.train.state import with_base


def token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta: float,
                  estimator: str = "absolute") -> jax.Array:
  """Per-token rewards [N, T]: the KL penalty on every response token, the score [N] added at the
  row's last response token (rows without one get nothing)."""
  m = mask.astype(jnp.float32)
  r = -beta * kl_per_token(logp, ref_logp, estimator) * m
  length = jnp.sum(mask != 0, axis=1)
  last = jax.nn.one_hot(length - 1, mask.shape[1], dtype=jnp.float32) * (length > 0)[:, None]
  return r + scores[:, None].astype(jnp.float32) * last


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float,
        next_value: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns), each [N, T] (0 off the mask), of per-token `rewards` and critic
  `values` [N, T] over response tokens `mask` [N, T] (left-aligned); `next_value` [N]: the value
  after each row's last token (a row cut short bootstraps from it; 0 or None: it ended)."""
  m = mask.astype(jnp.float32)
  r, v = rewards.astype(jnp.float32) * m, values.astype(jnp.float32) * m
  boot = jnp.zeros(r.shape[0], jnp.float32) if next_value is None else next_value.astype(jnp.float32)

  def back(carry, xs):  # from the last position to the first
    adv_next, v_next, started = carry
    r_t, v_t, m_t = xs
    # at a row's last token the next value is the bootstrap; past it, nothing
    v_after = jnp.where(started, v_next, boot)
    delta = r_t + gamma * v_after - v_t
    adv = delta + gamma * lam * jnp.where(started, adv_next, 0.0)
    adv = adv * m_t
    on = m_t > 0
    return (jnp.where(on, adv, adv_next), jnp.where(on, v_t, v_next), started | on), adv

  init = (jnp.zeros_like(boot), jnp.zeros_like(boot), jnp.zeros(boot.shape, bool))
  _, adv = jax.lax.scan(back, init, (r.T, v.T, m.T), reverse=True)
  adv = adv.T
  return adv, (adv + v) * m


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """`x` scaled to unit variance over the masked entries (and centred with `shift_mean`); 0 off the mask."""
  m = mask.astype(jnp.float32)
  mean = masked_mean(x, m)
  var = masked_mean((x - mean) ** 2, m)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return (out if shift_mean else out + mean) * m


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(clipped surrogate loss, {clip_fraction, ratio, approx_kl}) over the masked tokens [N, T]."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  stats = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
           "ratio": masked_mean(ratio, mask), "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
  return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(clipped value loss, {value_clip_fraction}) over the masked tokens [N, T]."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  a, b = (values - returns) ** 2, (clipped - returns) ** 2
  return 0.5 * masked_mean(jnp.maximum(a, b), mask), {"value_clip_fraction": masked_mean((b > a).astype(jnp.float32),
                                                                                          mask)}


def grpo_advantages(scores: jax.Array, k: int, eps: float = 1e-6) -> jax.Array:
  """GRPO's group-normalised advantage [N]: each score minus its prompt's mean over its k samples,
  over their standard deviation; rows prompt-major (N = P * k)."""
  s = scores.reshape(-1, k).astype(jnp.float32)
  return ((s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + eps)).reshape(-1)


@functools.partial(jax.jit, static_argnames=("beta", "estimator", "gamma", "lam", "advantage", "k", "whitened"))
def rollout_targets(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, kl: jax.Array, values: jax.Array,
                    mask: jax.Array, *, beta: float, estimator: str, gamma: float, lam: float, advantage: str = "gae",
                    k: int = 1, whitened: bool = True) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) [N, T] of a scored rollout batch: per-token rewards, GAE over the
  critic's `values` [N, T] (rows end where their mask does, NeMo's choice for rows cut short), or
  with `advantage="grpo"` the group-normalised score minus `beta * kl` [N] on every token (returns
  still GAE's, for the critic); whitened over the batch's response tokens with `whitened`."""
  rewards = token_rewards(scores, logp, ref_logp, mask, beta, estimator)
  adv, ret = gae(rewards, values, mask, gamma, lam)
  if advantage == "grpo":
    adv = grpo_advantages(scores - beta * kl, k)[:, None] * mask
  if whitened:
    adv = whiten(adv, mask)
  return adv, ret


def make_ppo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, weights: Any, clip: float = 0.2,
                  value_clip: float = 0.2, temperature: float = 1.0, micro_batches: int = 1):
  """A pure `step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)` of an
  `ActorCritic` on a rollout minibatch: `prompt_ids`, `prompt_mask` [N, Tp], `tokens`,
  `response_mask`, and from the rollout `old_logp`, `old_values`, `advantages`, `returns` [N, Tr].
  The actor's clipped surrogate and the critic's clipped value loss are summed (their parameters
  are disjoint, so each gets its own loss's gradient; `tx` gives them their own learning rates).
  With `micro_batches` m the rows go through the models m slices at a time and the gradients of
  the token sums are accumulated: the step equals the one-pass step (each loss one masked mean
  over all the minibatch's response tokens)."""
  w = jnp.asarray(weights, jnp.float32)

  def sums(params, frozen, batch):  # (sum over response tokens of both losses, {token sums, tokens})
    model = model_from(graphdef, with_base(params, frozen))
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"])
    logp = response_logprobs(model.actor, *args, temperature=temperature)
    values = response_values(model.critic, *args, w)[:, :-1]
    mask = batch["response_mask"]
    tokens = jnp.sum(mask.astype(jnp.float32))
    pl, ps = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, clip)
    vl, vs = value_loss(values, batch["old_values"], batch["returns"], mask, value_clip)
    out = {k: v * tokens for k, v in {"loss": pl, "value_loss": vl, **ps, **vs}.items()}  # masked means -> sums
    return out["loss"] + out["value_loss"], {**out, "tokens": tokens}

  grad_fn = jax.value_and_grad(sums, has_aux=True)

  def step(params, opt_state, frozen, batch):
    if micro_batches == 1:
      (_, total), grads = grad_fn(params, frozen, batch)
    else:
      grads, total = summed_grads(grad_fn, params, jax.tree.map(lambda a: interleave(a, micro_batches), batch),
                                  frozen)
    params, opt_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, total["tokens"])
    count = jnp.maximum(total.pop("tokens"), 1.0)
    return params, opt_state, {**{k: v / count for k, v in total.items()}, "grad_norm": grad_norm}

  return step
