"""`hs2p train-rm`: a reward model trained by SteerLM regression or Bradley-Terry, on the shared trainer."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hs2p_jax.config import RunConfig, to_dict
from hs2p_jax.errors import UserError
from hs2p_jax.eval.scoring import collect, pair_metrics, regression_metrics
from hs2p_jax.feed import StepFeed, micro_batch_rows, stacked_spec
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.model.scoring import make_eval_step
from hs2p_jax.sharding import Rules, make_mesh, rules_from, use_mesh
from hs2p_jax.train.model_init import architecture, model_meta, run_tokenizer
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.rm import Objective, make_train_step
from hs2p_jax.train.state import Part, RunState, Step
from hs2p_jax.train.trainer import Trainer, replicated_jit, run_datasets, run_loader, train


def objective(cfg: RunConfig) -> Objective:
  weights = attribute_weights(cfg.model.reward_weights, cfg.model.num_attributes)
  return Objective(cfg.train.objective, cfg.train.bt_variant, tuple(float(w) for w in weights))


def task(cfg: RunConfig) -> str:
  return "regression" if cfg.train.objective == "regression" else "pairs"


def blueprint(cfg: RunConfig, mesh: Any, rules: Rules, arch: LlamaConfig | None = None) -> Step:
  """The run's state and jitted step from the config alone (`arch` overrides the architecture):
  what the trainer fills and runs, and what `hs2p plan` compiles."""
  mc = cfg.model
  part = Part("reward", arch or architecture(mc)[0], mc.num_attributes)
  state = RunState.build(part, {}, optimizer_from(cfg.train), mesh, rules)
  return Step(state, make_train_step(state.graphdef, state.tx, objective(cfg)))


def batch_spec(cfg: RunConfig, mesh: Any, rules: Rules, rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's stacked batch at data.max_length tokens, placed as the feed places it: one row per
  sequence, or `rows` rows (a packed batch)."""
  tc = cfg.train
  micro = tc.micro_batch_size or tc.batch_size
  return stacked_spec(task(cfg), micro, tc.batch_size // micro, cfg.data.max_length, mesh, rules,
                      cfg.model.num_attributes, shared=cfg.data.share_prompt, rows=rows,
                      right_padded=not cfg.data.packing)


def trainer(cfg: RunConfig, out_dir: str) -> Trainer:
  """The reward-model run of `cfg` in `out_dir` (its data read, its weights not yet)."""
  if cfg.model.kind != "reward":
    raise UserError(f"train-rm needs model.kind=reward, got {cfg.model.kind!r}")
  tc, mesh, rules = cfg.train, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
  micro = tc.micro_batch_size or tc.batch_size
  tokenizer = run_tokenizer(cfg.model, "model")  # checked against the weights before any data is read

  sets = run_datasets(cfg.data, tokenizer, task(cfg), tc, out_dir, mesh, rules)  # data first: a bad file fails now
  if cfg.data.eval_pairs:
    pairs = type(cfg.data)(**{**to_dict(cfg.data), "validation": cfg.data.eval_pairs,
                              "format": cfg.data.eval_pairs_format})
    sets["eval_pairs"] = (run_loader(pairs, tokenizer, "validation", "pairs", micro, 0, out_dir, mesh, rules), None,
                          None)
  step = blueprint(cfg, mesh, rules)
  eval_step = replicated_jit(make_eval_step(step.state.graphdef), mesh)
  weights = np.asarray(objective(cfg).weights, np.float32)

  def evaluate(t: Trainer) -> dict[str, float]:
    """Validation loss and pairwise accuracy (BT), MSE (regression) and, with `data.eval_pairs`,
    pairwise accuracy of the regression model's scalar reward."""
    out = {}
    for name in ("validation", "eval_pairs"):
      if name not in sets:
        continue
      with use_mesh(mesh, rules):
        res = collect(eval_step, t.model_params(), sets[name][0], mesh, rules, tc.eval_batches)
      if name == "eval_pairs":
        out["val_pair_accuracy"] = pair_metrics(res["outputs"] @ weights)["accuracy"]
      elif task(cfg) == "pairs":
        m = pair_metrics(res["outputs"] @ weights, res["magnitude"], tc.bt_variant)
        out.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
      else:
        out["val_loss"] = regression_metrics(res["outputs"], res["labels"], res["label_mask"])["loss"]
    return out

  batch = {**micro_batch_rows("train.micro_batch_size", micro, 1 if task(cfg) == "regression" else 2, mesh, rules,
                              cfg.mesh.allow_padding, cfg.data.packing), "micro_batches": tc.batch_size // micro}
  notes = ()
  if "padded_rows" in batch:
    notes = (f"train.micro_batch_size={micro}: {batch['micro_batch_rows']} rows per micro-batch, padded to "
             f"{batch['padded_rows']} to split over the mesh's batch axes ({batch['batch_split']} devices)",)
  meta = model_meta(cfg.model, step.state.trainable.config, cfg.data.template, cfg.data.max_length)
  feed = StepFeed(sets["train"][0], tc.batch_size // micro, mesh, rules)
  return Trainer(cfg, out_dir, section=tc, model=cfg.model, step=step,
                 source=feed, tokenizer=tokenizer,
                 meta=meta, evaluate=evaluate, datasets=sets, batch_info=batch, notes=notes,
                 compile_for=feed.specs(task(cfg), micro, cfg.model.num_attributes, shared=cfg.data.share_prompt))


def train_rm(cfg: RunConfig, out_dir: str, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) a reward model into `out_dir`; returns the last logged metrics."""
  return train("train-rm", trainer, cfg, out_dir, allow_config_change)
