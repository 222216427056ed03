"""`hs2p ppo`: PPO with a critic initialised from the reward model, on the shared trainer.

The run trains an `ActorCritic` (the policy and the critic, each with its own AdamW and learning
rate, `optim.actor_critic_optimizer`) and holds, frozen, the reference (a copy of the initial actor,
kept once under `DIR/frozen/reference`) and the reward model. Its batch source is REINFORCE's
rollouts (`rl.rollouts`) with PPO's estimator: per-token rewards (the KL penalty on every token,
the score at the last), the critic's values, GAE (or GRPO's group-normalised scores) and whitening;
each rollout batch gives `updates_per_rollout` minibatches, `epochs` times. `DIR/model` holds the
actor.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax import storage
from hs2p_jax.checkpoint import load_checkpoint_tokenizer, load_model, read_meta
from hs2p_jax.config import PPORunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.eval.scorer import score_fn
from hs2p_jax.feed import host_global
from hs2p_jax.model.actor_critic import response_values
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.logprobs import make_logprob_fn, objective_temperature
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.rl import ppo
from hs2p_jax.rl.grpo import flat_groups
from hs2p_jax.rl.kl import kl_per_token, masked_mean
from hs2p_jax.rl.layout import layout_for
from hs2p_jax.rl.programs import lowerings
from hs2p_jax.rl.reward_client import is_served
from hs2p_jax.rl.rollouts import Rollout, RolloutSource
from hs2p_jax.rl.setup import (Phases, prompt_loader, reward_architecture, reward_info, rollout_source,
                               validation_loader)
from hs2p_jax.sharding import Rules, make_mesh, rules_from, use_mesh
from hs2p_jax.train.model_init import architecture, is_local_checkpoint, load_params, model_meta, run_tokenizer
from hs2p_jax.train.optim import actor_critic_optimizer
from hs2p_jax.train.state import Part, RunState, Step, abstract_part, frozen_dtype
from hs2p_jax.train.trainer import Trainer, train

_RUNTIME = ("dtype", "remat", "attention", "scan_layers")


def critic_source(cfg: PPORunConfig) -> str:
  path = cfg.critic or cfg.reward_model
  if not path or is_served(path):
    raise UserError("ppo: the critic starts from a reward-model checkpoint: set reward_model=CKPT (or critic=CKPT)")
  return path


def critic_architecture(cfg: PPORunConfig, policy: LlamaConfig, download: bool = True
                        ) -> tuple[LlamaConfig, int, np.ndarray, str]:
  """(architecture, outputs, value weights, origin) of the critic: its checkpoint's, computing as the
  policy does. Plans (`download=False`) fall back to the policy's shapes (9 outputs, helpfulness)
  where the checkpoint is not on this machine."""
  if not download and not is_local_checkpoint(cfg.critic or cfg.reward_model):
    path = cfg.critic or cfg.reward_model
    return (policy.replace(lora_rank=0), 9, attribute_weights("helpfulness", 9),
            "the policy's architecture" + (f" ({path}: not read by plan here)" if path else ""))
  path = critic_source(cfg)
  meta = read_meta(path)
  if meta.kind != "reward":
    raise UserError(f"ppo: {path} is a {meta.kind} checkpoint, not a reward model (the critic starts from one)")
  cfg_ = meta.config.replace(**{k: getattr(policy, k) for k in _RUNTIME})
  weights = np.asarray(attribute_weights(meta.reward_weights, meta.num_attributes))
  return cfg_, meta.num_attributes, weights, f"critic={path}"


def blueprint(cfg: PPORunConfig, mesh: Any, rules: Rules, policy: LlamaConfig,
              critic: tuple[LlamaConfig, int, np.ndarray] | tuple, reward: tuple[LlamaConfig, int] | None,
              memory: int | None = None, chip: str | None = None) -> Phases:
  """The run's state (actor-critic + AdamW, frozen reference and reward model) and its jitted phases."""
  pc = cfg.ppo
  stored = frozen_dtype(pc.frozen_dtype, policy.dtype)
  frozen = {"reference": Part("lm", policy, dtype=stored, of="actor")}
  if reward is not None:
    frozen["reward_model"] = Part("reward", reward[0], reward[1], dtype=stored)
  trainable = Part("actor_critic", policy, critic[1], critic=critic[0])
  state = RunState.build(trainable, frozen, actor_critic_optimizer(pc),
                         mesh, rules)
  temp = objective_temperature(pc.temperature)
  critic_graphdef = abstract_part(Part("reward", critic[0], critic[1]), mesh, rules)[0]
  weights = jnp.asarray(critic[2], jnp.float32)
  layout = layout_for(policy, mesh, rules, tensor=pc.rollout_tensor, dtype=pc.rollout_dtype,
                      rows=pc.prompts_per_step * pc.samples_per_prompt,
                      context=cfg.data.max_length + pc.max_new_tokens / 2, memory=memory,
                      chip=chip) if pc.rollout_copy else None
  replicated = NamedSharding(mesh, P())
  def critic_values(params, b):
    return response_values(nnx.merge(critic_graphdef, params), b["prompt_ids"], b["prompt_mask"], b["tokens"],
                           b["response_mask"], weights)
  values = jax.jit(critic_values, out_shardings=replicated)
  lm_graphdef = state.frozen_graphdefs["reference"]
  losses = ppo.Losses(pc.clip, pc.value_clip, pc.clip_high, pc.loss_agg, pc.kl_beta if pc.kl_in_loss else 0.0)
  step = lambda critic_only: ppo.make_ppo_step(state.graphdef, state.tx, critic[2], losses, temp,  # noqa: E731
                                               pc.micro_batches, critic_only)
  return Phases(
      update=Step(state, step(False)), critic_update=Step(state, step(True)) if pc.critic_warmup_steps else None,
      logprobs=jax.jit(make_logprob_fn(lm_graphdef, None, temp)),
      kl=jax.jit(lambda lp, ref, m: masked_mean(kl_per_token(lp, ref, pc.kl_estimator), m, axis=1),
                 out_shardings=replicated),
      score=score_fn(state.frozen_graphdefs["reward_model"], mesh) if reward is not None else None,
      layout=layout, policy_graphdef=lm_graphdef, policy_params=lambda t: t.params["actor"], values=values)


def estimate(source: RolloutSource, r: Rollout, trainer: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """PPO's estimator: the critic's values of the rollouts, per-token rewards, GAE (or GRPO's
  group-normalised scores on every token), whitened advantages, returns, and the tokens the actor
  learns from: those of the rows that ended (`ppo.truncated_in_actor_loss`: all), less GRPO's groups
  without signal (`ppo.drop_flat_groups`); the critic learns from every response token."""
  pc, ph = source.rc, source.phases
  st = ph.update.state
  with use_mesh(st.mesh, st.rules):
    values = host_global(ph.values(trainer.params["critic"], r.dev))  # [N, Tr + 1]
  mask = r.rows["response_mask"]
  logp, ref = host_global(r.logp), host_global(r.ref_logp)
  old_values = values[:, :-1] * mask
  adv, ret = ppo.rollout_targets(r.scores, logp, ref, r.kl, old_values, mask, beta=pc.kl_beta,
                                 estimator=pc.kl_estimator, gamma=pc.gamma, lam=pc.lam, advantage=pc.advantage,
                                 k=pc.samples_per_prompt, whitened=pc.whiten, kl_in_loss=pc.kl_in_loss)
  adv, ret = np.asarray(adv, np.float32), np.asarray(ret, np.float32)
  keep = np.ones(len(mask), bool) if pc.truncated_in_actor_loss else r.ended.astype(bool)
  if pc.drop_flat_groups:
    keep &= ~np.asarray(flat_groups(jnp.asarray(r.scores), pc.samples_per_prompt))
  actor_mask = (mask * keep[:, None]).astype(np.int32)
  on = mask.astype(bool)
  last = values[np.arange(len(values)), r.lengths]
  out = {"old_logp": np.asarray(logp, np.float32), "old_values": old_values.astype(np.float32), "advantages": adv,
         "returns": ret, "actor_mask": actor_mask}
  if pc.kl_in_loss:
    out["ref_logp"] = np.asarray(ref, np.float32)
  return (out, {"value_mean": float(old_values[on].mean()) if on.any() else 0.0,
                "return_mean": float(ret[on].mean()) if on.any() else 0.0, "value_at_end": float(last.mean()),
                "advantage_std": float(adv[on].std()) if on.any() else 0.0,
                "actor_token_fraction": float(actor_mask.sum() / max(mask.sum(), 1))})


def check_critic_tokenizer(cfg: PPORunConfig, tokenizer: Any) -> None:
  """The critic reads the policy's token ids: its reward model must have been trained with the policy's tokenizer."""
  path = critic_source(cfg)
  theirs = load_checkpoint_tokenizer(path)
  if theirs.get_vocab() != tokenizer.get_vocab():
    raise UserError(f"ppo: the critic's checkpoint {path} has another tokenizer ({len(theirs)} tokens) than the "
                    f"policy ({len(tokenizer)} tokens), and the critic reads the policy's token ids; start it from a "
                    f"reward model trained with the policy's tokenizer (critic=CKPT)")


def _read_source(cfg: PPORunConfig, path: str) -> Callable[[Trainer], Any]:
  def read(t: Trainer) -> Any:
    st = t.state
    actor = load_params(cfg.policy, st.params["actor"], t.mesh, t.rules, t.source_reads)
    runtime = {k: getattr(st.trainable.critic, k) for k in _RUNTIME}
    critic, _ = load_model(path, t.mesh, t.rules, **runtime)
    return nnx.State({"actor": actor, "critic": nnx.state(critic)})
  return read


def trainer(cfg: PPORunConfig, out_dir: str, scorer: Callable | None = None) -> Trainer:
  """The PPO run of `cfg` in `out_dir`; `scorer(prompts, responses) -> [N]` defaults to the reward
  model `cfg.reward_model` (a checkpoint, or `hs2p serve` at a URL); the critic starts from a
  reward-model checkpoint either way (`critic`, default `reward_model`)."""
  if cfg.policy.kind != "lm":
    raise UserError("ppo: policy.kind must be lm")
  if cfg.policy.lora.rank:
    raise UserError(f"policy.lora.rank={cfg.policy.lora.rank}: ppo does not train LoRA adapters yet")
  if scorer is None and not cfg.reward_model:
    raise UserError("ppo: set reward_model=CKPT (a reward-model checkpoint)")
  pc, mesh, rules = cfg.ppo, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  policy = architecture(cfg.policy)[0]
  critic = critic_architecture(cfg, policy)
  reward = reward_architecture(cfg, policy) if scorer is None else None
  tokenizer = run_tokenizer(cfg.policy, "policy")  # checked against the weights before any data is read
  loader = prompt_loader(cfg, pc, tokenizer, out_dir)
  val = validation_loader(cfg, pc, tokenizer, out_dir)
  phases = blueprint(cfg, mesh, rules, policy, critic, reward[:2] if reward else None)
  check_critic_tokenizer(cfg, tokenizer)
  source, frozen_from = rollout_source(cfg, pc, phases, loader, tokenizer, policy, scorer, estimate=estimate,
                                       shuffle=True, validation=val)
  return Trainer(cfg, out_dir, section=pc, model=cfg.policy, step=phases.update, source=source, tokenizer=tokenizer,
                 meta=model_meta(cfg.policy, policy, cfg.data.template, cfg.data.max_length), frozen_from=frozen_from,
                 datasets={"prompts": (loader, pc.steps, pc.prompts_per_step),
                           **({"validation prompts": (val, None, None)} if val else {})},
                 evaluate=source.validate if val else None, keep_best="val_reward" if val else None,
                 programs=lambda t: lowerings(source, t),
                 model_info={**reward_info(cfg), "critic": storage.absolute(critic_source(cfg))},
                 read_source=_read_source(cfg, critic_source(cfg)), final_part="actor")


def train_ppo(cfg: PPORunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) PPO into `out_dir`; returns the last logged metrics."""
  return train("ppo", trainer, cfg, out_dir, allow_config_change)
