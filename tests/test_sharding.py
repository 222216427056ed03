"""The mesh changes where arrays live, not the numbers: 1 device vs 8 (data x fsdp x tensor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import MeshConfig, logical_to_spec, mesh_shape

SCRIPT = r"""
import json, sys
import jax
from hs2p_jax import config as config_lib
from hs2p_jax.train.rm_trainer import trainer as rm_trainer
results = {}
for name, out, sets in json.loads(sys.argv[1]):
  trainer = rm_trainer(config_lib.load(config_lib.RunConfig, None, sets), out)
  last = trainer.run()
  specs = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): list(leaf.sharding.spec)
           for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.params)[0]}
  losses = [json.loads(l)["loss"] for l in open(out + "/metrics.jsonl")]
  results[name] = {"devices": jax.device_count(), "specs": specs, "losses": losses, "val_loss": last.get("val_loss")}
# the sampler on the same mesh (policy sharded by the same rules)
import numpy as np
from hs2p_jax.model import preset
from hs2p_jax.sample import generate
from hs2p_jax.sharding import use_mesh
from hs2p_jax.train.model_init import random_model
lm = random_model("lm", preset("tiny", num_layers=1), 9, 0, trainer.mesh, trainer.rules)
ids = np.random.RandomState(0).randint(16, 270, (4, 8))
with use_mesh(trainer.mesh, trainer.rules):
  out = generate(lm, ids, np.ones_like(ids), max_new_tokens=6, temperature=0.8, seed=1)
  multi = generate(lm, ids, np.ones_like(ids), max_new_tokens=6, temperature=0.8, seed=1, num_samples=2)
  # 2 prompts do not split over data*fsdp = 4 devices, their 4 samples do: each sample prefills its own copy
  two = generate(lm, ids[:2], np.ones_like(ids[:2]), max_new_tokens=6, temperature=0.8, seed=2, num_samples=2)
results["generate"] = {"tokens": np.asarray(out.tokens).tolist(), "logprobs": np.asarray(out.logprobs).tolist(),
                       "samples_tokens": np.asarray(multi.tokens).tolist(),
                       "two_tokens": np.asarray(two.tokens).tolist(), "two_logprobs": np.asarray(two.logprobs).tolist()}
print(json.dumps(results))
if jax.device_count() == 1:  # one device: the kernels' checks are tests/test_model.py's and test_share_prompt.py's
  sys.exit(0)
# the splash kernel per shard (shard_map over batch and heads) against the reference attention
import jax.numpy as jnp
from hs2p_jax.model.attention import reference_attention, segment_causal_mask, splash_attention
rng = np.random.RandomState(1)
q, k, v = (jnp.asarray(rng.randn(4, 20, h, 8), jnp.float32) for h in (4, 2, 2))
seg = np.ones((4, 20), np.int32); seg[0, :5] = 0; seg[1, 9:] = 2; seg[2, 15:] = 0
seg = jnp.asarray(seg)
slots = jnp.arange(20)
loss = lambda f: (lambda q, k, v: jnp.sum(jnp.where(seg[..., None, None] != 0, f(q, k, v), 0) ** 2))
with use_mesh(trainer.mesh, trainer.rules):
  got = jax.jit(jax.value_and_grad(loss(lambda q, k, v: splash_attention(q, k, v, seg)), (0, 1, 2)))(q, k, v)
want = jax.value_and_grad(loss(lambda q, k, v: reference_attention(q, k, v, segment_causal_mask(slots, slots, seg, seg))),
                          (0, 1, 2))(q, k, v)
results["splash_max_diff"] = max(float(jnp.max(jnp.abs(a - b)) / (1 + jnp.max(jnp.abs(b))))
                                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
# pairs sharing their prompt: row 3 is [prompt | chosen | rejected], row 1 two such segments
from hs2p_jax.model.attention import branch_mask
branch = np.zeros((4, 20), np.int32); branch[3, 6:12] = 1; branch[3, 12:] = 2; branch[1, 3:6] = 1; branch[1, 6:9] = 2
branch[1, 12:15] = 1; branch[1, 15:] = 2
branch = jnp.asarray(branch)
with use_mesh(trainer.mesh, trainer.rules):
  got = jax.jit(jax.value_and_grad(loss(lambda q, k, v: splash_attention(q, k, v, seg, branch)), (0, 1, 2)))(q, k, v)
want = jax.value_and_grad(loss(lambda q, k, v: reference_attention(
    q, k, v, segment_causal_mask(slots, slots, seg, seg) & branch_mask(branch, branch))), (0, 1, 2))(q, k, v)
results["splash_branches_max_diff"] = max(float(jnp.max(jnp.abs(a - b)) / (1 + jnp.max(jnp.abs(b))))
                                          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(results))
"""


def run_in_subprocess(devices, runs):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], env=env, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_device_and_eight_devices_log_the_same_losses(tmp_path):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  # (regression shares BT's model, step and sharding; its step runs on fsdp 2 x tensor 2 in test_plan_is_the_run)
  objectives = {
      "bt": {"data.format": "pairs", "train.objective": "bt", "train.bt_variant": "scaled", "data.train": pairs,
             "data.validation": pairs},
      # each pair as one packed [prompt | chosen | rejected] segment (test_share_prompt.py: the losses of unpacked)
      "bt_shared": {"data.format": "pairs", "train.objective": "bt", "train.bt_variant": "scaled", "data.train": pairs,
                    "data.validation": pairs, "data.packing": True, "data.share_prompt": True,
                    "data.max_length": 128},
  }
  # "bt": 3 pairs = 6 rows: on data*fsdp = 4 devices the loader pads them to 8 rows (the batch still splits)
  objectives["bt"]["train.batch_size"] = 3
  common = {"train.steps": 2, "train.batch_size": 8, "train.lr": 3e-3, "model.num_layers": 1}
  mesh8 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  one = run_in_subprocess(1, [(k, str(tmp_path / f"one_{k}"), tiny_overrides(tmp_path, **{**common, **v}))
                              for k, v in objectives.items()])
  eight = run_in_subprocess(8, [(k, str(tmp_path / f"eight_{k}"), tiny_overrides(tmp_path, **{**common, **v, **mesh8}))
                                for k, v in objectives.items()])
  for k in objectives:
    assert one[k]["devices"] == 1 and eight[k]["devices"] == 8
    # float reassociation across 8 shards: relative 1e-5
    assert eight[k]["losses"] == pytest.approx(one[k]["losses"], rel=1e-5), k
    assert eight[k]["val_loss"] == pytest.approx(one[k]["val_loss"], rel=1e-5), k
  assert eight["generate"]["tokens"] == one["generate"]["tokens"]  # the sampler, sharded, samples the same
  assert eight["generate"]["samples_tokens"] == one["generate"]["samples_tokens"]
  assert eight["generate"]["two_tokens"] == one["generate"]["two_tokens"]  # repeated prefill = shared prefill
  np.testing.assert_allclose(eight["generate"]["two_logprobs"], one["generate"]["two_logprobs"], atol=1e-4)
  assert eight["splash_max_diff"] < 1e-5 and eight["splash_branches_max_diff"] < 1e-5  # loss and grads vs reference
  np.testing.assert_allclose(eight["generate"]["logprobs"], one["generate"]["logprobs"], atol=1e-4)
  prov = json.load(open(tmp_path / "eight_bt" / "provenance.json"))
  assert prov["batch"] == {"micro_batch_rows": 6, "batch_split": 4, "micro_batches": 1, "padded_rows": 8}
  specs = eight["bt"]["specs"]
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


def test_the_batch_axis_is_never_dropped_silently():
  from jax.sharding import AbstractMesh
  from hs2p_jax.sharding import MESH_AXES, batch_split
  mesh = AbstractMesh((2, 2, 2), MESH_AXES)
  assert batch_split(mesh) == 4
  assert tuple(logical_to_spec(("act_batch", None), (8, 3), mesh)) == (("data", "fsdp"), None)
  for shape in ((6, 3), (2, 3)):
    with pytest.raises(UserError, match=r"act_batch: \d+ rows do not split .*data=2\*fsdp=2.*multiple of 4"):
      logical_to_spec(("act_batch", None), shape, mesh)
  # parameters and other activations still replicate over an axis that does not divide them
  assert tuple(logical_to_spec(("embed", "act_heads"), (6, 3), mesh)) == ("fsdp", None)


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
