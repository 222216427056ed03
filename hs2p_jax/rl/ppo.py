"""PPO (the paper's RLHF baseline, as NeMo-Aligner runs it): pure functions of arrays.

Per response token t of row i (mask m [N, T], response tokens left-aligned):
  reward   r_t = -beta * |logp_t - logp_ref_t|, plus the reward model's score at the row's last token
  GAE      delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1}
           (after the last token V = the bootstrap value for a row cut at max_new_tokens, 0 for one
           that ended), returns R_t = A_t + V_t
  policy   -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A), ratio = exp(logp - logp_old)
  value    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
The value loss is a masked mean over all response tokens of the minibatch; the policy loss over
the actor's tokens (NeMo-Aligner's: the rows that ended, a row cut at max_new_tokens training only
the critic), as one mean over all of them (`token`) or a mean over rows of each row's token mean
(`sequence`, GRPO's). Advantages are whitened over the rollout batch's response tokens.
GRPO (TRL's and DeepSeekMath's): each score minus its group's mean over the group's standard
deviation, never whitened again; its KL to the reference either a reward penalty or, with
`kl_in_loss`, a loss term beta * k3 on every actor token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import model_from
from hs2p_jax.model.actor_critic import response_values
from hs2p_jax.model.logprobs import response_logprobs
from hs2p_jax.rl.gae import gae, token_rewards, whiten
from hs2p_jax.rl.grpo import grpo_advantages
from hs2p_jax.rl.kl import kl_per_token, masked_mean
from hs2p_jax.train.accumulate import apply_mean_grads, interleave, summed_grads
from hs2p_jax.train.state import with_base


def surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip: float,
              clip_high: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(per-token clipped surrogate loss [N, T], per-token {clip_fraction, ratio, approx_kl}); the ratio
  kept in [1 - clip, 1 + clip_high] (clip_high None: clip)."""
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
  return jnp.maximum(unclipped, clipped), {"clip_fraction": (clipped > unclipped).astype(jnp.float32),
                                           "ratio": ratio, "approx_kl": 0.5 * log_ratio ** 2}


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip: float, clip_high: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(clipped surrogate loss, {clip_fraction, ratio, approx_kl}) as masked means over the tokens [N, T]."""
  per_token, stats = surrogate(logp, old_logp, advantages, clip, clip_high)
  return masked_mean(per_token, mask), {k: masked_mean(v, mask) for k, v in stats.items()}


def actor_weights(actor_mask: jax.Array, agg: str = "token") -> jax.Array:
  """[N, T] weights of the actor's tokens in its loss, summing to 1 (0 without tokens): `token`, one
  mean over all of them (NeMo-Aligner, DAPO); `sequence`, a mean over rows of each row's token mean
  (GRPO's paper, TRL's `grpo` loss)."""
  m = actor_mask.astype(jnp.float32)
  if agg == "token":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  if agg != "sequence":
    raise ValueError(f"loss aggregation {agg!r}: expected token or sequence")
  per_row = jnp.sum(m, axis=1, keepdims=True)
  rows = jnp.sum((per_row > 0).astype(jnp.float32))
  return m / jnp.maximum(per_row, 1.0) / jnp.maximum(rows, 1.0)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(clipped value loss, {value_clip_fraction}) over the masked tokens [N, T]."""
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  a, b = (values - returns) ** 2, (clipped - returns) ** 2
  return 0.5 * masked_mean(jnp.maximum(a, b), mask), {"value_clip_fraction": masked_mean((b > a).astype(jnp.float32),
                                                                                          mask)}


@functools.partial(jax.jit, static_argnames=("beta", "estimator", "gamma", "lam", "advantage", "k", "whitened",
                                             "kl_in_loss"))
def rollout_targets(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, kl: jax.Array, values: jax.Array,
                    mask: jax.Array, *, beta: float, estimator: str, gamma: float, lam: float, advantage: str = "gae",
                    k: int = 1, whitened: bool = True, kl_in_loss: bool = False) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) [N, T] of a scored rollout batch: per-token rewards, GAE over the
  critic's `values` [N, T] (rows end where their mask does, NeMo's choice for rows cut short),
  whitened over the batch's response tokens with `whitened`; or with `advantage="grpo"` the
  group-normalised score minus `beta * kl` [N] on every token, never whitened (returns still GAE's,
  for the critic). With `kl_in_loss` the KL is the loss's term, not the rewards' (beta 0 here)."""
  beta = 0.0 if kl_in_loss else beta
  rewards = token_rewards(scores, logp, ref_logp, mask, beta, estimator)
  adv, ret = gae(rewards, values, mask, gamma, lam)
  if advantage == "grpo":
    return grpo_advantages(scores - beta * kl, k)[:, None] * mask, ret
  if whitened:
    adv = whiten(adv, mask)
  return adv, ret


def _is_actor(path) -> bool:
  return str(getattr(path[0], "key", path[0])) == "actor"


@dataclasses.dataclass(frozen=True)
class Losses:
  """PPO's loss settings (`ppo:` keys): the ratio's clip (`clip_high`: its upper side, DAPO's
  clip-higher), the value clip, the actor loss's aggregation, and `kl_beta` where the KL is a loss term."""

  clip: float = 0.2
  value_clip: float = 0.2
  clip_high: float | None = None
  agg: str = "token"
  kl_beta: float = 0.0                 # > 0: + kl_beta * k3(logp, ref_logp) on every actor token (GRPO's)


def make_ppo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, weights: Any, losses: Losses = Losses(),
                  temperature: float = 1.0, micro_batches: int = 1, critic_only: bool = False):
  """A pure `step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)` of an
  `ActorCritic` on a rollout minibatch: `prompt_ids`, `prompt_mask` [N, Tp], `tokens`,
  `response_mask`, `actor_mask` (the tokens the actor learns from), and from the rollout `old_logp`,
  `old_values`, `advantages`, `returns` [N, Tr] (and `ref_logp` with `losses.kl_beta`). The actor's
  clipped surrogate (weighted by `actor_weights`) and the critic's clipped value loss (a mean over
  all response tokens) are summed: their parameters are disjoint, so each gets its own loss's
  gradient; `tx` gives them their own AdamW and learning rates. With `micro_batches` m the rows go
  through the models m slices at a time and the weighted gradients are accumulated: the step equals
  the one-pass step. `critic_only` (the critic's warm-up): the value loss alone, and the actor's
  params and optimizer state come back as they were."""
  w = jnp.asarray(weights, jnp.float32)

  def sums(params, frozen, batch):  # (weighted sum of both losses, weighted metric sums)
    model = model_from(graphdef, with_base(params, frozen))
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"])
    values = response_values(model.critic, *args, w)[:, :-1]
    clipped = batch["old_values"] + jnp.clip(values - batch["old_values"], -losses.value_clip, losses.value_clip)
    a, b = (values - batch["returns"]) ** 2, (clipped - batch["returns"]) ** 2
    vw = batch["value_weight"]
    out = {"value_loss": jnp.sum(0.5 * jnp.maximum(a, b) * vw),
           "value_clip_fraction": jnp.sum((b > a).astype(jnp.float32) * vw)}
    if not critic_only:
      logp = response_logprobs(model.actor, *args, temperature=temperature)
      per_token, stats = surrogate(logp, batch["old_logp"], batch["advantages"], losses.clip, losses.clip_high)
      aw = batch["actor_weight"]
      if losses.kl_beta:
        k3 = kl_per_token(logp, batch["ref_logp"], "k3")
        per_token = per_token + losses.kl_beta * k3
        out["kl_loss"] = jnp.sum(k3 * aw)
      out.update({"loss": jnp.sum(per_token * aw), **{k: jnp.sum(v * aw) for k, v in stats.items()}})
    return out.get("loss", 0.0) + out["value_loss"], out

  grad_fn = jax.value_and_grad(sums, has_aux=True)

  def step(params, opt_state, frozen, batch):
    batch = {**batch, "actor_weight": actor_weights(batch["actor_mask"], losses.agg),
             "value_weight": actor_weights(batch["response_mask"], "token")}  # of the whole minibatch
    if micro_batches == 1:
      (_, total), grads = grad_fn(params, frozen, batch)
    else:
      grads, total = summed_grads(grad_fn, params, jax.tree.map(lambda a: interleave(a, micro_batches), batch),
                                  frozen)
    new_params, new_state, grad_norm = apply_mean_grads(tx, params, opt_state, grads, jnp.float32(1.0))
    if critic_only:  # the actor's (zero-gradient) update dropped, its AdamW state kept as it was
      new_params = jax.tree_util.tree_map_with_path(lambda path, old, new: old if _is_actor(path) else new,
                                                    params, new_params)
      new_state = new_state._replace(inner_states={**new_state.inner_states, "actor": opt_state.inner_states["actor"]})
    return new_params, new_state, {**total, "grad_norm": grad_norm}

  return step
