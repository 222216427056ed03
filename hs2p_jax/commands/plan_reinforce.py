"""`hs2p plan` for a REINFORCE config: every phase of the step compiled on the target (see `hs2p_jax.plan_reinforce`).

As for the reward-model step: memory from the phases as they run (scanned layers, compiled at 2 and
4 layers and extrapolated), FLOPs from the layers unrolled at 1 and 2 layers; the decode loop's
body, which XLA's cost analysis counts once, is compiled on its own and counted once per new token.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from hs2p_jax import plan, plan_table
from hs2p_jax import plan_reinforce as rl
from hs2p_jax.commands.plan import REDUCED_LAYERS, _HOST_OPTIONS, _flops, _linear, _memory, architecture, start_compile
from hs2p_jax.config import ReinforceRunConfig
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import MESH_AXES, Rules, rules_from, use_mesh
from hs2p_jax.train.feed import batch_sharding


def reward_architecture(cfg: ReinforceRunConfig, policy: LlamaConfig) -> tuple[LlamaConfig, int, str]:
  """(architecture, outputs, where from) of the reward model: its checkpoint's, else the policy's."""
  from hs2p_jax.checkpoint import is_model_checkpoint, read_meta
  path = cfg.reward_model
  if path and (is_model_checkpoint(path) or is_model_checkpoint(os.path.join(path, "model"))):
    meta = read_meta(path)
    return meta.config.replace(dtype=policy.dtype, remat=policy.remat, attention=policy.attention), \
        meta.num_attributes, f"reward_model={path}"
  note = f" ({path}: not read by plan here)" if path else ""
  return policy, 9, f"the policy's architecture{note}"


def _decode_step(x: dict[str, Any], s: rl.Shapes, rules: Rules):
  """One decode step of the N rollouts against a full cache (Tp + Tr slots): the loop's body."""
  from hs2p_jax.model.llama import KVCache
  from hs2p_jax.sample import _constrain_cache
  import jax.numpy as jnp

  mesh, graphdef, params = rl.sampler_state(x)
  mesh = mesh or x["rollout"]["tokens"].sharding.mesh

  def step(params, tok):
    lm = nnx.merge(graphdef, params)
    cache = _constrain_cache(KVCache.init(lm.cfg, tok.shape[0], s.prompt_len + s.new_tokens))
    hidden, cache = lm.model(tok[:, None], jnp.ones_like(tok)[:, None], cache=cache)
    return lm.logits(hidden)[:, 0], cache

  tok = jax.ShapeDtypeStruct((s.rollouts,), jnp.int32, sharding=batch_sharding("tokens", (s.rollouts,), mesh, rules))
  with use_mesh(mesh, rules):
    return jax.jit(step).lower(params, tok)


def compile_phases(cfg: ReinforceRunConfig, policy: LlamaConfig, rm: LlamaConfig, num_attributes: int,
                   target: plan.Target, rules: Rules, mode: str) -> dict[str, Any]:
  """Compiled per-device memory of each phase and FLOPs of the step; status ok / skipped / failed."""
  t0 = time.time()
  started = start_compile(mode, target, cfg.mesh)
  if isinstance(started, dict):
    return started
  mesh, compiler = started
  s = rl.shapes(cfg)
  depth, rm_depth = policy.num_layers, rm.num_layers
  layers = [depth] if depth <= REDUCED_LAYERS[-1] else list(REDUCED_LAYERS)
  flop_layers = [depth] if depth <= 2 else [1, 2]
  options = _HOST_OPTIONS if mode == "host" else None
  print(f"hs2p plan: compiling the REINFORCE phases ({', '.join(rl.PHASES)}) at "
        f"{' and '.join(map(str, layers))} layer(s) for {compiler} ...", file=sys.stderr, flush=True)

  def at(n: int, scan: bool = True):
    return rl.inputs(cfg, policy.replace(num_layers=n, scan_layers=scan and policy.scan_layers),
                     rm.replace(num_layers=n, scan_layers=scan and rm.scan_layers), num_attributes, mesh, rules,
                     memory=target.hbm_bytes)

  full = rl.inputs(cfg, policy, rm, num_attributes, AbstractMesh(target.mesh, MESH_AXES), rules, target.hbm_bytes)
  if full["layout"] is not None:  # the reduced-depth inputs take the full model's degree
    cfg = dataclasses.replace(cfg, reinforce=dataclasses.replace(cfg.reinforce, rollout_tensor=full["layout"].tensor))
  phase_names = rl.phases(cfg)
  resident = rl.resident(full)
  try:
    with use_mesh(mesh, rules):
      mems = {ph: [_memory(rl.lower(ph, cfg, at(n)).compile(options)) for n in layers] for ph in phase_names}
      flops = {ph: [_flops(rl.lower(ph, cfg, at(n, scan=False), new_tokens=1 if ph == "generate" else None,
                                    micro_batches=1).compile(options)) for n in flop_layers] for ph in phase_names}
      decode = [_flops(_decode_step(at(n, scan=False), s, rules).compile(options)) for n in flop_layers]
  except jax.errors.JaxRuntimeError as e:
    return {"status": "failed", "compiler": compiler, "note": str(e).splitlines()[0][:300]}
  phases = {}
  for ph in phase_names:
    d = rm_depth if ph == "score" else depth
    mem = {k: int(_linear([m[k] for m in mems[ph]], layers, d)) for k in mems[ph][0]}
    phases[ph] = {**mem, "peak": rl.phase_peak(ph, mem, resident, cfg.reinforce.rollout_copy), "per_depth": mems[ph]}
  f = {ph: _linear(flops[ph], flop_layers, rm_depth if ph == "score" else depth) for ph in phase_names}
  calls = {"copy": 1, "generate": 1, "logprobs": 2, "score": math.ceil(s.rollouts / full["rm_rows"]),
           "update": cfg.reinforce.updates_per_rollout}
  f_phase = {ph: f[ph] * calls[ph] for ph in phase_names}
  f_phase["generate"] += (s.new_tokens - 1) * _linear(decode, flop_layers, depth)  # the loop body, per new token
  peak = max(p["peak"] for p in phases.values())
  note = f"all {depth} layers" if len(layers) == 1 else f"{layers[0]} and {layers[1]} layers extrapolated linearly"
  return {"status": "ok", "compiler": compiler, "note": note, "layers_compiled": layers, "phases": phases,
          "peak": peak, "verdict": plan.verdict(peak, target.hbm_bytes)["verdict"],
          "flops_by_phase": f_phase, "flops_per_device": sum(f_phase.values()), "calls": calls,
          "flops_layers_compiled": flop_layers, "seconds": round(time.time() - t0, 1)}


def build_report(cfg: ReinforceRunConfig, config_path: str, target: plan.Target, mode: str) -> dict[str, Any]:
  """The REINFORCE plan as one JSON-serialisable dict."""
  from hs2p_jax.bench.flops import PEAK_FLOPS, attention_forward_flops
  from hs2p_jax.model.attention import choose

  policy, source = architecture(cfg.policy)
  rm, n_attr, rm_source = reward_architecture(cfg, policy)
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  x = rl.inputs(cfg, policy, rm, n_attr, amesh, rules, target.hbm_bytes)
  resident = rl.resident(x)
  s = rl.shapes(cfg)
  lay = x["layout"]
  prefill = rl.prefill_rows(cfg, amesh, rules, lay)
  rollout = ({"copy": False, "note": "sampling from the training params and layout (reinforce.rollout_copy=false)"}
             if lay is None else {"copy": True, "dtype": lay.dtype, "tensor": lay.tensor, "mesh": dict(lay.mesh.shape),
                                  "bytes_per_device": lay.bytes_per_device(x["params"]), "note": lay.describe()})
  if lay is not None:  # a decode step reads the device's share of the copy and of the KV cache
    from hs2p_jax.bench.flops import PEAK_BANDWIDTH
    rows = s.rollouts / lay.mesh.shape["data"]
    kv = 2 * policy.num_layers * rows * (s.prompt_len + s.new_tokens / 2) * policy.num_kv_heads / lay.tensor \
        * policy.head_dim * jnp.dtype(lay.dtype).itemsize
    step_bytes = int(rollout["bytes_per_device"] + kv)
    bw = PEAK_BANDWIDTH.get(target.chip.name) if target.chip else None
    rollout.update(decode_bytes_per_step=step_bytes,
                   generate_seconds_at_peak_bandwidth=round(step_bytes * s.new_tokens / bw, 2) if bw else None)
  mf = rl.model_flops(cfg, policy, rm, prefill)
  peak_rate = PEAK_FLOPS.get(target.chip.name, {}).get(policy.dtype) if target.chip else None
  per_device = mf["total"] / target.devices
  analytic = {"resident": resident, "resident_total": sum(resident.values()), "model_flops": mf,
              "model_flops_per_device": per_device, "peak_flops_per_device": peak_rate,
              "step_seconds_at_50_mfu": per_device / (0.5 * peak_rate) if peak_rate else None,
              "prefill_rows": prefill}
  compiled = compile_phases(cfg, policy, rm, n_attr, target, rules, mode)
  kernel = choose(policy.attention, "tpu" if mode == "tpu" else "cpu", policy.dtype, branches=cfg.reinforce.share_prompt)
  if compiled["status"] == "ok":
    # the splash kernel's attention FLOPs, which XLA's cost analysis cannot see: two log-prob
    # forwards and the update's forward and backward (5 forwards' worth) of the policy, one of the RM
    t = s.prompt_len + s.new_tokens
    compiled["kernel_flops_per_device"] = ((5 * attention_forward_flops(policy, s.rollouts, t)
                                            + attention_forward_flops(rm, s.rollouts, t)) / target.devices
                                           if kernel == "splash" else 0.0)
    total = compiled["flops_per_device"] + compiled["kernel_flops_per_device"]
    compiled["flops_ratio"] = round(total / per_device, 3)
  on_chip = compiled["status"] == "ok" and compiled["compiler"].startswith("tpu")
  verdict = plan.verdict(compiled["peak"] if on_chip else analytic["resident_total"], target.hbm_bytes)
  verdict["basis"] = "compiled for the chip" if on_chip else "analytic (resident arrays only)"
  return {
      "config": config_path, "kind": "reinforce",
      "model": {"policy": source, "reward_model": rm_source, "params": rl.params_count(x), "layers": policy.num_layers,
                "dtype": policy.dtype, "remat": policy.remat,
                "attention": choose(policy.attention, target.chip.kind if target.chip else "cpu", policy.dtype,
                                    branches=cfg.reinforce.share_prompt)},
      "target": {"chip": target.chip.name if target.chip else None, "devices": target.devices,
                 "slice": target.slice_name, "hbm": target.hbm_bytes, "hbm_source": plan.HBM_SOURCE,
                 "mesh": dict(zip(MESH_AXES, target.mesh))},
      "rollout": rollout,
      "batch": {"prompts": s.prompts, "samples": s.samples, "rollouts": s.rollouts, "prompt_len": s.prompt_len,
                "new_tokens": s.new_tokens, "minibatch": s.minibatch},
      "analytic": analytic, "compiled": compiled, "verdict": verdict,
      "warnings": rl.warnings_for(cfg, target, amesh, rules), "notes": rl.notes_for(cfg, amesh, rules, lay),
  }


def render(r: dict[str, Any]) -> str:
  """The REINFORCE plan as a table."""
  t, a, b, c = r["target"], r["analytic"], r["batch"], r["compiled"]
  lines = [f"plan: {r['config']} (REINFORCE)",
           f"policy: {r['model']['policy']}; reward model: {r['model']['reward_model']}; {r['model']['layers']} layers, "
           f"compute {r['model']['dtype']}, remat={r['model']['remat']}, attention={r['model']['attention']}",
           f"target: {t['devices']} x {t['chip']}" + (f" ({t['slice']})" if t["slice"] else "")
           + f"; mesh {' '.join(f'{k}={v}' for k, v in t['mesh'].items())}",
           f"step: {b['prompts']} prompts x {b['samples']} samples, {b['prompt_len']} + {b['new_tokens']} tokens; "
           f"updates on {b['minibatch']} rollouts",
           f"sampler: {r['rollout']['note']}" + (f", {plan_table.size(r['rollout']['bytes_per_device'])} per device"
                                                 if r["rollout"]["copy"] else ""),
           *([f"  decoding reads {plan_table.size(r['rollout']['decode_bytes_per_step'])} per device and token: "
              f"{r['rollout']['generate_seconds_at_peak_bandwidth']} s for the {b['new_tokens']} tokens at peak HBM bandwidth"]
             if r["rollout"].get("generate_seconds_at_peak_bandwidth") else []),
           "", "  resident per device (float32)"]
  lines += [plan_table.row(k.replace("_", " "), v) for k, v in a["resident"].items()]
  lines.append(plan_table.row("total", a["resident_total"]))
  step = f"{a['step_seconds_at_50_mfu']:.1f} s" if a.get("step_seconds_at_50_mfu") else "- (no peak known)"
  lines += ["", f"  model FLOPs per device and step: {a['model_flops_per_device']:.4g}; step time at 50% MFU: {step}"]
  if c["status"] == "ok":
    lines += ["", f"  per device and phase (compiled: {c['compiler']}, {c['note']}): peak with the resident arrays"]
    lines += [plan_table.row(ph, p["peak"]) for ph, p in c["phases"].items()]
    lines.append(plan_table.flops_line(c))
  else:
    lines += ["", f"  compiled: {c['status']}: {c['note']}"]
  lines += ["", plan_table.verdict_line(r["verdict"]), *[f"warning: {w}" for w in r["warnings"]],
            *[f"note: {n}" for n in r["notes"]]]
  return "\n".join(lines) + "\n"
