"""What every RL learner's run sets up alike: its jitted phases, prompt loaders (training and
validation), the reward model (in the run, served, or any scoring function) and the rollout source."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
import numpy as np

from hs2p_jax import storage
from hs2p_jax.checkpoint import load_checkpoint_tokenizer, read_meta
from hs2p_jax.config import ReinforceRunConfig
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.errors import UserError
from hs2p_jax.eval.scorer import RewardScorer
from hs2p_jax.feed import batch_sharding
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.rl.layout import RolloutLayout
from hs2p_jax.rl.reward_client import RemoteScorer, is_served
from hs2p_jax.rl.rloo import rloo
from hs2p_jax.rl.rollouts import RolloutSource
from hs2p_jax.sharding import Rules
from hs2p_jax.train.model_init import is_local_checkpoint
from hs2p_jax.train.state import Step
from hs2p_jax.train.trainer import INITIAL


@dataclasses.dataclass
class Phases:
  """The jitted functions of an RL step on the run's state (REINFORCE's; PPO's add the critic's values
  and its warm-up step): what the trainer runs and `hs2p plan` compiles."""

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
  `cfg.reward_model` (a URL, `rl.reward_client`), else that reward-model checkpoint (the run's frozen
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
