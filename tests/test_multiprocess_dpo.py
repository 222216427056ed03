"""DPO and SFT on two processes (jax.distributed on localhost, FSDP over them) equal one process
with two devices: the pair / example pointers of the gathered batches are offset per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hs2p_jax.train.metrics import read_metrics
from test_multiprocess import _one_device, _run_two

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
@pytest.mark.parametrize("command,config,length,keys", [
    ("train-dpo", "dpo.yaml", 160, ("loss", "accuracy", "margin", "drift", "val_loss", "val_accuracy")),
    ("train-sft", "justifier.yaml", 256, ("loss", "val_loss"))])  # the justifier's 512 halved: the same code
def test_two_processes_equal_one_process_with_two_devices(tmp_path, command, config, length, keys):
  section = "dpo" if command == "train-dpo" else "sft"
  cmd = [sys.executable, "-m", "hs2p_jax", command, "--config", os.path.join(ROOT, "configs/quickstart", config)]
  common = [f"{section}.steps=2", f"{section}.log_every=1", f"{section}.batch_size=8", f"{section}.eval_batches=2",
            "data.builtin_size=32", "policy.num_layers=1",
            "mesh.data=1", "mesh.fsdp=2", f"data.buckets=[{length}]"]  # one padded length: one compile
  if section == "sft":
    common.append(f"data.max_length={length}")
  subprocess.run(cmd + ["--out", str(tmp_path / "one"), "--set", *common], check=True, capture_output=True,
                 env={**_one_device(), "JAX_NUM_CPU_DEVICES": "2"})
  _run_two(cmd + ["--out", str(tmp_path / "two"), "--set", *common], _one_device())
  one, two = (read_metrics(os.path.join(tmp_path, d, "metrics.jsonl")) for d in ("one", "two"))
  assert [r["step"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    for key in keys:
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
  assert "val_loss" in two[-1]
