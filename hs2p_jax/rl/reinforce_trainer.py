"""`hs2p reinforce`: leave-one-out REINFORCE with a KL penalty to a frozen reference, on the shared trainer.

The run holds the policy (trained) with its AdamW state, the frozen reference (the initial policy,
kept once under `DIR/frozen/reference`) and the frozen reward model (`reward_model=CKPT`, read from
its checkpoint into the run's layout; `reward_model=http://...` scores through `hs2p serve`
instead), both in `reinforce.frozen_dtype` (default: the policy's compute dtype). Its batch source
is the rollouts (`rl.rollouts`) with the leave-one-out estimator (`rl.rloo`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax.config import ReinforceRunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.eval.scorer import score_fn
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.logprobs import make_logprob_fn, objective_temperature
from hs2p_jax.rl.kl import kl_per_token, masked_mean
from hs2p_jax.rl.layout import layout_for
from hs2p_jax.rl.programs import lowerings
from hs2p_jax.rl.reinforce import make_policy_step
from hs2p_jax.rl.setup import (Phases, prompt_loader, reward_architecture, reward_info, rollout_source,
                               validation_loader)
from hs2p_jax.sharding import Rules, make_mesh, rules_from
from hs2p_jax.train.model_init import architecture, model_meta, run_tokenizer
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.state import Part, RunState, Step, frozen_dtype, initial_copy
from hs2p_jax.train.trainer import Trainer, train


def blueprint(cfg: ReinforceRunConfig, mesh: Any, rules: Rules, policy: LlamaConfig | None = None,
              reward: tuple[LlamaConfig, int] | None = None, memory: int | None = None,
              chip: str | None = None) -> Phases:
  """The run's state (policy + AdamW, frozen reference and reward model) and its jitted phases;
  `policy` / `reward` override the architectures (`reward` None: no reward model in the state);
  `memory` (bytes per device) and `chip`, for the rollout layout's choice (default: the devices')."""
  rc = cfg.reinforce
  policy = policy or architecture(cfg.policy)[0]
  stored = frozen_dtype(rc.frozen_dtype, policy.dtype)
  frozen = {"reference": initial_copy(policy, stored)}
  if reward is not None:
    frozen["reward_model"] = Part("reward", reward[0], reward[1], dtype=stored)
  state = RunState.build(Part("lm", policy), frozen, optimizer_from(rc), mesh, rules)
  share = rc.samples_per_prompt if rc.share_prompt else None  # rows come in prompt-major groups of k
  temp = objective_temperature(rc.temperature)  # the loss and KL read the sampler's distribution
  replicated = NamedSharding(mesh, P())
  layout = layout_for(policy, mesh, rules, tensor=rc.rollout_tensor, dtype=rc.rollout_dtype,
                      rows=rc.prompts_per_step * rc.samples_per_prompt,
                      context=cfg.data.max_length + rc.max_new_tokens / 2, memory=memory,
                      chip=chip, train_graphdef=state.graphdef) if rc.rollout_copy else None
  return Phases(
      update=Step(state, make_policy_step(state.graphdef, state.tx, share, temp, rc.micro_batches)),
      logprobs=jax.jit(make_logprob_fn(state.graphdef, share, temp)),
      kl=jax.jit(lambda lp, ref, m: masked_mean(kl_per_token(lp, ref, rc.kl_estimator), m, axis=1),
                 out_shardings=replicated),
      score=score_fn(state.frozen_graphdefs["reward_model"], mesh) if reward is not None else None,
      layout=layout)


def trainer(cfg: ReinforceRunConfig, out_dir: str, scorer: Callable | None = None) -> Trainer:
  """The REINFORCE run of `cfg` in `out_dir`. `scorer(prompts, responses) -> [N] rewards` defaults to
  the reward-model checkpoint `cfg.reward_model` (or the server at that URL, `rl.reward_client`); any
  function of texts can stand in (e.g. a rule)."""
  if not cfg.reward_model and scorer is None:
    raise UserError("reinforce: set reward_model=CKPT (a reward-model checkpoint)")
  if cfg.policy.kind != "lm":
    raise UserError("reinforce: policy.kind must be lm")
  rc, mesh, rules = cfg.reinforce, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  policy = architecture(cfg.policy)[0]
  reward = reward_architecture(cfg, policy) if scorer is None else None  # fails now, before any data or weights
  tokenizer = run_tokenizer(cfg.policy, "policy")  # checked against the weights before any data is read
  loader = prompt_loader(cfg, rc, tokenizer, out_dir)
  val = validation_loader(cfg, rc, tokenizer, out_dir)
  phases = blueprint(cfg, mesh, rules, policy, reward[:2] if reward else None)
  source, frozen_from = rollout_source(cfg, rc, phases, loader, tokenizer, policy, scorer, validation=val)
  return Trainer(cfg, out_dir, section=rc, model=cfg.policy, step=phases.update, source=source, tokenizer=tokenizer,
                 meta=model_meta(cfg.policy, policy, cfg.data.template, cfg.data.max_length), frozen_from=frozen_from,
                 datasets={"prompts": (loader, rc.steps, rc.prompts_per_step),
                           **({"validation prompts": (val, None, None)} if val else {})},
                 model_info=reward_info(cfg), evaluate=source.validate if val else None,
                 keep_best="val_reward" if val else None, programs=lambda t: lowerings(source, t))


def train_reinforce(cfg: ReinforceRunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) REINFORCE into `out_dir`; returns the last logged metrics."""
  return train("reinforce", trainer, cfg, out_dir, allow_config_change)
