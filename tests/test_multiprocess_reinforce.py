"""REINFORCE and PPO on two processes (jax.distributed on localhost) equal one process with two devices.

Its own file so that a test worker runs it beside the other multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import separable_pairs, write_jsonl
from hs2p_jax.train.metrics import read_metrics
from test_multiprocess import _one_device, _run_two, _train_bt


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
  """A tiny BT reward model (1 step on separable pairs)."""
  tmp = tmp_path_factory.mktemp("rm")
  _train_bt(tmp, write_jsonl(tmp / "pairs.jsonl", separable_pairs(8)), tmp / "rm", 1)
  return tmp / "rm" / "model"


ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_reinforce_on_two_processes_equals_one_process_with_two_devices(tmp_path, reward_model):
  env1 = _one_device()
  root = ROOT
  cmd = [sys.executable, "-m", "hs2p_jax", "reinforce", "--config", os.path.join(root, "configs/quickstart/reinforce.yaml")]
  common = ["reinforce.steps=2", f"reward_model={reward_model}", "data.builtin_size=32",
            "reinforce.max_new_tokens=8", "policy.num_layers=1", "data.buckets=[128]"]
  # one process: data parallel, sampling from the training params; two: FSDP over the processes,
  # sampling from the rollout copy (replicated: resharded across the processes before decoding)
  subprocess.run(cmd + ["--out", str(tmp_path / "one"), "--set", *common, "mesh.data=2", "reinforce.rollout_copy=false"],
                 check=True, capture_output=True, env={**env1, "JAX_NUM_CPU_DEVICES": "2"})
  _run_two(cmd + ["--out", str(tmp_path / "two"), "--set", *common, "mesh.data=1", "mesh.fsdp=2"], env1)
  one, two = (read_metrics(os.path.join(tmp_path, d, "metrics.jsonl")) for d in ("one", "two"))
  assert [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    for key in ("loss", "reward", "kl"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
  assert os.path.isfile(tmp_path / "two" / "model" / "hs2p_model.json")


@pytest.mark.slow
def test_ppo_on_two_processes_equals_one_process_with_two_devices(tmp_path, reward_model):
  """The quickstart PPO config without the critic's warm-up, its critic from the reward model: 2
  steps log one 2-device process's loss, reward, value loss and KL."""
  env1 = _one_device()
  cmd = [sys.executable, "-m", "hs2p_jax", "ppo", "--config", os.path.join(ROOT, "configs/quickstart/ppo.yaml")]
  common = ["ppo.steps=2", "ppo.critic_warmup_steps=0", f"reward_model={reward_model}", "data.builtin_size=32",
            "ppo.prompts_per_step=8", "ppo.max_new_tokens=8", "policy.num_layers=1", "data.buckets=[128]",
            "ppo.epochs=1", "ppo.updates_per_rollout=1"]
  subprocess.run(cmd + ["--out", str(tmp_path / "one"), "--set", *common, "mesh.data=2", "ppo.rollout_copy=false"],
                 check=True, capture_output=True, env={**env1, "JAX_NUM_CPU_DEVICES": "2"})
  _run_two(cmd + ["--out", str(tmp_path / "two"), "--set", *common, "mesh.data=1", "mesh.fsdp=2"], env1)
  one, two = (read_metrics(os.path.join(tmp_path, d, "metrics.jsonl")) for d in ("one", "two"))
  assert [r["step"] for r in two] == [1, 2] and two[-1]["kl"] > 0.0
  for a, b in zip(one, two):
    for key in ("loss", "reward", "value_loss", "kl", "value_mean"):
      # the first minibatch's surrogate at ratio 1 is the mean of whitened advantages: 0 up to float32
      # rounding of the sum (seen: +-2e-7 on two CPU kinds), so its tolerance is absolute
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6 if key == "loss" else 1e-7), (a["step"], key)
  assert os.path.isfile(tmp_path / "two" / "model" / "hs2p_model.json")
