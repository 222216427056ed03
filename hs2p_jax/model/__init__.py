"""Models: the Llama backbone, its causal-LM head and its reward head."""

from __future__ import annotations

from flax import nnx

from hs2p_jax.errors import UserError
from hs2p_jax.model.actor_critic import ActorCritic
from hs2p_jax.model.config import LlamaConfig, from_hf_config, preset, to_hf_config
from hs2p_jax.model.llama import KVCache, Llama, LlamaForCausalLM
from hs2p_jax.model.reward import ATTRIBUTES, HELPFULNESS, RewardModel

KINDS = ("lm", "reward", "actor_critic")


def create(kind: str, cfg: LlamaConfig, num_attributes: int = 9, seed: int = 0, critic: LlamaConfig | None = None
           ) -> LlamaForCausalLM | RewardModel | ActorCritic:
  """A freshly initialised model: kind "lm" (causal LM), "reward" (`num_attributes` outputs) or
  "actor_critic" (PPO's: an lm of `cfg` and a reward model of `critic`)."""
  if kind == "lm":
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
  if kind == "reward":
    return RewardModel(cfg, num_attributes, rngs=nnx.Rngs(seed))
  if kind == "actor_critic" and critic is not None:
    return ActorCritic(cfg, critic, num_attributes, rngs=nnx.Rngs(seed))
  raise UserError(f"model kind {kind!r}: expected one of {', '.join(KINDS)}")


def model_from(graphdef: nnx.GraphDef, params) -> nnx.Module:
  """The model of a split: `params` is one State, or a tuple of States (a LoRA run's trainable
  params and its frozen base)."""
  return nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)


def merge_lora(model: LlamaForCausalLM | RewardModel) -> LlamaForCausalLM | RewardModel:
  """`model` with its LoRA adapters folded into the weights (`model.lora`); a model without them as it is."""
  from hs2p_jax.model import lora
  if not model.cfg.lora_rank:
    return model
  if isinstance(model, RewardModel):
    return lora.merged(model, lambda cfg: RewardModel(cfg, model.num_attributes, rngs=nnx.Rngs(0)))
  return lora.merged(model, lambda cfg: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))


__all__ = ["ATTRIBUTES", "ActorCritic", "HELPFULNESS", "KINDS", "KVCache", "Llama", "LlamaConfig", "LlamaForCausalLM",
           "RewardModel", "create", "merge_lora", "model_from", "from_hf_config", "preset", "to_hf_config"]
