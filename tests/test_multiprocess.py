"""Two processes through jax.distributed (gloo on CPU) give one process's losses; checkpoints move between them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax.train.metrics import read_metrics


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_lora_train_rm_on_two_processes_matches_one_with_two_devices_and_restores_in_one(tmp_path):
  """LoRA train-rm (adapters and head over a base sharded across the processes) on 2 processes x 1
  device logs what 1 process x 2 devices logs; its model checkpoint restores in one process."""
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: mp\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.validation": data, "data.format": "pairs",
                                     "train.objective": "bt", "train.steps": 4, "train.batch_size": 4,
                                     "train.lr": 3e-3, "train.save_every": 2, "mesh.data": 1, "mesh.fsdp": -1,
                                     "model.lora.rank": 4})
  base = [sys.executable, "-m", "hs2p_jax", "train-rm", "--config", str(cfg)]
  single = str(tmp_path / "single")
  subprocess.run(base + ["--out", single, "--set", *sets], env={**_one_device(), "JAX_NUM_CPU_DEVICES": "2"},
                 check=True, capture_output=True)
  multi = str(tmp_path / "multi")
  _run_two(base + ["--out", multi, "--set", *sets], _one_device())
  a, b = read_metrics(os.path.join(single, "metrics.jsonl")), read_metrics(os.path.join(multi, "metrics.jsonl"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for k in ("loss", "grad_norm", "accuracy"):
    assert [r[k] for r in b] == pytest.approx([r[k] for r in a], rel=1e-5), k
  assert b[-1]["val_accuracy"] == a[-1]["val_accuracy"]
  assert os.path.isdir(os.path.join(multi, "frozen", "base"))  # the base kept once, written by both processes
  # the 2-process run's model checkpoint (adapters included) restores in a 1-process run with the same numbers
  script = ("import json, sys, numpy as np\nfrom hs2p_jax.checkpoint import load_model\n"
            "ids = np.arange(3, 40, dtype=np.int32).reshape(1, -1)\n"
            "print(json.dumps([np.asarray(load_model(p)[0](ids)).tolist() for p in sys.argv[1:]]))")
  res = subprocess.run([sys.executable, "-c", script, os.path.join(multi, "model"), os.path.join(single, "model")],
                       env=_one_device(), check=True, capture_output=True, text=True)
  m, s = json.loads(res.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(m, s, rtol=1e-4, atol=1e-5)


def _run_two(cmd: list[str], env: dict) -> list[str]:
  """`cmd` on two processes joined by jax.distributed; returns their stdouts (asserting exit 0)."""
  port = free_port()
  procs = [subprocess.Popen(cmd + [f"dist.coordinator=127.0.0.1:{port}", "dist.num_processes=2",
                                   f"dist.process_id={i}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [o for o, _ in outs]


def _one_device() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def _train_bt(tmp_path, data: str, out, steps: int, **extra) -> None:
  """A tiny BT reward model trained on `data` into `out` on one device."""
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: rm\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": steps, "train.batch_size": 4, **extra})
  subprocess.run([sys.executable, "-m", "hs2p_jax", "train-rm", "--config", str(cfg), "--out", str(out),
                  "--set", *sets], env=_one_device(), check=True, capture_output=True)


@pytest.mark.slow
def test_expo_search_and_eval_on_two_processes_equal_one_process_with_two_devices(tmp_path):
  """FSDP over 2 devices: on one process, and on two (one device each) through jax.distributed."""
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(12))
  env1 = _one_device()
  for name, steps in (("base", 1), ("tuned", 4)):
    _train_bt(tmp_path, data, tmp_path / name, steps, **{"train.lr": 3e-3})
  mesh = ["mesh.data=1", "mesh.fsdp=2"]
  expo = [sys.executable, "-m", "hs2p_jax", "expo", "--base", str(tmp_path / "base"), "--tuned",
          str(tmp_path / "tuned"), "--search", "0.5:2.0:0.5", "--data", data, "--format", "pairs",
          "--max-length", "64", "--batch-size", "4"]
  from hs2p_jax.data.synthetic import write_builtin
  rb2 = write_builtin(str(tmp_path / "builtin"), size=64)["rewardbench2"]
  evaluate2 = [sys.executable, "-m", "hs2p_jax", "eval", "--data", rb2, "--format", "rewardbench2", "--max-length",
               "64", "--batch-size", "6"]
  env2 = {**env1, "JAX_NUM_CPU_DEVICES": "2"}
  results = {}
  for name in ("one", "two"):
    out = tmp_path / name
    if name == "one":
      subprocess.run(expo + ["--out", str(out / "expo"), "--set", *mesh], env=env2, check=True, capture_output=True)
      subprocess.run(evaluate2 + ["--checkpoint", str(out / "expo"), "--out", str(out / "rb2.json"), "--set", *mesh],
                     env=env2, check=True, capture_output=True)
    else:
      _run_two(expo + ["--out", str(out / "expo"), "--set", *mesh], env1)
      _run_two(evaluate2 + ["--checkpoint", str(out / "expo"), "--out", str(out / "rb2.json"), "--set", *mesh], env1)
    search = json.loads((out / "expo" / "expo_search.json").read_text())
    results[name] = (search, json.loads((out / "rb2.json").read_text()))
  (s1, r1), (s2, r2) = results["one"], results["two"]
  assert r2["prompts"] == r1["prompts"] == 14 and r2["subsets"] == pytest.approx(r1["subsets"], rel=1e-4)
  assert r2["overall"] == pytest.approx(r1["overall"], rel=1e-4)
  assert s2["best"] == s1["best"] and [r["factor"] for r in s2["table"]] == [0.5, 1.0, 1.5, 2.0]
  for a, b in zip(s1["table"], s2["table"]):
    assert b["accuracy"] == a["accuracy"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


_GUARDED_RUN = """
import sys
import threading

import jax
from jax._src import array as jax_array
from jax.experimental import multihost_utils

from hs2p_jax import config as config_lib
from hs2p_jax.train.checkpoints import RunCheckpoints
from hs2p_jax.distributed import initialize
from hs2p_jax.train import rm_trainer
from hs2p_jax.train.guard import FiniteGuard
from hs2p_jax.train.trainer import Trainer

cfg = config_lib.load(config_lib.RunConfig, sys.argv[1], sys.argv[3:])
d = cfg.dist
initialize(d.coordinator, d.num_processes, d.process_id, d.local_device_ids, d.heartbeat_timeout)

# No host sync in the loop or its batch reader outside the log, eval and save work: on an accelerator the
# transfer guard says so; on the CPU, where arrays live in host memory and it cannot trip, every way
# this code reads a device array, waits for one or meets the other processes raises instead.
jax.config.update("jax_transfer_guard_device_to_host", "disallow_explicit")
allow = threading.local()
armed = False  # from the first step on (setup, restore and snapshots come before)

def check(what):
  feeding = threading.current_thread().name.startswith(("MainThread", "hs2p-feed"))  # the loop and its batch reader
  if armed and feeding and not getattr(allow, "on", False):
    raise RuntimeError(f"host sync outside a log, eval or save step: {what}")

value = jax_array.ArrayImpl._value
jax_array.ArrayImpl._value = property(lambda self: (check("a device array read"), value.fget(self))[1])
for owner, name in ((jax_array.ArrayImpl, "__array__"), (jax_array.ArrayImpl, "block_until_ready"),
                    (multihost_utils, "process_allgather"), (multihost_utils, "broadcast_one_to_all"),
                    (multihost_utils, "sync_global_devices")):
  def guarded(*args, _fn=getattr(owner, name), _name=name, **kwargs):
    check(_name)
    return _fn(*args, **kwargs)
  setattr(owner, name, guarded)

def allowed(fn):
  def run(*args, **kwargs):
    allow.on = True
    try:
      with jax.transfer_guard_device_to_host("allow"):
        return fn(*args, **kwargs)
    finally:
      allow.on = False
  return run

for owner, name in ((Trainer, "record"), (Trainer, "evaluate"), (Trainer, "save_final"), (FiniteGuard, "check"),
                    (RunCheckpoints, "save"), (RunCheckpoints, "wait"), (RunCheckpoints, "close")):
  setattr(owner, name, allowed(getattr(owner, name)))
begin = Trainer.begin

def arm(self, start):
  global armed
  begin(self, start)
  armed = True
Trainer.begin = arm
rm_trainer.train_rm(cfg, sys.argv[2])
"""


@pytest.mark.slow
def test_two_processes_feed_their_own_rows_without_host_syncs_between_log_steps(tmp_path):
  """2 processes x 1 device: each feeds its block of the batch, no device-to-host copy outside the log,
  eval and save steps (a transfer guard says so), and the numbers of 1 process x 2 devices."""
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(12))
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: guarded\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.validation": data, "data.format": "pairs",
                                     "train.objective": "bt", "train.steps": 8, "train.batch_size": 4,
                                     "train.micro_batch_size": 2, "train.lr": 3e-3, "train.log_every": 4,
                                     "train.save_every": 4, "mesh.data": 1, "mesh.fsdp": -1})
  script = tmp_path / "guarded.py"
  script.write_text(_GUARDED_RUN)
  multi = str(tmp_path / "multi")
  _run_two([sys.executable, str(script), str(cfg), multi, *sets], _one_device())
  single = str(tmp_path / "single")
  subprocess.run([sys.executable, str(script), str(cfg), single, *sets],
                 env={**_one_device(), "JAX_NUM_CPU_DEVICES": "2"}, check=True, capture_output=True)
  a, b = read_metrics(os.path.join(single, "metrics.jsonl")), read_metrics(os.path.join(multi, "metrics.jsonl"))
  assert [r["step"] for r in b] == [4, 8]
  for ra, rb in zip(a, b):
    for k in ("loss", "grad_norm", "accuracy", "val_accuracy"):
      if k in ra:
        assert rb[k] == pytest.approx(ra[k], rel=1e-5), (k, ra, rb)

