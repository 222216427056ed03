"""The pipeline's report: report.md (each reward model's scores beside the paper's Table 1 row, the
policies beside its RLHF table, curves and notes) and summary.json, from the stages' outputs."""

from __future__ import annotations

import json
import sys
from typing import Any

from hs2p_jax import storage
from hs2p_jax.atomic import write_bytes, write_text
from hs2p_jax.train.metrics import read_metrics

PAPER_ROWS = {
    ("regression", "helpfulness"): "Regression, helpfulness only",
    ("regression", "all"): "Regression, 5 HelpSteer attributes",
}


def write_pipeline_report(p: Any) -> dict[str, Any]:
  """Writes `p.out`/report.md and summary.json for the `Pipeline` `p`; returns the summary."""
  from hs2p_jax.eval.report import plot_curves, write_report

  def metrics(stage):
    path = storage.join(p._dir(stage), "metrics.jsonl")
    return read_metrics(path) if storage.isfile(path) else []

  done_info = p._done_info

  scores = p.results.get("eval") or {}
  reg_attr = done_info("regression").get("attributes", "helpfulness")
  bt_info = done_info("bt")
  variant = (bt_info.get("variant") or "scaled").capitalize()
  init = "BT init. from helpfulness regression" if bt_info.get("init_from") else "BT from scratch"
  labels = {"regression": (f"regression ({reg_attr})", PAPER_ROWS[("regression", reg_attr)]),
            "bt": (f"{variant.lower()} BT", f"{init}, {variant}"),
            "expo": (f"ExPO (factor {done_info('expo').get('factor')})", "Scaled BT + ExPO")}
  rows = []
  for stage, (name, paper) in labels.items():
    if stage not in scores:
      continue
    recs = metrics(stage)
    val = [r.get("val_accuracy", r.get("val_pair_accuracy")) for r in recs
           if r.get("val_accuracy", r.get("val_pair_accuracy")) is not None]
    table = done_info(stage).get("table") or []
    val += [r["accuracy"] for r in table if r["factor"] == done_info(stage).get("factor")]
    rows.append({"stage": name, "paper_row": paper, "sections": scores[stage].get("sections"),
                 "accuracy": scores[stage].get("accuracy"), "val_accuracy": val[-1] if val else None,
                 "rewardbench2": scores[stage].get("rewardbench2")})
  images, notes = [], []
  rm_runs = {s: metrics(s) for s in ("regression", "bt") if metrics(s)}
  if rm_runs and plot_curves(rm_runs, ["loss", "val_loss", "accuracy", "val_accuracy", "val_pair_accuracy"],
                             storage.join(p.out, "rm_curves.png"), "reward-model training"):
    images.append(("Reward-model loss and accuracy", "rm_curves.png"))
  expo_png = storage.join(p._dir("expo"), "model", "expo_search.png")
  if storage.isfile(expo_png):
    write_bytes(storage.join(p.out, "expo_search.png"), storage.read_bytes(expo_png))
    images.append(("ExPO search: validation accuracy and BT loss against the factor", "expo_search.png"))
  rl = metrics("reinforce")
  if rl and plot_curves({"reinforce": rl}, ["reward", "kl", "val_reward", "val_kl", "response_length", "loss"],
                        storage.join(p.out, "reinforce_curves.png"), "REINFORCE"):
    images.append(("REINFORCE: reward-model score and KL to the reference", "reinforce_curves.png"))
    notes.append(f"REINFORCE: mean RM reward {rl[0]['reward']:.4f} at step {rl[0]['step']} -> "
                 f"{rl[-1]['reward']:.4f} at step {rl[-1]['step']}; KL {rl[-1]['kl']:.4f}." + _validation(rl))
  ppo_runs = {s: metrics(s) for s in p._ppo_dirs() if metrics(s)}
  if ppo_runs and plot_curves(ppo_runs, ["reward", "kl", "val_reward", "val_kl", "value_loss", "loss"],
                              storage.join(p.out, "ppo_curves.png"), "PPO"):
    images.append(("PPO: reward-model score, KL to the reference, the critic's value loss", "ppo_curves.png"))
    for s, recs in ppo_runs.items():
      notes.append(f"PPO ({s}): mean RM reward {recs[0]['reward']:.4f} at step {recs[0]['step']} -> "
                   f"{recs[-1]['reward']:.4f} at step {recs[-1]['step']}; KL {recs[-1]['kl']:.4f}; value loss "
                   f"{recs[0]['value_loss']:.4f} -> {recs[-1]['value_loss']:.4f}." + _validation(recs))
  dp = metrics("dpo")
  if dp and plot_curves({"dpo": dp}, ["loss", "accuracy", "val_accuracy", "margin", "drift"],
                        storage.join(p.out, "dpo_curves.png"), "DPO"):
    images.append(("DPO: loss, implicit-reward accuracy and margin, drift from the reference", "dpo_curves.png"))
    vals = [r for r in dp if "val_accuracy" in r]
    if vals:
      notes.append(f"DPO ({done_info('dpo').get('variant')}): validation implicit-reward accuracy "
                   f"{vals[0]['val_accuracy']:.4f} at step {vals[0]['step']} -> {vals[-1]['val_accuracy']:.4f} "
                   f"at step {vals[-1]['step']}.")
  policies = p.results.get("compare") or {}
  for name, m in policies.items():
    notes.append(f"Policy {name} on held-out prompts: RM reward {m['reward']:.4f}, KL to the reference "
                 f"{m['kl']:.4f} per token, {m['response_length']:.1f} tokens.")
  judge = p.results.get("judge")
  if judge:
    notes.append(f"Pairwise Justifier (generative baseline): accuracy {judge['accuracy']:.4f} on {judge['pairs']} "
                 f"pairs in both orders, {judge['unparsed']} of {judge['answers']} answers unparsed, position "
                 f"consistency {judge['position_consistency']:.4f}.")
  if "expo" in scores:
    notes.append("ExPO factor convention: base + factor * (tuned - base), base = regression, tuned = BT.")
  if p.keys:
    ran = {s: "run now" if k["ran"] else f"reused: finished {k.get('finished')}" for s, k in p.keys.items()}
    notes.append("Stages and their keys (a hash of the stage's resolved config and of its inputs' keys, recorded in "
                 "its DONE): " + "; ".join(f"{s} `{k['key']}` ({ran[s]})" for s, k in p.keys.items()) + ".")
  dpo_variant = (done_info("dpo").get("variant") or "scaled").capitalize()
  path = write_report(p.out, rows, notes, images, policies, {"dpo": f"{dpo_variant} DPO"})
  print(f"report: {path}", file=sys.stderr)
  summary = {"report": path, "stages": {r["stage"]: r.get("sections") for r in rows}}
  rb2 = {r["stage"]: {**r["rewardbench2"]["subsets"], "Overall": r["rewardbench2"].get("overall")}
         for r in rows if r.get("rewardbench2")}
  if rb2:
    summary["rewardbench2"] = rb2
  summary["stage_keys"] = {s: {"key": k["key"], "ran": k["ran"]} for s, k in p.keys.items()}
  if p.results.get("compare"):
    summary["policies"] = p.results["compare"]
  if p.results.get("judge"):
    summary["justifier"] = p.results["judge"]
  write_text(storage.join(p.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
  return summary


def _validation(recs: list[dict[str, Any]]) -> str:
  """' Validation (greedy, held-out prompts): reward a at step s -> ... (best b at step t).' or ''."""
  vals = [r for r in recs if "val_reward" in r]
  if not vals:
    return ""
  best = max(vals, key=lambda r: r["val_reward"])
  return (" Validation (greedy responses to held-out prompts): reward " +
          " -> ".join(f"{r['val_reward']:.4f} at step {r['step']}" for r in vals) +
          f"; best {best['val_reward']:.4f} at step {best['step']} (kept in its best/), KL {best['val_kl']:.4f}.")
