"""The plan is the run: for every kind of run (regression, BT, DPO, SFT, REINFORCE, PPO), the step `hs2p plan`
compiles takes exactly the arguments the trainer passes its step (tree, shapes, dtypes, shardings),
on a 4-device mesh (fsdp 2 x tensor 2), frozen models in bfloat16 where the policy computes in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import separable_pairs, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os, sys
import jax
from hs2p_jax import config as config_lib
from hs2p_jax.checkpoint import ModelMeta, save_model
from hs2p_jax.model import preset
from hs2p_jax.plan import lm as plan_lm, reinforce as plan_rl, rm as plan_rm
from hs2p_jax.rl import ppo_trainer, reinforce_trainer
from hs2p_jax.sharding import rules_from
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train import dpo_trainer, rm_trainer, sft_trainer
from hs2p_jax.train.model_init import random_model

tmp, pairs, ratings = sys.argv[1:4]
COMMON = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "data.max_length=64", "data.buckets=[64]"]
LM = ["policy.preset=tiny", "policy.num_layers=1", "policy.tokenizer=bytes", "data.template=chat"]
out = {}


def recorder(fn, calls):
  def wrapped(*args):
    calls.append(args)
    return fn(*args)
  return wrapped


def compare(name, args, lowered):
  # the plan's compiled step against the arguments the trainer passed
  compiled = lowered.compile()
  mismatches = []
  if jax.tree.structure((tuple(args), {})) != lowered.in_tree:
    mismatches.append(f"tree {jax.tree.structure((tuple(args), {}))} != {lowered.in_tree}")
  infos = jax.tree.leaves(lowered.args_info)
  shardings = jax.tree.leaves(compiled.input_shardings, is_leaf=lambda x: x is None)
  got = jax.tree.leaves(args)
  checked = 0
  for i, (g, info, sh) in enumerate(zip(got, infos, shardings)):
    if tuple(g.shape) != tuple(info.shape) or g.dtype != info.dtype:
      mismatches.append(f"leaf {i}: {g.shape} {g.dtype} != {info.shape} {info.dtype}")
    if sh is not None:
      checked += 1
      if not sh.is_equivalent_to(g.sharding, g.ndim):
        mismatches.append(f"leaf {i} {g.shape}: sharding {g.sharding} != {sh}")
  out[name] = {"leaves": len(got), "plan_leaves": len(infos), "shardings_checked": checked,
               "mismatches": mismatches[:6], "dtypes": sorted({str(g.dtype) for g in got})}


def run_step(trainer):
  # the loop's start of a fresh run and its first step (no checkpoint or final model needed here)
  calls = []
  trainer.step_fn.__dict__["jitted"] = recorder(trainer.step_fn.jitted, calls)
  trainer.compile_for, trainer._programs = [], None  # what is compared is the step's arguments, not compiling ahead
  trainer.start(None, {})
  trainer.begin(0)
  trainer.step(1)
  return calls[0]


def arch_of(trainer):
  return trainer.state.trainable.config


# regression and BT
for name, sets in (("regression", [f"data.train={ratings}", "data.format=helpsteer2", "train.objective=regression"]),
                   ("bt", [f"data.train={pairs}", "data.format=pairs", "train.objective=bt"])):
  cfg = config_lib.load(config_lib.RunConfig, None, COMMON + sets + [
      "model.preset=tiny", "model.num_layers=1", "model.tokenizer=bytes", "data.template=chat", "train.steps=1",
      "train.batch_size=4", "train.micro_batch_size=2"])
  t = rm_trainer.trainer(cfg, os.path.join(tmp, name))
  args = run_step(t)
  compare(name, args, plan_rm.lowering(cfg, arch_of(t), rules_from(cfg.mesh.rules))(t.mesh, 1, False))

# DPO (bfloat16: the frozen reference in bfloat16) and SFT
for name, cls in (("dpo", config_lib.DPORunConfig), ("sft", config_lib.SFTRunConfig)):
  cfg = config_lib.load(cls, None, COMMON + LM + [
      f"data.train={pairs}", "data.format=pairs", f"{name}.steps=1", f"{name}.batch_size=4",
      f"{name}.micro_batch_size=2", "policy.dtype=" + ("bfloat16" if name == "dpo" else "float32")])
  page = dpo_trainer if name == "dpo" else sft_trainer
  t = page.trainer(cfg, os.path.join(tmp, name))
  args = run_step(t)
  compare(name, args, plan_lm.lowering(cfg, arch_of(t), rules_from(cfg.mesh.rules))(t.mesh, 1, False))

# REINFORCE: the update, the log-probs and the reward model's scoring, bfloat16 frozen models
rm_dir = os.path.join(tmp, "rm")
rm = random_model("reward", preset("tiny", num_layers=1), 9, 0, None, ())
save_model(rm_dir, rm, ModelMeta("reward", rm.cfg, template="chat"), load_tokenizer("bytes"))
cfg = config_lib.load(config_lib.ReinforceRunConfig, None, COMMON[:3] + LM + [
    f"reward_model={rm_dir}", "data.max_length=24", "data.pad_multiple=8", "data.buckets=[24]", "policy.dtype=bfloat16",
    "reinforce.steps=1", "reinforce.prompts_per_step=2", "reinforce.samples_per_prompt=2",
    "reinforce.max_new_tokens=8"])  # the scorer's 32 tokens: its smallest bucket, its longest length
t = reinforce_trainer.trainer(cfg, os.path.join(tmp, "reinforce"))
phases, scorer = t.source.phases, t.source.scorer
logprob_calls, score_calls = [], []
phases.logprobs = recorder(phases.logprobs, logprob_calls)
scorer._eval = recorder(scorer._eval, score_calls)
update_args = run_step(t)
rules = rules_from(cfg.mesh.rules)
plan = reinforce_trainer.blueprint(cfg, t.mesh, rules, arch_of(t), (t.state.frozen_parts["reward_model"].config, 9))
compare("reinforce update", update_args, plan_rl.lower("update", cfg, plan))
compare("reinforce logprobs", logprob_calls[0], plan_rl.lower("logprobs", cfg, plan))
compare("reinforce score", score_calls[0], plan_rl.lower("score", cfg, plan))
out["reinforce frozen"] = {k: sorted({str(x.dtype) for x in jax.tree.leaves(v)}) for k, v in t.frozen.items()}

# PPO: the actor-critic's update, the log-probs and the critic's values (the critic from the same reward model)
cfg = config_lib.load(config_lib.PPORunConfig, None, COMMON[:3] + LM + [
    f"reward_model={rm_dir}", "data.max_length=24", "data.pad_multiple=8", "data.buckets=[24]", "policy.dtype=bfloat16",
    "ppo.steps=1", "ppo.prompts_per_step=4", "ppo.max_new_tokens=8", "ppo.updates_per_rollout=2"])
t = ppo_trainer.trainer(cfg, os.path.join(tmp, "ppo"))
phases = t.source.phases
logprob_calls, value_calls = [], []
phases.logprobs = recorder(phases.logprobs, logprob_calls)
phases.values = recorder(phases.values, value_calls)
update_args = run_step(t)
policy = arch_of(t)
plan = plan_rl.blueprint(cfg, t.mesh, rules, policy, (t.state.frozen_parts["reward_model"].config, 9),
                         ppo_trainer.critic_architecture(cfg, policy)[:3])
compare("ppo update", update_args, plan_rl.lower("update", cfg, plan))
compare("ppo logprobs", logprob_calls[0], plan_rl.lower("logprobs", cfg, plan))
compare("ppo values", value_calls[0], plan_rl.lower("values", cfg, plan))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_plans_compiled_steps_take_the_trainers_arguments(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  ratings = write_jsonl(tmp_path / "ratings.jsonl", [
      {"prompt": f"Rate {i}", "response": "x" * (i + 1), "helpfulness": i % 5, "correctness": 2, "coherence": 3,
       "complexity": 1, "verbosity": 4 - i % 5} for i in range(8)])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), pairs, ratings], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  kinds = ["regression", "bt", "dpo", "sft", "reinforce update", "reinforce logprobs", "reinforce score", "ppo update",
           "ppo logprobs", "ppo values"]
  assert set(kinds) <= set(out)
  for kind in kinds:
    r = out[kind]
    assert r["mismatches"] == [], (kind, r)
    assert r["leaves"] == r["plan_leaves"] and r["shardings_checked"] > 0, (kind, r)
  # the frozen models in the compute dtype: DPO's reference and REINFORCE's reference and reward model
  assert "bfloat16" in out["dpo"]["dtypes"] and "bfloat16" not in out["sft"]["dtypes"]
  assert out["reinforce frozen"] == {"reference": ["bfloat16", "float32"], "reward_model": ["bfloat16", "float32"]}
  assert "bfloat16" in out["reinforce score"]["dtypes"]
