"""The plan of a reward-model run: its own state and step (`train.rm_trainer.blueprint`), per device.

Parameters, AdamW state and the batch are counted exactly: each leaf of the run's abstract state and
of the step's batch holds prod(shard shape) * itemsize bytes on a device, its shard shape coming from
the PartitionSpec the logical-axis rules give it on the mesh (a replicated leaf counts fully).
Gradients are float32 like the parameters, twice over (accumulator + one micro-batch's gradient)
when a step accumulates several micro-batches.

Activations are an estimate (`activations`). Per device: r rows of a micro-batch (the batch axes
split the rows where they divide them), T = data.max_length tokens per row, hidden size d, h query
and g key/value heads, head dim e, MLP width f (heads and MLP split by the tensor axis), compute
dtype bytes b, L layers.
  saved for the backward pass, per layer; the scan keeps each layer's input, the remat policy
  decides what else:
    every policy          r*T*d*b                                layer input
    save_attention_out    + r*T*h*e*b                            attention output
    dots_no_batch         + r*T*((h + 2g)*e + 2d + 2f)*b         projection and MLP matmuls
    dots                  dots_no_batch + r*h*T*T*4 + r*T*h*e*4  + attention matmuls (float32)
    none                  dots + r*h*T*T*b + r*T*(2d + (h + g)*e + 2f)*b   + softmax, norms, RoPE, SwiGLU
  transient, once (one layer's recomputed forward and its backward):
    attention             r*h*T*T*(4 + 4 + b)  logits and their gradient (float32), probabilities:
                          the "reference" and "xla" kernels materialise [r, h, T, T]; "splash" is
                          fused (0); "cudnn" is fused but for its head-shared mask bias, r*T*T*b
    MLP                   3*r*T*f*b
    mask                  r*T*T (bool; none with "splash", which masks by segment ids)
    FSDP gather           one layer's weights gathered over the batch axes, in b bytes, plus their
                          float32 gradient before the reduce-scatter
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from hs2p_jax.config import RunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.model.attention import choose
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.plan import compile as comp, packing
from hs2p_jax.plan.packing import PairProfile
from hs2p_jax.plan.tables import size
from hs2p_jax.plan.target import Target, final_verdict, gpu_warnings
from hs2p_jax.roofline.flops import PEAK_FLOPS, attention_flops, train_flops
from hs2p_jax.sharding import MESH_AXES, Rules, batch_split, logical_to_spec, rules_from
from hs2p_jax.train import rm_trainer
from hs2p_jax.train.model_init import architecture
from hs2p_jax.train.state import device_bytes


def batch_layout(cfg: RunConfig, split: int = 1) -> dict[str, int]:
  """Worst-case micro-batch shape: N examples or pairs, R rows of T tokens (`real_rows` of them
  sequences, the rest padding so that R divides the `split` devices of the batch axes, as the data
  loader pads them), k micro-batches a step."""
  tc = cfg.train
  n = tc.micro_batch_size or tc.batch_size
  real = n if tc.objective == "regression" else 2 * n
  return {"examples": n, "rows": -(-real // split) * split, "real_rows": real, "seq_len": cfg.data.max_length,
          "micro_batches": tc.batch_size // n}


def num_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _per_device(axes: tuple, shape: tuple, mesh, rules: Rules) -> tuple[int, ...]:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)).shard_shape(shape)


def _batch_axes(rules: Rules) -> set[str]:
  target = dict(rules).get("act_batch")
  return set(target if isinstance(target, tuple) else (target,)) - {None}


def gathered_layer_bytes(params: Any, mesh, rules: Rules, dtype_bytes: int) -> int:
  """Bytes of one layer's weights on a device once gathered over the batch (FSDP) axes."""
  sizes, batch_axes = dict(mesh.shape), _batch_axes(rules)
  total = 0
  for x in jax.tree.leaves(params.get("model", {}).get("layers", {})):
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    elems = 1
    for dim, entry in zip(x.shape[1:], spec[1:]):  # [L, ...]: one layer
      names = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
      elems *= dim // math.prod(sizes[a] for a in names if a not in batch_axes)
    total += elems * dtype_bytes
  return total


def activations(model_cfg: LlamaConfig, layout: dict[str, int], params: Any, mesh, rules: Rules) -> dict[str, int]:
  """Estimated activation bytes per device (module docstring): saved per layer x L, and transients."""
  c = model_cfg
  b = jnp.dtype(c.dtype).itemsize
  rows, t = layout["rows"], layout["seq_len"]
  r = _per_device(("act_batch",), (rows,), mesh, rules)[0]
  h = _per_device(("act_heads",), (c.num_heads,), mesh, rules)[0]
  g = _per_device(("act_kv_heads",), (c.num_kv_heads,), mesh, rules)[0]
  f = _per_device(("act_mlp",), (c.intermediate_size,), mesh, rules)[0]
  d, e, tok = c.hidden_size, c.head_dim, r * t
  logits = r * h * t * t
  dots_nb = tok * ((h + 2 * g) * e + 2 * d + 2 * f) * b
  extra = {
      "full": 0,
      "save_attention_out": tok * h * e * b,
      "dots_no_batch": dots_nb,
      "dots": dots_nb + logits * 4 + tok * h * e * 4,
      "none": dots_nb + logits * 4 + tok * h * e * 4 + logits * b + tok * (2 * d + (h + g) * e + 2 * f) * b,
  }[c.remat]
  per_layer = tok * d * b + extra
  fsdp = math.prod(dict(mesh.shape)[a] for a in _batch_axes(rules)) > 1
  gathered = gathered_layer_bytes(params, mesh, rules, b) if fsdp else 0
  return {
      "rows_per_device": r,
      "saved_per_layer": per_layer,
      "saved": per_layer * c.num_layers,
      "attention_transient": {"splash": 0, "cudnn": r * t * t * b}.get(c.attention, logits * (8 + b)),
      "mlp_transient": 3 * tok * f * b,
      "mask": 0 if c.attention == "splash" else r * t * t,
      "fsdp_gathered_layer": gathered + (gathered // b) * 4,
  }


def model_flops(cfg: RunConfig, model_cfg: LlamaConfig, attention_only: bool = False) -> float:
  """Model FLOPs of one optimizer step over its real rows (`roofline.flops.train_flops`: 6N per token
  plus attention; padding rows, remat recomputation and the head not counted); `attention_only`:
  the attention term alone (12 L T^2 H Dh per row)."""
  lay = batch_layout(cfg)
  rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
  return attention_flops(model_cfg, rows, t) if attention_only else train_flops(model_cfg, rows, t)


def analytic(cfg: RunConfig, model_cfg: LlamaConfig, step: Any, batch: Any, mesh, rules: Rules) -> dict[str, Any]:
  """Per-device bytes of params, optimizer state, gradients, batch and activations (module docstring)."""
  layout = batch_layout(cfg, batch_split(mesh, rules))
  params = device_bytes(step.state.params)
  grads = params * (2 if layout["micro_batches"] > 1 else 1)
  base = step.state.frozen.get("base")  # a LoRA run: params are the adapters and head, the weights frozen here
  act = activations(model_cfg, layout, base if base is not None else step.state.params, mesh, rules)
  act_total = sum(v for k, v in act.items() if k not in ("rows_per_device", "saved_per_layer"))
  out = {"params": params, "optimizer": device_bytes(step.state.opt_state), "gradients": grads,
         **({"frozen_base": device_bytes(base)} if base is not None else {}),
         "batch": device_bytes(batch), "activations": act_total}
  out["total"] = sum(out.values())
  out["activation_terms"] = act
  return out


def warnings_for(cfg: RunConfig, target: Target, analytic: dict[str, Any], rules: Rules) -> list[str]:
  """Lines worth reading: a batch the batch axes cannot split, state too big for the devices, GPU preallocation."""
  out = []
  sizes = dict(zip(MESH_AXES, target.mesh))
  split = math.prod(sizes[a] for a in _batch_axes(rules))
  lay = batch_layout(cfg, split)
  if lay["rows"] != lay["real_rows"]:
    out.append(f"micro-batch rows ({lay['real_rows']}) are padded to {lay['rows']} to split over the batch axes "
               f"data*fsdp ({split} devices): {1 - lay['real_rows'] / lay['rows']:.0%} of the step computes padding; "
               f"make train.micro_batch_size a multiple of {split // math.gcd(split, 2) if cfg.train.objective == 'bt' else split}"
               + ("; over a quarter: the run stops unless mesh.allow_padding=true"
                  if (lay["rows"] - lay["real_rows"]) * 4 > lay["rows"] else ""))
  hbm = target.hbm_bytes
  state = analytic["params"] + analytic["optimizer"] + analytic["gradients"]
  if hbm and state > hbm:
    out.append(f"params, AdamW state and gradients alone take {size(state)} per device: sharded further (mesh.fsdp) "
               f"they need at least {math.ceil(state * target.devices / hbm)} x {target.chip.name}, before activations")
  return out + gpu_warnings(target)


def lowering(cfg: RunConfig, arch: LlamaConfig, rules: Rules, flop_rows: int | None = None):
  """`lower_at(mesh, layers, for_flops)` of the run's own step (`plan.compile.compile_step`); the
  FLOPs at `flop_rows` rows per micro-batch (packed: a typical batch's) instead of the worst case."""
  return comp.page_lowering(rm_trainer, cfg, "train", arch, rules, flop_rows)


def packed_report(cfg: RunConfig, model_cfg: LlamaConfig, profile: PairProfile, split: int) -> dict[str, Any]:
  """`plan.packing.report` for the config's micro-batches (`--pair-tokens`: packed pair configs only)."""
  if not cfg.data.packing or rm_trainer.task(cfg) != "pairs":
    raise UserError("--pair-tokens: for packed preference-pair configs (data.packing=true, train.objective=bt)")
  tc = cfg.train
  micro = tc.micro_batch_size or tc.batch_size
  return packing.report(model_cfg, profile, micro, tc.batch_size // micro, cfg.data.max_length, split,
                        cfg.data.buckets, cfg.data.share_prompt)


def build_report(cfg: RunConfig, config_path: str, target: Target, mode: str,
                 profile: PairProfile | None = None) -> dict[str, Any]:
  """The plan of a reward-model run as one JSON-serialisable dict; with `profile` (packed pair
  configs), FLOPs of a step of such pairs (`plan.packing`) beside the worst-case memory."""
  model_cfg, source = architecture(cfg.model, download=False)
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  branches = 2 * cfg.data.share_prompt
  # the kernel `attention: auto` picks on the target (the compiled step picks by its devices)
  on_target = model_cfg.replace(attention=choose(model_cfg.attention, target.platform, model_cfg.dtype,
                                                 branches=branches))
  step = rm_trainer.blueprint(cfg, amesh, rules, on_target)
  an = analytic(cfg, on_target, step, rm_trainer.batch_spec(cfg, amesh, rules), amesh, rules)
  packed = packed_report(cfg, model_cfg, profile, batch_split(amesh, rules)) if profile else None
  an["model_flops"] = packed["model_flops"] if packed else model_flops(cfg, model_cfg)
  an["model_flops_per_device"] = an["model_flops"] / target.devices
  peak = PEAK_FLOPS.get(target.chip.name, {}).get(model_cfg.dtype) if target.chip else None
  an["peak_flops_per_device"] = peak
  an["step_seconds_at_50_mfu"] = an["model_flops_per_device"] / (0.5 * peak) if peak else None
  tc = cfg.train
  micro_batches = tc.batch_size // (tc.micro_batch_size or tc.batch_size)
  compiled = comp.compile_step(lowering(cfg, model_cfg, rules, packed["rows"] if packed else None), target, mode,
                               cfg.mesh, model_cfg.num_layers, micro_batches)
  kernel = choose(model_cfg.attention, "tpu" if mode == "tpu" else "cpu", model_cfg.dtype, branches=branches)
  # the splash kernel's attention over every row it runs on, once per branch where pairs share a prompt
  attn = (attention_flops(model_cfg, packed["rows"] * micro_batches, cfg.data.max_length) if packed
          else model_flops(cfg, model_cfg, attention_only=True)) * max(branches, 1)
  comp.kernel_flops(compiled, attn / target.devices if kernel == "splash" else 0.0, an["model_flops_per_device"])
  return {
      "config": config_path, "kind": "rm",
      "model": {"name": source, "params": num_params(step.state.params), "layers": model_cfg.num_layers,
                "dtype": model_cfg.dtype, "remat": model_cfg.remat, "attention": on_target.attention,
                "attention_config": model_cfg.attention, "final_model_bytes": step.state.final_model_bytes(),
                "lora": bool(model_cfg.lora_rank)},
      "objective": tc.objective if tc.objective == "regression" else f"bt ({tc.bt_variant})",
      "target": target.describe(),
      "batch": batch_layout(cfg, batch_split(amesh, rules)),
      **({"packing": packed} if packed else {}),
      "analytic": an,
      "compiled": compiled,
      "verdict": final_verdict(compiled, an["total"], target),
      "warnings": warnings_for(cfg, target, an, rules),
  }
