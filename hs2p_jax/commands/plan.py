"""`hs2p plan`: what a config's run holds and computes per device on a mesh and chip, compiled ahead of time.

The plan builds the run's own state and steps abstractly (the trainer pages' `blueprint`s) and
compiles them for the target (`hs2p_jax.plan.compile`): reward-model (`plan.rm`), DPO and SFT
(`plan.lm`), REINFORCE and PPO (`plan.reinforce`) configs.
"""

from __future__ import annotations

import json
import os
import sys

from hs2p_jax import config as config_lib
from hs2p_jax.atomic import write_json
from hs2p_jax.config import DPORunConfig, PPORunConfig, ReinforceRunConfig, RunConfig, SFTRunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.plan import compile as comp, lm, reinforce, rm, tables
from hs2p_jax.plan.packing import PairProfile
from hs2p_jax.plan.target import resolve_target

# kind -> (config class, plan module, table)
KINDS = {"rm": (RunConfig, rm, tables.render_rm), "dpo": (DPORunConfig, lm, tables.render_lm),
         "sft": (SFTRunConfig, lm, tables.render_lm), "reinforce": (ReinforceRunConfig, reinforce,
                                                                    tables.render_reinforce),
         "ppo": (PPORunConfig, reinforce, tables.render_reinforce)}


def config_kind(path: str) -> str:
  """"rm", "dpo", "sft", "reinforce" or "ppo": which trainer a config is for."""
  data = config_lib.read_with_includes(path)
  for kind in ("dpo", "sft", "reinforce", "ppo"):
    if kind in data:
      return kind
  return "reinforce" if "policy" in data or "reward_model" in data else "rm"


def build_report(cfg, config_path: str, target, mode: str) -> dict:
  """The plan of `cfg` (any kind) for `target` as one JSON-serialisable dict."""
  kind = next(k for k, (cls, _, _) in KINDS.items() if isinstance(cfg, cls))
  return KINDS[kind][1].build_report(cfg, config_path, target, mode)


def plan_command(args) -> int:
  kind = config_kind(args.config)
  cls, module, render = KINDS[kind]
  cfg = config_lib.load(cls, args.config, args.overrides)
  if kind == "rm" and cfg.model.kind != "reward":
    raise UserError(f"{args.config}: model.kind={cfg.model.kind!r}: hs2p plan covers reward-model (model.kind=reward), "
                    "REINFORCE (policy:, reinforce:), PPO (policy:, ppo:), DPO (policy:, dpo:) and SFT (policy:, sft:) configs")
  target = resolve_target(args.chip, args.devices, cfg.mesh)
  mode = comp.compile_mode(getattr(args, "compile", None), target)
  comp.start_backend(mode, target.devices)
  extra = {}
  if getattr(args, "pair_tokens", None):
    if kind != "rm":
      raise UserError(f"--pair-tokens: for packed reward-model configs; {args.config} is a {kind} config")
    extra["profile"] = PairProfile.parse(args.pair_tokens)
  report = module.build_report(cfg, args.config, target, mode, **extra)
  sys.stderr.write(render(report))
  print(json.dumps(report, indent=2))
  if args.out:
    write_json(os.path.join(args.out, "plan.json"), report)
  return 0
