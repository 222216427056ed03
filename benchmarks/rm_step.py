"""Reward-model training step throughput, JAX vs PyTorch/transformers: prints ONE JSON object.

Random weights of the preset's shapes; 2*pairs fixed-length random rows (chosen and rejected in one
forward pass); scaled Bradley-Terry loss; AdamW (betas 0.9/0.98, wd 0.1) with clipping at 1.0.
`jax_over_torch` (tokens/s ratio) is the last key. See benchmarks/README.md.

  /tmp/venv/bin/python benchmarks/rm_step.py [--model smollm2-135m] [--pairs 2] [--seq 256] [--steps 3]
      [--dtype float32] [--scan-layers on] [--remat none] [--attention reference] [--cpu-devices 0]
"""

from __future__ import annotations

import argparse
import json

from common import add_model_args, init_devices, model_config


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(ap)
  ap.add_argument("--pairs", type=int, default=2)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--num-attributes", type=int, default=9, help="reward head outputs (9 or 1)")
  ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch", "save_attention_out"])
  ap.add_argument("--no-donate", action="store_true", help="do not donate params / optimizer state to the step")
  args = ap.parse_args()
  init_devices(args)
  from hs2p_jax.commands.bench import rm_report
  cfg = model_config(args, remat=args.remat)
  res = rm_report(cfg, args.model, args.pairs, args.seq, args.steps, not args.no_torch, args.num_attributes,
                  donate=not args.no_donate)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
