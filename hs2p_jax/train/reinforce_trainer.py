"""`hs2p reinforce`: leave-one-out REINFORCE with a KL penalty to a frozen reference, on the shared trainer.

The run holds the policy (trained) with its AdamW state, the frozen reference (the initial policy,
kept once under `DIR/frozen/reference`) and the frozen reward model (`reward_model=CKPT`, read from
its checkpoint into the run's layout; `reward_model=http://...` scores through `hs2p serve` instead), both in `reinforce.frozen_dtype` (default: the policy's
compute dtype). Its batch source is the rollouts (`train.rollouts`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax import storage
from hs2p_jax.checkpoint import load_checkpoint_tokenizer, read_meta
from hs2p_jax.config import ReinforceRunConfig
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.rollout import RolloutLayout, layout_for
from hs2p_jax.serve.client import RemoteScorer, is_served
from hs2p_jax.sharding import Rules, make_mesh, rules_from
from hs2p_jax.train.feed import batch_sharding
from hs2p_jax.train.model_init import architecture, is_local_checkpoint, model_meta, run_tokenizer
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.reinforce import kl_per_token, make_logprob_fn, make_policy_step, masked_mean, objective_temperature
from hs2p_jax.train.rm_scorer import RewardScorer, score_fn
from hs2p_jax.train.rollouts import RolloutSource, rloo
from hs2p_jax.train.state import Part, RunState, Step, frozen_dtype, initial_copy
from hs2p_jax.train.trainer import INITIAL, Trainer, train


@dataclasses.dataclass
class Phases:
  """The jitted functions of a REINFORCE step on the run's state: what the trainer runs and `hs2p plan` compiles."""

  update: Step                    # the policy step on a rollout minibatch
  logprobs: Any                   # (params, rollout batch) -> [N, Tr], policy or reference
  kl: Any                         # (logp, ref logp, response mask) -> [N]
  score: Any | None               # (reward-model params, scorer batch) -> [R, A]; None without a reward model
  layout: RolloutLayout | None    # the sampler's copy of the policy (None: sampling from the training layout)
  policy_graphdef: Any = None     # the policy's graphdef (default: the update's); `policy_params(trainer)` its params
  policy_params: Callable = dataclasses.field(default=lambda trainer: trainer.model_params())
  values: Any = None              # PPO: (critic params, rollout batch) -> [N, Tr + 1] values
  critic_update: Step | None = None  # PPO: the critic-only step of its warm-up (the actor left as it is)

  def __post_init__(self):
    if self.policy_graphdef is None:
      self.policy_graphdef = self.update.state.graphdef

  @property
  def policy_graphdef_config(self) -> LlamaConfig:
    return self.update.state.trainable.config


def reward_architecture(cfg: ReinforceRunConfig, policy: LlamaConfig, download: bool = True
                        ) -> tuple[LlamaConfig, int, str] | None:
  """(architecture, outputs, origin) of the reward model, computing in the policy's dtype and
  kernels; None without `reward_model` or where it is served (a URL). Plans (`download=False`) fall back to the policy's shapes
  where the checkpoint is not on this machine."""
  path = cfg.reward_model
  if not path or is_served(path):  # served elsewhere: not in this run's state
    return None
  if not download and not is_local_checkpoint(path):
    return policy.replace(lora_rank=0), 9, f"the policy's architecture ({path}: not read by plan here)"
  meta = read_meta(path)
  if meta.kind != "reward":
    raise UserError(f"reward_model={path}: a {meta.kind} checkpoint, not a reward model")
  runtime = {k: getattr(policy, k) for k in ("dtype", "remat", "attention", "scan_layers")}
  return meta.config.replace(**runtime), meta.num_attributes, f"reward_model={path}"


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


def rows_spec(mesh: Any, rules: Rules, **arrays: tuple[tuple[int, ...], Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """Batch arrays placed as `put_batch` places them."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(k, shape, mesh, rules))
          for k, (shape, dtype) in arrays.items()}


def rollout_spec(cfg: Any, mesh: Any, rules: Rules, rows: int, advantages: bool = False) -> dict:
  """`rows` rollouts at their longest (data.max_length prompt tokens, max_new_tokens response tokens):
  the log-prob phase's batch, or with `advantages` an update minibatch (REINFORCE's advantage per
  row; PPO's, `cfg.ppo`, per token with the rollout's log-probs, values and returns)."""
  ppo = getattr(cfg, "ppo", None)
  tp, tr, i32, f32 = cfg.data.max_length, (ppo or cfg.reinforce).max_new_tokens, np.int32, np.float32
  out = rows_spec(mesh, rules, prompt_ids=((rows, tp), i32), prompt_mask=((rows, tp), i32),
                  tokens=((rows, tr), i32), response_mask=((rows, tr), i32))
  if advantages and ppo is not None:
    floats = ("old_logp", "old_values", "advantages", "returns") + (("ref_logp",) if ppo.kl_in_loss else ())
    out.update(rows_spec(mesh, rules, actor_mask=((rows, tr), i32), **{k: ((rows, tr), f32) for k in floats}))
  elif advantages:
    out.update(rows_spec(mesh, rules, advantages=((rows,), f32)))
  return out


def prompt_loader(cfg: Any, rc: Any, tokenizer: Any, out_dir: str, split: str = "train") -> Any:
  """The run's prompts, `rc.prompts_per_step` a step (every process reads the global batch's rows it
  holds); `split="validation"`: the held-out prompts (`data.validation`) in order, once, as many a
  batch as a training rollout has rows."""
  train = split == "train"
  return make_loader(cfg.data, tokenizer, split=split, task="prompts",
                     batch_size=rc.prompts_per_step * (1 if train else rc.samples_per_prompt), seed=rc.seed,
                     shuffle=train, repeat=train, process_index=jax.process_index(),
                     process_count=jax.process_count(), cache_dir=storage.local_dir(out_dir, "data"))


def validation_loader(cfg: Any, rc: Any, tokenizer: Any, out_dir: str) -> Any:
  """The held-out prompts of the validation rollouts, or None (`eval_every` 0 or no `data.validation`)."""
  if not rc.eval_every:
    return None
  if not cfg.data.validation:
    raise UserError(f"{'ppo' if hasattr(rc, 'critic_lr') else 'reinforce'}.eval_every={rc.eval_every}: the "
                    f"validation rollouts read held-out prompts: set data.validation (a file, hf:... or builtin)")
  return prompt_loader(cfg, rc, tokenizer, out_dir, "validation")


def rollout_source(cfg: Any, rc: Any, phases: Phases, loader: Any, tokenizer: Any, policy: LlamaConfig,
                   scorer: Callable | None, estimate: Callable = rloo, shuffle: bool = False,
                   validation: Any = None) -> tuple[RolloutSource, dict[str, str]]:
  """(the rollouts, where the frozen models start): responses scored by `scorer`, else the server at
  `cfg.reward_model` (a URL, `serve.client`), else that reward-model checkpoint (the run's frozen
  `reward_model`, read from it)."""
  state = phases.update.state
  if phases.layout is not None and jax.process_index() == 0:
    print(phases.layout.describe(), file=sys.stderr, flush=True)
  frozen_from = {"reference": INITIAL}
  if scorer is None and is_served(cfg.reward_model):
    scorer = RemoteScorer(cfg.reward_model, timeout=rc.reward_timeout, retries=rc.reward_retries)
    scorer.check(cfg.data.max_length + rc.max_new_tokens)
  if scorer is None:
    frozen_from["reward_model"] = cfg.reward_model
    scorer = RewardScorer(state.frozen_graphdefs["reward_model"], None, read_meta(cfg.reward_model),
                          load_checkpoint_tokenizer(cfg.reward_model), state.mesh, state.rules,
                          max_length=cfg.data.max_length + rc.max_new_tokens, eval_fn=phases.score)
  eos = tuple(policy.eos_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
  return (RolloutSource(cfg, loader, phases, scorer, tokenizer, eos, estimate=estimate, section=rc, shuffle=shuffle,
                        validation=validation), frozen_from)


def reward_info(cfg: Any) -> dict[str, Any]:
  """The reward model a run reads, as its provenance records it (a checkpoint's absolute path, or the URL)."""
  rm = cfg.reward_model
  return {"reward_model": storage.absolute(rm) if rm and not is_served(rm) else rm}


def trainer(cfg: ReinforceRunConfig, out_dir: str, scorer: Callable | None = None) -> Trainer:
  """The REINFORCE run of `cfg` in `out_dir`. `scorer(prompts, responses) -> [N] rewards` defaults to
  the reward-model checkpoint `cfg.reward_model` (or the server at that URL, `serve.client`); any
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
                 keep_best="val_reward" if val else None)


def train_reinforce(cfg: ReinforceRunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) REINFORCE into `out_dir`; returns the last logged metrics."""
  return train("reinforce", trainer, cfg, out_dir, allow_config_change)
