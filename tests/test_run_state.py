"""A run's state (`train.state`): restarts that read no source weights, frozen models in the compute dtype."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import separable_pairs, tiny_hf_model, tiny_overrides, write_jsonl
from hs2p_jax import config as config_lib
from hs2p_jax.model import create, preset
from hs2p_jax.sharding import DEFAULT_RULES, make_mesh
from hs2p_jax.train import dpo_trainer, rm_trainer
from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.state import Part, RunState, store_as
from hs2p_jax.train.optim import make_optimizer


def _hf_source(tmp_path) -> str:
  path = tmp_path / "hf"
  tiny_hf_model(vocab_size=512).save_pretrained(path, safe_serialization=True)  # room for the byte tokenizer
  return str(path)


def _config(kind: str, tmp_path, source: str, steps: int, save_every: int):
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  if kind == "rm":
    sets = tiny_overrides(tmp_path, **{"model.preset": "tiny", "model.num_layers": None, "model.source": f"hf:{source}",
                                       "data.train": pairs, "data.format": "pairs", "train.objective": "bt",
                                       "train.steps": steps, "train.save_every": save_every, "train.batch_size": 4,
                                       "train.lr": 3e-3})
    return config_lib.load(config_lib.RunConfig, None, [s for s in sets if not s.startswith("model.num_layers")])
  return config_lib.load(config_lib.DPORunConfig, None, [
      f"policy.source=hf:{source}", "policy.tokenizer=bytes", f"data.train={pairs}", "data.format=pairs",
      "data.template=chat", "data.max_length=64", "data.pad_multiple=16", f"dpo.steps={steps}",
      f"dpo.save_every={save_every}", "dpo.batch_size=4", "dpo.lr=1e-3", "dpo.warmup_steps=0", "mesh.data=1"])


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_a_resume_reads_no_source_weights_and_logs_the_uninterrupted_numbers(tmp_path, kind):
  pytest.importorskip("torch")
  source = _hf_source(tmp_path)
  page = rm_trainer if kind == "rm" else dpo_trainer
  straight = page.trainer(_config(kind, tmp_path, source, 4, 2), str(tmp_path / "a"))
  straight.run()
  weights = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))
  assert straight.source_reads.bytes_read > (0.9 if kind == "dpo" else 0.6) * weights  # a reward model: no LM head
  first = page.trainer(_config(kind, tmp_path, source, 2, 2), str(tmp_path / "b"))
  first.run()
  resumed = page.trainer(_config(kind, tmp_path, source, 4, 2), str(tmp_path / "b"))
  resumed.run()
  assert resumed.source_reads.bytes_read == 0 and resumed.source_reads.reads == 0
  if kind == "dpo":  # the reference came from the run's own copy of the initial policy
    assert os.path.isdir(tmp_path / "b" / "frozen" / "reference")
  a, b = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("a", "b"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for key in ("loss", "grad_norm", "accuracy"):
      assert rb[key] == ra[key], (key, ra, rb)


def _state(kind: str, compute: str, frozen: str) -> RunState:
  cfg = preset("tiny", num_layers=2, dtype=compute)
  return RunState.build(Part(kind, cfg), {"frozen": Part(kind, cfg, dtype=frozen)}, make_optimizer(1e-3), make_mesh(),
                        DEFAULT_RULES)


@pytest.mark.parametrize("kind", ["lm", "reward"])
def test_frozen_models_in_bfloat16_compute_what_float32_copies_compute(kind):
  graphdef, params = nnx.split(create(kind, preset("tiny", num_layers=2, dtype="bfloat16"), 9, 0))
  ids = np.random.RandomState(0).randint(3, 500, (3, 24))
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  kept = _state(kind, "bfloat16", "float32")
  halved = _state(kind, "bfloat16", "bfloat16")
  as_f32, as_bf16 = store_as(params, "float32"), store_as(params, "bfloat16")
  # the matrices are stored in bfloat16; the norms (and a reward head) stay float32
  dtypes = {"/".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(as_bf16)}
  assert dtypes["model/layers/attn/wq"] == jnp.bfloat16 and dtypes["model/norm/weight"] == jnp.float32
  if kind == "reward":
    assert dtypes["head_kernel"] == dtypes["head_bias"] == jnp.float32
  # the abstract state holds what `store_as` gives, at about half the bytes
  for (_, want), (_, got) in zip(nnx.to_flat_state(halved.frozen["frozen"]), nnx.to_flat_state(as_bf16)):
    assert want.get_value().dtype == got.get_value().dtype
  res_f32, res_bf16 = kept.resident_bytes()["frozen"], halved.resident_bytes()["frozen"]
  assert 0.5 < res_bf16 / res_f32 < 0.52
  out_f32 = np.asarray(nnx.merge(graphdef, as_f32)(ids, mask))
  out_bf16 = np.asarray(nnx.merge(graphdef, as_bf16)(ids, mask))
  np.testing.assert_array_equal(out_bf16, out_f32)  # computing in bfloat16, a float32 copy is cast to the same values
  full = np.asarray(nnx.merge(*nnx.split(create(kind, preset("tiny", num_layers=2), 9, 0)))(ids, mask))
  scale = np.max(np.abs(full))
  assert np.max(np.abs(out_bf16 - full)) < 2 ** -6 * scale  # bfloat16's rounding of the float32 computation
  assert np.max(np.abs(out_bf16 - full)) > 0


def test_float32_runs_keep_float32_frozen_models():
  cfg = config_lib.load(config_lib.DPORunConfig, None, ["policy.preset=tiny", "mesh.data=1"])
  state = dpo_trainer.blueprint(cfg, make_mesh(), DEFAULT_RULES).state
  assert {x.dtype for x in jax.tree.leaves(state.frozen["reference"])} == {jnp.dtype("float32")}
  cfg = config_lib.load(config_lib.DPORunConfig, None, ["policy.preset=tiny", "policy.dtype=bfloat16",
                                                        "dpo.frozen_dtype=float32"])
  state = dpo_trainer.blueprint(cfg, make_mesh(), DEFAULT_RULES).state
  assert state.frozen_parts["reference"].dtype == "float32" and state.trainable.config.dtype == "bfloat16"
