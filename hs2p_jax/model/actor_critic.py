"""PPO's trained pair as one module: the policy (actor) and a reward model whose head reads a value
at every token (critic), split and sharded together, each keeping its own architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.llama import LlamaForCausalLM
from hs2p_jax.model.reward import RewardModel


class ActorCritic(nnx.Module):
  """`actor` (a causal LM) and `critic` (a reward model, `num_attributes` outputs; PPO initialises
  it from the reward model: backbone and head)."""

  def __init__(self, actor: LlamaConfig, critic: LlamaConfig, num_attributes: int = 9, *, rngs: nnx.Rngs):
    self.cfg = actor
    self.actor = LlamaForCausalLM(actor, rngs=rngs)
    self.critic = RewardModel(critic, num_attributes, rngs=rngs)


def response_values(critic: RewardModel, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                    response_mask: jax.Array, weights: jax.Array) -> jax.Array:
  """[N, Tr + 1] float32 values `weights @ head` of the states before each response token and,
  at index L, after a row's L tokens (where the reward model reads its score). prompt_* [N, Tp]
  (left-padded), tokens / response_mask [N, Tr]."""
  ids = jnp.concatenate([prompt_ids, tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  hidden = critic.model(ids, mask)  # [N, Tp + Tr, D]
  tp = prompt_ids.shape[1]
  return critic.head(hidden[:, tp - 1:]) @ jnp.asarray(weights, jnp.float32)
