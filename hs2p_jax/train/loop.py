"""The one training loop: restore, steps, logging, the non-finite guard, checkpoints, final save.

A trainer is its pure step function plus a batch source; it gives the loop:
  params, opt_state          the state a checkpoint holds (with `loader.get_state()`)
  loader                     its batch source (a `data.pipeline.Loader`)
  provenance()               write provenance.json and print the start-of-run data report
  begin(start)               start reading batches at step `start` (after a restore)
  step(step) -> metrics      run one optimizer step; metrics may stay on the device
  record(step, metrics)      the host record to log at `step` (fetches)
  evaluate() -> dict         validation metrics, merged into the record every `eval_every` steps
                             and at the last step (logged there whatever `log_every` says)
  after_step(step)           (optional) side outputs of a step (e.g. REINFORCE's samples.jsonl)
  save_final()               write the final model
Running the same loop again on the same directory resumes from the newest readable checkpoint,
and `metrics.jsonl` then holds each step once with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax

from hs2p_jax.atomic import write_json
from hs2p_jax.checkpoint import RunCheckpoints, abstract_like
from hs2p_jax.train.guard import FiniteGuard
from hs2p_jax.train.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  log_every: int = 1
  save_every: int = 50
  keep_checkpoints: int = 2
  async_checkpoint: bool = False
  name: str | None = None
  eval_every: int = 0          # 0: evaluate at the last step only


class Trainer(Protocol):
  params: Any
  opt_state: Any
  loader: Any

  def provenance(self) -> None: ...
  def begin(self, start: int) -> None: ...
  def step(self, step: int) -> dict[str, Any]: ...
  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]: ...
  def evaluate(self) -> dict[str, Any]: ...
  def save_final(self) -> None: ...


def run(trainer: Trainer, loop: LoopConfig, out_dir: str, config: dict[str, Any]) -> dict[str, Any]:
  """Trains (or resumes) `trainer` to `loop.steps` in `out_dir`; returns the last logged record."""
  os.makedirs(out_dir, exist_ok=True)
  if jax.process_index() == 0:
    write_json(os.path.join(out_dir, "config.json"), config)
  trainer.provenance()
  ckpts = RunCheckpoints(out_dir, loop.keep_checkpoints, loop.async_checkpoint)
  start, state, data_state = ckpts.restore_latest({"params": abstract_like(trainer.params),
                                                   "opt_state": abstract_like(trainer.opt_state)})
  if start:
    trainer.params, trainer.opt_state = state["params"], state["opt_state"]
    trainer.loader.set_state(data_state["loader"])
  trainer.begin(start)
  writer = MetricsWriter(out_dir, loop.steps, start, stage=loop.name)
  guard = FiniteGuard(out_dir, start or None)
  last: dict[str, Any] = {}
  try:
    for step in range(start + 1, loop.steps + 1):
      metrics = trainer.step(step)
      guard.update(step, metrics)  # on the device: no sync here
      final = step == loop.steps
      evaluating = final or bool(loop.eval_every and step % loop.eval_every == 0)
      if step % loop.log_every == 0 or evaluating:
        guard.check()
        rec = trainer.record(step, metrics)
        if evaluating:
          rec.update(trainer.evaluate())
        last = writer.log(step, rec)
      if hasattr(trainer, "after_step"):
        trainer.after_step(step)
      if step % loop.save_every == 0 or final:
        guard.check()  # never a checkpoint of non-finite params
        ckpts.save(step, {"params": trainer.params, "opt_state": trainer.opt_state},
                   {"loader": trainer.loader.get_state()}, force=final)
        guard.saved(step)
    guard.check()
    ckpts.wait()
    trainer.save_final()
  finally:
    ckpts.close()
    writer.close()
  return last


def host_record(metrics: dict[str, Any]) -> dict[str, float]:
  """A step's metrics fetched to the host as floats."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
