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
  ap.add_argument("--attention", default="reference", choices=["reference", "xla"])
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
