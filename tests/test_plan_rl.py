"""`hs2p plan` for the rollout trainers (REINFORCE, PPO): every phase compiled on CPU devices,
resident arrays and model FLOPs by hand, the paper configs' rollout layout and fit."""

from __future__ import annotations

import json
import os

import pytest

from hs2p_jax.commands.plan import build_report
from hs2p_jax.config import load
from hs2p_jax.model.config import PRESETS
from hs2p_jax.plan import target as plan
from test_plan import REPO, _run_plan


def test_cli_plans_a_reinforce_step_phase_by_phase():
  """Every phase of the quickstart REINFORCE step compiled on 2 CPU devices (data parallel)."""
  proc = _run_plan(["--config", os.path.join(REPO, "configs/quickstart/reinforce.yaml"), "--devices", "2",
                    "--chip", "h100", "--set", "mesh.data=2", "reinforce.share_prompt=false"])
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  c, a, b = r["compiled"], r["analytic"], r["batch"]
  assert r["kind"] == "reinforce" and c["status"] == "ok" and set(c["phases"]) == {"copy", "generate", "logprobs",
                                                                                   "score", "update"}
  # the sampler's copy: float32 (the compute dtype), replicated on both devices (a tiny model on an H100)
  assert r["rollout"]["copy"] and r["rollout"]["tensor"] == 1 and r["rollout"]["mesh"] == {"data": 2, "fsdp": 1,
                                                                                           "tensor": 1}
  assert r["rollout"]["bytes_per_device"] == a["resident"]["policy"]
  assert c["phases"]["generate"]["argument"] >= r["rollout"]["bytes_per_device"]  # the sampler takes the copy
  tiny, b = PRESETS["tiny"], r["batch"]
  kv = 2 * tiny.num_layers * (b["rollouts"] / 2) * (b["prompt_len"] + b["new_tokens"] / 2) * tiny.num_kv_heads \
      * tiny.head_dim * 4
  d = r["rollout"]["decode"]  # tiny rows: all-reduces would cost more than the bytes they save
  assert d["chosen"]["tensor"] == d["smallest"]["tensor"] == 1 and d["chosen"]["comm_seconds_per_token"] == 0
  assert d["chosen"]["bytes_per_token"] == int(r["rollout"]["bytes_per_device"] + kv)
  assert d["chosen"]["seconds_per_token"] == pytest.approx(max(d["chosen"]["bytes_per_token"] / 3.35e12,
                                                               d["chosen"]["flops_per_token"] / 494.7e12))
  assert d["chosen"]["seconds_per_rollout"] == pytest.approx(d["chosen"]["seconds_per_token"] * b["new_tokens"])
  res = a["resident"]
  cfg = PRESETS["tiny"]
  assert res["policy"] == res["reference"] == 4 * r["model"]["params"]["policy"]  # replicated float32
  assert abs(res["optimizer"] - 2 * res["policy"]) <= 64  # AdamW mu, nu (+ step counts)
  taken = {"copy": {"policy"}, "generate": set(), "logprobs": {"policy"}, "score": {"reward_model"}, "update": {"policy", "optimizer"}}
  for name, p in c["phases"].items():
    others = sum(v for k, v in res.items() if k not in taken[name])
    assert p["peak"] == p["argument"] + p["output"] - p["alias"] + p["temp"] + others
  assert c["peak"] == max(p["peak"] for p in c["phases"].values())
  # model FLOPs by hand: 2N per token forward, attention 4 L T^2 H Dh per row, LM head 2 D V per scored token
  n = cfg.num_layers * (cfg.hidden_size * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads)
                        + 3 * cfg.hidden_size * cfg.intermediate_size)
  rows, tr, t = b["rollouts"], b["new_tokens"], b["prompt_len"] + b["new_tokens"]
  attn = lambda rows, t: 4 * cfg.num_layers * t * t * cfg.num_heads * cfg.head_dim * rows  # noqa: E731
  fwd = 2 * n * rows * t + attn(rows, t) + 2 * cfg.hidden_size * cfg.vocab_size * rows * tr
  f = a["model_flops"]
  assert f["logprobs"] == pytest.approx(2 * fwd) and f["update"] == pytest.approx(3 * fwd)
  assert f["score"] == pytest.approx(2 * n * rows * t + attn(rows, t))  # the RM: the policy's shapes, no LM head
  assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
  assert a["model_flops_per_device"] == pytest.approx(f["total"] / 2)
  assert 0.8 < c["flops_ratio"] < 1.25  # the decode loop counted once per new token
  assert "per device and phase" in proc.stderr and r["verdict"]["fits"]


def test_cli_plans_a_ppo_step_phase_by_phase():
  """Every phase of the quickstart PPO step compiled on 2 CPU devices: the critic beside the actor,
  its values' phase, both updated in every minibatch; model FLOPs by hand."""
  proc = _run_plan(["--config", os.path.join(REPO, "configs/quickstart/ppo.yaml"), "--devices", "2",
                    "--chip", "h100", "--set", "mesh.data=2"])
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  c, a, b = r["compiled"], r["analytic"], r["batch"]
  assert r["kind"] == "ppo" and c["status"] == "ok" and set(c["phases"]) == {"copy", "generate", "logprobs", "score",
                                                                             "values", "update"}
  res, params = a["resident"], r["model"]["params"]
  assert res["policy"] == res["reference"] == 4 * params["policy"]  # replicated float32
  assert res["critic"] == res["reward_model"] == 4 * params["critic"]  # the critic is the reward model's shape
  assert abs(res["optimizer"] - 2 * (res["policy"] + res["critic"])) <= 128  # AdamW mu, nu of both
  taken = {"copy": {"policy"}, "generate": set(), "logprobs": {"policy"}, "score": {"reward_model"},
           "values": {"critic"}, "update": {"policy", "critic", "optimizer"}}
  for name, p in c["phases"].items():
    others = sum(v for k, v in res.items() if k not in taken[name])
    assert p["peak"] == p["argument"] + p["output"] - p["alias"] + p["temp"] + others, name
  cfg = PRESETS["tiny"]
  n = cfg.num_layers * (cfg.hidden_size * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads)
                        + 3 * cfg.hidden_size * cfg.intermediate_size)
  rows, tr, t = b["rollouts"], b["new_tokens"], b["prompt_len"] + b["new_tokens"]
  attn = 4 * cfg.num_layers * t * t * cfg.num_heads * cfg.head_dim * rows
  fwd = 2 * n * rows * t + attn + 2 * cfg.hidden_size * cfg.vocab_size * rows * tr
  values = 2 * n * rows * t + attn
  f, epochs = a["model_flops"], 2  # configs/quickstart/ppo.yaml: 2 minibatches, 2 epochs
  assert f["logprobs"] == pytest.approx(2 * fwd) and f["values"] == f["score"] == pytest.approx(values)
  assert f["update"] == pytest.approx(epochs * 3 * (fwd + values))
  assert c["calls"]["update"] == 4 and 0.8 < c["flops_ratio"] < 1.25
  assert "(PPO)" in proc.stderr and "critic: the policy's architecture" in proc.stderr


@pytest.mark.parametrize("size, chip, devices", [("70b", "v5p", 64), ("8b", "v5p", 8)])
def test_the_paper_ppo_configs_fit_their_slices(size, chip, devices):
  """PPO's actor and critic (float32, AdamW each) and the bfloat16 reference and reward model of
  configs/paper/llama-3.1-{70b,8b}/ppo.yaml fit the slices their headers name (v5p-128, v5p-16;
  the compiled peaks are in the headers), one rollout row per chip in each update."""
  from hs2p_jax.config import PPORunConfig
  cfg = load(PPORunConfig, os.path.join(REPO, f"configs/paper/llama-3.1-{size}/ppo.yaml"))
  r = build_report(cfg, "test", plan.resolve_target(chip, devices, cfg.mesh), "none")
  a = r["analytic"]
  assert r["verdict"]["verdict"] == "fits" and r["warnings"] == [], (r["verdict"], r["warnings"])
  n = PRESETS[cfg.policy.preset].num_params()
  assert a["resident_total"] == pytest.approx(n * (2 * (4 + 8) + 2 * 2) / devices, rel=0.05)
  assert r["batch"]["minibatch"] % devices == 0


def test_a_served_reward_model_is_not_in_the_reinforce_plan():
  """`reward_model: http://...`: the run holds no reward model, and neither does its plan."""
  proc = _run_plan(["--config", os.path.join(REPO, "configs/quickstart/reinforce.yaml"), "--devices", "2",
                    "--chip", "h100", "--set", "mesh.data=2", "reward_model=http://rm-host:8000"])
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  assert r["model"]["reward_model"] == "served at http://rm-host:8000 (not on these devices)"
  assert r["model"]["params"]["reward_model"] == 0 and "reward_model" not in r["analytic"]["resident"]
  assert r["compiled"]["status"] == "ok" and "score" not in r["compiled"]["phases"]
  assert r["analytic"]["model_flops"]["score"] == 0


@pytest.mark.parametrize("size,chip,smallest,chosen", [("70b", "v5p-256", 4, 8), ("8b", "v5p-16", 1, 4)])
def test_the_paper_reinforce_plans_report_decode_time_at_the_chosen_and_the_smallest_degree(size, chip, smallest,
                                                                                            chosen):
  proc = _run_plan(["--config", os.path.join(REPO, f"configs/paper/llama-3.1-{size}/reinforce.yaml"), "--chip", chip,
                    "--compile", "none"])
  assert proc.returncode == 0, proc.stderr
  ro = json.loads(proc.stdout)["rollout"]
  d = ro["decode"]
  assert (ro["tensor"], d["chosen"]["tensor"], d["smallest"]["tensor"]) == (chosen, chosen, smallest)
  assert ro["mesh"]["tensor"] == chosen and ro["bytes_per_device"] < d["chosen"]["bytes_per_token"]
  # a larger degree reads less per token and spends some of it in all-reduces
  assert d["chosen"]["bytes_per_token"] < d["smallest"]["bytes_per_token"]
  assert d["chosen"]["comm_seconds_per_token"] > d["smallest"]["comm_seconds_per_token"]
  assert d["chosen"]["seconds_per_rollout"] < d["smallest"]["seconds_per_rollout"]
  assert "chosen   tensor=" in proc.stderr and "smallest tensor=" in proc.stderr
