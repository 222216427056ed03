"""`hs2p train-rm`: the reward-model training loop (data, steps, evaluation, checkpoints, logging)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from hs2p_jax import provenance
from hs2p_jax.checkpoint import RunCheckpoints, abstract_like, save_model
from hs2p_jax.config import RunConfig, to_dict
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.eval.scoring import collect, pair_metrics, regression_metrics
from hs2p_jax.atomic import write_json
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import batch_split, make_mesh, opt_state_shardings, rules_from, state_shardings, use_mesh
from hs2p_jax.train.feed import gather_processes, put_batch
from hs2p_jax.train.guard import FiniteGuard
from hs2p_jax.train.metrics import MetricsWriter
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.model_init import build_model, tokenizer_spec, with_template
from hs2p_jax.train.optim import optimizer_from, schedule
from hs2p_jax.train.rm import Objective, make_eval_step, make_train_step, stack_micro_batches


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

  def _record_provenance(self) -> None:
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

  def _restore(self, ckpts: RunCheckpoints) -> int:
    target = {"params": abstract_like(self.params), "opt_state": abstract_like(self.opt_state)}
    step, state, data_state = ckpts.restore_latest(target)
    if not step:
      return 0
    self.params, self.opt_state = state["params"], state["opt_state"]
    self.loader.set_state(data_state["loader"])
    return step

  def run(self) -> dict[str, Any]:
    cfg, tc = self.cfg, self.cfg.train
    os.makedirs(self.out_dir, exist_ok=True)
    if jax.process_index() == 0:
      write_json(os.path.join(self.out_dir, "config.json"), to_dict(cfg))
    self._record_provenance()
    ckpts = RunCheckpoints(self.out_dir, tc.keep_checkpoints, tc.async_checkpoint)
    start = self._restore(ckpts)
    writer = MetricsWriter(self.out_dir, tc.steps, start, stage=cfg.name)
    it = iter(self.loader)
    last: dict[str, Any] = {}
    t0, tokens = time.time(), 0
    guard = FiniteGuard(self.out_dir, start or None)
    try:
      for step in range(start + 1, tc.steps + 1):
        micro = [gather_processes(next(it)) for _ in range(self.accum)]
        tokens += sum(int(np.count_nonzero(b["segment_ids"])) for b in micro)
        batch = put_batch(stack_micro_batches(micro), self.mesh, self.rules, stacked=True)
        with use_mesh(self.mesh, self.rules):
          self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, batch)
        guard.update(step, metrics)
        evaluate = step == tc.steps or bool(tc.eval_every and step % tc.eval_every == 0)
        if step % tc.log_every == 0 or step == tc.steps or evaluate:
          guard.check()
          rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.time() - t0
          rec.update(lr=float(self.lr_at(step - 1)), tokens_per_s=tokens / max(elapsed, 1e-9))
          if evaluate:
            rec.update(self.evaluate())
          last = writer.log(step, rec)
          t0, tokens = time.time(), 0
        if step % tc.save_every == 0 and step != tc.steps:
          guard.check()
          ckpts.save(step, {"params": self.params, "opt_state": self.opt_state},
                     {"loader": self.loader.get_state()})
          guard.saved(step)
      guard.check()
      if start < tc.steps:
        ckpts.save(tc.steps, {"params": self.params, "opt_state": self.opt_state},
                   {"loader": self.loader.get_state()}, force=True)
      ckpts.wait()
      model_dir = os.path.join(self.out_dir, "model")
      save_model(model_dir, nnx.merge(self.graphdef, self.params), self.meta, self.tokenizer, overwrite=True)
    finally:
      ckpts.close()
      writer.close()
    return last


def train_rm(cfg: RunConfig, out_dir: str) -> dict[str, Any]:
  """Trains (or resumes) a reward model into `out_dir`; returns the last logged metrics."""
  return RMTrainer(cfg, out_dir).run()
