"""`hs2p eval`: score a chosen/rejected set with a reward-model checkpoint (or judge it with a generative
one, `--judge generative`); RewardBench sections."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from hs2p_jax import storage
from hs2p_jax.atomic import write_json
from hs2p_jax.config import DataConfig
from hs2p_jax.eval.scorer import RewardScorer
from hs2p_jax.eval.scoring import Progress, collect
from hs2p_jax.feed import feed_layout
from hs2p_jax.sharding import batch_split, use_mesh


# `--set data.KEY` that scoring pairs applies (hs2p eval, and the factor search of hs2p expo).
PAIR_DATA_KEYS = ("template", "max_length", "overlong", "pad_multiple", "packing", "share_prompt", "skip_invalid",
                  "num_workers")


class PairScorer(RewardScorer):
  """A loaded reward model that scores pair files: chosen and rejected in one forward pass."""

  def data_config(self, data: str, fmt: str, **keys: Any) -> DataConfig:
    """The DataConfig that reads `data` in `fmt` the way this model was trained (its template)."""
    keys = {"template": self.meta.template, "max_length": self.max_length, **keys}
    keys.setdefault("pad_multiple", min(32, keys["max_length"]))
    return DataConfig(validation=data, format=fmt, **keys)

  def loader(self, data: str | DataConfig, fmt: str | None = None, split: str = "validation",
             cache_dir: str | None = None):
    """Batches of `data` (a DataConfig, or a source read in `fmt` with `data_config`'s defaults)."""
    from hs2p_jax.data.pipeline import make_loader
    cfg = data if isinstance(data, DataConfig) else self.data_config(data, fmt)
    layout = feed_layout(self.mesh, self.rules)  # this process reads its block of each batch
    return make_loader(cfg, self.tokenizer, split=split, task="pairs", batch_size=self.batch_size, shuffle=False,
                       repeat=False, process_index=layout.slot, process_count=layout.slots,
                       cache_dir=cache_dir, row_multiple=batch_split(self.mesh, self.rules))

  def rewards(self, loader, params=None, progress: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([N, 2] rewards, [N] magnitudes, [N] example ids) of every pair of `loader`; with `progress`
    (a label), a console line every few seconds."""
    shown = Progress(progress, "pairs", loader.report.kept) if progress else None
    with use_mesh(self.mesh, self.rules):
      res = collect(self._eval, self.params if params is None else params, loader, self.mesh, self.rules,
                    progress=shown)
    return res["outputs"] @ self.weights, res["magnitude"], res["example_id"]


def scoring_length(command: str, checkpoint: str, flag: int | None, given: Any = None) -> int:
  """The length `command` scores `checkpoint` at: `--max-length` or `--set data.max_length` (not two
  different values), else the length the checkpoint was trained at, else 1024 (said in one line)."""
  from hs2p_jax.checkpoint import read_meta
  from hs2p_jax.errors import UserError
  if flag is not None and given is not None and flag != given:
    raise UserError(f"--max-length {flag} and --set data.max_length={given} disagree; give one of them")
  if flag is not None or given is not None:
    return flag if flag is not None else given
  trained = read_meta(checkpoint).max_length
  if trained:
    return trained
  if jax.process_index() == 0:
    print(f"hs2p {command}: {checkpoint} records no training length (not trained here); scoring at 1024 tokens "
          f"(--max-length to change)", file=sys.stderr, flush=True)
  return 1024


def say_truncated(what: str, truncated: int, total: int, max_length: int) -> None:
  """One console line when scoring cut any input to `max_length` tokens."""
  if truncated and jax.process_index() == 0:
    print(f"truncated {truncated} of {total} {what} to {max_length} tokens (the prompt's start first; "
          f"--max-length to change)", file=sys.stderr, flush=True)


def tool_config(command: str, checkpoint: str, overrides: list[str], data: str | None, fmt: str | None,
                max_length: int | None, data_keys: tuple[str, ...] = PAIR_DATA_KEYS):
  """The `--set` config of a command that scores `data` with `checkpoint`; data keys default to the
  checkpoint's template and the length it was trained at (`scoring_length`). Starts the multi-host
  runtime; returns (cfg, mesh, rules)."""
  from hs2p_jax.checkpoint import read_meta
  from hs2p_jax.config import load_tool, parse_overrides
  from hs2p_jax.distributed import initialize
  from hs2p_jax.sharding import make_mesh, rules_from

  given = parse_overrides(list(overrides)).get("data", {})
  length = scoring_length(command, checkpoint, max_length, given.get("max_length"))
  defaults = {"validation": data, "template": read_meta(checkpoint).template, "max_length": length,
              "pad_multiple": min(32, length) if isinstance(length, int) and length > 0 else 32}
  if fmt:
    defaults["format"] = fmt
  cfg = load_tool(command, overrides, defaults, data_keys)
  d = cfg.dist
  initialize(d.coordinator, d.num_processes, d.process_id, d.local_device_ids, d.heartbeat_timeout)
  return cfg, make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)


def say_devices(mesh) -> None:
  """The devices and mesh a command runs on, one line (once its inputs have loaded: an error is the only line)."""
  from hs2p_jax.provenance import device_line
  if jax.process_index() == 0:
    print(device_line(mesh), file=sys.stderr, flush=True)


def data_cache() -> str:
  """Where the built-in data is generated for `eval`, `expo` and `serve`: this host's cache
  (`$HS2P_CACHE` or ~/.cache/hs2p_jax/data), never beside the command's output or in the working directory."""
  return os.path.join(storage.cache_root(), "data")


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


def judge_command(args, cfg, mesh, rules) -> int:
  """`hs2p eval --judge generative`: the Pairwise Justifier's verdicts on the pairs, both orders."""
  from hs2p_jax.checkpoint import load_checkpoint_tokenizer, load_model
  from hs2p_jax.data.load import load_examples
  from hs2p_jax.data.synthetic import resolve_source
  from hs2p_jax.errors import UserError
  from hs2p_jax.eval.judge import judge_pairs

  source = resolve_source(args.data, args.split, args.format, data_cache())
  pairs, load = load_examples(source, args.format, args.split, "pairs", skip_invalid=cfg.data.skip_invalid)
  with use_mesh(mesh, rules):
    lm, meta = load_model(args.checkpoint, mesh, rules, **cfg.model.fields())
  if meta.kind != "lm":
    raise UserError(f"--judge generative: {args.checkpoint} is a {meta.kind} checkpoint; it needs an LM (the justifier)")
  report = judge_pairs(lm, load_checkpoint_tokenizer(args.checkpoint), cfg.data.template, pairs,
                       max_length=cfg.data.max_length, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       mesh=mesh, rules=rules)
  report = {"checkpoint": storage.absolute(args.checkpoint), "data": args.data, "format": args.format,
            "judge": "generative", "template": cfg.data.template, **report, "load": load.summary()}
  print(f"pairs {report['pairs']}  accuracy {report['accuracy']:.4f}  unparsed {report['unparsed']} of "
        f"{report['answers']}  position consistency {report['position_consistency']:.4f}", file=sys.stderr)
  if args.out and jax.process_index() == 0:
    write_json(args.out, report)
  print(json.dumps({k: report[k] for k in ("accuracy", "pairs", "unparsed", "position_consistency")} |
                   ({"sections": report["sections"]} if "sections" in report else {})))
  return 0


def rewardbench2_command(args, cfg, mesh, rules) -> int:
  """`hs2p eval --format rewardbench2`: every completion scored, a prompt's together; subset and overall scores."""
  from hs2p_jax.data.rewardbench2 import load_groups
  from hs2p_jax.data.synthetic import resolve_source
  from hs2p_jax.eval import rewardbench2

  scorer = RewardScorer.load(args.checkpoint, mesh, rules, cfg.model.fields(), batch_size=args.batch_size,
                             max_length=cfg.data.max_length)
  groups, load = load_groups(resolve_source(args.data, args.split, "rewardbench2", data_cache()),
                             cfg.data.skip_invalid)
  if scorer.meta.template != cfg.data.template:  # score in the template given with --set
    scorer.meta = dataclasses.replace(scorer.meta, template=cfg.data.template)
  say_devices(mesh)
  scores = scorer.score_groups([g.prompt for g in groups], [g.completions for g in groups])
  say_truncated("completions", scorer.truncated, scorer.encoded, cfg.data.max_length)
  report = {"checkpoint": storage.absolute(args.checkpoint), "data": args.data, "format": "rewardbench2",
            "template": cfg.data.template, **rewardbench2.report(groups, scores), "load": load.summary(),
            "origin": load.origin}
  lines = [f"prompts {report['prompts']}  completions {report['completions']}"]
  lines += [f"{name:<12} {100 * v:5.1f}" for name, v in report["subsets"].items()]
  if "overall" in report:
    lines.append(f"{'Overall':<12} {100 * report['overall']:5.1f}")
  print("\n".join(lines), file=sys.stderr)
  if args.out and jax.process_index() == 0:
    write_json(args.out, report)
  print(json.dumps({k: report[k] for k in ("prompts", "subsets", "overall") if k in report}))
  return 0


def write_scores(path: str, rewards: np.ndarray, ids: np.ndarray) -> None:
  """One JSON line a pair, in the data's order: {"id": its index in the data, "chosen", "rejected"}."""
  from hs2p_jax.atomic import write_text
  order = np.argsort(ids, kind="stable")
  write_text(path, "".join(json.dumps({"id": int(ids[i]), "chosen": float(rewards[i, 0]),
                                       "rejected": float(rewards[i, 1])}) + "\n" for i in order))


def eval_command(args) -> int:
  if args.scores and (args.judge != "reward" or args.format == "rewardbench2"):
    from hs2p_jax.errors import UserError
    raise UserError("eval --scores writes a reward model's pair scores (not with --judge generative or rewardbench2)")
  cfg, mesh, rules = tool_config("eval", args.checkpoint, args.overrides, args.data, args.format, args.max_length)
  if args.judge == "generative":
    return judge_command(args, cfg, mesh, rules)
  if args.format == "rewardbench2":
    return rewardbench2_command(args, cfg, mesh, rules)
  scorer = PairScorer.load(args.checkpoint, mesh, rules, cfg.model.fields(), batch_size=args.batch_size,
                           max_length=cfg.data.max_length)
  loader = scorer.loader(cfg.data, split=args.split, cache_dir=data_cache())
  say_devices(mesh)
  rewards, magnitude, ids = scorer.rewards(loader, progress="eval")
  say_truncated("pairs", loader.report.truncated, loader.report.kept, cfg.data.max_length)
  report = {"checkpoint": storage.absolute(args.checkpoint), "data": args.data, "format": args.format,
            "template": cfg.data.template,
            **pair_report(rewards, magnitude, ids, loader.examples, args.format), "load": loader.report.summary(),
            "origin": loader.report.origin}
  print(format_table(report), file=sys.stderr)
  if args.out and jax.process_index() == 0:
    write_json(args.out, report)
  if args.scores and jax.process_index() == 0:
    write_scores(args.scores, rewards, ids)
  print(json.dumps({k: report[k] for k in ("accuracy", "pairs") if k in report} |
                   ({"sections": report["sections"]} if "sections" in report else {})))
  return 0
