"""The JAX Llama against transformers' PyTorch Llama: logits, reward heads, exports, GGUF weights."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import need_torch, padded_batch, requires_smollm2, tiny_hf_model, torch_positions
from hs2p_jax.convert import export_hf, load_hf
from hs2p_jax.errors import UserError

TOL = 1e-3


def torch_logits(model, ids, mask):
  torch = need_torch()
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(torch_positions(mask))).logits.float().numpy()


@pytest.mark.parametrize("side", ["left", "right"])
def test_tiny_llama_logits_match_transformers(tiny_hf_dir, side):
  path, ref_model = tiny_hf_dir
  lm = load_hf(path, dtype="float32")
  assert lm.cfg.rope_scaling is not None and lm.cfg.num_kv_heads == 2 and not lm.cfg.tie_word_embeddings
  ids, mask = padded_batch(np.random.RandomState(0), [40, 23, 7], 40, side)
  ref = torch_logits(ref_model, ids, mask)
  out = np.asarray(lm(ids, mask))
  assert out.shape == (3, 40, 256) and out.dtype == np.float32
  m = mask.astype(bool)
  assert np.abs(out - ref)[m].max() <= TOL
  assert (out.argmax(-1) == ref.argmax(-1))[m].all()


def test_rope_scaling_matters_beyond_original_context(tiny_hf_dir):
  # positions past original_max_position_embeddings=32 exercise the llama3 frequency scaling:
  # a model without it must disagree, so the parity above is not vacuous.
  path, ref_model = tiny_hf_dir
  ids, mask = padded_batch(np.random.RandomState(1), [64], 64, "right")
  ref = torch_logits(ref_model, ids, mask)
  right = float(np.abs(np.asarray(load_hf(path)(ids, mask)) - ref).max())
  wrong = float(np.abs(np.asarray(load_hf(path, rope_scaling=None)(ids, mask)) - ref).max())
  assert wrong > TOL and wrong > 100 * right


def test_reward_head_matches_sequence_classification(tmp_path):
  torch = need_torch()
  ref = tiny_hf_model("LlamaForSequenceClassification", num_labels=9, seed=1)
  ref.save_pretrained(tmp_path / "rm", safe_serialization=True)
  rm = load_hf(str(tmp_path / "rm"), head="reward", num_attributes=9)
  for side in ("left", "right"):
    ids, mask = padded_batch(np.random.RandomState(2), [30, 11, 5], 30, side)
    with torch.no_grad():
      expected = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(torch_positions(mask))).logits.numpy()
    out = np.asarray(rm(ids, mask))
    assert out.shape == (3, 9)
    assert np.abs(out - expected).max() <= TOL, side


def test_fresh_reward_head_on_lm_directory(tiny_hf_dir):
  path, _ = tiny_hf_dir
  rm = load_hf(path, head="reward", num_attributes=9, seed=3)
  kernel = np.asarray(rm.head_kernel[...])
  assert kernel.shape == (64, 9) and 0.01 < kernel.std() < 0.03
  assert np.all(np.asarray(rm.head_bias[...]) == 0)
  ids, mask = padded_batch(np.random.RandomState(3), [9, 4], 9, "left")
  assert np.isfinite(np.asarray(rm(ids, mask))).all()


def test_export_reloads_in_transformers_with_same_logits(tiny_hf_dir, tmp_path):
  path, ref_model = tiny_hf_dir
  import transformers
  lm = load_hf(path)
  export_hf(lm, str(tmp_path / "export"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
  ids, mask = padded_batch(np.random.RandomState(4), [20, 13], 20, "right")
  m = mask.astype(bool)
  np.testing.assert_allclose(torch_logits(again, ids, mask)[m], torch_logits(ref_model, ids, mask)[m], atol=1e-5)
  assert np.abs(np.asarray(load_hf(str(tmp_path / "export"))(ids, mask)) - np.asarray(lm(ids, mask))).max() == 0


def test_reward_export_round_trip_keeps_bias(tiny_hf_dir, tmp_path):
  torch = need_torch()
  import jax.numpy as jnp
  import transformers
  path, _ = tiny_hf_dir
  rm = load_hf(path, head="reward", num_attributes=9, seed=5)
  rm.head_bias[...] = jnp.arange(9, dtype=jnp.float32) / 10
  export_hf(rm, str(tmp_path / "rm"))
  back = load_hf(str(tmp_path / "rm"), head="reward", num_attributes=9)
  ids, mask = padded_batch(np.random.RandomState(5), [12, 6], 12, "right")
  ours = np.asarray(rm(ids, mask))
  np.testing.assert_array_equal(np.asarray(back(ids, mask)), ours)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
  with torch.no_grad():
    theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(torch_positions(mask))).logits.numpy()
  np.testing.assert_allclose(theirs + np.arange(9) / 10, ours, atol=TOL)  # HF's head has no bias


def test_sharded_safetensors_index(tiny_hf_dir, tmp_path):
  path, ref_model = tiny_hf_dir
  ref_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  ids, mask = padded_batch(np.random.RandomState(6), [10], 10, "right")
  a = np.asarray(load_hf(str(tmp_path / "sharded"))(ids, mask))
  b = np.asarray(load_hf(path)(ids, mask))
  np.testing.assert_array_equal(a, b)


def test_wrong_shape_and_missing_tensor_name_the_tensor(tiny_hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = tiny_hf_dir
  tensors = load_file(os.path.join(path, "model.safetensors"))
  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((10, 64), np.float32)
  os.makedirs(tmp_path / "bad")
  save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
  os.link(os.path.join(path, "config.json"), tmp_path / "bad" / "config.json")
  with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
    load_hf(str(tmp_path / "bad"))
  del bad["model.layers.1.mlp.up_proj.weight"]
  save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
  with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
    load_hf(str(tmp_path / "bad"))
  with pytest.raises(UserError, match="no config.json"):
    load_hf(str(tmp_path))


@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_gguf_matches_transformers(side, smollm2_torch, smollm2_jax):
  lm = smollm2_jax
  assert lm.cfg.num_layers == 30 and lm.cfg.tie_word_embeddings
  ids, mask = padded_batch(np.random.RandomState(7), [48, 30], 48, side, vocab=49152)
  ref = torch_logits(smollm2_torch, ids, mask)
  out = np.asarray(lm(ids, mask))
  m = mask.astype(bool)
  assert np.abs(out - ref)[m].max() <= TOL
  assert (out.argmax(-1) == ref.argmax(-1))[m].mean() > 0.99
