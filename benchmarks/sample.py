"""Rollout throughput, the JAX KV-cache sampler vs transformers' `generate`: prints ONE JSON object.

Random weights of the preset's shapes; the same random prompts; both produce exactly `--new-tokens`
tokens (EOS disabled; min = max new tokens for `generate`); greedy unless `--temperature` > 0.
`jax_over_torch` (generated tokens/s ratio) is the last key. `--knobs` instead times runtime
variants round-robin in one process and prints a table. See benchmarks/README.md.

  python benchmarks/sample.py [--model smollm2-135m] [--batch 4] [--prompt 64]
      [--new-tokens 32] [--steps 3] [--temperature 0] [--samples-per-prompt 1] [--dtype float32] [--cpu-devices 0]
  python benchmarks/sample.py --knobs [--rounds 3] [--only base no_scan ...]
  python benchmarks/sample.py --knobs --cpu-devices 2   # the data-parallel variants
"""

from __future__ import annotations

import argparse
import json
import sys

from common import add_model_args, init_devices, model_config, round_robin

# name -> (LlamaConfig overrides, SampleRun keyword arguments, XLA compiler options). Variants with
# devices=2 run in a process split into 2 CPU devices, the others in a 1-device process; torch
# float32 is timed in both as the common reference.
KNOBS: dict[str, tuple[dict, dict, dict | None]] = {
    "base": ({}, {}, None),
    "bfloat16": ({"dtype": "bfloat16"}, {}, None),
    "no_scan": ({"scan_layers": False}, {}, None),
    "attention_xla": ({"attention": "xla"}, {}, None),
    "eigen_dots": ({}, {}, {"xla_cpu_experimental_ynn_fusion_type": ""}),  # XLA's Eigen dots, not YNNPACK
    # batch / 4 prompts x 4 samples each (one prefill per prompt): the same rows as the others;
    # PyTorch's cost is the same for 4 distinct or 4 repeated prompts (generate expands them)
    "samples_4": ({}, {"samples": 4}, None),
    "data_parallel_2": ({}, {"devices": 2}, None),
    "data_parallel_2_no_scan": ({"scan_layers": False}, {"devices": 2}, None),
    # REINFORCE's policy is FSDP-sharded for training: sampling from that layout gathers every weight
    # at every token; the rollout layout copies it once per call (the copy is timed with the call)
    "fsdp_2": ({}, {"devices": 2, "layout": "fsdp"}, None),
    "rollout_2": ({}, {"devices": 2, "layout": "rollout"}, None),
    "fsdp_2_bfloat16": ({"dtype": "bfloat16"}, {"devices": 2, "layout": "fsdp"}, None),
    "rollout_2_bfloat16": ({"dtype": "bfloat16"}, {"devices": 2, "layout": "rollout"}, None),
}


def knob_table(args) -> dict:
  """Compiles every variant, then times them round-robin on one shared parameter state."""
  import jax
  from hs2p_jax.bench.jax_runs import SampleRun
  from hs2p_jax.bench.torch_runs import hf_config_of, run_torch

  base = model_config(args)
  ndev = len(jax.devices())
  names = [n for n in (args.only or KNOBS) if KNOBS[n][1].get("devices", 1) == ndev]
  runs, compile_s = {}, {}
  for name in names:
    over, kw, opts = KNOBS[name]
    if args.batch % kw.get("samples", 1):
      raise SystemExit(f"{name}: --batch {args.batch} is not a multiple of {kw['samples']} samples per prompt")
    runs[name] = SampleRun(base.replace(**over), args.batch // kw.get("samples", 1), args.prompt, args.new_tokens,
                           args.temperature, compiler_options=opts, **kw)
    print(f"compiled {name}", file=sys.stderr, flush=True)
    compile_s[name] = runs[name].compile_s
  calls = {}
  state = runs[names[0]].init_state()
  for name, run in runs.items():
    placed = run.place(state)
    calls[name] = lambda run=run, placed=placed: run(placed)
  # torch float32 (bf16 autocast on a CPU without bf16 units is much slower) in child processes
  # before and after the JAX rounds, so that it neither shares this process nor misses the load drift
  torch_run = lambda: run_torch("torch_sample", hf_config=hf_config_of(base, pad_token_id=0), batch=args.batch,
                                prompt=args.prompt, new_tokens=args.new_tokens, steps=args.rounds, dtype="float32",
                                temperature=args.temperature)["generate_s_all"]
  load, rows = round_robin(calls, args.rounds, args.batch * args.new_tokens, "generate_s",
                           None if args.no_torch else torch_run, compile_s)
  return {"bench": "sample_knobs", "model": args.model, "batch": args.batch, "prompt": args.prompt,
          "new_tokens": args.new_tokens, "temperature": args.temperature, "rounds": args.rounds,
          "cpu_devices": len(jax.devices()), "load_avg_1m": load, "variants": rows}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(ap)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (no top-k / top-p)")
  ap.add_argument("--samples-per-prompt", type=int, default=1, metavar="K",
                  help="K sampled continuations per prompt (needs --temperature > 0): JAX prefills each prompt once "
                       "(num_samples), transformers expands the prompts (num_return_sequences)")
  ap.add_argument("--knobs", action="store_true",
                  help="time the KNOBS variants for this process's device count (and torch) round-robin")
  ap.add_argument("--only", nargs="+", choices=list(KNOBS), help="with --knobs: these variants only")
  ap.add_argument("--rounds", type=int, default=3, help="with --knobs: timed rounds")
  args = ap.parse_args()
  init_devices(args)
  if args.knobs:
    print(json.dumps(knob_table(args)))
    return
  from hs2p_jax.commands.bench import sample_report
  cfg = model_config(args)
  if args.samples_per_prompt > 1 and args.temperature <= 0:
    ap.error("--samples-per-prompt > 1 needs --temperature > 0 (greedy samples would be identical)")
  res = sample_report(cfg, args.model, args.batch, args.prompt, args.new_tokens, args.steps, not args.no_torch,
                      args.temperature, samples=args.samples_per_prompt)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
