"""Run logging: `metrics.jsonl` (one JSON object per logged step), `samples.jsonl` (example outputs),
TensorBoard events, a progress line. In a local run directory the logs are appended to; on object
storage, where nothing can be appended, each is rewritten whole at most every `flush_secs` and before
every checkpoint."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax

from hs2p_jax import storage
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
               tensorboard: bool = True, flush_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    self.path = storage.join(run_dir, "metrics.jsonl")
    self.samples_path = storage.join(run_dir, "samples.jsonl")
    self.remote = storage.is_url(run_dir)
    self.flush_secs, self.flushed_at = flush_secs, time.time()
    self.lines: dict[str, list[str]] = {}  # remote: path -> every line of the file
    self.dirty = False
    self.total = total_steps
    self.stage = stage
    self.start_time = time.time()
    self.start_step = resume_step
    self.tb = None
    if not self.enabled:
      return
    storage.makedirs(run_dir)
    for path in (self.path, self.samples_path):
      kept = truncate_jsonl_after(path, resume_step)
      if self.remote:
        self.lines[path] = kept or []
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(storage.join(run_dir, "tensorboard"), flush_secs=10)
      except ImportError:  # TensorBoard output is optional
        self.tb = None

  def log(self, step: int, metrics: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    if self.stage:
      rec.setdefault("stage", self.stage)
    if not self.enabled:
      return rec
    self._append(self.path, [json.dumps(rec)])
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
    self._append(self.samples_path, [json.dumps({"step": int(step), **s}) for s in samples])

  def _append(self, path: str, lines: list[str]) -> None:
    if not self.remote:
      with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
      return
    self.lines[path].extend(lines)
    self.dirty = True
    if time.time() - self.flushed_at >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    """Makes the logged records durable in the run directory (object storage: one upload a file)."""
    if self.remote and self.dirty and self.enabled:
      for path, lines in self.lines.items():
        if lines:
          write_text(path, "".join(line + "\n" for line in lines))
      self.dirty = False
    self.flushed_at = time.time()

  def progress(self, step: int, rec: dict[str, Any]) -> None:
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    parts = [f"{self.stage + ' ' if self.stage else ''}step {step}/{self.total}"]
    evaluated = tuple(sorted(k for k in rec if k.startswith("val_") and k != "val_pairs"))  # every val_* metric
    for k in ("loss", "accuracy", "reward", "kl") + evaluated:
      if isinstance(rec.get(k), float):
        parts.append(f"{k} {rec[k]:.4f}")
    if isinstance(rec.get("tokens_per_s"), float):
      parts.append(f"tok/s {rec['tokens_per_s']:.0f}")
    parts.append(f"ETA {_fmt_time(eta)}")
    print(" | ".join(parts), file=sys.stderr, flush=True)

  def close(self, quiet: bool = False) -> None:
    """Flushes and closes the logs; `quiet` (the run is already failing): without raising."""
    try:
      self.flush()
      if self.tb is not None:
        self.tb.close()
    except Exception:  # noqa: BLE001 - a full disk, a lost bucket: the run's own error is the one to report
      if not quiet:
        raise


def truncate_jsonl_after(path: str, step: int) -> list[str] | None:
  """Drops records with `step` > step (and lines cut short by a crash) from a JSONL log, atomically;
  returns the lines kept (None: no such file)."""
  if not storage.exists(path):
    return None
  keep = []
  for line in storage.read_text(path).splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if rec.get("step", 0) <= step:
      keep.append(json.dumps(rec))
  write_text(path, "".join(k + "\n" for k in keep))
  return keep


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file."""
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
