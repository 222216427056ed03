"""Range, choice and cross-field checks of a loaded config (`config.load` runs them before anything is read).

Sections are recognised by their name and fields, not their classes, so that `config` can import
this module without this one importing it back."""

from __future__ import annotations

import dataclasses

from hs2p_jax.errors import UserError

_CHOICES = {
    "model.kind": ("reward", "lm"),
    "data.format": ("helpsteer2", "helpsteer2-preference", "helpsteer3-preference", "pairs", "hh", "rewardbench",
                    "rewardbench2", "prompts", "sft", "justifier"),
    "data.attributes": ("helpfulness", "all"),
    "data.template": ("steerlm", "chat"),
    "data.overlong": ("truncate", "drop"),
    "train.objective": ("regression", "bt"),
    "train.bt_variant": ("regular", "margin", "scaled"),
    "policy.kind": ("lm",),
    "reinforce.kl_estimator": ("absolute", "k1", "k3"),
    "ppo.kl_estimator": ("absolute", "k1", "k3"),
    "ppo.advantage": ("gae", "grpo"),
    "ppo.loss_agg": ("token", "sequence"),
    "ppo.rollout_dtype": ("auto", "float32", "bfloat16", "float16"),
    "ppo.frozen_dtype": ("auto", "float32", "bfloat16", "float16"),
    "reinforce.rollout_dtype": ("auto", "float32", "bfloat16", "float16"),
    "dpo.variant": ("regular", "margin", "scaled"),
    "dpo.frozen_dtype": ("auto", "float32", "bfloat16", "float16"),
    "reinforce.frozen_dtype": ("auto", "float32", "bfloat16", "float16"),
}


def validate(cfg) -> None:
  """Range, choice and cross-field checks for every known section of a config; the first failure raises UserError."""
  for key, choices in _CHOICES.items():
    section, name = key.split(".")
    sec = getattr(cfg, section, None)
    if sec is not None and hasattr(sec, name) and getattr(sec, name) not in choices:
      raise UserError(f"{key}={getattr(sec, name)!r}: expected one of {', '.join(choices)}")
  from hs2p_jax.model.config import ATTENTION_IMPLS, REMAT_POLICIES, WEIGHT_GRADS
  runtime = {"remat": REMAT_POLICIES, "attention": ATTENTION_IMPLS, "weight_grad": WEIGHT_GRADS,
             "dtype": ("float32", "bfloat16", "float16")}
  for field in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
    model = getattr(cfg, field.name)
    if _is_model(model):  # checked here, before any data or weights are read
      for name, choices in runtime.items():
        if not hasattr(model, name) or getattr(model, name) is None:  # None: a tool keeps the checkpoint's
          continue
        if getattr(model, name) not in choices:
          raise UserError(f"{field.name}.{name}={getattr(model, name)!r}: expected one of {', '.join(choices)}")
      if getattr(model, "attention", None) == "cudnn" and getattr(model, "dtype", None) == "float32":
        raise UserError(f"{field.name}.attention=cudnn needs {field.name}.dtype bfloat16 or float16 (cuDNN flash "
                        "attention has no float32 kernel); attention auto picks xla for float32 on GPU")
  for key in ("train", "dpo", "sft"):
    lm = getattr(cfg, key, None)
    if not hasattr(lm, "micro_batch_size"):
      continue
    if lm.steps < 0:  # 0: the starting model saved as the run's model, nothing trained
      raise UserError(f"{key}.steps={lm.steps}: must be 0 or more")
    if lm.batch_size <= 0:
      raise UserError(f"{key}.batch_size={lm.batch_size}: must be positive")
    if lm.micro_batch_size is not None and (lm.micro_batch_size <= 0 or lm.batch_size % lm.micro_batch_size):
      raise UserError(f"{key}.micro_batch_size={lm.micro_batch_size} must divide {key}.batch_size={lm.batch_size}")
    if lm.lr < 0 or lm.warmup_steps < 0:
      raise UserError(f"{key}.lr and {key}.warmup_steps must be >= 0")
    if hasattr(lm, "beta") and lm.beta <= 0:
      raise UserError(f"dpo.beta={lm.beta}: must be positive")
  for sec in ("reinforce", "ppo"):
    rl = getattr(cfg, sec, None)
    if not hasattr(rl, "prompts_per_step"):
      continue
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "updates_per_rollout"):
      if getattr(rl, name) <= 0:
        raise UserError(f"{sec}.{name}={getattr(rl, name)}: must be positive")
    if (rl.prompts_per_step * rl.samples_per_prompt) % rl.updates_per_rollout:
      raise UserError(f"{sec}.updates_per_rollout must divide prompts_per_step * samples_per_prompt")
    if rl.share_prompt and rl.prompts_per_step % rl.updates_per_rollout:
      raise UserError(f"{sec}.share_prompt=true: {sec}.updates_per_rollout must divide prompts_per_step "
                      "(a minibatch holds whole prompts)")
    minibatch = rl.prompts_per_step * rl.samples_per_prompt // rl.updates_per_rollout
    if rl.micro_batches <= 0 or minibatch % rl.micro_batches or \
        (rl.share_prompt and (minibatch // rl.micro_batches) % rl.samples_per_prompt):
      raise UserError(f"{sec}.micro_batches={rl.micro_batches} must divide the {minibatch} rollouts of an update"
                      + (" into whole prompts (share_prompt)" if rl.share_prompt else ""))
    if rl.rollout_tensor < 0:
      raise UserError(f"{sec}.rollout_tensor={rl.rollout_tensor}: must be >= 0 (0 chooses)")
    if not 0.0 < rl.top_p <= 1.0 or rl.temperature < 0:
      raise UserError(f"{sec}.top_p must be in (0, 1] and {sec}.temperature >= 0")
    if sec == "ppo":
      if rl.share_prompt:
        raise UserError("ppo.share_prompt=true: ppo computes each rollout row on its own (share_prompt is REINFORCE's)")
      if rl.epochs <= 0 or rl.critic_warmup_steps < 0 or rl.critic_lr < 0:
        raise UserError("ppo.epochs must be positive, ppo.critic_warmup_steps and ppo.critic_lr >= 0")
      if rl.advantage == "grpo" and rl.samples_per_prompt < 2:
        raise UserError("ppo.advantage=grpo normalises over each prompt's samples: set ppo.samples_per_prompt >= 2")
      if not (0.0 <= rl.gamma <= 1.0 and 0.0 <= rl.lam <= 1.0) or rl.clip <= 0 or rl.value_clip <= 0:
        raise UserError("ppo.gamma and ppo.lam must be in [0, 1], ppo.clip and ppo.value_clip positive")
      if rl.clip_high is not None and rl.clip_high <= 0:
        raise UserError(f"ppo.clip_high={rl.clip_high}: must be positive (or null: ppo.clip)")
      if rl.drop_flat_groups and rl.advantage != "grpo":
        raise UserError("ppo.drop_flat_groups drops GRPO groups without signal: set ppo.advantage=grpo")
  for sec in ("train", "dpo", "sft", "reinforce", "ppo"):
    section = getattr(cfg, sec, None)
    if hasattr(section, "lr_schedule") and section.lr_schedule not in ("constant", "cosine"):
      raise UserError(f"{sec}.lr_schedule={section.lr_schedule!r}: expected constant or cosine")
    if hasattr(section, "min_lr") and not 0.0 <= section.min_lr <= section.lr:
      raise UserError(f"{sec}.min_lr={section.min_lr}: must be in [0, {sec}.lr]")
    for name in ("log_every", "eval_every", "eval_batches", "save_every", "sample_every"):
      if hasattr(section, name) and getattr(section, name) < 0:
        raise UserError(f"{sec}.{name}={getattr(section, name)}: must be >= 0 (0: never, or all for eval_batches)")
    if hasattr(section, "keep_checkpoints") and section.keep_checkpoints < 1:
      raise UserError(f"{sec}.keep_checkpoints={section.keep_checkpoints}: must be >= 1 (a resume needs one)")
  dist = getattr(cfg, "dist", None)
  if hasattr(dist, "heartbeat_timeout"):
    if dist.heartbeat_timeout <= 0 or dist.step_timeout < 0:
      raise UserError("dist.heartbeat_timeout must be > 0 and dist.step_timeout >= 0 (0: no limit)")
  data = getattr(cfg, "data", None)
  if hasattr(data, "max_length"):
    if data.max_length < 8:
      raise UserError(f"data.max_length={data.max_length}: must be >= 8")
    if data.pad_multiple <= 0 or data.pad_multiple > data.max_length:
      raise UserError(f"data.pad_multiple={data.pad_multiple}: must be in 1..data.max_length")
    b = data.buckets
    if not (b in ("multiple", "pow2") or (isinstance(b, list) and b and all(isinstance(x, int) and x > 0 for x in b))):
      raise UserError(f"data.buckets={b!r}: expected multiple, pow2 or a list of positive lengths")
    for key in ("domains", "languages"):
      values = getattr(data, key)
      if values is not None and (not values or not all(isinstance(v, str) and v.strip() for v in values)):
        raise UserError(f"data.{key}={values!r}: expected a non-empty list of names")
      if values is not None and data.format != "helpsteer3-preference":
        raise UserError(f"data.{key} filters helpsteer3-preference records; data.format={data.format!r}")
    if data.share_prompt and not data.packing:
      raise UserError("data.share_prompt=true needs data.packing=true (a shared pair is one packed segment)")


def _is_model(section) -> bool:
  """A `model:` / `policy:` section (ModelConfig) or a tool's runtime keys (RuntimeConfig)."""
  return hasattr(section, "attention") and hasattr(section, "dtype")
