"""`hs2p convert` on the mesh: the streamed Hugging Face export (shards laid out up front, one layer
gathered at a time, the chosen dtype) and imports and exports on two processes equal to one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import need_torch, padded_batch, tiny_hf_model, torch_positions

REPO = os.path.join(os.path.dirname(__file__), "..")


def _hf_layout(params: dict, cfg) -> dict[str, np.ndarray]:
  """Our parameters in Hugging Face's names and layouts, stated independently of convert.mapping."""
  d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {"model.embed_tokens.weight": params["model/embed"], "model.norm.weight": params["model/norm/weight"],
         "score.weight": params["head_kernel"].T}
  for i in range(cfg.num_layers):
    layer = {k[len("model/layers/"):]: v[i] for k, v in params.items() if k.startswith("model/layers/")}
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": layer["attn/wq"].reshape(d, h * dh).T,
                p + "self_attn.k_proj.weight": layer["attn/wk"].reshape(d, kv * dh).T,
                p + "self_attn.v_proj.weight": layer["attn/wv"].reshape(d, kv * dh).T,
                p + "self_attn.o_proj.weight": layer["attn/wo"].reshape(h * dh, d).T,
                p + "mlp.gate_proj.weight": layer["mlp/gate"].T, p + "mlp.up_proj.weight": layer["mlp/up"].T,
                p + "mlp.down_proj.weight": layer["mlp/down"].T,
                p + "input_layernorm.weight": layer["input_norm/weight"],
                p + "post_attention_layernorm.weight": layer["post_attn_norm/weight"]})
  return out


def _flat(model) -> dict[str, np.ndarray]:
  from flax import nnx
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_shards_hold_the_parameters_in_their_layout_and_load_in_transformers(tiny_hf_dir, tmp_path, dtype):
  torch = need_torch()
  import ml_dtypes
  import transformers
  from safetensors.numpy import load_file

  from hs2p_jax.convert import export_hf, load_hf
  from hs2p_jax.convert.hf_export import HEAD_BIAS_FILE
  path, _ = tiny_hf_dir
  rm = load_hf(path, head="reward", num_attributes=3, seed=1)
  rm.head_bias[...] = np.asarray([0.5, -1.0, 2.0], np.float32)
  out = tmp_path / "hf"
  export_hf(rm, str(out), dtype=dtype, shard_bytes=60_000)  # a tiny budget: one file per few tensors
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  got = {}
  for f in files:  # the safetensors library reads every streamed file
    got.update(load_file(str(out / f)))
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  want = {k: v.astype(np_dtype) for k, v in _hf_layout(_flat(rm), rm.cfg).items()}
  assert set(got) == set(index["weight_map"]) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in want.values())
  assert load_file(str(out / HEAD_BIAS_FILE))["score.bias"].astype(np.float32).tolist() == [0.5, -1.0, 2.0]
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=getattr(torch, dtype))
  assert next(hf.parameters()).dtype == getattr(torch, dtype)
  ids, mask = padded_batch(np.random.RandomState(2), [12, 7], 12, "right")
  with torch.no_grad():
    theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(torch_positions(mask))).logits.float().numpy()
  ours = np.asarray(rm(ids, mask)) - np.asarray([0.5, -1.0, 2.0])
  np.testing.assert_allclose(theirs, ours, atol=1e-4 if dtype == "float32" else 0.15)


def test_the_layer_gather_holds_one_layer_per_device():
  """On a 4-device FSDP mesh the gather's compiled buffers are one layer's tensors, not the stacks."""
  script = r"""
import json, numpy as np, jax
from flax import nnx
from hs2p_jax.convert.hf_export import entries, gather_fn
from hs2p_jax.model import create, preset
from hs2p_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh, state_shardings
cfg = preset("tiny", num_layers=8, dtype="float32")
mesh = make_mesh(MeshConfig(data=1, fsdp=4))
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("lm", cfg)))
shard = state_shardings(abstract, mesh, DEFAULT_RULES)
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
flat = dict(nnx.to_flat_state(state))
groups = entries(nnx.merge(graphdef, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)))
layer = groups[1]
arrays = {e.path: flat[e.path].get_value() for e in layer}
model = nnx.merge(graphdef, jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), state))
m = gather_fn(model, "bfloat16").lower(arrays, np.int32(3)).compile().memory_analysis()
one_layer = sum(int(np.prod(e.shape)) for e in layer) * 2
stacked = sum(int(np.prod(a.shape)) for a in arrays.values()) * 4
print(json.dumps({"out": m.output_size_in_bytes, "temp": m.temp_size_in_bytes, "one_layer": one_layer,
                  "stacked": stacked, "args": m.argument_size_in_bytes}))
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": REPO}
  r = json.loads(subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1])
  assert r["one_layer"] <= r["out"] <= 1.01 * r["one_layer"]  # one layer, bf16, whole (buffers aligned)
  assert r["args"] <= 1.01 * r["stacked"] / 4  # the stacks stay sharded: a quarter each (norms replicated)
  assert r["temp"] <= 2 * r["one_layer"]      # no stacked tensor gathered whole


def _files(d) -> dict[str, str]:
  return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def _run(cmd: list[str], processes: int, devices: int) -> list[str]:
  from test_multiprocess import free_port
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  if processes == 1:
    return [subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout]
  port = free_port()
  procs = [subprocess.Popen(cmd + ["--set", f"dist.coordinator=127.0.0.1:{port}", f"dist.num_processes={processes}",
                                   f"dist.process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(processes)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [o for o, _ in outs]


@pytest.mark.slow
def test_two_processes_import_and_export_what_one_does(tmp_path):
  """`hs2p convert --hf` and `--checkpoint --to-hf` on 2 processes x 1 device (FSDP over both):
  the same checkpoint and byte-identical files as 1 process; transformers scores what we score."""
  torch = need_torch()
  import transformers

  from hs2p_jax.checkpoint import load_model
  ref = tiny_hf_model("LlamaForSequenceClassification", num_labels=3, pad_token_id=0)
  src = tmp_path / "src"
  ref.save_pretrained(src, safe_serialization=True)
  hs2p = [sys.executable, "-m", "hs2p_jax", "convert"]
  for n in (1, 2):
    _run(hs2p + ["--hf", str(src), "--head", "reward", "--num-attributes", "3", "--out", str(tmp_path / f"ckpt{n}")],
         n, 1)
  one, two = (_flat(load_model(str(tmp_path / f"ckpt{n}"))[0]) for n in (1, 2))
  assert set(one) == set(two) and all(np.array_equal(one[k], two[k]) for k in one)
  for n in (1, 2):
    outs = _run(hs2p + ["--checkpoint", str(tmp_path / "ckpt2"), "--to-hf", str(tmp_path / f"hf{n}"),
                        "--dtype", "bfloat16"], n, 1)
    assert json.loads(outs[0].strip().splitlines()[-1])["dtype"] == "bfloat16"
  assert _files(tmp_path / "hf1") == _files(tmp_path / "hf2")
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf2"), dtype=torch.float32)
  ids, mask = padded_batch(np.random.RandomState(7), [15, 9], 15, "right")
  with torch.no_grad():
    theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(torch_positions(mask))).logits.numpy()
    original = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(torch_positions(mask))).logits.numpy()
  np.testing.assert_allclose(theirs, original, atol=0.05)  # bf16 weights of the same model
  # an existing directory is refused before anything is gathered, on every process
  proc = subprocess.run(hs2p + ["--checkpoint", str(tmp_path / "ckpt1"), "--to-hf", str(tmp_path / "hf1")],
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
  assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith("hf1 already exists")


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tiny_hf_dir, tmp_path):
  from hs2p_jax.convert import export_hf, load_hf
  from hs2p_jax.errors import UserError
  path, _ = tiny_hf_dir
  lm = load_hf(path)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(UserError, match="the export could not be written"):
    export_hf(lm, str(blocker / "hf"))
  assert sorted(os.listdir(tmp_path)) == ["a_file", "tiny_hf"]
