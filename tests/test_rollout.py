"""The rollout layout: the degree chosen, the copy's placement and values, and sampling from it
equal to sampling from the training layout (4 CPU devices, FSDP training mesh)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hs2p_jax.errors import UserError
from hs2p_jax.model import preset
from hs2p_jax.rl.layout import choose_tensor

GiB = 1 << 30


def test_without_chip_figures_the_smallest_degree_that_fits_half_a_device():
  cfg70 = preset("llama-3.1-70b")  # 64 heads, 8 KV heads
  copy = 141 * 10**9  # bf16 70B
  assert choose_tensor(copy, 128, cfg70, rows=128, memory=95 * GiB) == 4  # 35 GB <= 47.5 GiB; 2: 70 GB does not
  assert choose_tensor(copy, 128, cfg70, rows=128, memory=192 * GiB) == 2
  assert choose_tensor(16 * 10**9, 8, preset("llama-3.1-8b"), rows=128, memory=95 * GiB) == 1  # 8B: replicated
  assert choose_tensor(copy, 128, cfg70, rows=128, memory=None) == 1  # unknown memory (CPU): replicated
  assert choose_tensor(copy, 128, cfg70, rows=128, memory=None, chip="cpu") == 1
  # rows must split over the n / t groups: 8 rows on 16 devices need t >= 2
  assert choose_tensor(10, 16, cfg70, rows=8, memory=None) == 2
  # nothing fits: the largest degree allowed
  assert choose_tensor(10**13, 16, cfg70, rows=16, memory=GiB) == 8
  # no degree divides the KV heads and splits the rows
  assert choose_tensor(10, 3, preset("tiny"), rows=1, memory=None) == 0


def _decode_seconds(cfg, copy, n, t, rows, context, bw, peak, link, hop):
  """An independent statement of roofline.decode_time's model: HBM bytes or FLOPs, plus ring all-reduces."""
  group = rows * t / n
  d, L = cfg.hidden_size, cfg.num_layers
  weights = L * (d * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads) + 3 * d * cfg.intermediate_size)
  kv_bytes = 2 * L * group * context * (cfg.num_kv_heads / t) * cfg.head_dim * 2
  flops = (2 * weights + 2 * d * cfg.vocab_size + 4 * L * context * cfg.num_heads * cfg.head_dim) * group / t
  comm = 0 if t == 1 else 2 * L * (2 * (t - 1) * hop + 2 * (t - 1) / t * group * d * 2 / link)
  return max((copy / t + kv_bytes) / bw, flops / peak) + comm


@pytest.mark.parametrize("name,n,copy,memory,chip,smallest", [
    ("llama-3.1-70b", 128, 141 * 10**9, 95 * GiB, "v5p", 4), ("llama-3.1-8b", 8, 16 * 10**9, 95 * GiB, "v5p", 1),
    ("llama-3.1-70b", 16, 141 * 10**9, 80 * GiB, "h100", 4)])
def test_the_degree_is_chosen_for_decode_time_among_those_that_fit(name, n, copy, memory, chip, smallest):
  from hs2p_jax.roofline.decode_time import LINKS, NETWORK_LINK, decode_time
  from hs2p_jax.roofline.flops import PEAK_BANDWIDTH, PEAK_FLOPS
  from hs2p_jax.rl.layout import degrees, smallest_fitting
  cfg = preset(name).replace(dtype="bfloat16")
  rows, context = 128, 2048 + 1024
  assert smallest_fitting(copy, n, cfg, rows, memory) == smallest
  chosen = choose_tensor(copy, n, cfg, rows, memory, chip, context)
  fitting = [t for t in degrees(n, cfg, rows) if copy / t <= memory / 2]
  figures = PEAK_BANDWIDTH[chip], PEAK_FLOPS[chip]["bfloat16"]
  want = {t: _decode_seconds(cfg, copy, n, t, rows, context, *figures,
                             *(NETWORK_LINK if chip == "h100" and t > 8 else LINKS[chip])) for t in fitting}
  got = {t: decode_time(cfg, copy, "bfloat16", n, t, rows, context, chip).seconds for t in fitting}
  assert got == pytest.approx(want, rel=1e-9)
  assert chosen == min(want, key=want.get) and chosen > smallest  # bandwidth-bound: a larger degree wins
  assert got[chosen] < got[smallest]
  # the 70B copy: 8 KV heads bound the degree, and the all-reduces keep it from being free
  assert decode_time(cfg, copy, "bfloat16", n, chosen, rows, context, chip).comm_seconds > 0


SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from hs2p_jax.errors import UserError
from hs2p_jax.model import preset
from hs2p_jax.rl.layout import layout_for
from hs2p_jax.sample import SamplingConfig, generate_from_state
from hs2p_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh, use_mesh
from hs2p_jax.train.model_init import random_model

out = {}
mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=1))
ids = np.random.RandomState(0).randint(3, 500, (4, 12)).astype(np.int32)
mask = np.ones_like(ids); mask[1, :3] = 0
sc = SamplingConfig(max_new_tokens=6, temperature=0.9, eos_ids=(), pad_id=0, num_samples=2)
for dtype in ("float32", "bfloat16"):
  cfg = preset("tiny", num_layers=2, dtype=dtype)
  lm = random_model("lm", cfg, 9, 0, mesh, DEFAULT_RULES)
  gd, st = nnx.split(lm)
  with use_mesh(mesh, DEFAULT_RULES):
    ref = generate_from_state(gd, st, ids, mask, jax.random.key(3), sc)
  out[f"{dtype}/0"] = {"tensor": layout_for(cfg, mesh, DEFAULT_RULES, rows=8).tensor}  # auto
  for t in (1, 2, 4):
    lay = layout_for(cfg, mesh, DEFAULT_RULES, tensor=t, rows=8)
    cp = lay.copy(st)
    sample = dtype == "float32" or t == 1  # bfloat16 tensor-parallel samples differ (see the test)
    with use_mesh(lay.mesh, lay.rules):
      got = generate_from_state(lay.graphdef, cp, ids, mask, jax.random.key(3), sc) if sample else ref
    specs = {"/".join(str(getattr(k, "key", k)) for k in p): [str(s) for s in leaf.sharding.spec]
             for p, leaf in jax.tree_util.tree_flatten_with_path(cp)[0]}
    values = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b.astype(a.dtype), jnp.float32))))
                 for a, b in zip(jax.tree.leaves(cp), jax.tree.leaves(st)))
    out[f"{dtype}/{t}"] = {
        "tensor": lay.tensor, "mesh": dict(lay.mesh.shape), "specs": specs, "value_diff": values,
        "splits": sorted({int(np.prod(a.shape) // np.prod(a.sharding.shard_shape(a.shape))) for a in jax.tree.leaves(cp)}),
        "gate_shard": list(cp["model"]["layers"]["mlp"]["gate"].value.sharding.shard_shape(
            cp["model"]["layers"]["mlp"]["gate"].value.shape)),
        "dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(cp)}),
        "same_devices": [d.id for d in lay.mesh.devices.flat] == [d.id for d in mesh.devices.flat],
        "tokens_equal": bool(np.array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))),
        "logprob_diff": float(np.max(np.abs(np.asarray(got.logprobs) - np.asarray(ref.logprobs)))),
        "lengths_equal": bool(np.array_equal(np.asarray(got.lengths), np.asarray(ref.lengths)))}
try:
  layout_for(cfg, mesh, DEFAULT_RULES, tensor=3, rows=8)
except UserError as e:
  out["error"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices():
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True, text=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_copy_is_placed_for_decoding_on_the_same_devices(four_devices):
  for dtype in ("float32", "bfloat16"):
    assert four_devices[f"{dtype}/0"]["tensor"] == 1  # CPU (no memory stats): replicated
    for t in (1, 2, 4):
      r = four_devices[f"{dtype}/{t}"]
      assert r["mesh"] == {"data": 4 // t, "fsdp": 1, "tensor": t} and r["same_devices"]
      assert r["dtypes"] == [dtype]  # cast once, to the compute dtype
      assert r["value_diff"] == 0.0
      # each weight whole on a device, or split over the t devices of a tensor-parallel group only
      assert r["splits"] == ([1] if t == 1 else [1, t]), r["splits"]
  assert four_devices["float32/2"]["gate_shard"] == [2, 128, 192]  # [L, D, F / 2]
  assert four_devices["float32/1"]["gate_shard"] == [2, 128, 384]


def test_sampling_from_the_copy_equals_sampling_from_the_training_layout(four_devices):
  for t in (1, 2, 4):  # float32: tensor-parallel sums round differently, within 1e-5
    r = four_devices[f"float32/{t}"]
    assert r["tokens_equal"] and r["lengths_equal"], t
    assert r["logprob_diff"] <= 1e-5, (t, r["logprob_diff"])
  # a replicated copy computes exactly what the training layout computed, in bfloat16 too (in
  # bfloat16 a tensor-parallel copy's partial sums round differently enough to change samples)
  for dtype in ("float32", "bfloat16"):
    r = four_devices[f"{dtype}/1"]
    assert r["tokens_equal"] and r["logprob_diff"] == 0.0, dtype


def test_a_degree_that_does_not_divide_the_devices_is_a_config_error(four_devices):
  assert four_devices["error"] == "reinforce.rollout_tensor=3 does not divide the 4 devices"


def test_layout_rows_must_split(tmp_path):
  import jax
  from flax import nnx
  from hs2p_jax.model import create
  from hs2p_jax.rl.layout import layout_for
  from hs2p_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh
  cfg = preset("tiny", num_layers=1)
  _, st = nnx.split(create("lm", cfg))
  mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:1])
  lay = layout_for(cfg, mesh, DEFAULT_RULES, rows=3)
  assert lay.tensor == 1 and lay.describe().startswith("rollout copy: float32, replicated")
  with pytest.raises(UserError, match="must be >= 0"):
    from hs2p_jax import config as config_lib
    config_lib.load(config_lib.ReinforceRunConfig, None, ["reinforce.rollout_tensor=-1"])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="compile-only TPU devices need libtpu")
def test_the_decode_groups_are_compact_blocks_of_a_v5p_slice():
  """On a v5p-128 (4x4x8, compile-only devices) each tensor group of the rollout copy's mesh is a
  block of chips no larger than the group (its decode all-reduces cross no extra links)."""
  from jax.experimental import topologies

  from hs2p_jax.rl.layout import decode_mesh, tensor_groups
  from hs2p_jax.sharding import MeshConfig, make_mesh
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x8").devices
  for train, tensor in (((1, -1, 1), 8), ((2, -1, 1), 4), ((1, -1, 4), 16)):
    mesh = make_mesh(MeshConfig(*train), list(devices))
    groups = tensor_groups(decode_mesh(mesh, tensor))
    assert groups["compact"] and np.prod([int(x) for x in groups["extent"].split("x")]) == tensor, (train, groups)
  assert tensor_groups(decode_mesh(make_mesh(MeshConfig(data=1), jax.devices()[:1]), 1)) is None  # CPU: no coords
