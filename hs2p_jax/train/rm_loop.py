"""`hs2p train-rm`: the reward-model trainer (data, jitted steps, evaluation) on the shared loop (`train.loop`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from hs2p_jax import provenance
from hs2p_jax.checkpoint import save_model
from hs2p_jax.config import RunConfig, to_dict
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.eval.scoring import collect, pair_metrics, regression_metrics
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import batch_split, make_mesh, opt_state_shardings, rules_from, state_shardings, use_mesh
from hs2p_jax.train.feed import StepFeed
from hs2p_jax.train.loop import LoopConfig, host_record, run as run_loop
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.model_init import build_model, tokenizer_spec, with_template
from hs2p_jax.train.optim import optimizer_from, schedule
from hs2p_jax.train.rm import Objective, make_eval_step, make_train_step


class RMTrainer:
  """Holds the jitted steps and the state of one reward-model run; `run()` trains to `train.steps`."""

  def __init__(self, cfg: RunConfig, out_dir: str):
    self.cfg, self.out_dir = cfg, os.path.abspath(out_dir)
    self.mesh = make_mesh(cfg.mesh)
    self.rules = rules_from(cfg.mesh.rules)
    tc = cfg.train
    if cfg.model.kind != "reward":
      raise UserError(f"train-rm needs model.kind=reward, got {cfg.model.kind!r}")
    self.task = "regression" if tc.objective == "regression" else "pairs"
    self.micro = tc.micro_batch_size or tc.batch_size
    self.accum = tc.batch_size // self.micro
    self.cache_dir = os.path.join(self.out_dir, "data")
    # data first: a bad file fails in seconds, before any model is loaded
    tokenizer = load_tokenizer(tokenizer_spec(cfg.model))
    self.loader = self._loader(cfg.data, tokenizer, "train", self.task)
    self.feed = StepFeed(self.loader, self.accum, self.mesh, self.rules)
    self.val_loader = self._loader(cfg.data, tokenizer, "validation", self.task) if cfg.data.validation else None
    self.pair_loader = None
    if cfg.data.eval_pairs:
      pairs = type(cfg.data)(**{**to_dict(cfg.data), "validation": cfg.data.eval_pairs,
                                "format": cfg.data.eval_pairs_format})
      self.pair_loader = self._loader(pairs, tokenizer, "validation", "pairs")
    with use_mesh(self.mesh, self.rules):
      model, meta, self.tokenizer = build_model(cfg.model, self.mesh, self.rules)
    self.meta = with_template(meta, cfg.data.template)
    self.graphdef, self.params = nnx.split(model)
    weights = tuple(float(w) for w in attribute_weights(cfg.model.reward_weights, meta.num_attributes))
    self.objective = Objective(tc.objective, tc.bt_variant, weights)
    self.tx = optimizer_from(tc)
    self.lr_at = schedule(tc.lr, tc.warmup_steps)
    self.param_sh = state_shardings(self.params, self.mesh, self.rules)
    self.opt_sh = opt_state_shardings(jax.eval_shape(self.tx.init, self.params), self.param_sh, self.mesh)
    with use_mesh(self.mesh, self.rules):
      self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.params)
    self._step = jax.jit(make_train_step(self.graphdef, self.tx, self.objective), donate_argnums=(0, 1),
                         out_shardings=(self.param_sh, self.opt_sh, None))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._eval = jax.jit(make_eval_step(self.graphdef), out_shardings=replicated)

  def _loader(self, data, tokenizer, split: str, task: str):
    train = split == "train"
    return make_loader(data, tokenizer, split=split, task=task, batch_size=self.micro,
                       seed=self.cfg.train.seed if train else 0, shuffle=train, repeat=train,
                       process_index=jax.process_index(), process_count=jax.process_count(), cache_dir=self.cache_dir,
                       row_multiple=batch_split(self.mesh, self.rules))

  # -- evaluation -------------------------------------------------------------------------------

  def evaluate(self) -> dict[str, float]:
    """Validation metrics: loss and pairwise accuracy (BT), MSE (regression) and, with
    `data.eval_pairs`, pairwise accuracy of the regression model's scalar reward."""
    out = {}
    if self.val_loader is not None:
      res = self._collect(self.val_loader)
      if self.task == "pairs":
        rewards = res["outputs"] @ np.asarray(self.objective.weights, np.float32)
        m = pair_metrics(rewards, res["magnitude"], self.objective.bt_variant)
        out.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
      else:
        m = regression_metrics(res["outputs"], res["labels"], res["label_mask"])
        out.update(val_loss=m["loss"])
    if self.pair_loader is not None:
      res = self._collect(self.pair_loader)
      rewards = res["outputs"] @ np.asarray(self.objective.weights, np.float32)
      out["val_pair_accuracy"] = pair_metrics(rewards)["accuracy"]
    return out

  def _collect(self, loader):
    with use_mesh(self.mesh, self.rules):
      return collect(self._eval, self.params, loader, self.mesh, self.rules, self.cfg.train.eval_batches)

  # -- training ---------------------------------------------------------------------------------

  def provenance(self) -> None:
    """provenance.json, and one line per data set at the start: kept/dropped/truncated, epochs."""
    tc = self.cfg.train
    data = {"train": provenance.data_entry(self.loader, tc.steps, tc.batch_size)}
    if self.val_loader is not None:
      data["validation"] = provenance.data_entry(self.val_loader)
    if self.pair_loader is not None:
      data["eval_pairs"] = provenance.data_entry(self.pair_loader)
    split = batch_split(self.mesh, self.rules)
    rows = self.micro * (1 if self.task == "regression" else 2)
    batch = {"micro_batch_rows": rows, "batch_split": split, "micro_batches": self.accum}
    lines = [provenance.describe(name, entry) for name, entry in data.items()]
    if not self.cfg.data.packing and rows % split:
      padded = -(-rows // split) * split
      batch["padded_rows"] = padded
      lines.append(f"train.micro_batch_size={self.micro}: {rows} rows per micro-batch, padded to {padded} to split "
                   f"over the mesh's batch axes ({split} devices): {1 - rows / padded:.0%} of the rows are padding")
    if jax.process_index() == 0:
      for line in lines:
        print(line, file=sys.stderr, flush=True)
    m = self.cfg.model
    provenance.write(self.out_dir, self.mesh, data, batch=batch,
                     model={"source": m.source, "init_from": m.init_from})

  def begin(self, start: int) -> None:
    self.feed.begin()

  def step(self, step: int) -> dict[str, Any]:
    batch = self.feed.next()
    with use_mesh(self.mesh, self.rules):
      self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, batch)
    return metrics

  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {**host_record(metrics), "lr": float(self.lr_at(step - 1)), "tokens_per_s": self.feed.tokens_per_s()}

  def save_final(self) -> None:
    save_model(os.path.join(self.out_dir, "model"), nnx.merge(self.graphdef, self.params), self.meta, self.tokenizer,
               overwrite=True)

  def run(self) -> dict[str, Any]:
    tc = self.cfg.train
    loop = LoopConfig(tc.steps, tc.log_every, tc.save_every, tc.keep_checkpoints, tc.async_checkpoint, self.cfg.name,
                      tc.eval_every)
    return run_loop(self, loop, self.out_dir, to_dict(self.cfg))


def train_rm(cfg: RunConfig, out_dir: str) -> dict[str, Any]:
  """Trains (or resumes) a reward model into `out_dir`; returns the last logged metrics."""
  return RMTrainer(cfg, out_dir).run()
