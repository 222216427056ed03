"""Scoring a data set with a reward model: pairwise accuracy, BT loss, regression error, per subset."""

from __future__ import annotations

import functools
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hs2p_jax.feed import feed_layout, to_global
from hs2p_jax.losses import bt_losses
from hs2p_jax.sharding import DEFAULT_RULES


class Progress:
  """`progress(n)`: a console line (process 0) at most every `every` seconds while `total` `what` are
  scored: how many so far, the rate and the time left."""

  def __init__(self, label: str, what: str, total: int, every: float = 10.0):
    self.label, self.what, self.total, self.every = label, what, total, every
    self.start = self.last = time.time()
    if jax.process_index() == 0:
      print(f"{label}: scoring {total} {what}...", file=sys.stderr, flush=True)

  def __call__(self, done: int) -> None:
    now = time.time()
    if now - self.last < self.every or jax.process_index() != 0:
      return
    self.last, rate = now, done / max(now - self.start, 1e-9)
    left = (self.total - done) / rate if rate > 0 else float("nan")
    print(f"{self.label}: {done} of {self.total} {self.what} scored, {rate:.1f}/s, about {left:.0f} s left",
          file=sys.stderr, flush=True)


def collect(eval_fn: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh=None, rules=None,
            max_batches: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
  """Runs `eval_fn(params, batch)` (its outputs replicated) over `batches`, this process's blocks of
  global batches (`hs2p_jax.feed`); returns the valid examples' outputs ([N, 2, A] pairs or [N, A]),
  example ids [N] and, where present, magnitude / labels / label_mask. Each batch is dispatched
  before the previous one's results are fetched; `progress(examples so far)` is called after each."""
  rules = rules if rules is not None else DEFAULT_RULES
  layout = feed_layout(mesh, rules)
  outs: dict[str, list[np.ndarray]] = defaultdict(list)

  def fetch(pending) -> None:
    out, meta = jax.device_get(pending)
    keep = np.asarray(meta["valid"]).astype(bool)
    outs["outputs"].append(np.asarray(out)[keep])
    for key, value in meta.items():
      if key != "valid":
        outs[key].append(np.asarray(value)[keep])
    if progress is not None:
      progress(sum(len(o) for o in outs["outputs"]))

  pending = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    placed = to_global(batch, layout, mesh, rules)
    meta = {k: placed[k] for k in ("valid", "example_id", "magnitude", "labels", "label_mask") if k in placed}
    current = (eval_fn(params, placed), replicated(meta, mesh))
    if pending is not None:
      fetch(pending)
    pending = current
  if pending is not None:
    fetch(pending)
  return {k: np.concatenate(v) for k, v in outs.items()}


def replicated(tree: Any, mesh) -> Any:
  """`tree`'s arrays replicated on every device (an all-gather on the devices), so every host can read them."""
  if mesh is None:
    return tree
  return _replicate(mesh)(tree)


@functools.lru_cache(maxsize=8)
def _replicate(mesh) -> Callable:
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))


def pair_metrics(rewards: np.ndarray, magnitude: np.ndarray | None = None, variant: str = "regular") -> dict[str, float]:
  """rewards [N, 2] (chosen, rejected) -> accuracy (ties wrong), BT loss of `variant`, mean margin."""
  if len(rewards) == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "margin": float("nan"), "pairs": 0}
  mag = np.ones(len(rewards), np.float32) if magnitude is None else magnitude
  loss = np.asarray(bt_losses(rewards[:, 0], rewards[:, 1], mag, variant))
  return {"accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])), "loss": float(np.mean(loss)),
          "margin": float(np.mean(rewards[:, 0] - rewards[:, 1])), "pairs": int(len(rewards))}


def subset_accuracy(rewards: np.ndarray, subsets: list[str | None]) -> dict[str, float]:
  """Per-subset accuracy of [N, 2] rewards; `subsets[i]` names example i's subset."""
  hits: dict[str, list[bool]] = defaultdict(list)
  for (c, r), s in zip(rewards, subsets):
    hits[s or "all"].append(bool(c > r))
  return {s: float(np.mean(v)) for s, v in sorted(hits.items())}


def regression_metrics(outputs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """Masked MSE overall and per labelled attribute index."""
  m = mask.astype(bool)
  err = (outputs - labels) ** 2
  out = {"loss": float(err[m].mean()) if m.any() else float("nan"), "examples": int(len(outputs))}
  for a in np.nonzero(m.any(axis=0))[0]:
    out[f"mse_{a}"] = float(err[m[:, a], a].mean())
  return out
