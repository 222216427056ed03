"""The mesh changes where arrays live, not the numbers: 1 device vs 8 (data x fsdp x tensor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import MeshConfig, logical_to_spec, mesh_shape

SCRIPT = r"""
import json, sys
import jax
from hs2p_jax import config as config_lib
from hs2p_jax.train.rm_loop import RMTrainer
cfg = config_lib.load(config_lib.RunConfig, None, sys.argv[2:])
trainer = RMTrainer(cfg, sys.argv[1])
specs = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): list(leaf.sharding.spec)
         for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.params)[0]}
last = trainer.run()
losses = [json.loads(l)["loss"] for l in open(sys.argv[1] + "/metrics.jsonl")]
print(json.dumps({"devices": jax.device_count(), "specs": specs, "losses": losses,
                  "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy")}))
"""


def run_in_subprocess(tmp_path, name, devices, sets):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), *sets], env=env, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("objective", ["regression", "bt"])
def test_one_device_and_eight_devices_log_the_same_losses(tmp_path, objective):
  if objective == "bt":
    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
    extra = {"data.format": "pairs", "train.objective": "bt", "train.bt_variant": "scaled"}
  else:
    rows = [{"prompt": f"p{i}", "response": "r" * (i + 1), "helpfulness": i % 5, "correctness": 1, "coherence": 2,
             "complexity": 3, "verbosity": 0} for i in range(8)]
    data = write_jsonl(tmp_path / "ratings.jsonl", rows)
    extra = {"data.format": "helpsteer2", "train.objective": "regression"}
  common = {**extra, "data.train": data, "data.validation": data, "train.steps": 3, "train.batch_size": 8,
            "train.lr": 3e-3, "model.num_layers": 2}
  one = run_in_subprocess(tmp_path, "one", 1, tiny_overrides(tmp_path, **common))
  sets8 = tiny_overrides(tmp_path, **common, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  eight = run_in_subprocess(tmp_path, "eight", 8, sets8)
  assert one["devices"] == 1 and eight["devices"] == 8
  # float reassociation across 8 shards: relative 1e-5
  assert eight["losses"] == pytest.approx(one["losses"], rel=1e-5)
  assert eight["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
  specs = eight["specs"]
  assert specs["model/layers/mlp/gate/value"] == [None, "fsdp", "tensor"]
  assert specs["model/layers/attn/wq/value"] == [None, "fsdp", "tensor", None]
  assert specs["model/embed/value"] == ["tensor", "fsdp"]


def test_mesh_errors_and_rules():
  assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(UserError, match="does not divide the 6 devices"):
    mesh_shape(MeshConfig(data=-1, fsdp=4, tensor=1), 6)
  with pytest.raises(UserError, match="but there are 8 devices"):
    mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(UserError, match="at most one"):
    mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_logical_to_spec_drops_axes_that_do_not_divide():
  import numpy as np
  from jax.sharding import Mesh
  import jax
  devices = np.asarray(jax.devices()[:1] * 1).reshape(1, 1, 1)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  spec = logical_to_spec(("act_batch", None), (4, 3), mesh)
  assert tuple(spec) == (("data", "fsdp"), None)


def test_mesh_that_does_not_divide_devices_is_a_one_line_cli_error(tmp_path):
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(4))
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: x\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "mesh.data": 3})
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, "-m", "hs2p_jax", "train-rm", "--config", str(cfg), "--out",
                        str(tmp_path / "run"), "--set", *sets], env=env, capture_output=True, text=True)
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and "mesh" in lines[0] and "2 devices" in lines[0], res.stderr
  assert not os.path.exists(tmp_path / "run" / "model")
