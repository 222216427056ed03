"""The one training loop: restore, steps, logging, the non-finite guard, checkpoints, final save.

The loop holds every side effect of a run; a trainer (`train.trainer.Trainer`, or any object with
these members) gives it:
  loader                     its batch source's position (`get_state()` / `set_state()`), checkpointed
  checkpoint_target()        the abstract tree a checkpoint holds (ShapeDtypeStructs with shardings)
  snapshot_targets()         {name: abstract tree} of frozen models derived from the source, which the
                             run keeps once under DIR/frozen/ (the DPO / REINFORCE reference)
  start(restored, snapshots) fill the state: from a checkpoint (`restored`, and the snapshots found) or,
                             with `restored` None, from the source weights
  checkpoint_state()         the tree to checkpoint;  snapshot(name): a frozen model to keep
  provenance()               write provenance.json and print the start-of-run data report
  begin(start)               start reading batches at step `start` (after a restore)
  step(step) -> metrics      run one optimizer step; metrics may stay on the device; a `_samples` entry
                             (a list of dicts) is appended to samples.jsonl
  record(step, metrics)      the host record to log at `step` (fetches)
  evaluate() -> dict         validation metrics, merged into the record every `eval_every` steps
                             and at the last step (logged there whatever `log_every` says)
  save_final()               write the final model
Running the same loop again on the same directory resumes from the newest readable checkpoint
without reading the source weights, and `metrics.jsonl` then holds each step once with the numbers
of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax

from hs2p_jax.atomic import write_json
from hs2p_jax.checkpoint import RunCheckpoints
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
  loader: Any

  def checkpoint_target(self) -> Any: ...
  def snapshot_targets(self) -> dict[str, Any]: ...
  def start(self, restored: Any | None, snapshots: dict[str, Any]) -> None: ...
  def checkpoint_state(self) -> Any: ...
  def snapshot(self, name: str) -> Any: ...
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
  start, state, data_state = ckpts.restore_latest(trainer.checkpoint_target())
  snapshots = trainer.snapshot_targets()
  if start:
    trainer.start(state, {name: ckpts.restore_snapshot(name, target) for name, target in snapshots.items()})
    trainer.loader.set_state(data_state["loader"])
  else:
    trainer.start(None, {})
    for name in snapshots:
      ckpts.save_snapshot(name, trainer.snapshot(name))
  trainer.begin(start)
  writer = MetricsWriter(out_dir, loop.steps, start, stage=loop.name)
  guard = FiniteGuard(out_dir, start or None)
  last: dict[str, Any] = {}
  try:
    for step in range(start + 1, loop.steps + 1):
      metrics = trainer.step(step)
      samples = metrics.pop("_samples", None)
      guard.update(step, metrics)  # on the device: no sync here
      final = step == loop.steps
      evaluating = final or bool(loop.eval_every and step % loop.eval_every == 0)
      if step % loop.log_every == 0 or evaluating:
        guard.check()
        rec = trainer.record(step, metrics)
        if evaluating:
          rec.update(trainer.evaluate())
        last = writer.log(step, rec)
      if samples:
        writer.samples(step, samples)
      if step % loop.save_every == 0 or final:
        guard.check()  # never a checkpoint of non-finite params
        ckpts.save(step, trainer.checkpoint_state(), {"loader": trainer.loader.get_state()}, force=final)
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
