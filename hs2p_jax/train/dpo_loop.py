"""`hs2p train-dpo`: DPO (regular, margin, scaled) against a frozen copy of the initial policy, on the shared loop (`train.loop`)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hs2p_jax import provenance
from hs2p_jax.checkpoint import ModelMeta, save_model
from hs2p_jax.config import DPORunConfig, to_dict
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.eval.scoring import collect
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import batch_split, make_mesh, opt_state_shardings, rules_from, state_shardings, use_mesh
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.dpo import eval_metrics, make_dpo_eval, make_dpo_step
from hs2p_jax.train.feed import gather_processes, put_batch
from hs2p_jax.train.loop import LoopConfig, run as run_loop
from hs2p_jax.train.model_init import build_model, tokenizer_spec
from hs2p_jax.train.optim import optimizer_from, schedule
from hs2p_jax.train.rm import stack_micro_batches


class DPOTrainer:
  """One DPO run: the policy, its frozen reference (the initial policy), the jitted step; `run()`
  trains to `dpo.steps`. The reference's log-probs are computed in each step (no cache to keep in
  step with the data order or a resume)."""

  def __init__(self, cfg: DPORunConfig, out_dir: str):
    self.cfg, self.out_dir = cfg, os.path.abspath(out_dir)
    dc = cfg.dpo
    self.mesh, self.rules = make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
    self.micro = dc.micro_batch_size or dc.batch_size
    self.accum = dc.batch_size // self.micro
    tokenizer = load_tokenizer(tokenizer_spec(cfg.policy))
    self.loader = self._loader(tokenizer, "train")  # data first: a bad file fails before any model loads
    self.val_loader = self._loader(tokenizer, "validation") if cfg.data.validation else None
    with use_mesh(self.mesh, self.rules):
      policy, self.meta, self.tokenizer = build_model(cfg.policy, self.mesh, self.rules)
    if self.meta.kind != "lm":
      raise UserError("train-dpo: policy.kind must be lm")
    self.graphdef, self.params = nnx.split(policy)
    self.ref_params = jax.tree.map(jnp.copy, self.params)  # the frozen reference
    self.tx = optimizer_from(dc)
    self.lr_at = schedule(dc.lr, dc.warmup_steps)
    param_sh = state_shardings(self.params, self.mesh, self.rules)
    self.opt_sh = opt_state_shardings(jax.eval_shape(self.tx.init, self.params), param_sh, self.mesh)
    with use_mesh(self.mesh, self.rules):
      self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.params)
    self._step = jax.jit(make_dpo_step(self.graphdef, self.tx, dc.variant, dc.beta), donate_argnums=(0, 1),
                         out_shardings=(param_sh, self.opt_sh, None))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._eval = jax.jit(make_dpo_eval(self.graphdef), out_shardings=replicated)

  def _loader(self, tokenizer, split: str):
    train = split == "train"
    return make_loader(self.cfg.data, tokenizer, split=split, task="pairs", batch_size=self.micro,
                       seed=self.cfg.dpo.seed if train else 0, shuffle=train, repeat=train,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       cache_dir=os.path.join(self.out_dir, "data"), row_multiple=batch_split(self.mesh, self.rules),
                       targets=True)

  def evaluate(self) -> dict[str, float]:
    """Validation loss, implicit-reward accuracy and margin, rewards and drift over the validation pairs."""
    if self.val_loader is None:
      return {}
    evaluate = lambda params, batch: self._eval(params, self.ref_params, batch)  # noqa: E731
    with use_mesh(self.mesh, self.rules):
      res = collect(evaluate, self.params, self.val_loader, self.mesh, self.rules, self.cfg.dpo.eval_batches)
    m = eval_metrics(res["outputs"], res["magnitude"], self.cfg.dpo.variant, self.cfg.dpo.beta)
    return {f"val_{k}": v for k, v in m.items()}

  # -- the loop's trainer protocol (train/loop.py) ----------------------------------------------

  def provenance(self) -> None:
    dc = self.cfg.dpo
    data = {"train": provenance.data_entry(self.loader, dc.steps, dc.batch_size)}
    if self.val_loader is not None:
      data["validation"] = provenance.data_entry(self.val_loader)
    if jax.process_index() == 0:
      for name, entry in data.items():
        print(provenance.describe(name, entry), file=sys.stderr, flush=True)
    provenance.write(self.out_dir, self.mesh, data, model={"source": self.cfg.policy.source,
                                                            "init_from": self.cfg.policy.init_from})

  def begin(self, start: int) -> None:
    self._it = iter(self.loader)
    self._t0, self._tokens = time.time(), 0

  def step(self, step: int) -> dict[str, Any]:
    micro = [gather_processes(next(self._it)) for _ in range(self.accum)]
    self._tokens += sum(int(np.count_nonzero(b["segment_ids"])) for b in micro)
    batch = put_batch(stack_micro_batches(micro), self.mesh, self.rules, stacked=True)
    with use_mesh(self.mesh, self.rules):
      self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.ref_params, batch)
    return metrics

  def _evaluates(self, step: int) -> bool:
    dc = self.cfg.dpo
    return step == dc.steps or bool(dc.eval_every and step % dc.eval_every == 0)

  def log_now(self, step: int) -> bool:
    return self._evaluates(step)

  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
    rec.update(lr=float(self.lr_at(step - 1)), tokens_per_s=self._tokens / max(time.time() - self._t0, 1e-9))
    if self._evaluates(step):
      rec.update(self.evaluate())
    self._t0, self._tokens = time.time(), 0
    return rec

  def after_step(self, step: int) -> None:
    pass

  def save_final(self) -> None:
    save_model(os.path.join(self.out_dir, "model"), nnx.merge(self.graphdef, self.params),
               ModelMeta(kind="lm", config=self.meta.config, template=self.cfg.data.template), self.tokenizer,
               overwrite=True)

  def run(self) -> dict[str, Any]:
    dc = self.cfg.dpo
    loop = LoopConfig(dc.steps, dc.log_every, dc.save_every, dc.keep_checkpoints, dc.async_checkpoint, self.cfg.name)
    return run_loop(self, loop, self.out_dir, to_dict(self.cfg))


def train_dpo(cfg: DPORunConfig, out_dir: str) -> dict[str, Any]:
  """Trains (or resumes) a DPO policy into `out_dir`; returns the last logged metrics."""
  return DPOTrainer(cfg, out_dir).run()
