"""Loading per shard: each process reads from safetensors / GGUF only the regions its devices hold,
and the sharded params equal a plain load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import requires_smollm2, tiny_hf_model
from test_multiprocess import free_port

SCRIPT = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from hs2p_jax.distributed import initialize
args = json.loads(sys.argv[1])
if args.get("port"):
  initialize(f"127.0.0.1:{args['port']}", 2, args["pid"])
from hs2p_jax.convert import load_gguf, load_hf
from hs2p_jax.convert.state import ReadStats
from hs2p_jax.sharding import MeshConfig, make_mesh
mesh = make_mesh(MeshConfig(data=1, fsdp=args["fsdp"], tensor=args["tensor"]))
load = load_gguf if args["kind"] == "gguf" else load_hf
stats = ReadStats()
sharded = load(args["path"], head=args["head"], mesh=mesh, stats=stats)
plain_stats = ReadStats()
plain = load(args["path"], head=args["head"], stats=plain_stats)  # whole tensors, one device
from jax.experimental import multihost_utils
worst, specs = 0.0, {}
for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded, nnx.Param)), nnx.to_flat_state(nnx.state(plain, nnx.Param))):
  a, b = a.get_value(), b.get_value()
  specs[".".join(path)] = [str(s) for s in a.sharding.spec]
  full = multihost_utils.process_allgather(a, tiled=True) if not a.is_fully_addressable else a
  worst = max(worst, float(np.max(np.abs(np.asarray(full) - np.asarray(b)))))
print(json.dumps({"bytes": stats.bytes_read, "plain_bytes": plain_stats.bytes_read, "max_diff": worst, "specs": specs}))
"""


def _run(args: dict, devices: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], env=env, check=True, capture_output=True,
                       text=True, timeout=600)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
  import torch
  path = tmp_path_factory.mktemp("bf16") / "hf"
  tiny_hf_model("LlamaForSequenceClassification", num_labels=9).to(torch.bfloat16).save_pretrained(path)
  return str(path)


def test_sharded_safetensors_load_equals_plain_and_reads_its_share(bf16_dir):
  res = _run({"path": bf16_dir, "kind": "hf", "head": "reward", "fsdp": 2, "tensor": 2}, devices=4)
  assert res["max_diff"] == 0.0  # the same bf16 values, whatever the regions
  assert res["specs"]["model.layers.mlp.gate"] == ["None", "fsdp", "tensor"]
  assert res["specs"]["model.layers.attn.wo"] == ["None", "tensor", "None", "fsdp"]
  # 4 devices, each a distinct quarter of every matrix: together they read the file's bytes once
  # (plus the small replicated norms and head, read once per distinct region)
  assert res["plain_bytes"] <= res["bytes"] < 1.05 * res["plain_bytes"]


@pytest.mark.slow
def test_two_processes_each_read_about_half_of_the_weights(bf16_dir):
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT,
                             json.dumps({"path": bf16_dir, "kind": "hf", "head": "reward", "fsdp": 2, "tensor": 1,
                                         "port": port, "pid": i})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  total = res[0]["plain_bytes"]
  assert total == res[1]["plain_bytes"]
  for r in res:
    assert r["max_diff"] == 0.0
    assert 0.45 * total < r["bytes"] < 0.55 * total, (r["bytes"], total)


@requires_smollm2
@pytest.mark.slow
def test_sharded_gguf_load_equals_plain(tmp_path):
  res = _run({"path": "smollm2", "kind": "gguf", "head": "lm", "fsdp": 2, "tensor": 1}, devices=2)
  assert res["max_diff"] < 1e-6  # dequantised block by block: the same values
  # each of the 2 devices reads half the blocks of every matrix
  assert res["plain_bytes"] <= res["bytes"] < 1.02 * res["plain_bytes"]
