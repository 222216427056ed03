"""Reward-model training step throughput, JAX vs PyTorch/transformers: prints ONE JSON object.

Random weights of the preset's shapes; 2*pairs fixed-length random rows (chosen and rejected in one
forward pass); scaled Bradley-Terry loss; AdamW (betas 0.9/0.98, wd 0.1) with clipping at 1.0.
`jax_over_torch` (tokens/s ratio) is the last key. `--knobs` instead times runtime variants
round-robin in one process (so that load from other processes hits all alike) and prints a table.
See benchmarks/README.md.

  python benchmarks/rm_step.py [--model smollm2-135m] [--pairs 2] [--seq 256] [--steps 3]
      [--dtype float32] [--scan-layers on] [--remat none] [--attention reference] [--weight-grad flat] [--cpu-devices 0]
      [--share-prompt 0]
  python benchmarks/rm_step.py --knobs [--rounds 3] [--only base no_scan ...]
  python benchmarks/rm_step.py --knobs --cpu-devices 2   # the data-parallel variants
"""

from __future__ import annotations

import argparse
import json
import sys

from common import add_model_args, init_devices, model_config, round_robin

# name -> (LlamaConfig overrides, RMStep keyword arguments, XLA compiler options). Variants with
# devices=2 run in a process split into 2 CPU devices (which slows single-device programs there),
# the others in a 1-device process; torch float32 is timed in both as the common reference.
# Chosen and rejected of an HH-RLHF pair share 78 % of their SmolLM2 tokens (the prompt: all turns but the
# last), measured on ../shared/data's file; a float share_prompt below is this fraction of --seq.
HH_PROMPT_FRACTION = 0.78

KNOBS: dict[str, tuple[dict, dict, dict | None]] = {
    "base": ({}, {}, None),
    "bfloat16": ({"dtype": "bfloat16"}, {}, None),
    "no_scan": ({"scan_layers": False}, {}, None),
    "weight_grad_autodiff": ({"weight_grad": "autodiff"}, {}, None),
    "attention_xla": ({"attention": "xla"}, {}, None),
    "no_donation": ({}, {"donate": False}, None),
    "remat_full": ({"remat": "full"}, {}, None),
    "remat_dots_no_batch": ({"remat": "dots_no_batch"}, {}, None),
    "remat_save_attention_out": ({"remat": "save_attention_out"}, {}, None),
    "remat_dots_no_batch_attention_xla": ({"remat": "dots_no_batch", "attention": "xla"}, {}, None),
    "remat_dots_no_batch_no_scan": ({"remat": "dots_no_batch", "scan_layers": False}, {}, None),
    "remat_dots_no_batch_share_prompt": ({"remat": "dots_no_batch"}, {"share_prompt": HH_PROMPT_FRACTION}, None),
    "eigen_dots": ({}, {}, {"xla_cpu_experimental_ynn_fusion_type": ""}),  # XLA's Eigen dots, not YNNPACK
    "data_parallel_2": ({}, {"devices": 2}, None),
    "data_parallel_2_no_scan": ({"scan_layers": False}, {"devices": 2}, None),
    "data_parallel_2_remat_dots_no_batch": ({"remat": "dots_no_batch"}, {"devices": 2}, None),
}


def knob_table(args) -> dict:
  """Compiles every variant, then times them round-robin on one shared (params, opt_state)."""
  import jax
  from hs2p_jax.bench.jax_runs import RMStep
  from hs2p_jax.bench.torch_runs import hf_config_of, run_torch

  base = model_config(args)
  ndev = len(jax.devices())
  names = [n for n in (args.only or KNOBS) if KNOBS[n][1].get("devices", 1) == ndev]
  steps, compile_s = {}, {}
  for name in names:
    over, kw, opts = KNOBS[name]
    if isinstance(kw.get("share_prompt"), float):
      kw = {**kw, "share_prompt": round(kw["share_prompt"] * args.seq)}
    steps[name] = RMStep(base.replace(**over), args.pairs, args.seq, args.num_attributes, compiler_options=opts, **kw)
    print(f"compiled {name}", file=sys.stderr, flush=True)
    compile_s[name] = steps[name].compile_s
  # torch float32 (bf16 autocast on a CPU without bf16 units is ~20x slower) in child processes
  # before and after the JAX rounds, so that it neither shares this process nor misses the load drift
  hf = hf_config_of(base, architecture="LlamaForSequenceClassification", num_labels=args.num_attributes,
                  pad_token_id=0)
  torch_run = lambda: run_torch("torch_rm", hf_config=hf, pairs=args.pairs, seq=args.seq, steps=args.rounds,
                                dtype="float32")["step_s_all"]
  state = [steps[names[0]].init_state()]

  def call(name):
    def run():
      params, opt_state, _ = steps[name](steps[name].place(state[0]))
      state[0] = (params, opt_state)
    return run

  load, rows = round_robin({n: call(n) for n in names}, args.rounds, 2 * args.pairs * args.seq, "step_s",
                           None if args.no_torch else torch_run, compile_s)
  return {"bench": "rm_knobs", "model": args.model, "pairs": args.pairs, "seq": args.seq, "rounds": args.rounds,
          "cpu_devices": len(jax.devices()), "load_avg_1m": load, "variants": rows}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(ap)
  ap.add_argument("--pairs", type=int, default=2)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--num-attributes", type=int, default=9, help="reward head outputs (9 or 1)")
  ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch", "save_attention_out"])
  ap.add_argument("--no-donate", action="store_true", help="do not donate params / optimizer state to the step")
  ap.add_argument("--share-prompt", type=int, default=0, metavar="N",
                  help="JAX only: each pair's first N tokens are a shared prompt, computed once (data.share_prompt); "
                       "tokens/s still counts 2*pairs*seq, as PyTorch processes them")
  ap.add_argument("--knobs", action="store_true",
                  help="time the KNOBS variants for this process's device count (and torch) round-robin")
  ap.add_argument("--only", nargs="+", choices=list(KNOBS), help="with --knobs: these variants only")
  ap.add_argument("--rounds", type=int, default=3, help="with --knobs: timed rounds")
  args = ap.parse_args()
  init_devices(args)
  if args.knobs:
    print(json.dumps(knob_table(args)))
    return
  from hs2p_jax.commands.bench import rm_report
  cfg = model_config(args, remat=args.remat)
  res = rm_report(cfg, args.model, args.pairs, args.seq, args.steps, not args.no_torch, args.num_attributes,
                  donate=not args.no_donate, share_prompt=args.share_prompt)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
