"""`hs2p train-dpo`: DPO (regular, margin, scaled) against a frozen copy of the initial policy, on the shared trainer.

The reference's log-probs are computed in each step (no cache to keep in step with the data order
or a resume); it is held in `dpo.frozen_dtype` (default: the policy's compute dtype) and kept once
under `DIR/frozen/reference`, so that a resume does not read the source weights."""

from __future__ import annotations

from typing import Any

import jax

from hs2p_jax.config import DPORunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.feed import StepFeed, micro_batch_rows, stacked_spec
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import Rules, make_mesh, rules_from
from hs2p_jax.train import dpo
from hs2p_jax.train.model_init import architecture, model_meta, run_tokenizer
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.state import Part, RunState, Step, frozen_dtype, initial_copy
from hs2p_jax.train.trainer import INITIAL, Trainer, on_validation, replicated_jit, run_datasets, train


def blueprint(cfg: DPORunConfig, mesh: Any, rules: Rules, arch: LlamaConfig | None = None) -> Step:
  """The policy (trained), its AdamW state and the frozen reference, and the jitted DPO step. A
  LoRA policy trains its adapters over the frozen base; its reference is its initial adapters."""
  dc = cfg.dpo
  arch = arch or architecture(cfg.policy)[0]
  reference = initial_copy(arch, frozen_dtype(dc.frozen_dtype, arch.dtype))
  state = RunState.build(Part("lm", arch), {"reference": reference}, optimizer_from(dc), mesh, rules)
  return Step(state, dpo.make_dpo_step(state.graphdef, state.tx, dc.variant, dc.beta), takes=("reference",))


def batch_spec(cfg: DPORunConfig, mesh: Any, rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's stacked pair batch with log-prob targets at data.max_length tokens."""
  dc = cfg.dpo
  micro = dc.micro_batch_size or dc.batch_size
  return stacked_spec("pairs", micro, dc.batch_size // micro, cfg.data.max_length, mesh, rules, targets=True,
                      shared=cfg.data.share_prompt, right_padded=not cfg.data.packing)


def trainer(cfg: DPORunConfig, out_dir: str) -> Trainer:
  """The DPO run of `cfg` in `out_dir` (its data read, its weights not yet)."""
  if cfg.policy.kind != "lm":
    raise UserError("train-dpo: policy.kind must be lm")
  dc, mesh, rules = cfg.dpo, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  micro = dc.micro_batch_size or dc.batch_size
  tokenizer = run_tokenizer(cfg.policy, "policy")  # checked against the weights before any data is read
  sets = run_datasets(cfg.data, tokenizer, "pairs", dc, out_dir, mesh, rules, True)  # data first: a bad file fails now
  step = blueprint(cfg, mesh, rules)
  eval_step = replicated_jit(dpo.make_dpo_eval(step.state.graphdef), mesh)
  evaluate = on_validation(  # loss, implicit-reward accuracy and margin, rewards and drift
      sets, dc, mesh, rules, lambda t: lambda p, b: eval_step(p, t.frozen_params("reference"), b),
      lambda res: dpo.eval_metrics(res["outputs"], res["magnitude"], dc.variant, dc.beta))
  meta = model_meta(cfg.policy, step.state.trainable.config, cfg.data.template, cfg.data.max_length)
  batch = {**micro_batch_rows("dpo.micro_batch_size", micro, 2, mesh, rules, cfg.mesh.allow_padding, cfg.data.packing),
           "micro_batches": dc.batch_size // micro}
  feed = StepFeed(sets["train"][0], dc.batch_size // micro, mesh, rules)
  return Trainer(cfg, out_dir, section=dc, model=cfg.policy, step=step,
                 source=feed, tokenizer=tokenizer,
                 meta=meta, frozen_from={"reference": INITIAL}, evaluate=evaluate, datasets=sets, batch_info=batch,
                 compile_for=feed.specs("pairs", micro, targets=True, shared=cfg.data.share_prompt))


def train_dpo(cfg: DPORunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) a DPO policy into `out_dir`; returns the last logged metrics."""
  return train("train-dpo", trainer, cfg, out_dir, allow_config_change)
