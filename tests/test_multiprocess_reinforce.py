"""REINFORCE on two processes (jax.distributed on localhost) equals one process with two devices.

Its own file so that a test worker runs it beside the other multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import separable_pairs, write_jsonl
from hs2p_jax.train.metrics import read_metrics
from test_multiprocess import _one_device, _run_two, _train_bt


@pytest.mark.slow
def test_reinforce_on_two_processes_equals_one_process_with_two_devices(tmp_path):
  env1 = _one_device()
  _train_bt(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8)), tmp_path / "rm", 1)
  root = os.path.join(os.path.dirname(__file__), "..")
  cmd = [sys.executable, "-m", "hs2p_jax", "reinforce", "--config", os.path.join(root, "configs/quickstart/reinforce.yaml")]
  common = ["reinforce.steps=2", f"reward_model={tmp_path / 'rm' / 'model'}", "data.builtin_size=32",
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
