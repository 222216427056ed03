"""`hs2p train-dpo` and `hs2p train-sft`: the policy trainers on the shared loop (`train.loop`).

DPO (regular, margin, scaled) trains against a frozen copy of the initial policy, on preference
pairs; SFT on (prompt, response) examples. Both read batches with log-prob targets."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hs2p_jax import provenance
from hs2p_jax.checkpoint import ModelMeta, save_model
from hs2p_jax.config import DPORunConfig, SFTRunConfig, to_dict
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.eval.scoring import collect
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import batch_split, make_mesh, opt_state_shardings, rules_from, state_shardings, use_mesh
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train import dpo, sft
from hs2p_jax.train.feed import StepFeed
from hs2p_jax.train.loop import LoopConfig, host_record, run as run_loop
from hs2p_jax.train.model_init import build_model, tokenizer_spec
from hs2p_jax.train.optim import optimizer_from, schedule


class LMTrainer:
  """One DPO or SFT run (`kind`): the policy, for DPO its frozen reference (the initial policy), the
  jitted step; `run()` trains to `steps`. DPO's reference log-probs are computed in each step (no
  cache to keep in step with the data order or a resume)."""

  def __init__(self, cfg: DPORunConfig | SFTRunConfig, out_dir: str, kind: str):
    self.cfg, self.out_dir, self.kind = cfg, os.path.abspath(out_dir), kind
    self.tc = tc = cfg.dpo if kind == "dpo" else cfg.sft
    self.mesh, self.rules = make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
    self.micro = tc.micro_batch_size or tc.batch_size
    self.accum = tc.batch_size // self.micro
    tokenizer = load_tokenizer(tokenizer_spec(cfg.policy))
    self.loader = self._loader(tokenizer, "train")  # data first: a bad file fails before any model loads
    self.feed = StepFeed(self.loader, self.accum, self.mesh, self.rules)
    self.val_loader = self._loader(tokenizer, "validation") if cfg.data.validation else None
    with use_mesh(self.mesh, self.rules):
      policy, self.meta, self.tokenizer = build_model(cfg.policy, self.mesh, self.rules)
    if self.meta.kind != "lm":
      raise UserError(f"train-{kind}: policy.kind must be lm")
    self.graphdef, self.params = nnx.split(policy)
    self.ref_params = jax.tree.map(jnp.copy, self.params) if kind == "dpo" else None  # the frozen reference
    self.tx = optimizer_from(tc)
    self.lr_at = schedule(tc.lr, tc.warmup_steps)
    param_sh = state_shardings(self.params, self.mesh, self.rules)
    self.opt_sh = opt_state_shardings(jax.eval_shape(self.tx.init, self.params), param_sh, self.mesh)
    with use_mesh(self.mesh, self.rules):
      self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.params)
    step = (dpo.make_dpo_step(self.graphdef, self.tx, tc.variant, tc.beta) if kind == "dpo"
            else sft.make_sft_step(self.graphdef, self.tx))
    self._step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, self.opt_sh, None))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._eval = jax.jit(dpo.make_dpo_eval(self.graphdef) if kind == "dpo" else sft.make_sft_eval(self.graphdef),
                         out_shardings=replicated)

  def _loader(self, tokenizer, split: str):
    train = split == "train"
    return make_loader(self.cfg.data, tokenizer, split=split, task="pairs" if self.kind == "dpo" else "sft",
                       batch_size=self.micro, seed=self.tc.seed if train else 0, shuffle=train, repeat=train,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       cache_dir=os.path.join(self.out_dir, "data"), row_multiple=batch_split(self.mesh, self.rules),
                       targets=True)

  def evaluate(self) -> dict[str, float]:
    """Validation metrics: DPO's loss, implicit-reward accuracy and margin, rewards and drift;
    SFT's token-mean NLL and perplexity."""
    if self.val_loader is None:
      return {}
    if self.kind == "dpo":
      evaluate = lambda params, batch: self._eval(params, self.ref_params, batch)  # noqa: E731
    else:
      evaluate = self._eval
    with use_mesh(self.mesh, self.rules):
      res = collect(evaluate, self.params, self.val_loader, self.mesh, self.rules, self.tc.eval_batches)
    m = (dpo.eval_metrics(res["outputs"], res["magnitude"], self.tc.variant, self.tc.beta) if self.kind == "dpo"
         else sft.eval_metrics(res["outputs"]))
    return {f"val_{k}": v for k, v in m.items()}

  # -- the loop's trainer protocol (train/loop.py) ----------------------------------------------

  def provenance(self) -> None:
    data = {"train": provenance.data_entry(self.loader, self.tc.steps, self.tc.batch_size)}
    if self.val_loader is not None:
      data["validation"] = provenance.data_entry(self.val_loader)
    if jax.process_index() == 0:
      for name, entry in data.items():
        print(provenance.describe(name, entry), file=sys.stderr, flush=True)
    provenance.write(self.out_dir, self.mesh, data, model={"source": self.cfg.policy.source,
                                                            "init_from": self.cfg.policy.init_from})

  def begin(self, start: int) -> None:
    self.feed.begin()

  def step(self, step: int) -> dict[str, Any]:
    batch = self.feed.next()
    refs = (self.ref_params,) if self.kind == "dpo" else ()
    with use_mesh(self.mesh, self.rules):
      self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, *refs, batch)
    return metrics

  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {**host_record(metrics), "lr": float(self.lr_at(step - 1)), "tokens_per_s": self.feed.tokens_per_s()}

  def save_final(self) -> None:
    save_model(os.path.join(self.out_dir, "model"), nnx.merge(self.graphdef, self.params),
               ModelMeta(kind="lm", config=self.meta.config, template=self.cfg.data.template), self.tokenizer,
               overwrite=True)

  def run(self) -> dict[str, Any]:
    tc = self.tc
    loop = LoopConfig(tc.steps, tc.log_every, tc.save_every, tc.keep_checkpoints, tc.async_checkpoint, self.cfg.name,
                      tc.eval_every)
    return run_loop(self, loop, self.out_dir, to_dict(self.cfg))


def train_dpo(cfg: DPORunConfig, out_dir: str) -> dict[str, Any]:
  """Trains (or resumes) a DPO policy into `out_dir`; returns the last logged metrics."""
  return LMTrainer(cfg, out_dir, "dpo").run()


def train_sft(cfg: SFTRunConfig, out_dir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) a policy on (prompt, response) examples into `out_dir`."""
  return LMTrainer(cfg, out_dir, "sft").run()
