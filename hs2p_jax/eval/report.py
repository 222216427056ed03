"""The pipeline's `report.md`: RewardBench-style scores of every stage beside the paper's, and curve plots."""

from __future__ import annotations

import io
from typing import Any

from hs2p_jax import storage
from hs2p_jax.atomic import write_bytes, write_text

SECTIONS = ("Overall", "Chat", "Chat Hard", "Safety", "Reasoning")

# HelpSteer2-Preference, Table 1 (RewardBench, Llama-3.1-70B-Instruct base): Overall, Chat,
# Chat-Hard, Safety, Reasoning.
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "Regression, helpfulness only": (93.0, 97.2, 84.2, 94.6, 95.8),
    "Regression, 5 HelpSteer attributes": (92.4, 95.0, 85.5, 94.0, 95.1),
    "BT from scratch, Regular": (91.5, 97.5, 80.3, 90.5, 97.9),
    "BT from scratch, Margin": (91.5, 98.0, 78.5, 94.6, 94.8),
    "BT from scratch, Scaled": (92.7, 97.8, 83.5, 93.2, 96.0),
    "BT init. from helpfulness regression, Regular": (92.7, 98.9, 82.9, 93.7, 95.4),
    "BT init. from helpfulness regression, Margin": (93.0, 98.3, 83.8, 94.0, 95.8),
    "BT init. from helpfulness regression, Scaled": (93.7, 98.0, 85.7, 94.3, 96.7),
    "Scaled BT + ExPO": (94.1, 97.5, 85.7, 95.1, 98.1),
}


def _fmt(v: Any) -> str:
  return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "–"


def plot_curves(runs: dict[str, list[dict[str, Any]]], keys: list[str], path: str, title: str) -> bool:
  """One panel per metric key, one line per run, from metrics.jsonl records. False if nothing to plot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [k for k in keys if any(k in r for recs in runs.values() for r in recs)]
  if not keys:
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name, recs in runs.items():
      pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
      if pts:
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=name)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  write_bytes(path, buf.getvalue())
  return True


# The paper's RLHF table (Llama-3.1-70B-Instruct trained against its reward model): MT-Bench
# (GPT-4-Turbo), mean response length (characters), AlpacaEval 2 LC, Arena Hard.
PAPER_POLICIES: dict[str, tuple[float, float, float, float]] = {
    "Regular DPO": (8.66, 1502.2, 40.4, 52.8),
    "Margin DPO": (8.58, 1496.6, 41.1, 52.6),
    "Scaled DPO": (8.74, 1514.8, 41.0, 52.9),
    "PPO": (8.74, 1842.8, 43.8, 58.6),
    "REINFORCE": (8.98, 2199.8, 57.6, 85.0),
    "Llama-3.1-70B-Instruct": (8.22, 1728.6, 38.1, 55.7),
}


def policy_table(policies: dict[str, dict[str, float]], paper_names: dict[str, str] | None = None) -> list[str]:
  """Markdown lines: each compared policy's reward-model score, KL and length beside the paper's
  figures for the same method (`paper_names` maps a policy to its paper row; the reference is the
  policies' common start, the paper's Llama-3.1-70B-Instruct)."""
  names = {"reinforce": "REINFORCE", "ppo": "PPO", "reference": "Llama-3.1-70B-Instruct", **(paper_names or {})}
  lines = ["Policies on held-out prompts (ours: reward-model score of one sample per prompt, KL to the common "
           "start per token, response tokens) beside the paper's RLHF table for the same method (its 70B "
           "policies on MT-Bench, AlpacaEval 2 LC and Arena Hard; what the built-in data can show is the "
           "ordering of the reward-model scores, not those benchmarks).", "",
           "| policy | RM reward | KL / token | tokens | paper row | MT-Bench | length (chars) | AlpacaEval 2 LC "
           "| Arena Hard |", "|---|---|---|---|---|---|---|---|---|"]
  order = ["reference", "reinforce", "ppo", "dpo"]
  for name, m in sorted(policies.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
    row = names.get(name, "")
    paper = PAPER_POLICIES.get(row)
    figures = " | ".join(f"{v:.1f}" if i != 0 else f"{v:.2f}" for i, v in enumerate(paper)) if paper else " | | | "
    lines.append(f"| {name} | {m['reward']:.4f} | {m['kl']:.4f} | {m['response_length']:.1f} | {row} | {figures} |")
  return lines + [""]


def write_report(out_dir: str, rows: list[dict[str, Any]], notes: list[str], images: list[tuple[str, str]],
                 policies: dict[str, dict[str, float]] | None = None, paper_names: dict[str, str] | None = None) -> str:
  """report.md: a table (our scores; the paper's for the same row), the compared policies beside the
  paper's RLHF table (`policy_table`), notes and images.

  rows: {"stage", "paper_row", "sections": {...} | None, "accuracy", "val_accuracy"[, "rewardbench2"]}.
  """
  lines = ["# hs2p pipeline report", "",
           "RewardBench-style section scores (%) of each stage on the evaluation set, beside the paper's "
           "Table 1 for the same recipe row (Llama-3.1-70B-Instruct on the real RewardBench). On the built-in "
           "data the numbers show the pipeline works, not the paper's values.", "",
           "| stage | | " + " | ".join(SECTIONS) + " | pairwise acc. | val. pair acc. |",
           "|---|---|" + "---|" * (len(SECTIONS) + 2)]
  for row in rows:
    ours = row.get("sections") or {}
    lines.append(f"| {row['stage']} | ours | " + " | ".join(_fmt(ours.get(s)) for s in SECTIONS)
                 + f" | {_fmt(row.get('accuracy'))} | {_fmt(row.get('val_accuracy'))} |")
    paper = PAPER_TABLE1.get(row.get("paper_row", ""))
    if paper:
      lines.append(f"| | paper: {row['paper_row']} | " + " | ".join(f"{v:.1f}" for v in paper) + " | | |")
  lines.append("")
  rb2 = [r for r in rows if r.get("rewardbench2")]
  if rb2:
    from hs2p_jax.eval.rewardbench2 import SUBSETS
    lines += ["RewardBench 2 scores (%): best-of-4 subsets (ties at the top share the credit), Ties by "
              "RewardBench 2's weighted formula, Overall the mean of the six.", "",
              "| stage | Overall | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * (len(SUBSETS) + 1)]
    for row in rb2:
      r = row["rewardbench2"]
      subsets = {k.lower(): v for k, v in r["subsets"].items()}
      lines.append(f"| {row['stage']} | {_fmt(r.get('overall'))} | "
                   + " | ".join(_fmt(subsets.get(s.lower())) for s in SUBSETS) + " |")
    lines.append("")
  if policies:
    lines += policy_table(policies, paper_names)
  lines += [f"- {n}" for n in notes]
  lines.append("")
  for caption, rel in images:
    lines += [f"## {caption}", "", f"![{caption}]({rel})", ""]
  path = storage.join(out_dir, "report.md")
  write_text(path, "\n".join(lines) + "\n")
  return path
