"""Compiling a run's jitted steps ahead of time for a target: devices, depths, memory and FLOPs.

`--compile` (default auto = host):
  host  N virtual CPU devices, on any machine: shardings and argument bytes are exact; temporaries
        are the CPU compiler's, an indication of an accelerator's only.
  tpu   libtpu's compile-only devices of the chip's slice (needs the libtpu package, no TPU): the TPU
        compiler's own numbers; minutes for a 70B model on a few cores.
  none  analytic only.
Models deeper than 4 layers are compiled at 2 and 4 layers and each figure is extrapolated linearly
to the full depth. XLA's cost analysis counts a loop's body once, so FLOPs come from the layers
unrolled (at 1 and 2 layers, extrapolated) and one micro-batch, times their number.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any, Callable

import jax

from hs2p_jax.errors import UserError
from hs2p_jax.plan.target import Target, verdict
from hs2p_jax.sharding import make_mesh

COMPILE_MODES = ("auto", "host", "tpu", "none")
REDUCED_LAYERS = (2, 4)  # compiled depths for models deeper than the last one
FLOP_LAYERS = (1, 2)
# Codegen-only options: the same buffer sizes (to a few bytes) in a fraction of the CPU compile time.
HOST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


class Unavailable(Exception):
  """The compiled path cannot run here; the message says why."""


def compile_mode(requested: str | None, target: Target) -> str:
  mode = requested or "auto"
  if mode not in COMPILE_MODES:
    raise UserError(f"--compile {mode}: expected one of {', '.join(COMPILE_MODES)}")
  if mode == "tpu" and (not target.chip or target.chip.kind != "tpu"):
    raise UserError("--compile tpu needs a TPU --chip (v4, v5e, v5p, v6e)")
  return "host" if mode == "auto" else mode


def start_backend(mode: str, n: int) -> None:
  """Keeps this machine's accelerators out and, for host compilation, asks for `n` CPU devices, if
  the JAX backend has not started yet (`devices` checks what it got)."""
  jax.config.update("jax_platforms", "cpu")
  if mode == "host":
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
      pass


def devices(mode: str, target: Target) -> tuple[list, str]:
  """(the devices to compile on, the compiler's name) for `mode`; Unavailable says why there are none."""
  if mode == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise Unavailable("TPU AOT compilation needs the libtpu package (pip install libtpu), which is not installed")
    if target.topology is None:
      raise Unavailable(f"no known {target.chip.name} slice topology for {target.devices} chips")
    from jax.experimental import topologies
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", target.slice_name),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compile-only devices hold no chip: plans may run side by side
      os.environ.setdefault(key, value)  # no TPU VM metadata to read: compile-only devices
    config = "megacore" if target.chip.cores_per_chip == 2 else "default"
    try:
      devs = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                          chip_config_name=config).devices
    except Exception as e:  # libtpu's errors are many and unstable
      raise Unavailable(f"libtpu could not describe topology {target.topology}: {str(e).splitlines()[0]}") from None
    if len(devs) != target.devices:
      raise Unavailable(f"libtpu gave {len(devs)} devices for topology {target.topology}, not {target.devices}")
    return list(devs), f"tpu ({target.topology}, libtpu AOT)"
  devs = jax.devices("cpu")
  if len(devs) < target.devices:
    raise Unavailable(f"the JAX CPU backend started with {len(devs)} device(s) before the plan could ask for "
                      f"{target.devices}; run hs2p plan in a fresh process")
  return devs[:target.devices], f"host CPU ({target.devices} virtual device{'s' * (target.devices > 1)})"


def start_compile(mode: str, target: Target, mesh_cfg: Any) -> tuple[Any, str] | dict:
  """(the mesh of `mesh_cfg` over the devices to compile on, compiler name), or the "skipped"
  report saying why there are none."""
  if mode == "none":
    return {"status": "skipped", "note": "--compile none"}
  try:
    devs, compiler = devices(mode, target)
  except Unavailable as e:
    return {"status": "skipped", "note": str(e)}
  return make_mesh(mesh_cfg, devs), compiler


def memory(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}


def flops(compiled: Any) -> float:
  """FLOPs per device of a compiled (SPMD-partitioned) step, by XLA's cost analysis."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))


def linear(values: list, layers: list[int], depth: int) -> Any:
  """The figure at `depth` from figures at two depths (exact when each layer adds the same)."""
  if len(values) == 1:
    return values[0]
  (l1, l2), (v1, v2) = layers, values
  return v1 + (depth - l1) * (v2 - v1) / (l2 - l1)


def memory_at(values: list, layers: list[int], depth: int) -> Any:
  """A memory figure at `depth` from figures at two depths, never below the deeper one's: memory
  does not shrink as layers are added (a smaller figure at the deeper compile is XLA scheduling
  it differently, and the deeper figure stands)."""
  if len(values) == 1:
    return values[0]
  return max(linear(values, layers, depth), values[-1])


def depths(depth: int) -> tuple[list[int], list[int]]:
  """(depths compiled for memory, depths compiled for FLOPs) of a `depth`-layer model."""
  return ([depth] if depth <= REDUCED_LAYERS[-1] else list(REDUCED_LAYERS),
          [depth] if depth <= FLOP_LAYERS[-1] else list(FLOP_LAYERS))


def options(mode: str) -> dict | None:
  return HOST_OPTIONS if mode == "host" else None


def compile_step(lower_at: Callable[[Any, int, bool], Any], target: Target, mode: str, mesh_cfg: Any, depth: int,
                 micro_batches: int = 1, label: str = "train step") -> dict:
  """Per-device memory and FLOPs of a compiled step; status "ok", "skipped" or "failed".
  `lower_at(mesh, layers, for_flops)` lowers the step at `layers` layers (for FLOPs: layers unrolled,
  one micro-batch of the `micro_batches`)."""
  t0 = time.time()
  started = start_compile(mode, target, mesh_cfg)
  if isinstance(started, dict):
    return started
  mesh, compiler = started
  layers, flop_layers = depths(depth)
  print(f"hs2p plan: compiling the {label} at {' and '.join(map(str, layers))} layer(s) for {compiler} ...",
        file=sys.stderr, flush=True)
  try:
    mems = [memory(lower_at(mesh, n, False).compile(options(mode))) for n in layers]
    fl = [flops(lower_at(mesh, n, True).compile(options(mode))) * micro_batches for n in flop_layers]
  except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED from a TPU compile: a finding
    return {"status": "failed", "compiler": compiler, "note": str(e).splitlines()[0][:300]}
  out = {k: int(memory_at([m[k] for m in mems], layers, depth)) for k in mems[0]}
  note = f"all {depth} layers" if len(layers) == 1 else f"{layers[0]} and {layers[1]} layers extrapolated linearly to {depth}"
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["verdict"] = verdict(out["peak"], target.hbm_bytes)["verdict"]
  out["flops_per_device"] = linear(fl, flop_layers, depth)
  return {"status": "ok", "compiler": compiler, "note": note, "layers_compiled": layers, "per_depth": mems, **out,
          "flops_layers_compiled": flop_layers, "seconds": round(time.time() - t0, 1)}


def kernel_flops(compiled: dict[str, Any], attention_flops: float, model_flops_per_device: float) -> None:
  """Adds the splash kernel's attention FLOPs (`attention_flops` per device: XLA's cost analysis cannot
  see inside a Pallas kernel) and the ratio of the compiled FLOPs to the model's, in place."""
  if compiled["status"] != "ok":
    return
  compiled["kernel_flops_per_device"] = attention_flops
  total = compiled["flops_per_device"] + attention_flops
  compiled["flops_ratio"] = round(total / model_flops_per_device, 3)


def page_lowering(page: Any, cfg: Any, section: str, arch: Any, rules: Any,
                  flop_rows: int | None = None) -> Callable[[Any, int, bool], Any]:
  """`lower_at(mesh, layers, for_flops)` for `compile_step`: a trainer page's own step (its
  `blueprint` and `batch_spec`) at `layers` layers of `arch`; for FLOPs, layers unrolled and one
  micro-batch of `cfg.<section>`, of `flop_rows` rows where given (a typical packed batch)."""
  sc = getattr(cfg, section)
  one_micro = dataclasses.replace(cfg, **{section: dataclasses.replace(sc, batch_size=sc.micro_batch_size or
                                                                        sc.batch_size)})

  def lower_at(mesh, layers: int, for_flops: bool):
    c = one_micro if for_flops else cfg
    at = arch.replace(num_layers=layers, scan_layers=arch.scan_layers and not for_flops)
    rows = {"rows": flop_rows} if for_flops and flop_rows else {}
    return page.blueprint(c, mesh, rules, at).lower(page.batch_spec(c, mesh, rules, **rows))
  return lower_at
