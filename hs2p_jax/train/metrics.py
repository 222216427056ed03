"""Run logging: `metrics.jsonl` (one JSON object per logged step), `samples.jsonl` (example outputs),
TensorBoard events, a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from hs2p_jax.atomic import write_text


def _clean(v: Any) -> Any:
  try:
    v = float(v) if not isinstance(v, (str, bool, int)) else v
  except (TypeError, ValueError):
    return str(v)
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsWriter:
  """Appends metrics to DIR/metrics.jsonl and DIR/tensorboard/, samples to DIR/samples.jsonl (process 0 only).

  On resume at step k, records after k left by an interrupted run are dropped first, so the files
  read as one uninterrupted run.
  """

  def __init__(self, run_dir: str, total_steps: int, resume_step: int = 0, stage: str | None = None,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.samples_path = os.path.join(run_dir, "samples.jsonl")
    self.total = total_steps
    self.stage = stage
    self.start_time = time.time()
    self.start_step = resume_step
    self.tb = None
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    truncate_jsonl_after(self.path, resume_step)
    truncate_jsonl_after(self.samples_path, resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)
      except ImportError:  # TensorBoard output is optional
        self.tb = None

  def log(self, step: int, metrics: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    if self.stage:
      rec.setdefault("stage", self.stage)
    if not self.enabled:
      return rec
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
    if self.tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(k, v, step)
    if progress:
      self.progress(step, rec)
    return rec

  def samples(self, step: int, samples: list[dict[str, Any]]) -> None:
    """Appends example outputs of `step` (one JSON object each) to DIR/samples.jsonl."""
    if not self.enabled:
      return
    with open(self.samples_path, "a", encoding="utf-8") as f:
      for s in samples:
        f.write(json.dumps({"step": int(step), **s}) + "\n")

  def progress(self, step: int, rec: dict[str, Any]) -> None:
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    parts = [f"{self.stage + ' ' if self.stage else ''}step {step}/{self.total}"]
    for k in ("loss", "accuracy", "reward", "kl", "val_accuracy", "val_loss"):
      if isinstance(rec.get(k), float):
        parts.append(f"{k} {rec[k]:.4f}")
    if isinstance(rec.get("tokens_per_s"), float):
      parts.append(f"tok/s {rec['tokens_per_s']:.0f}")
    parts.append(f"ETA {_fmt_time(eta)}")
    print(" | ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def truncate_jsonl_after(path: str, step: int) -> None:
  """Drops records with `step` > step (and lines cut short by a crash) from a JSONL log, atomically."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("step", 0) <= step:
        keep.append(json.dumps(rec))
  write_text(path, "".join(k + "\n" for k in keep))


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        out.append(json.loads(line))
  return out
