"""Rollout throughput, the JAX KV-cache sampler vs transformers' `generate`: prints ONE JSON object.

Random weights of the preset's shapes; the same random prompts; both produce exactly `--new-tokens`
tokens (EOS disabled; min = max new tokens for `generate`); greedy unless `--temperature` > 0.
`jax_over_torch` (generated tokens/s ratio) is the last key. See benchmarks/README.md.

  /tmp/venv/bin/python benchmarks/sample.py [--model smollm2-135m] [--batch 4] [--prompt 64]
      [--new-tokens 32] [--steps 3] [--temperature 0] [--dtype float32] [--cpu-devices 0]
"""

from __future__ import annotations

import argparse
import json

from common import add_model_args, init_devices, model_config


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(ap)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (no top-k / top-p)")
  args = ap.parse_args()
  init_devices(args)
  from hs2p_jax.commands.bench import sample_report
  cfg = model_config(args)
  res = sample_report(cfg, args.model, args.batch, args.prompt, args.new_tokens, args.steps, not args.no_torch,
                      args.temperature)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
