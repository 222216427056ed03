"""`hs2p train-sft`: supervised fine-tuning on (prompt, response) examples, on the shared trainer."""

from __future__ import annotations

from typing import Any

import jax

from hs2p_jax.config import SFTRunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.feed import StepFeed, micro_batch_rows, stacked_spec
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import Rules, make_mesh, rules_from
from hs2p_jax.train import sft
from hs2p_jax.train.model_init import architecture, model_meta, run_tokenizer
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.state import Part, RunState, Step
from hs2p_jax.train.trainer import Trainer, on_validation, replicated_jit, run_datasets, train


def blueprint(cfg: SFTRunConfig, mesh: Any, rules: Rules, arch: LlamaConfig | None = None) -> Step:
  """The policy (trained) and its AdamW state, and the jitted SFT step."""
  part = Part("lm", arch or architecture(cfg.policy)[0])
  state = RunState.build(part, {}, optimizer_from(cfg.sft), mesh, rules)
  return Step(state, sft.make_sft_step(state.graphdef, state.tx))


def batch_spec(cfg: SFTRunConfig, mesh: Any, rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's stacked SFT batch at data.max_length tokens."""
  sc = cfg.sft
  micro = sc.micro_batch_size or sc.batch_size
  return stacked_spec("sft", micro, sc.batch_size // micro, cfg.data.max_length, mesh, rules,
                      right_padded=not cfg.data.packing)


def trainer(cfg: SFTRunConfig, out_dir: str) -> Trainer:
  """The SFT run of `cfg` in `out_dir` (its data read, its weights not yet)."""
  if cfg.policy.kind != "lm":
    raise UserError("train-sft: policy.kind must be lm")
  sc, mesh, rules = cfg.sft, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  micro = sc.micro_batch_size or sc.batch_size
  tokenizer = run_tokenizer(cfg.policy, "policy")  # checked against the weights before any data is read
  sets = run_datasets(cfg.data, tokenizer, "sft", sc, out_dir, mesh, rules)  # data first: a bad file fails now
  step = blueprint(cfg, mesh, rules)
  eval_step = replicated_jit(sft.make_sft_eval(step.state.graphdef), mesh)
  evaluate = on_validation(sets, sc, mesh, rules, lambda t: eval_step,  # token-mean NLL, perplexity
                           lambda res: sft.eval_metrics(res["outputs"]))
  meta = model_meta(cfg.policy, step.state.trainable.config, cfg.data.template, cfg.data.max_length)
  batch = {**micro_batch_rows("sft.micro_batch_size", micro, 1, mesh, rules, cfg.mesh.allow_padding, cfg.data.packing),
           "micro_batches": sc.batch_size // micro}
  feed = StepFeed(sets["train"][0], sc.batch_size // micro, mesh, rules)
  return Trainer(cfg, out_dir, section=sc, model=cfg.policy, step=step,
                 source=feed, tokenizer=tokenizer,
                 meta=meta, evaluate=evaluate, datasets=sets, batch_info=batch,
                 compile_for=feed.specs("sft", micro))


def train_sft(cfg: SFTRunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Fine-tunes (or resumes) a policy on (prompt, response) examples into `out_dir`."""
  return train("train-sft", trainer, cfg, out_dir, allow_config_change)
