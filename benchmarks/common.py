"""Shared flags of the benchmark scripts: model preset and runtime knobs, CPU device count, torch on/off."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def add_model_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--model", default="smollm2-135m", help="architecture preset (random weights)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
  ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
  ap.add_argument("--scan-layers", default="on", choices=["on", "off"], help="lax.scan over layers or unrolled")
  ap.add_argument("--attention", default="reference", choices=["reference", "xla", "cudnn", "splash"])
  ap.add_argument("--weight-grad", default="flat", choices=["flat", "autodiff"],
                  help="VJP of the weight projections (hs2p_jax/model/linear.py)")
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="split the host into N JAX CPU devices, batch sharded over them (0: JAX's default)")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch/transformers baseline")


def init_devices(args: argparse.Namespace) -> None:
  """Sets the JAX CPU device count; must run before JAX starts its backend."""
  if args.cpu_devices:
    import jax
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)


def model_config(args: argparse.Namespace, **extra):
  from hs2p_jax.model.config import preset
  return preset(args.model, dtype=args.dtype, scan_layers=args.scan_layers == "on", attention=args.attention,
                weight_grad=args.weight_grad, **extra)


def round_robin(calls: dict, rounds: int, tokens: int, time_key: str, torch_times=None,
                compile_s: dict | None = None) -> tuple[list[float], dict]:
  """Times `calls` (variant name -> zero-argument callable, synchronised) round-robin: round 0 warms
  up and each later round starts one variant later, so that load drift hits all variants alike.
  `torch_times()` (-> list of seconds, e.g. a child process) runs before and after the rounds.

  Returns the 1-minute load averages before and after, and per variant the median and best time
  (`time_key`, `time_key`_min), tokens/s, and the speed-ups over the first variant and over torch."""
  import statistics
  import time

  from hs2p_jax.bench.measure import load_avg, rounded

  names = list(calls)
  times: dict[str, list[float]] = {n: [] for n in names}
  if torch_times is not None:
    times["torch_float32"] = torch_times()
  load = [load_avg()]
  for r in range(rounds + 1):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      calls[name]()
      if r:
        times[name].append(time.perf_counter() - t0)
      print(f"round {r} {name}: {time.perf_counter() - t0:.3f} s", file=sys.stderr, flush=True)
  load.append(load_avg())
  if torch_times is not None:
    times["torch_float32"] += torch_times()
  ref = statistics.median(times[names[0]])
  torch_s = statistics.median(times["torch_float32"]) if "torch_float32" in times else None
  rows = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    rows[name] = {time_key: rounded(med), f"{time_key}_min": rounded(min(ts)), "tokens_per_s": rounded(tokens / med),
                  "speedup_vs_first": rounded(ref / med), "speedup_vs_torch": rounded(torch_s / med) if torch_s else None,
                  "compile_s": rounded((compile_s or {}).get(name))}
  return load, rows
