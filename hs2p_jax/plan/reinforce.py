"""The plan of a REINFORCE or PPO run: per-device memory and FLOPs of the phases its trainer runs
(`rl.reinforce_trainer.blueprint`, `rl.ppo_trainer.blueprint`: the same state and jitted functions).

Resident for the whole run: the policy (float32) and its AdamW state (PPO: the actor and the
critic, each with its AdamW state), the frozen reference and the reward model (their matrices in
`reinforce.frozen_dtype` / `ppo.frozen_dtype`, the policy's compute dtype by default), all sharded
by the rules. One step runs these phases one after another, each a compiled function of some of
the resident arrays and its own inputs:
  copy       the policy cast and resharded into the rollout layout (`hs2p_jax.rl.layout`), unless
             reinforce.rollout_copy is off
  generate   (from that copy, on its mesh) prefill of the P prompts (or of their P*k copies where P
             does not split over the batch axes) and the decode loop with its KV cache, k samples per prompt
  logprobs   policy and reference log-probs of the N = P*k rollouts ([N, Tp + Tr] rows)
  score      the reward model on the rollouts, a scorer batch at a time ([R, Tp + Tr] rows)
  values     PPO: the critic's values of the N rollouts ([N, Tp + Tr] rows)
  update     the policy (PPO: actor-critic) step on a minibatch of N / updates_per_rollout rollouts
             (donated params), updates_per_rollout (x ppo.epochs) times
A phase's peak is its compiled peak plus the resident arrays it does not take; the step's peak is
the largest. Memory from the phases as they run (scanned layers, at 2 and 4 layers extrapolated),
FLOPs from the layers unrolled at 1 and 2 layers; the decode loop's body, which XLA's cost analysis
counts once, is compiled on its own and counted once per new token. Model FLOPs
(`roofline.flops.forward_flops`, causal attention not discounted): the prefill, 2N + attention over the
mean context per decoded token, two log-prob forwards (with reinforce.share_prompt, over one
[prompt | k samples] row per prompt), the reward model's forward and the update's forward and backward
(PPO: the critic's forward, and its forward and backward in each update, epochs times).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from hs2p_jax.config import PPORunConfig, ReinforceRunConfig
from hs2p_jax.eval.scorer import score_spec
from hs2p_jax.feed import batch_sharding
from hs2p_jax.model import model_from
from hs2p_jax.model.attention import choose
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.plan import compile as comp
from hs2p_jax.plan.rm import num_params
from hs2p_jax.plan.target import Target, final_verdict, gpu_warnings, verdict
from hs2p_jax.rl import ppo_trainer, reinforce_trainer as rt
from hs2p_jax.rl.setup import Phases, reward_architecture, rollout_spec
from hs2p_jax.rl.layout import smallest_fitting, tensor_groups
from hs2p_jax.rl.reward_client import is_served
from hs2p_jax.roofline import decode_time
from hs2p_jax.roofline.flops import PEAK_FLOPS, attention_forward_flops, decode_flops, forward_flops
from hs2p_jax.sample import SamplingConfig, generate_from_state
from hs2p_jax.sharding import MESH_AXES, Rules, batch_split, rules_from, use_mesh
from hs2p_jax.train.model_init import architecture

PHASES = ("copy", "generate", "logprobs", "score", "values", "update")
# the resident trees each phase takes as arguments (the rest stay resident beside it); PPO's
# trainable part is two trees, the actor (the policy) and the critic
TAKEN = {"copy": ("policy",), "generate": (), "logprobs": ("policy",), "score": ("reward_model",),
         "values": ("critic",), "update": ("policy", "critic", "optimizer")}
RLConfig = ReinforceRunConfig | PPORunConfig


def is_ppo(cfg: RLConfig) -> bool:
  return isinstance(cfg, PPORunConfig)


def section(cfg: RLConfig) -> Any:
  """The run's rollout settings: `reinforce:` or `ppo:`."""
  return cfg.ppo if is_ppo(cfg) else cfg.reinforce


def with_section(cfg: RLConfig, **changes: Any) -> RLConfig:
  name = "ppo" if is_ppo(cfg) else "reinforce"
  return dataclasses.replace(cfg, **{name: dataclasses.replace(section(cfg), **changes)})


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


def shapes(cfg: RLConfig) -> Shapes:
  rc = section(cfg)
  n = rc.prompts_per_step * rc.samples_per_prompt
  return Shapes(rc.prompts_per_step, rc.samples_per_prompt, cfg.data.max_length, rc.max_new_tokens,
                n // rc.updates_per_rollout)


def phases(cfg: RLConfig) -> tuple[str, ...]:
  """The phases a step of `cfg` runs: `copy` (the policy into the rollout layout) where it has one;
  `score` where the reward model is on these devices (not served at a URL); `values` for PPO."""
  out = PHASES if section(cfg).rollout_copy else PHASES[1:]
  return tuple(p for p in out if (p != "score" or not is_served(cfg.reward_model)) and (p != "values" or is_ppo(cfg)))


def resident(ph: Phases) -> dict[str, int]:
  """Per-device bytes of what lives through the run: policy (PPO: actor and critic), AdamW state,
  reference, reward model."""
  st = ph.update.state
  res = st.resident_bytes()
  params = res.pop("params")
  if ph.values is None:
    return {"policy": params, "optimizer": res.pop("optimizer"), **res}
  from hs2p_jax.train.state import device_bytes
  critic = device_bytes(st.params["critic"])
  return {"policy": params - critic, "critic": critic, "optimizer": res.pop("optimizer"), **res}


def policy_params(ph: Phases) -> Any:
  """The policy's abstract params as the sampler and the log-prob phase take them (PPO: the actor's)."""
  import types
  st = ph.update.state
  return ph.policy_params(types.SimpleNamespace(params=st.params,
                                                model_params=lambda **_: st.model_params(st.params, st.frozen)))


def phase_peak(phase: str, mem: dict[str, int], res: dict[str, int], copy: bool = True) -> int:
  """The device's peak while `phase` runs: its compiled peak plus the resident arrays it does not
  take (with the rollout `copy`, the sampler takes the copy, and the policy stays resident)."""
  taken = TAKEN[phase] if copy or phase != "generate" else ("policy",)
  others = sum(v for k, v in res.items() if k not in taken)
  return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + others


def sampling(cfg: RLConfig, new_tokens: int | None = None) -> SamplingConfig:
  rc = section(cfg)
  return SamplingConfig(max_new_tokens=new_tokens or rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                        top_p=rc.top_p, eos_ids=(2,), num_samples=rc.samples_per_prompt)


def sampler_state(ph: Phases) -> tuple[Any, Rules, Any, Any]:
  """(mesh, rules, graphdef, abstract params) the sampler runs with: the rollout copy's, or the policy's."""
  st, lay = ph.update.state, ph.layout
  if lay is None:
    return st.mesh, st.rules, ph.policy_graphdef, policy_params(ph)
  return lay.mesh, lay.rules, lay.graphdef, lay.abstract()


def lower(phase: str, cfg: RLConfig, ph: Phases, new_tokens: int | None = None):
  """The run's jitted function of `phase` lowered on its abstract inputs."""
  st, s = ph.update.state, shapes(cfg)
  mesh, rules = st.mesh, st.rules
  if phase == "copy":
    return ph.layout._copy.lower(policy_params(ph))
  if phase == "generate":
    s_mesh, s_rules, graphdef, params = sampler_state(ph)
    prompts = jax.ShapeDtypeStruct((s.prompts, s.prompt_len), jnp.int32, sharding=NamedSharding(mesh, P()))
    key = jax.eval_shape(lambda: jax.random.key(0))
    with use_mesh(s_mesh, s_rules):
      return generate_from_state.lower(graphdef, params, prompts, prompts, key, sampling(cfg, new_tokens))
  with use_mesh(mesh, rules):
    if phase == "logprobs":
      return ph.logprobs.lower(policy_params(ph), rollout_spec(cfg, mesh, rules, s.rollouts))
    if phase == "score":
      return ph.score.lower(st.frozen["reward_model"], score_spec(mesh, rules, s.prompt_len + s.new_tokens))
    if phase == "values":
      return ph.values.lower(st.params["critic"], rollout_spec(cfg, mesh, rules, s.rollouts))
  if phase == "update":
    return ph.update.lower(rollout_spec(cfg, mesh, rules, s.minibatch, advantages=True))
  raise ValueError(phase)


def _decode_step(ph: Phases, s: Shapes):
  """One decode step of the N rollouts against a full cache (Tp + Tr slots): the loop's body."""
  from hs2p_jax.model.llama import KVCache
  from hs2p_jax.sample import _constrain_cache
  mesh, rules, graphdef, params = sampler_state(ph)

  def step(params, tok):
    lm = model_from(graphdef, params)
    cache = _constrain_cache(KVCache.init(lm.cfg, tok.shape[0], s.prompt_len + s.new_tokens))
    hidden, cache = lm.model(tok[:, None], jnp.ones_like(tok)[:, None], cache=cache)
    return lm.logits(hidden)[:, 0], cache

  tok = jax.ShapeDtypeStruct((s.rollouts,), jnp.int32, sharding=batch_sharding("tokens", (s.rollouts,), mesh, rules))
  with use_mesh(mesh, rules):
    return jax.jit(step).lower(params, tok)


Critic = tuple[LlamaConfig, int, Any]  # PPO's critic: (architecture, outputs, value weights)


def blueprint(cfg: RLConfig, mesh: Any, rules: Rules, policy: LlamaConfig, reward: tuple[LlamaConfig, int] | None,
              critic: Critic | None, memory: int | None = None, chip: str | None = None) -> Phases:
  """The trainer's own state and phases: REINFORCE's, or PPO's with its `critic`."""
  if is_ppo(cfg):
    return ppo_trainer.blueprint(cfg, mesh, rules, policy, critic, reward, memory=memory, chip=chip)
  return rt.blueprint(cfg, mesh, rules, policy, reward, memory=memory, chip=chip)


def compile_phases(cfg: RLConfig, policy: LlamaConfig, reward: tuple[LlamaConfig, int] | None, target: Target,
                   mode: str, full: Phases, critic: Critic | None = None) -> dict[str, Any]:
  """Compiled per-device memory of each phase and FLOPs of the step; status ok / skipped / failed.
  Depths are scaled together (policy, reward model, critic at n layers each) and each phase
  extrapolated to its model's depth (the update to the policy's)."""
  t0 = time.time()
  started = comp.start_compile(mode, target, cfg.mesh)
  if isinstance(started, dict):
    return started
  mesh, compiler = started
  rules, s = rules_from(cfg.mesh.rules), shapes(cfg)
  depth, rm_depth = policy.num_layers, reward[0].num_layers if reward else 0
  depths = {"score": rm_depth, "values": critic[0].num_layers if critic else 0}
  layers, flop_layers = comp.depths(depth)
  opts = comp.options(mode)
  print(f"hs2p plan: compiling the {'PPO' if is_ppo(cfg) else 'REINFORCE'} phases ({', '.join(phases(cfg))}) at "
        f"{' and '.join(map(str, layers))} layer(s) for {compiler} ...", file=sys.stderr, flush=True)
  if full.layout is not None:  # the reduced-depth runs take the full model's degree
    cfg = with_section(cfg, rollout_tensor=full.layout.tensor)
  one_micro = with_section(cfg, micro_batches=1)

  def at(n: int, scan: bool = True, c: RLConfig = cfg) -> Phases:
    cut = lambda m: m.replace(num_layers=n, scan_layers=scan and m.scan_layers)  # noqa: E731
    return blueprint(c, mesh, rules, cut(policy), (cut(reward[0]), reward[1]) if reward else None,
                     (cut(critic[0]), *critic[1:]) if critic else None,
                     memory=target.hbm_bytes, chip=target.chip.name if target.chip else None)

  res = resident(full)
  try:
    mems = {ph: [comp.memory(lower(ph, cfg, at(n)).compile(opts)) for n in layers] for ph in phases(cfg)}
    flops = {ph: [comp.flops(lower(ph, one_micro, at(n, False, one_micro), new_tokens=1 if ph == "generate" else None)
                             .compile(opts)) for n in flop_layers] for ph in phases(cfg)}
    decode = [comp.flops(_decode_step(at(n, False), s).compile(opts)) for n in flop_layers]
  except jax.errors.JaxRuntimeError as e:
    return {"status": "failed", "compiler": compiler, "note": str(e).splitlines()[0][:300]}
  out = {}
  for ph in phases(cfg):
    d = depths.get(ph, depth)
    mem = {k: int(comp.memory_at([m[k] for m in mems[ph]], layers, d)) for k in mems[ph][0]}
    out[ph] = {**mem, "peak": phase_peak(ph, mem, res, section(cfg).rollout_copy), "per_depth": mems[ph]}
  f = {ph: comp.linear(flops[ph], flop_layers, depths.get(ph, depth)) for ph in phases(cfg)}
  rows_rm = score_spec(AbstractMesh(target.mesh, MESH_AXES), rules, 8)["input_ids"].shape[0]
  calls = {"copy": 1, "generate": 1, "logprobs": 2, "score": math.ceil(s.rollouts / rows_rm), "values": 1,
           "update": section(cfg).updates_per_rollout * getattr(section(cfg), "epochs", 1)}
  f_phase = {ph: f[ph] * calls[ph] for ph in phases(cfg)}
  f_phase["generate"] += (s.new_tokens - 1) * comp.linear(decode, flop_layers, depth)  # the loop body, per new token
  peak = max(p["peak"] for p in out.values())
  note = f"all {depth} layers" if len(layers) == 1 else f"{layers[0]} and {layers[1]} layers extrapolated linearly"
  return {"status": "ok", "compiler": compiler, "note": note, "layers_compiled": layers, "phases": out,
          "peak": peak, "verdict": verdict(peak, target.hbm_bytes)["verdict"],
          "flops_by_phase": f_phase, "flops_per_device": sum(f_phase.values()), "calls": calls,
          "flops_layers_compiled": flop_layers, "seconds": round(time.time() - t0, 1)}


def model_flops(cfg: RLConfig, policy_cfg: LlamaConfig, rm_cfg: LlamaConfig | None, prefill_rows: int,
                critic_cfg: LlamaConfig | None = None) -> dict:
  """Model FLOPs of one REINFORCE or PPO step, by phase (module docstring); `rm_cfg` None: served elsewhere."""
  s = shapes(cfg)
  t = s.prompt_len + s.new_tokens
  if section(cfg).share_prompt:  # one row [prompt | sample 1 | ... | sample k] per prompt
    fwd = forward_flops(policy_cfg, s.prompts, s.prompt_len + s.samples * s.new_tokens,
                        head_tokens=s.rollouts * s.new_tokens)
  else:
    fwd = forward_flops(policy_cfg, s.rollouts, t, head_tokens=s.rollouts * s.new_tokens)
  out = {"copy": 0, "generate": forward_flops(policy_cfg, prefill_rows, s.prompt_len, head_tokens=prefill_rows)
         + decode_flops(policy_cfg, s.rollouts, s.new_tokens, s.prompt_len),
         "logprobs": 2 * fwd,                       # policy and reference
         "score": forward_flops(rm_cfg, s.rollouts, t, head_tokens=0) if rm_cfg else 0,
         "update": 3 * fwd}                         # forward + backward
  if critic_cfg is not None:  # PPO: the critic's values, and both models' forward + backward in every epoch
    values = forward_flops(critic_cfg, s.rollouts, t, head_tokens=0)
    out.update(values=values, update=section(cfg).epochs * 3 * (fwd + values))
  out["total"] = sum(out.values())
  return out


def prefill_rows(cfg: RLConfig, mesh, rules: Rules, layout=None) -> int:
  """Rows the sampler prefills: the prompts, or their P*k copies where the prompts do not split
  (over the rollout layout's mesh where there is one)."""
  s = shapes(cfg)
  split = batch_split(layout.mesh if layout is not None else mesh, rules, "cache_batch")
  return s.prompts if s.samples == 1 or s.prompts % split == 0 else s.rollouts


def warnings_for(cfg: RLConfig, target: Target, mesh, rules: Rules) -> list[str]:
  """Problems: rollout or minibatch rows the batch axes cannot split; GPU preallocation."""
  s, out = shapes(cfg), []
  split = batch_split(mesh, rules)
  for name, rows in (("rollouts (prompts_per_step * samples_per_prompt)", s.rollouts),
                     ("update minibatch rows", s.minibatch)):
    if rows % split:
      out.append(f"{name} = {rows} do not divide over the batch axes data*fsdp ({split} devices)")
  return out + gpu_warnings(target)


def notes_for(cfg: RLConfig, mesh, rules: Rules, layout=None) -> list[str]:
  """What is worth knowing but not a problem: how the prefill runs, what the step time means."""
  s, split = shapes(cfg), batch_split(layout.mesh if layout is not None else mesh, rules, "cache_batch")
  out = []
  if prefill_rows(cfg, mesh, rules, layout) != s.prompts:
    out.append(f"{'ppo' if is_ppo(cfg) else 'reinforce'}.prompts_per_step={s.prompts} does not split over the {split} devices of the batch axes, "
               f"its {s.rollouts} samples do: the sampler prefills each sample's prompt copy ({s.samples}x the prefill)")
  out.append("the step time at 50% MFU is a lower bound: decoding reads every weight per token and is bound by memory "
             "bandwidth, not FLOPs")
  return out


def rollout_report(cfg: RLConfig, policy: LlamaConfig, ph: Phases, target: Target) -> dict[str, Any]:
  """The sampler's copy: layout, bytes per device, and a decode step's time (`roofline.decode_time`)
  at the degree chosen and at the smallest that fits (the choice before decode time decided it)."""
  lay, s = ph.layout, shapes(cfg)
  if lay is None:
    return {"copy": False, "note": "sampling from the training params and layout "
                                   f"({'ppo' if is_ppo(cfg) else 'reinforce'}.rollout_copy=false)"}
  out = {"copy": True, "dtype": lay.dtype, "tensor": lay.tensor, "mesh": dict(lay.mesh.shape),
         "bytes_per_device": lay.bytes_per_device(), "note": lay.describe()}
  groups = tensor_groups(lay.mesh)
  if groups is not None:  # compiled for real (compile-only) chips: where the tensor groups lie
    out["tensor_groups"] = groups
  chip = target.chip.name if target.chip else None
  if not decode_time.known(chip):
    return out
  size, context = lay.copy_bytes(), s.prompt_len + s.new_tokens / 2
  smallest = smallest_fitting(size, target.devices, policy, s.rollouts, target.hbm_bytes)
  out["decode"] = {
      name: decode_time.decode_time(policy, size, lay.dtype, target.devices, t, s.rollouts, context, chip)
      .as_dict(s.new_tokens) for name, t in (("chosen", lay.tensor), ("smallest", smallest))}
  out["decode"]["basis"] = (f"{s.rollouts} rows, {context:g} cached tokens on average, peak HBM bandwidth and FLOPs, "
                            "ring all-reduces (hs2p_jax.roofline.decode_time): a lower bound")
  return out


def build_report(cfg: RLConfig, config_path: str, target: Target, mode: str) -> dict[str, Any]:
  """The REINFORCE or PPO plan as one JSON-serialisable dict."""
  policy, source = architecture(cfg.policy, download=False)
  served = is_served(cfg.reward_model)
  reward = None if served else (reward_architecture(cfg, policy, download=False)
                                or (policy.replace(lora_rank=0), 9, "the policy's architecture"))
  critic = ppo_trainer.critic_architecture(cfg, policy, download=False) if is_ppo(cfg) else None
  rules = rules_from(cfg.mesh.rules)
  amesh = AbstractMesh(target.mesh, MESH_AXES)
  ph = blueprint(cfg, amesh, rules, policy, reward[:2] if reward else None, critic[:3] if critic else None,
                 memory=target.hbm_bytes, chip=target.chip.name if target.chip else None)
  res, s = resident(ph), shapes(cfg)
  prefill = prefill_rows(cfg, amesh, rules, ph.layout)
  mf = model_flops(cfg, policy, reward[0] if reward else None, prefill, critic[0] if critic else None)
  peak_rate = PEAK_FLOPS.get(target.chip.name, {}).get(policy.dtype) if target.chip else None
  per_device = mf["total"] / target.devices
  analytic = {"resident": res, "resident_total": sum(res.values()), "model_flops": mf,
              "model_flops_per_device": per_device, "peak_flops_per_device": peak_rate,
              "step_seconds_at_50_mfu": per_device / (0.5 * peak_rate) if peak_rate else None,
              "prefill_rows": prefill}
  compiled = compile_phases(cfg, policy, reward[:2] if reward else None, target, mode, ph,
                            critic[:3] if critic else None)
  branches = s.samples * section(cfg).share_prompt
  kernel = choose(policy.attention, "tpu" if mode == "tpu" else "cpu", policy.dtype, branches=branches)
  # the splash kernel's attention FLOPs: two log-prob forwards and the update's forward and backward
  # (3 forwards' worth, each PPO epoch) of the policy, one of the reward model; PPO's critic: its
  # values' forward and its share of each update
  t = s.prompt_len + s.new_tokens
  epochs = getattr(section(cfg), "epochs", 1)
  attn = (2 + 3 * epochs) * attention_forward_flops(policy, s.rollouts, t) + (
      attention_forward_flops(reward[0], s.rollouts, t) if reward else 0) + (
      (1 + 3 * epochs) * attention_forward_flops(critic[0], s.rollouts, t) if critic else 0)
  comp.kernel_flops(compiled, attn / target.devices if kernel == "splash" else 0.0, per_device)
  state = ph.update.state
  params = {"policy": num_params(state.params), "reward_model": num_params(state.frozen["reward_model"]) if not served
            else 0}
  if critic:
    params.update(policy=num_params(state.params["actor"]), critic=num_params(state.params["critic"]))
  return {
      "config": config_path, "kind": "ppo" if is_ppo(cfg) else "reinforce",
      "model": {"policy": source,
                "reward_model": f"served at {cfg.reward_model} (not on these devices)" if served else reward[2],
                **({"critic": critic[3]} if critic else {}),
                "params": params,
                "layers": policy.num_layers, "dtype": policy.dtype, "remat": policy.remat,
                "frozen_dtype": state.frozen_parts["reference"].dtype,
                "attention": choose(policy.attention, target.platform, policy.dtype, branches=branches)},
      "target": target.describe(),
      "rollout": rollout_report(cfg, policy, ph, target),
      "batch": {"prompts": s.prompts, "samples": s.samples, "rollouts": s.rollouts, "prompt_len": s.prompt_len,
                "new_tokens": s.new_tokens, "minibatch": s.minibatch},
      "analytic": analytic, "compiled": compiled,
      "verdict": final_verdict(compiled, analytic["resident_total"], target, "analytic (resident arrays only)"),
      "warnings": warnings_for(cfg, target, amesh, rules), "notes": notes_for(cfg, amesh, rules, ph.layout),
  }
