"""`hs2p plan` for a DPO config: the real `train.dpo` step compiled on the target.

The step takes the policy (float32, sharded by the rules), its AdamW state, the frozen reference
(as the policy) and k stacked micro-batches of pairs with log-prob targets ([k, R, T] rows split
over the batch axes). Memory comes from the step compiled with scanned layers (at 2 and 4 layers,
extrapolated), FLOPs from one micro-batch with the layers unrolled (1 and 2 layers) times k, as for
the reward-model step. Model FLOPs: the policy's forward and backward (6N per token and attention),
the reference's forward (2N per token and attention), and the LM head (2DV per target token: every
token counted, a bound) three times for the policy and once for the reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from hs2p_jax import plan, plan_table
from hs2p_jax.commands.plan import architecture, compile_step
from hs2p_jax.config import DPORunConfig
from hs2p_jax.model import create
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import MESH_AXES, Rules, batch_split, logical_to_spec, opt_state_shardings, rules_from, \
    state_shardings, use_mesh
from hs2p_jax.train.optim import optimizer_from

ROW_KEYS = ("input_ids", "segment_ids", "target_pred", "chosen_pair", "rejected_pair")


def layout(cfg: DPORunConfig, split: int = 1) -> dict[str, int]:
  """Pairs per micro-batch, rows (2 per pair, padded to split over the batch axes), tokens, micro-batches."""
  dc = cfg.dpo
  n = dc.micro_batch_size or dc.batch_size
  return {"examples": n, "rows": -(-2 * n // split) * split, "real_rows": 2 * n, "seq_len": cfg.data.max_length,
          "micro_batches": dc.batch_size // n}


def inputs(cfg: DPORunConfig, model_cfg: LlamaConfig, mesh, rules: Rules) -> dict[str, Any]:
  """Abstract, sharded arguments of the DPO step."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: create("lm", model_cfg)))
  sh = state_shardings(state, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)
  tx = optimizer_from(cfg.dpo)
  abs_opt = jax.eval_shape(tx.init, params)
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_opt,
                     opt_state_shardings(abs_opt, sh, mesh))
  lay = layout(cfg, batch_split(mesh, rules))
  k, n, r, t = lay["micro_batches"], lay["examples"], lay["rows"], lay["seq_len"]
  rows = NamedSharding(mesh, logical_to_spec((None, "act_batch", None), (k, r, t), mesh, rules))
  rep = NamedSharding(mesh, P())
  batch = {key: jax.ShapeDtypeStruct((k, r, t), jnp.int32, sharding=rows) for key in ROW_KEYS}
  batch.update(magnitude=jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=rep),
               valid=jax.ShapeDtypeStruct((k, n), jnp.bool_, sharding=rep))
  return {"graphdef": graphdef, "tx": tx, "params": params, "opt_state": opt, "batch": batch}


def lower(cfg: DPORunConfig, model_cfg: LlamaConfig, mesh, rules: Rules):
  from hs2p_jax.train.dpo import make_dpo_step
  x = inputs(cfg, model_cfg, mesh, rules)
  shard = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
  step = jax.jit(make_dpo_step(x["graphdef"], x["tx"], cfg.dpo.variant, cfg.dpo.beta), donate_argnums=(0, 1),
                 out_shardings=(shard(x["params"]), shard(x["opt_state"]), None))
  with use_mesh(mesh, rules):
    return step.lower(x["params"], x["opt_state"], x["params"], x["batch"])


def model_flops(cfg: DPORunConfig, model_cfg: LlamaConfig) -> dict[str, float]:
  """Model FLOPs of one step over its real rows (module docstring)."""
  from hs2p_jax.bench.flops import forward_flops, train_flops
  lay = layout(cfg)
  rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
  head = 2 * model_cfg.hidden_size * model_cfg.vocab_size * rows * t
  out = {"policy": train_flops(model_cfg, rows, t) + 3 * head, "reference": forward_flops(model_cfg, rows, t) + head}
  out["total"] = out["policy"] + out["reference"]
  return out


def build_report(cfg: DPORunConfig, config_path: str, target: plan.Target, mode: str) -> dict[str, Any]:
  """The DPO plan as one JSON-serialisable dict."""
  from hs2p_jax.bench.flops import PEAK_FLOPS, attention_flops, attention_forward_flops
  from hs2p_jax.model.attention import choose

  model_cfg, source = architecture(cfg.policy)
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  x = inputs(cfg, model_cfg, amesh, rules)
  resident = {"policy": plan.device_bytes(x["params"]), "optimizer": plan.device_bytes(x["opt_state"]),
              "reference": plan.device_bytes(x["params"]), "batch": plan.device_bytes(x["batch"])}
  mf = model_flops(cfg, model_cfg)
  per_device = mf["total"] / target.devices
  peak_rate = PEAK_FLOPS.get(target.chip.name, {}).get(model_cfg.dtype) if target.chip else None
  analytic = {"resident": resident, "resident_total": sum(resident.values()), "model_flops": mf,
              "model_flops_per_device": per_device, "peak_flops_per_device": peak_rate,
              "step_seconds_at_50_mfu": per_device / (0.5 * peak_rate) if peak_rate else None}
  compiled = compile_step(cfg, model_cfg, target, rules, mode, lower=lower, section="dpo", label="DPO step")
  kernel = choose(model_cfg.attention, "tpu" if mode == "tpu" else "cpu", model_cfg.dtype,
                  branches=cfg.data.share_prompt)
  lay = layout(cfg, batch_split(amesh, rules))
  if compiled["status"] == "ok":
    rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
    compiled["kernel_flops_per_device"] = ((attention_flops(model_cfg, rows, t) + attention_forward_flops(
        model_cfg, rows, t)) / target.devices if kernel == "splash" else 0.0)
    compiled["flops_ratio"] = round((compiled["flops_per_device"] + compiled["kernel_flops_per_device"]) / per_device, 3)
  on_chip = compiled["status"] == "ok" and compiled["compiler"].startswith("tpu")
  verdict = plan.verdict(compiled["peak"] if on_chip else analytic["resident_total"], target.hbm_bytes)
  verdict["basis"] = "compiled for the chip" if on_chip else "analytic (resident arrays only)"
  warnings = []
  if lay["rows"] != lay["real_rows"]:
    warnings.append(f"{lay['real_rows']} rows per micro-batch are padded to {lay['rows']} to split over the batch axes")
  return {
      "config": config_path, "kind": "dpo",
      "model": {"policy": source, "params": plan.num_params(x["params"]), "layers": model_cfg.num_layers,
                "dtype": model_cfg.dtype, "remat": model_cfg.remat,
                "attention": choose(model_cfg.attention, target.chip.kind if target.chip else "cpu", model_cfg.dtype,
                                    branches=cfg.data.share_prompt)},
      "objective": f"dpo ({cfg.dpo.variant}, beta {cfg.dpo.beta})",
      "target": {"chip": target.chip.name if target.chip else None, "devices": target.devices,
                 "slice": target.slice_name, "hbm": target.hbm_bytes, "hbm_source": plan.HBM_SOURCE,
                 "mesh": dict(zip(MESH_AXES, target.mesh))},
      "batch": lay, "analytic": analytic, "compiled": compiled, "verdict": verdict, "warnings": warnings,
  }


def render(r: dict[str, Any]) -> str:
  """The DPO plan as a table."""
  t, a, b, c = r["target"], r["analytic"], r["batch"], r["compiled"]
  lines = [f"plan: {r['config']} ({r['objective']})",
           f"policy: {r['model']['policy']}; {r['model']['layers']} layers, compute {r['model']['dtype']}, "
           f"remat={r['model']['remat']}, attention={r['model']['attention']}",
           f"target: {t['devices']} x {t['chip']}" + (f" ({t['slice']})" if t["slice"] else "")
           + f"; mesh {' '.join(f'{k}={v}' for k, v in t['mesh'].items())}",
           f"step: {b['micro_batches']} micro-batch(es) of {b['examples']} pairs, {b['rows']} rows x {b['seq_len']} "
           "tokens", "", "  resident per device"]
  lines += [plan_table.row(k, v) for k, v in a["resident"].items()]
  lines.append(plan_table.row("total", a["resident_total"]))
  step = f"{a['step_seconds_at_50_mfu']:.1f} s" if a.get("step_seconds_at_50_mfu") else "- (no peak known)"
  lines += ["", f"  model FLOPs per device and step: {a['model_flops_per_device']:.4g}; step time at 50% MFU: {step}"]
  if c["status"] == "ok":
    lines += ["", f"  compiled ({c['compiler']}, {c['note']})", plan_table.row("peak", c["peak"]),
              plan_table.flops_line(c)]
  else:
    lines += ["", f"  compiled: {c['status']}: {c['note']}"]
  lines += ["", plan_table.verdict_line(r["verdict"]), *[f"warning: {w}" for w in r["warnings"]]]
  return "\n".join(lines) + "\n"
