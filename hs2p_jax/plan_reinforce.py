"""Per-device memory and FLOPs of one REINFORCE step on a mesh: the phases `train/reinforce_loop.py` runs.

Resident for the whole run (float32, sharded by the rules): the policy, its AdamW state, the frozen
reference and the reward model. One step runs four phases one after another, each a compiled
function of some of the resident arrays and its own inputs:
  copy       the policy cast and resharded into the rollout layout (`hs2p_jax.rollout`), unless
             reinforce.rollout_copy is off
  generate   (from that copy, on its mesh) prefill of the P prompts (or of their P*k copies where P does not split over the
             batch axes) and the decode loop with its KV cache, k samples per prompt
  logprobs   policy and reference log-probs of the N = P*k rollouts ([N, Tp + Tr] rows)
  score      the reward model on the N rollouts ([N, Tp + Tr] rows)
  update     the policy step on a minibatch of N / updates_per_rollout rollouts (donated params)
A phase's peak is its compiled peak plus the resident arrays it does not take; the step's peak is
the largest. Model FLOPs (`bench.flops.forward_flops`, causal attention not discounted): the
prefill, 2N + attention over the mean context per decoded token, two log-prob forwards (with
reinforce.share_prompt, over one [prompt | k samples] row per prompt), the reward model's
forward and the update's forward and backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax.config import ReinforceRunConfig
from hs2p_jax.model import create
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.plan import Target, device_bytes, num_params
from hs2p_jax.rollout import layout_for
from hs2p_jax.sharding import (Rules, batch_split, current_mesh, current_rules, opt_state_shardings,
                               state_shardings, use_mesh)
from hs2p_jax.train.feed import batch_sharding
from hs2p_jax.train.optim import optimizer_from

PHASES = ("copy", "generate", "logprobs", "score", "update")


def phases(cfg: ReinforceRunConfig) -> tuple[str, ...]:
  """The phases a step of `cfg` runs: `copy` (the policy into the rollout layout) where it has one."""
  return PHASES if cfg.reinforce.rollout_copy else PHASES[1:]


@dataclasses.dataclass(frozen=True)
class Shapes:
  prompts: int         # P per step (global)
  samples: int         # k per prompt
  prompt_len: int      # Tp
  new_tokens: int      # Tr
  minibatch: int       # rollouts per policy update

  @property
  def rollouts(self) -> int:
    return self.prompts * self.samples


def shapes(cfg: ReinforceRunConfig) -> Shapes:
  rc = cfg.reinforce
  n = rc.prompts_per_step * rc.samples_per_prompt
  return Shapes(rc.prompts_per_step, rc.samples_per_prompt, cfg.data.max_length, rc.max_new_tokens,
                n // rc.updates_per_rollout)


def _abstract(kind: str, model_cfg: LlamaConfig, num_attributes: int, mesh, rules: Rules):
  """(graphdef, abstract params with their shardings) of a model."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: create(kind, model_cfg, num_attributes)))
  sh = state_shardings(state, mesh, rules)
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)


def _rows(mesh, rules: Rules, **arrays: tuple[tuple[int, ...], Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """Batch arrays placed as `put_batch` places them."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(k, shape, mesh, rules))
          for k, (shape, dtype) in arrays.items()}


def inputs(cfg: ReinforceRunConfig, policy_cfg: LlamaConfig, rm_cfg: LlamaConfig, num_attributes: int, mesh,
           rules: Rules, memory: int | None = None) -> dict[str, Any]:
  """Abstract, sharded arguments of every phase (module docstring); `memory`: bytes per device,
  for the rollout layout's choice."""
  s = shapes(cfg)
  graphdef, params = _abstract("lm", policy_cfg, 9, mesh, rules)
  rm_graphdef, rm_params = _abstract("reward", rm_cfg, num_attributes, mesh, rules)
  tx = optimizer_from(cfg.reinforce)
  abs_opt = jax.eval_shape(tx.init, params)
  opt_sh = opt_state_shardings(abs_opt, jax.tree.map(lambda x: x.sharding, params), mesh)
  opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abs_opt, opt_sh)
  rep = NamedSharding(mesh, P())
  i32 = jnp.int32

  def rollout(n):
    return _rows(mesh, rules, prompt_ids=((n, s.prompt_len), i32), prompt_mask=((n, s.prompt_len), i32),
                 tokens=((n, s.new_tokens), i32), response_mask=((n, s.new_tokens), i32))

  update = {**rollout(s.minibatch), "advantages": jax.ShapeDtypeStruct((s.minibatch,), jnp.float32, sharding=rep)}
  t_rm = s.prompt_len + s.new_tokens
  rows_rm = -(-16 // batch_split(mesh, rules)) * batch_split(mesh, rules)  # RewardScorer's rows per call
  score = _rows(mesh, rules, input_ids=((rows_rm, t_rm), i32), segment_ids=((rows_rm, t_rm), i32))
  score.update(score_row=jax.ShapeDtypeStruct((rows_rm,), i32, sharding=rep),
               score_index=jax.ShapeDtypeStruct((rows_rm,), i32, sharding=rep))
  prompts = {k: jax.ShapeDtypeStruct((s.prompts, s.prompt_len), i32, sharding=rep) for k in ("ids", "mask")}
  rc = cfg.reinforce
  layout = layout_for(params, policy_cfg, mesh, rules, tensor=rc.rollout_tensor, dtype=rc.rollout_dtype,
                      rows=s.rollouts, memory=memory) if rc.rollout_copy else None
  return {"graphdef": graphdef, "params": params, "opt_state": opt, "tx": tx, "rm_graphdef": rm_graphdef,
          "rm_params": rm_params, "rollout": rollout(s.rollouts), "update": update, "score": score,
          "prompts": prompts, "rm_rows": rows_rm, "layout": layout}


def sampler_state(x: dict[str, Any]) -> tuple[Any, Any, Any]:
  """(mesh or None, graphdef, abstract params) the sampler runs with: the rollout copy's, or the policy's."""
  lay = x["layout"]
  if lay is None:
    return None, x["graphdef"], x["params"]
  return lay.mesh, lay.graphdef, lay.abstract(x["params"])


def sampling(cfg: ReinforceRunConfig, eos: tuple[int, ...], new_tokens: int | None = None):
  from hs2p_jax.sample import SamplingConfig
  rc = cfg.reinforce
  return SamplingConfig(max_new_tokens=new_tokens or rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                        top_p=rc.top_p, eos_ids=eos, num_samples=rc.samples_per_prompt)


def lower(phase: str, cfg: ReinforceRunConfig, x: dict[str, Any], new_tokens: int | None = None,
          micro_batches: int | None = None):
  """The jitted function of `phase` lowered on the abstract inputs `x` (run under `use_mesh`);
  `micro_batches` overrides the update's (1 for a FLOP count: a scanned body is counted once)."""
  from hs2p_jax.sample import generate_from_state
  from hs2p_jax.train.reinforce import make_logprob_fn, make_policy_step
  from hs2p_jax.train.rm import make_eval_step

  share = cfg.reinforce.samples_per_prompt if cfg.reinforce.share_prompt else None
  params = x["params"]
  if phase == "copy":
    return x["layout"]._copy.lower(params)
  if phase == "generate":
    key = jax.eval_shape(lambda: jax.random.key(0))
    eos = (2,)
    mesh, graphdef, state = sampler_state(x)
    with use_mesh(mesh or current_mesh(), x["layout"].rules if mesh is not None else current_rules()):
      return generate_from_state.lower(graphdef, state, x["prompts"]["ids"], x["prompts"]["mask"], key,
                                       sampling(cfg, eos, new_tokens))
  if phase == "logprobs":
    return jax.jit(make_logprob_fn(x["graphdef"], share)).lower(params, x["rollout"])
  if phase == "score":
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return jax.jit(make_eval_step(x["rm_graphdef"]), out_shardings=NamedSharding(mesh, P())).lower(
        x["rm_params"], x["score"])
  if phase == "update":
    shard = lambda t: jax.tree.map(lambda a: a.sharding, t)  # noqa: E731
    m = cfg.reinforce.micro_batches if micro_batches is None else micro_batches
    step = jax.jit(make_policy_step(x["graphdef"], x["tx"], share, micro_batches=m), donate_argnums=(0, 1),
                   out_shardings=(shard(params), shard(x["opt_state"]), None))
    return step.lower(params, x["opt_state"], x["update"])
  raise ValueError(phase)


def phase_arguments(phase: str, x: dict[str, Any]) -> list[str]:
  """The resident trees each phase takes as arguments."""
  return {"copy": ["params"], "generate": ["params"], "logprobs": ["params"], "score": ["rm_params"],
          "update": ["params", "opt_state"]}[phase]


def resident(x: dict[str, Any]) -> dict[str, int]:
  """Per-device bytes of what lives through the run: policy, AdamW state, reference, reward model."""
  p = device_bytes(x["params"])
  return {"policy": p, "optimizer": device_bytes(x["opt_state"]), "reference": p,
          "reward_model": device_bytes(x["rm_params"])}


def phase_peak(phase: str, mem: dict[str, int], res: dict[str, int], copy: bool = True) -> int:
  """The device's peak while `phase` runs: its compiled peak plus the resident arrays it does not
  take (with the rollout `copy`, the sampler takes the copy, and the policy stays resident)."""
  taken = {"copy": ("policy",), "generate": () if copy else ("policy",), "logprobs": ("policy",),
           "score": ("reward_model",), "update": ("policy", "optimizer")}[phase]
  others = sum(v for k, v in res.items() if k not in taken)
  return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + others


def model_flops(cfg: ReinforceRunConfig, policy_cfg: LlamaConfig, rm_cfg: LlamaConfig, prefill_rows: int) -> dict:
  """Model FLOPs of one REINFORCE step, by phase (module docstring)."""
  from hs2p_jax.bench.flops import decode_flops, forward_flops
  s = shapes(cfg)
  t = s.prompt_len + s.new_tokens
  if cfg.reinforce.share_prompt:  # one row [prompt | sample 1 | ... | sample k] per prompt
    fwd = forward_flops(policy_cfg, s.prompts, s.prompt_len + s.samples * s.new_tokens,
                        head_tokens=s.rollouts * s.new_tokens)
  else:
    fwd = forward_flops(policy_cfg, s.rollouts, t, head_tokens=s.rollouts * s.new_tokens)
  out = {"copy": 0, "generate": forward_flops(policy_cfg, prefill_rows, s.prompt_len, head_tokens=prefill_rows)
         + decode_flops(policy_cfg, s.rollouts, s.new_tokens, s.prompt_len),
         "logprobs": 2 * fwd,                       # policy and reference
         "score": forward_flops(rm_cfg, s.rollouts, t, head_tokens=0),
         "update": 3 * fwd}                         # forward + backward
  out["total"] = sum(out.values())
  return out


def params_count(x: dict[str, Any]) -> dict[str, int]:
  return {"policy": num_params(x["params"]), "reward_model": num_params(x["rm_params"])}


def prefill_rows(cfg: ReinforceRunConfig, mesh, rules: Rules, layout=None) -> int:
  """Rows the sampler prefills: the prompts, or their P*k copies where the prompts do not split
  (over the rollout layout's mesh where there is one)."""
  s = shapes(cfg)
  split = batch_split(layout.mesh if layout is not None else mesh, rules, "cache_batch")
  return s.prompts if s.samples == 1 or s.prompts % split == 0 else s.rollouts


def warnings_for(cfg: ReinforceRunConfig, target: Target, mesh, rules: Rules) -> list[str]:
  """Problems: rollout or minibatch rows the batch axes cannot split; GPU preallocation."""
  s, out = shapes(cfg), []
  split = batch_split(mesh, rules)
  for name, rows in (("rollouts (prompts_per_step * samples_per_prompt)", s.rollouts),
                     ("update minibatch rows", s.minibatch)):
    if rows % split:
      out.append(f"{name} = {rows} do not divide over the batch axes data*fsdp ({split} devices)")
  if target.chip and target.chip.kind == "gpu":
    out.append("JAX preallocates 75% of GPU memory by default; set XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95)")
  return out


def notes_for(cfg: ReinforceRunConfig, mesh, rules: Rules, layout=None) -> list[str]:
  """What is worth knowing but not a problem: how the prefill runs, what the step time means."""
  s, split = shapes(cfg), batch_split(layout.mesh if layout is not None else mesh, rules, "cache_batch")
  out = []
  if prefill_rows(cfg, mesh, rules, layout) != s.prompts:
    out.append(f"reinforce.prompts_per_step={s.prompts} does not split over the {split} devices of the batch axes, "
               f"its {s.rollouts} samples do: the sampler prefills each sample's prompt copy ({s.samples}x the prefill)")
  out.append("the step time at 50% MFU is a lower bound: decoding reads every weight per token and is bound by memory "
             "bandwidth, not FLOPs")
  return out
