"""`hs2p plan`: per-device memory of a config's reward-model train step on a mesh and chip (REINFORCE:
`commands.plan_reinforce`; DPO: `commands.plan_dpo`).

The analytic breakdown (`hs2p_jax.plan`) is always there. Compiled numbers come from lowering and
compiling the real train step ahead of time on abstract sharded inputs and reading
`compiled.memory_analysis()`, by `--compile` (default auto = host):
  host  N virtual CPU devices, on any machine: shardings and argument bytes are exact; temporaries
        are the CPU compiler's, an indication of an accelerator's only.
  tpu   libtpu's compile-only devices of the chip's slice (needs the libtpu package, no TPU): the TPU
        compiler's own numbers; minutes for a 70B model on a few cores.
  none  analytic only.
Models deeper than 4 layers are compiled at 2 and 4 layers and each figure is extrapolated linearly
to the full depth. The verdict uses the TPU compiler's peak when there is one, else the analytic total.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any

import jax
from jax.sharding import AbstractMesh

from hs2p_jax import config as config_lib
from hs2p_jax import plan, plan_table
from hs2p_jax.atomic import write_json
from hs2p_jax.config import DPORunConfig, ModelConfig, ReinforceRunConfig, RunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LlamaConfig, from_hf_config, preset
from hs2p_jax.sharding import MESH_AXES, Rules, make_mesh, rules_from, use_mesh

COMPILE_MODES = ("auto", "host", "tpu", "none")
REDUCED_LAYERS = (2, 4)  # compiled depths for models deeper than the last one
# Codegen-only options: the same buffer sizes (to a few bytes) in a fraction of the CPU compile time.
_HOST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}


class _Unavailable(Exception):
  """The compiled path cannot run here; the message says why."""


def architecture(mc: ModelConfig) -> tuple[LlamaConfig, str]:
  """The model's LlamaConfig (checkpoint, Hugging Face config.json, else the preset) and where it came from."""
  runtime: dict[str, Any] = {"dtype": mc.dtype, "scan_layers": mc.scan_layers, "remat": mc.remat,
                             "attention": mc.attention, "weight_grad": mc.weight_grad}
  if mc.num_layers is not None:
    runtime["num_layers"] = mc.num_layers
  if mc.init_from:
    from hs2p_jax.checkpoint import is_model_checkpoint, read_meta
    if is_model_checkpoint(mc.init_from) or is_model_checkpoint(os.path.join(mc.init_from, "model")):
      return read_meta(mc.init_from).config.replace(**runtime), f"model.init_from={mc.init_from}"
  elif mc.source and not mc.source.startswith("gguf:"):
    path = mc.source[3:] if mc.source.startswith("hf:") else mc.source
    if os.path.isfile(os.path.join(path, "config.json")):
      from hs2p_jax.convert.hf import read_config
      return from_hf_config(read_config(path), **runtime), f"model.source={mc.source}"
  missing = mc.init_from or mc.source
  note = f" ({missing}: not read by plan here)" if missing else ""
  return preset(mc.preset, **runtime), f"model.preset={mc.preset}{note}"


def _compile_mode(requested: str | None, target: plan.Target) -> str:
  mode = requested or "auto"
  if mode not in COMPILE_MODES:
    raise UserError(f"--compile {mode}: expected one of {', '.join(COMPILE_MODES)}")
  if mode == "tpu" and (not target.chip or target.chip.kind != "tpu"):
    raise UserError("--compile tpu needs a TPU --chip (v4, v5e, v5p, v6e)")
  return "host" if mode == "auto" else mode


def _start_backend(mode: str, n: int) -> None:
  """Keeps this machine's accelerators out and, for host compilation, asks for `n` CPU devices, if
  the JAX backend has not started yet (`_devices` checks what it got)."""
  jax.config.update("jax_platforms", "cpu")
  if mode == "host":
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
      pass


def _devices(mode: str, target: plan.Target) -> tuple[list, str]:
  if mode == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise _Unavailable("TPU AOT compilation needs the libtpu package (pip install libtpu), which is not installed")
    if target.topology is None:
      raise _Unavailable(f"no known {target.chip.name} slice topology for {target.devices} chips")
    from jax.experimental import topologies
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", target.slice_name),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compile-only devices hold no chip: plans may run side by side
      os.environ.setdefault(key, value)  # no TPU VM metadata to read: compile-only devices
    config = "megacore" if target.chip.cores_per_chip == 2 else "default"
    try:
      devices = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                             chip_config_name=config).devices
    except Exception as e:  # libtpu's errors are many and unstable
      raise _Unavailable(f"libtpu could not describe topology {target.topology}: {str(e).splitlines()[0]}") from None
    if len(devices) != target.devices:
      raise _Unavailable(f"libtpu gave {len(devices)} devices for topology {target.topology}, not {target.devices}")
    return list(devices), f"tpu ({target.topology}, libtpu AOT)"
  devices = jax.devices("cpu")
  if len(devices) < target.devices:
    raise _Unavailable(f"the JAX CPU backend started with {len(devices)} device(s) before the plan could ask for "
                       f"{target.devices}; run hs2p plan in a fresh process")
  return devices[:target.devices], f"host CPU ({target.devices} virtual device{'s' * (target.devices > 1)})"


def _lower(cfg: RunConfig, model_cfg: LlamaConfig, mesh, rules: Rules):
  from hs2p_jax.train.rm import make_train_step

  inputs = plan.step_inputs(cfg, model_cfg, mesh, rules)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  step = jax.jit(make_train_step(inputs.graphdef, inputs.tx, inputs.objective), donate_argnums=(0, 1),
                 out_shardings=(shardings(inputs.params), shardings(inputs.opt_state), None))
  with use_mesh(mesh, rules):
    return step.lower(inputs.params, inputs.opt_state, inputs.batch)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}


def _flops(compiled) -> float:
  """FLOPs per device of a compiled (SPMD-partitioned) step, by XLA's cost analysis."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))


def _linear(values: list, layers: list[int], depth: int):
  """The figure at `depth` from figures at two depths (exact when each layer adds the same)."""
  if len(values) == 1:
    return values[0]
  (l1, l2), (v1, v2) = layers, values
  return v1 + (depth - l1) * (v2 - v1) / (l2 - l1)


def start_compile(mode: str, target: plan.Target, mesh_cfg) -> tuple[Any, str] | dict:
  """(the mesh of `mesh_cfg` over the devices to compile on, compiler name), or the "skipped"
  report saying why there are none."""
  if mode == "none":
    return {"status": "skipped", "note": "--compile none"}
  try:
    devices, compiler = _devices(mode, target)
  except _Unavailable as e:
    return {"status": "skipped", "note": str(e)}
  return make_mesh(mesh_cfg, devices), compiler


def compile_step(cfg: RunConfig, model_cfg: LlamaConfig, target: plan.Target, rules: Rules, mode: str,
                 lower=None, section: str = "train", label: str = "train step") -> dict:
  """Per-device bytes from the compiled train step (module docstring); status "ok", "skipped" or
  "failed". `lower(cfg, model_cfg, mesh, rules)` lowers another trainer's step whose batch keys are
  in `cfg.<section>` (default: the reward-model step)."""
  lower = lower or _lower
  t0 = time.time()
  started = start_compile(mode, target, cfg.mesh)
  if isinstance(started, dict):
    return started
  mesh, compiler = started
  depth = model_cfg.num_layers
  layers = [depth] if depth <= REDUCED_LAYERS[-1] else list(REDUCED_LAYERS)
  print(f"hs2p plan: compiling the {label} at {' and '.join(map(str, layers))} layer(s) for {compiler} ...",
        file=sys.stderr, flush=True)
  options = _HOST_OPTIONS if mode == "host" else None
  # XLA's cost analysis counts a loop's body once: FLOPs come from one micro-batch (times their
  # number) with the layers unrolled (at 1 and 2 layers, extrapolated); memory from the step as it runs.
  flop_layers = [depth] if depth <= 2 else [1, 2]
  tc = getattr(cfg, section)
  micro = tc.micro_batch_size or tc.batch_size
  one_micro = dataclasses.replace(cfg, **{section: dataclasses.replace(tc, batch_size=micro)})
  try:
    compiled = [lower(cfg, model_cfg.replace(num_layers=n), mesh, rules).compile(options) for n in layers]
    mems = [_memory(c) for c in compiled]
    flops = [_flops(lower(one_micro, model_cfg.replace(num_layers=n, scan_layers=False), mesh, rules).compile(options))
             * (tc.batch_size // micro) for n in flop_layers]
  except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED from a TPU compile: a finding
    return {"status": "failed", "compiler": compiler, "note": str(e).splitlines()[0][:300]}
  out = {k: int(_linear([m[k] for m in mems], layers, depth)) for k in mems[0]}
  note = f"all {depth} layers" if len(layers) == 1 else f"{layers[0]} and {layers[1]} layers extrapolated linearly to {depth}"
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["verdict"] = plan.verdict(out["peak"], target.hbm_bytes)["verdict"]
  out["flops_per_device"] = _linear(flops, flop_layers, depth)
  return {"status": "ok", "compiler": compiler, "note": note, "layers_compiled": layers, "per_depth": mems, **out,
          "flops_layers_compiled": flop_layers, "seconds": round(time.time() - t0, 1)}


def build_report(cfg: RunConfig, config_path: str, target: plan.Target, mode: str) -> dict[str, Any]:
  """The plan as one JSON-serialisable dict (what `hs2p plan` prints and writes)."""
  from hs2p_jax.bench.flops import PEAK_FLOPS
  from hs2p_jax.model.attention import choose

  model_cfg, source = architecture(cfg.model)
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  # the kernel `attention: auto` picks on the target (the compiled step picks by its devices)
  on_target = model_cfg.replace(attention=choose(model_cfg.attention, target.chip.kind if target.chip else "cpu",
                                                 model_cfg.dtype, branches=cfg.data.share_prompt))
  inputs = plan.step_inputs(cfg, on_target, amesh, rules)
  analytic = plan.analytic(cfg, on_target, inputs, amesh, rules)
  analytic["model_flops"] = plan.model_flops(cfg, model_cfg)
  analytic["model_flops_per_device"] = analytic["model_flops"] / target.devices
  peak = PEAK_FLOPS.get(target.chip.name, {}).get(model_cfg.dtype) if target.chip else None
  analytic["peak_flops_per_device"] = peak
  analytic["step_seconds_at_50_mfu"] = analytic["model_flops_per_device"] / (0.5 * peak) if peak else None
  compiled = compile_step(cfg, model_cfg, target, rules, mode)
  if compiled["status"] == "ok":
    # XLA's cost analysis cannot see inside a Pallas kernel: the splash kernel's attention FLOPs
    # (the model count's share) are added beside it, so that the two totals compare.
    kernel = choose(model_cfg.attention, "tpu" if mode == "tpu" else "cpu", model_cfg.dtype,
                    branches=cfg.data.share_prompt)
    compiled["kernel_flops_per_device"] = (plan.model_flops(cfg, model_cfg, attention_only=True) / target.devices
                                           if kernel == "splash" else 0.0)
    total = compiled["flops_per_device"] + compiled["kernel_flops_per_device"]
    compiled["flops_ratio"] = round(total / analytic["model_flops_per_device"], 3)
  on_chip = compiled["status"] == "ok" and compiled["compiler"].startswith("tpu")
  verdict = plan.verdict(compiled["peak"] if on_chip else analytic["total"], target.hbm_bytes)
  verdict["basis"] = "compiled for the chip" if on_chip else "analytic"
  return {
      "config": config_path,
      "model": {"name": source, "params": plan.num_params(inputs.params), "layers": model_cfg.num_layers,
                "dtype": model_cfg.dtype, "remat": model_cfg.remat, "attention": on_target.attention,
                "attention_config": model_cfg.attention},
      "objective": cfg.train.objective if cfg.train.objective == "regression" else f"bt ({cfg.train.bt_variant})",
      "target": {"chip": target.chip.name if target.chip else None, "devices": target.devices,
                 "slice": target.slice_name, "hbm": target.hbm_bytes, "hbm_source": plan.HBM_SOURCE,
                 "mesh": dict(zip(MESH_AXES, target.mesh))},
      "batch": plan.batch_layout(cfg, plan.batch_split(amesh, rules)),
      "analytic": analytic,
      "compiled": compiled,
      "verdict": verdict,
      "warnings": plan.warnings_for(cfg, target, analytic, rules),
  }


def _kind(path: str) -> str:
  """"dpo", "reinforce" or "rm": which trainer a config is for."""
  data = config_lib.read_yaml(path)
  if "dpo" in data:
    return "dpo"
  return "reinforce" if "policy" in data or "reinforce" in data else "rm"


def plan_command(args) -> int:
  kind = _kind(args.config)
  cfg = config_lib.load({"dpo": DPORunConfig, "reinforce": ReinforceRunConfig, "rm": RunConfig}[kind], args.config,
                        args.overrides)
  if kind == "rm" and cfg.model.kind != "reward":
    raise UserError(f"{args.config}: model.kind={cfg.model.kind!r}: hs2p plan covers reward-model (model.kind=reward), "
                    "REINFORCE (policy:, reinforce:) and DPO (policy:, dpo:) configs")
  target = plan.resolve_target(args.chip, args.devices, cfg.mesh)
  mode = _compile_mode(getattr(args, "compile", None), target)
  _start_backend(mode, target.devices)
  if kind != "rm":
    from hs2p_jax.commands import plan_dpo, plan_reinforce
    module = plan_dpo if kind == "dpo" else plan_reinforce
    report = module.build_report(cfg, args.config, target, mode)
    sys.stderr.write(module.render(report))
  else:
    report = build_report(cfg, args.config, target, mode)
    sys.stderr.write(plan_table.render(report))
  print(json.dumps(report, indent=2))
  if args.out:
    write_json(os.path.join(args.out, "plan.json"), report)
  return 0
