"""`hs2p eval`: score a chosen/rejected set with a reward-model checkpoint; RewardBench sections."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np

from hs2p_jax.atomic import write_json
from hs2p_jax.config import DataConfig
from hs2p_jax.eval.scoring import collect
from hs2p_jax.sharding import DEFAULT_RULES, use_mesh
from hs2p_jax.train.rm_scorer import RewardScorer


class PairScorer(RewardScorer):
  """A loaded reward model that scores pair files: chosen and rejected in one forward pass."""

  def __init__(self, checkpoint: str, batch_size: int = 8, max_length: int = 1024, mesh=None, rules=None):
    super().__init__(checkpoint, mesh, rules or DEFAULT_RULES, max_length=max_length, batch_size=batch_size)

  def loader(self, data: str, fmt: str, split: str = "validation", cache_dir: str | None = None):
    from hs2p_jax.data.pipeline import make_loader
    cfg = DataConfig(validation=data, format=fmt, template=self.meta.template, max_length=self.max_length,
                     pad_multiple=min(32, self.max_length))
    return make_loader(cfg, self.tokenizer, split=split, task="pairs", batch_size=self.batch_size, shuffle=False,
                       repeat=False, process_index=jax.process_index(), process_count=jax.process_count(),
                       cache_dir=cache_dir)

  def rewards(self, loader, params=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([N, 2] rewards, [N] magnitudes, [N] example ids) of every pair of `loader`."""
    with use_mesh(self.mesh, self.rules):
      res = collect(self._eval, self.params if params is None else params, loader, self.mesh, self.rules)
    return res["outputs"] @ self.weights, res["magnitude"], res["example_id"]


def pair_report(rewards: np.ndarray, magnitude: np.ndarray, ids: np.ndarray, examples: list, fmt: str) -> dict[str, Any]:
  """Accuracy, BT losses, per-subset accuracy and (RewardBench) section scores of scored pairs."""
  from hs2p_jax.eval.rewardbench import EXAMPLE_COUNTS, section_scores
  from hs2p_jax.eval.scoring import pair_metrics, subset_accuracy

  report: dict[str, Any] = pair_metrics(rewards)
  report["loss_scaled"] = pair_metrics(rewards, magnitude, "scaled")["loss"]
  subsets = [examples[int(i)].subset for i in ids]
  if any(subsets):
    report["subsets"] = subset_accuracy(rewards, subsets)
    known = {s: a for s, a in report["subsets"].items() if s in EXAMPLE_COUNTS}
    if fmt == "rewardbench" and known:
      report["sections"] = section_scores(known)
      unknown = sorted(set(report["subsets"]) - set(known))
      if unknown:
        report["ignored_subsets"] = unknown
  return report


def format_table(report: dict[str, Any]) -> str:
  lines = [f"pairs {report['pairs']}  accuracy {report['accuracy']:.4f}  BT loss {report['loss']:.4f}"]
  if "sections" in report:
    lines.append("section      score")
    for name, v in report["sections"].items():
      lines.append(f"{name:<12} {100 * v:5.1f}")
  if "subsets" in report:
    lines.append("subset                     accuracy")
    for name, v in report["subsets"].items():
      lines.append(f"{name:<26} {100 * v:5.1f}")
  return "\n".join(lines)


def eval_command(args) -> int:
  scorer = PairScorer(args.checkpoint, args.batch_size, args.max_length)
  cache = os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd(), ".hs2p_data")
  loader = scorer.loader(args.data, args.format, args.split, cache_dir=cache)
  rewards, magnitude, ids = scorer.rewards(loader)
  report = {"checkpoint": os.path.abspath(args.checkpoint), "data": args.data, "format": args.format,
            **pair_report(rewards, magnitude, ids, loader.examples, args.format), "load": loader.report.summary()}
  print(format_table(report), file=sys.stderr)
  if args.out and jax.process_index() == 0:
    write_json(args.out, report)
  print(json.dumps({k: report[k] for k in ("accuracy", "pairs") if k in report} |
                   ({"sections": report["sections"]} if "sections" in report else {})))
  return 0
