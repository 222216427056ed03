"""The plans as tables for people: `hs2p plan`'s report before its JSON (reward model, DPO / SFT, REINFORCE)."""

from __future__ import annotations

from typing import Any

from hs2p_jax.plan.target import HBM_SOURCE

GiB = 1 << 30


def size(n: int | None) -> str:
  """Bytes in the largest binary unit under which they are at least 1."""
  if n is None:
    return "-"
  for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= scale:
      return f"{n / scale:,.2f} {unit}"
  return f"{n} B"


def row(label: str, n: int, indent: int = 2) -> str:
  return f"{' ' * indent}{label:<{46 - indent}}{size(n):>14}"


def flops_line(c: dict[str, Any]) -> str:
  """Compiled FLOPs per device (and the splash kernel's) against the model's share."""
  return (f"  compiled FLOPs per device: {c['flops_per_device']:.4g}"
          + (f" + {c['kernel_flops_per_device']:.4g} in the splash kernel" if c.get("kernel_flops_per_device") else "")
          + f" ({c.get('flops_ratio', 0):.2f}x the model's)")


def verdict_line(v: dict[str, Any]) -> str:
  """The verdict against the chip's HBM, in one line."""
  if v["hbm"] is None:
    return "no verdict: pass --chip to compare with a chip's HBM"
  return (f"{v['verdict'].upper()} ({v['basis']}): {size(v['peak'])} of {size(v['hbm'])}, "
          f"headroom {size(v['headroom'])} ({v['headroom_fraction']:.0%})")


def _target_line(t: dict[str, Any]) -> str:
  chip = f"{t['devices']} device(s), no --chip"
  if t["chip"]:
    chip = f"{t['devices']} x {t['chip']}" + (f" ({t['slice']})" if t["slice"] else "") + f", {size(t['hbm'])} HBM each"
  return f"target: {chip}; mesh {' '.join(f'{k}={v}' for k, v in t['mesh'].items())}"


def _step_time(a: dict[str, Any], digits: int = 2) -> list[str]:
  step = f"{a['step_seconds_at_50_mfu']:.{digits}f} s" if a.get("step_seconds_at_50_mfu") else "- (no peak known)"
  return ["", f"  model FLOPs per device and step: {a['model_flops_per_device']:.4g}; step time at 50% MFU: {step}"]


def _resident(a: dict[str, Any]) -> list[str]:
  return ([row(k.replace("_", " "), v) for k, v in a["resident"].items()]
          + [row("total", a["resident_total"])])


def _packing(p: dict[str, Any] | None) -> list[str]:
  if not p:
    return []
  pr = p["profile"]
  return [f"packed pairs of {pr['prompt']} + 2 x {pr['response']} tokens: {p['pairs_per_micro_batch']} per micro-batch "
          f"take {p['rows_unshared']} rows, {p['rows_shared']} with the prompt shared; FLOPs at {p['rows']} rows "
          "(memory: the worst case above)"]


def render_rm(report: dict[str, Any]) -> str:
  """The human-readable plan of a reward-model step (the JSON report, as a table)."""
  m, a, lay = report["model"], report["analytic"], report["batch"]
  act = a["activation_terms"]
  lines = [
      f"plan: {report['config']}",
      f"model: {m['name']} reward model, {m['params'] / 1e9:.3f} B params, {m['layers']} layers, "
      f"compute {m['dtype']}, remat={m['remat']}, attention={m['attention']}",
      _target_line(report["target"]),
      f"batch: {report['objective']}, {lay['micro_batches']} micro-batch(es) of {lay['rows']} rows x "
      f"{lay['seq_len']} tokens; {act['rows_per_device']} row(s) per device",
      *_packing(report.get("packing")),
      *final_model_line(m),
      "",
      "  per device (analytic)",
      row("params (float32)" if "frozen_base" not in a else "params: LoRA adapters + head (float32)", a["params"]),
      row("optimizer (AdamW mu + nu, float32)", a["optimizer"]),
      row("gradients (float32)", a["gradients"]),
      *([row(f"frozen base ({m['dtype']})", a["frozen_base"])] if "frozen_base" in a else []),
      row("batch", a["batch"]),
      row("activations (estimate)", a["activations"]),
      row(f"saved: {size(act['saved_per_layer'])} per layer x {m['layers']}", act["saved"], 4),
      row("attention logits (one layer)", act["attention_transient"], 4),
      row("MLP intermediates (one layer)", act["mlp_transient"], 4),
      row("FSDP-gathered weights + grads (one layer)", act["fsdp_gathered_layer"], 4),
      row("total", a["total"]),
  ]
  lines += _step_time(a)
  c = report["compiled"]
  if c["status"] == "ok":
    lines += ["", f"  per device (compiled: {c['compiler']}, {c['note']})",
              row("arguments (params, optimizer, batch)", c["argument"]),
              row("outputs (aliased to donated arguments)", c["output"] - c["alias"]),
              row("temporaries", c["temp"]),
              row(f"peak ({c['verdict']})" if report["target"]["hbm"] else "peak", c["peak"]),
              flops_line(c)]
  else:
    lines += ["", f"  compiled: {c['status']}: {c['note']}"]
  lines += ["", verdict_line(report["verdict"]), *[f"note: {w}" for w in report["warnings"]],
            f"HBM per chip: {HBM_SOURCE}"]
  return "\n".join(lines) + "\n"


def final_model_line(m: dict[str, Any]) -> list[str]:
  """The size of what the run saves as its model (DIR/model)."""
  if "final_model_bytes" not in m:
    return []
  what = "LoRA adapters + head, float32; the base is referenced, not saved" if m.get("lora") else \
      "every parameter, float32"
  return [f"final model (DIR/model): {size(m['final_model_bytes'])} ({what})"]


def render_lm(r: dict[str, Any]) -> str:
  """The DPO or SFT plan as a table."""
  a, b, c = r["analytic"], r["batch"], r["compiled"]
  unit = "pairs" if r["kind"] == "dpo" else "examples"
  lines = [f"plan: {r['config']} ({r['objective']})",
           f"policy: {r['model']['policy']}; {r['model']['layers']} layers, compute {r['model']['dtype']}, "
           f"remat={r['model']['remat']}, attention={r['model']['attention']}",
           _target_line(r["target"]),
           f"step: {b['micro_batches']} micro-batch(es) of {b['examples']} {unit}, {b['rows']} rows x {b['seq_len']} "
           "tokens", *final_model_line(r["model"]), "", "  resident per device (policy float32"
           + (f", reference {r['model']['frozen_dtype']})" if r["model"].get("frozen_dtype") else ")"), *_resident(a)]
  lines += _step_time(a, 1)
  if c["status"] == "ok":
    lines += ["", f"  compiled ({c['compiler']}, {c['note']})", row("peak", c["peak"]), flops_line(c)]
  else:
    lines += ["", f"  compiled: {c['status']}: {c['note']}"]
  lines += ["", verdict_line(r["verdict"]), *[f"warning: {w}" for w in r["warnings"]]]
  return "\n".join(lines) + "\n"


def _decode(d: dict[str, Any] | None, new_tokens: int) -> list[str]:
  if not d:
    return []
  lines = [f"  decode step ({d['basis']}):"]
  for name in ("chosen", "smallest"):
    x = d[name]
    lines.append(f"    {name:<8} tensor={x['tensor']:<3} reads {size(x['bytes_per_token'])} per device and token, "
                 f"all-reduces {x['comm_seconds_per_token'] * 1e3:.2f} ms: {x['seconds_per_token'] * 1e3:.2f} ms a "
                 f"token, {x['seconds_per_rollout']:.1f} s for {new_tokens} tokens")
  return lines


def render_reinforce(r: dict[str, Any]) -> str:
  """The REINFORCE or PPO plan as a table."""
  a, b, c, ro = r["analytic"], r["batch"], r["compiled"], r["rollout"]
  critic = f"; critic: {r['model']['critic']}" if "critic" in r["model"] else ""
  lines = [f"plan: {r['config']} ({r['kind'].upper()})",
           f"policy: {r['model']['policy']}; reward model: {r['model']['reward_model']}{critic}; "
           f"{r['model']['layers']} layers, "
           f"compute {r['model']['dtype']}, remat={r['model']['remat']}, attention={r['model']['attention']}",
           _target_line(r["target"]),
           f"step: {b['prompts']} prompts x {b['samples']} samples, {b['prompt_len']} + {b['new_tokens']} tokens; "
           f"updates on {b['minibatch']} rollouts",
           f"sampler: {ro['note']}" + (f", {size(ro['bytes_per_device'])} per device" if ro["copy"] else ""),
           *_decode(ro.get("decode"), b["new_tokens"]),
           "", f"  resident per device (policy float32, frozen models {r['model']['frozen_dtype']})", *_resident(a)]
  lines += _step_time(a, 1)
  if c["status"] == "ok":
    lines += ["", f"  per device and phase (compiled: {c['compiler']}, {c['note']}): peak with the resident arrays"]
    lines += [row(ph, p["peak"]) for ph, p in c["phases"].items()]
    lines.append(flops_line(c))
  else:
    lines += ["", f"  compiled: {c['status']}: {c['note']}"]
  lines += ["", verdict_line(r["verdict"]), *[f"warning: {w}" for w in r["warnings"]],
            *[f"note: {n}" for n in r["notes"]]]
  return "\n".join(lines) + "\n"
