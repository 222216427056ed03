"""The plan of a DPO or SFT run: its own state and step (`train.dpo_trainer` / `train.sft_trainer`).

The DPO step takes the policy (float32, sharded by the rules), its AdamW state, the frozen reference
(in `dpo.frozen_dtype`) and k stacked micro-batches of pairs with log-prob targets ([k, R, T] rows
split over the batch axes); the SFT step the policy, its AdamW state and the examples. Model FLOPs:
the policy's forward and backward (6N per token and attention) and the LM head (2DV per target token:
every token counted, a bound) three times; DPO adds the reference's forward (2N per token, attention,
the LM head once).
"""

from __future__ import annotations

from typing import Any

from jax.sharding import AbstractMesh

from hs2p_jax.config import DPORunConfig, SFTRunConfig
from hs2p_jax.model.attention import choose
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.plan import compile as comp
from hs2p_jax.plan.rm import num_params
from hs2p_jax.plan.target import Target, final_verdict, gpu_warnings
from hs2p_jax.roofline.flops import PEAK_FLOPS, attention_flops, attention_forward_flops, forward_flops, train_flops
from hs2p_jax.sharding import MESH_AXES, Rules, batch_split, rules_from
from hs2p_jax.train import dpo_trainer, sft_trainer
from hs2p_jax.train.model_init import architecture
from hs2p_jax.train.state import device_bytes


def _section(cfg: DPORunConfig | SFTRunConfig):
  return cfg.dpo if isinstance(cfg, DPORunConfig) else cfg.sft


def layout(cfg: DPORunConfig | SFTRunConfig, split: int = 1) -> dict[str, int]:
  """Pairs (or examples) per micro-batch, rows (2 per pair, padded to split over the batch axes), tokens, micro-batches."""
  sc = _section(cfg)
  n = sc.micro_batch_size or sc.batch_size
  real = 2 * n if isinstance(cfg, DPORunConfig) else n
  return {"examples": n, "rows": -(-real // split) * split, "real_rows": real, "seq_len": cfg.data.max_length,
          "micro_batches": sc.batch_size // n}


def model_flops(cfg: DPORunConfig | SFTRunConfig, model_cfg: LlamaConfig) -> dict[str, float]:
  """Model FLOPs of one step over its real rows (module docstring)."""
  lay = layout(cfg)
  rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
  head = 2 * model_cfg.hidden_size * model_cfg.vocab_size * rows * t
  out = {"policy": train_flops(model_cfg, rows, t) + 3 * head}
  if isinstance(cfg, DPORunConfig):
    out["reference"] = forward_flops(model_cfg, rows, t) + head
  out["total"] = sum(out.values())
  return out


def lowering(cfg: DPORunConfig | SFTRunConfig, arch: LlamaConfig, rules: Rules):
  """`lower_at(mesh, layers, for_flops)` of the run's own step (`plan.compile.compile_step`)."""
  dpo = isinstance(cfg, DPORunConfig)
  return comp.page_lowering(dpo_trainer if dpo else sft_trainer, cfg, "dpo" if dpo else "sft", arch, rules)


def build_report(cfg: DPORunConfig | SFTRunConfig, config_path: str, target: Target, mode: str) -> dict[str, Any]:
  """The DPO or SFT plan as one JSON-serialisable dict."""
  dpo = isinstance(cfg, DPORunConfig)
  page, sc = (dpo_trainer if dpo else sft_trainer), _section(cfg)
  model_cfg, source = architecture(cfg.policy, download=False)
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  step = page.blueprint(cfg, amesh, rules, model_cfg)
  res = step.state.resident_bytes()
  resident = {"policy": res.pop("params"), "optimizer": res.pop("optimizer"), **res,
              "batch": device_bytes(page.batch_spec(cfg, amesh, rules))}
  mf = model_flops(cfg, model_cfg)
  per_device = mf["total"] / target.devices
  peak_rate = PEAK_FLOPS.get(target.chip.name, {}).get(model_cfg.dtype) if target.chip else None
  analytic = {"resident": resident, "resident_total": sum(resident.values()), "model_flops": mf,
              "model_flops_per_device": per_device, "peak_flops_per_device": peak_rate,
              "step_seconds_at_50_mfu": per_device / (0.5 * peak_rate) if peak_rate else None}
  micro = sc.micro_batch_size or sc.batch_size
  compiled = comp.compile_step(lowering(cfg, model_cfg, rules), target, mode, cfg.mesh, model_cfg.num_layers,
                               sc.batch_size // micro, "DPO step" if dpo else "SFT step")
  kernel = choose(model_cfg.attention, "tpu" if mode == "tpu" else "cpu", model_cfg.dtype,
                  branches=2 * cfg.data.share_prompt)
  lay = layout(cfg, batch_split(amesh, rules))
  rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
  attn = attention_flops(model_cfg, rows, t) + (attention_forward_flops(model_cfg, rows, t) if dpo else 0)
  comp.kernel_flops(compiled, attn / target.devices if kernel == "splash" else 0.0, per_device)
  warnings = gpu_warnings(target)
  if lay["rows"] != lay["real_rows"]:
    warnings.insert(0, f"{lay['real_rows']} rows per micro-batch are padded to {lay['rows']} to split over the batch axes")
  return {
      "config": config_path, "kind": "dpo" if dpo else "sft",
      "model": {"policy": source, "params": num_params(step.state.params), "layers": model_cfg.num_layers,
                "dtype": model_cfg.dtype, "remat": model_cfg.remat,
                "attention": choose(model_cfg.attention, target.platform, model_cfg.dtype,
                                    branches=2 * cfg.data.share_prompt),
                "frozen_dtype": step.state.frozen_parts["reference"].dtype if dpo else None,
                "final_model_bytes": step.state.final_model_bytes(), "lora": bool(model_cfg.lora_rank)},
      "objective": f"dpo ({sc.variant}, beta {sc.beta})" if dpo else "sft",
      "target": target.describe(), "batch": lay, "analytic": analytic, "compiled": compiled,
      "verdict": final_verdict(compiled, analytic["resident_total"], target, "analytic (resident arrays only)"),
      "warnings": warnings,
  }
