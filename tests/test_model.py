"""Model internals: packing, scan vs unrolled, remat, attention kernels, KV cache, compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hs2p_jax.model import create, preset
from hs2p_jax.model.attention import reference_attention
from hs2p_jax.model.llama import KVCache, segment_positions
from hs2p_jax.model.reward import last_token_index, segment_last_indices

CFG = preset("tiny", num_layers=2)


@pytest.fixture(scope="module")
def lm():
  return create("lm", CFG, seed=0)


def variant(model, **changes):
  """The same weights under a different runtime config (scan, remat, attention, dtype)."""
  _, state = nnx.split(model)
  g2, _ = nnx.split(nnx.eval_shape(lambda: create("lm", CFG.replace(**changes), seed=0)))
  return nnx.merge(g2, state)


IDS = np.random.RandomState(1).randint(16, 270, (2, 12))
MASK = np.ones_like(IDS)
MASK[0, :3] = 0


def value_grads_logits(model):
  """Jitted (loss, grads) and logits: remat and scan only act under a trace anyway."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(jax.value_and_grad(lambda st: jnp.sum(nnx.merge(graphdef, st)(IDS, MASK)[:, -1] ** 2)))
  return fn(state), jax.jit(lambda st: nnx.merge(graphdef, st)(IDS, MASK))(state)


@pytest.fixture(scope="module")
def reference(lm):
  return value_grads_logits(lm)


def test_packed_rows_equal_separate_rows(lm):
  rng = np.random.RandomState(0)
  a, b = rng.randint(16, 270, 7), rng.randint(16, 270, 5)
  packed = np.concatenate([a, b, [0, 0, 0, 0]])[None]
  seg = np.concatenate([np.ones(7), 2 * np.ones(5), np.zeros(4)]).astype(np.int32)[None]
  assert segment_positions(jnp.asarray(seg)).tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 0, 0, 0]]
  out = np.asarray(lm(packed, segment_ids=seg))
  np.testing.assert_allclose(out[0, :7], np.asarray(lm(a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:12], np.asarray(lm(b[None]))[0], atol=1e-5)
  assert segment_last_indices(jnp.asarray(seg), 3).tolist() == [[6, 11, -1]]


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                                     dict(attention="xla"), dict(scan_layers=False, remat="save_attention_out"),
                                     dict(weight_grad="autodiff"), dict(weight_grad="autodiff", remat="dots_no_batch"),
                                     dict(attention="splash"), dict(attention="auto")])
def test_runtime_variants_compute_the_same_function(lm, reference, changes):
  (v_ref, g_ref), ref = reference
  (v_other, g_other), out = value_grads_logits(variant(lm, **changes))
  np.testing.assert_allclose(np.asarray(out)[MASK == 1], np.asarray(ref)[MASK == 1], atol=2e-5)
  assert float(v_other) == pytest.approx(float(v_ref), rel=1e-5)
  # gradients too (remat / scan change how they are computed, not what)
  for x, y in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_other)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_xla_attention_kernel_equals_reference_with_gqa_and_masks():
  rng = np.random.RandomState(2)
  q = jnp.asarray(rng.randn(2, 6, 4, 8), jnp.float32)
  k = jnp.asarray(rng.randn(2, 9, 2, 8), jnp.float32)
  v = jnp.asarray(rng.randn(2, 9, 2, 8), jnp.float32)
  mask = jnp.asarray(rng.rand(2, 6, 9) > 0.3)
  mask = mask.at[:, :, 0].set(True)
  ref = reference_attention(q, k, v, mask)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  # against an explicit numpy softmax
  qn, kn, vn, mn = (np.asarray(x, np.float64) for x in (q, k, v, mask))
  kn, vn = np.repeat(kn, 2, axis=2), np.repeat(vn, 2, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(8)
  logits = np.where(mn[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ref), np.einsum("bhqk,bkhd->bqhd", p, vn), atol=1e-5)


def test_flash_attention_call_equals_reference_with_packing_branches_and_padding():
  """The cuDNN path's call (is_causal + a head-shared [B, 1, T, S] segment mask), run by XLA here."""
  from hs2p_jax.model.attention import branch_mask, flash_attention, segment_causal_mask
  rng = np.random.RandomState(4)
  q, k, v = (jnp.asarray(rng.randn(3, 10, h, 8), jnp.float32) for h in (4, 2, 2))
  seg = jnp.asarray([[1] * 4 + [2] * 5 + [0], [0, 0] + [1] * 8, [1] * 10], jnp.int32)  # packed, left pad, full
  branch = jnp.asarray([[0] * 10, [0] * 10, [0] * 4 + [1] * 3 + [2] * 3], jnp.int32)  # row 2: a shared prompt
  slots = jnp.arange(10)
  mask = segment_causal_mask(slots, slots, seg, seg) & branch_mask(branch, branch)
  real = np.asarray(seg)[..., None, None] != 0
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v), 0.0) ** 2)
  got = jax.value_and_grad(loss(lambda q, k, v: flash_attention(q, k, v, mask, "xla")), (0, 1, 2))(q, k, v)
  want = jax.value_and_grad(loss(lambda q, k, v: reference_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_flash_attention_with_row_lengths_equals_reference_on_right_padded_rows():
  """The cuDNN path's call for right-padded rows (sequence lengths, no mask), run by XLA here: the
  reference's values and gradients at the real tokens; a row of padding stays finite."""
  from hs2p_jax.model.attention import flash_attention, segment_causal_mask
  rng = np.random.RandomState(5)
  q, k, v = (jnp.asarray(rng.randn(3, 12, h, 8), jnp.float32) for h in (4, 2, 2))
  lengths = jnp.asarray([12, 7, 0], jnp.int32)  # full, padded, all padding (a filler row)
  seg = (jnp.arange(12)[None] < lengths[:, None]).astype(jnp.int32)
  slots = jnp.arange(12)
  mask = segment_causal_mask(slots, slots, seg, seg)
  real = np.asarray(seg)[..., None, None] != 0
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v), 0.0) ** 2)
  got = jax.value_and_grad(loss(lambda q, k, v: flash_attention(q, k, v, mask, "xla", lengths)), (0, 1, 2))(q, k, v)
  want = jax.value_and_grad(loss(lambda q, k, v: reference_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_the_reward_step_hands_cudnn_its_row_lengths(monkeypatch, tmp_path):
  """Right-padded loader rows carry `row_lengths`; with attention "cudnn" the model passes them to the
  kernel (run by XLA here) and scores what the reference scores; packed rows carry none."""
  from conftest import separable_pairs, write_jsonl
  from hs2p_jax.config import DataConfig
  from hs2p_jax.data import make_loader
  from hs2p_jax.model import attention as attention_lib
  from hs2p_jax.tokenizer import load_tokenizer
  from hs2p_jax.model.scoring import reward_outputs
  seen = []

  def flash_by_xla(q, k, v, mask, implementation="cudnn", lengths=None):
    seen.append(lengths is not None)
    return original(q, k, v, mask, "xla", lengths)

  original = attention_lib.flash_attention
  monkeypatch.setattr(attention_lib, "flash_attention", flash_by_xla)
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(6))
  tok = load_tokenizer("bytes")
  batches = {}
  for packing in (False, True):
    cfg = DataConfig(train=data, format="pairs", template="chat", max_length=64, pad_multiple=16, packing=packing)
    loader = make_loader(cfg, tok, split="train", task="pairs", batch_size=6, shuffle=False, repeat=False,
                         cache_dir=str(tmp_path / "cache"))
    batches[packing] = next(iter(loader))
  plain, packed = batches[False], batches[True]
  assert "row_lengths" not in packed
  np.testing.assert_array_equal(plain["row_lengths"], plain["segment_ids"].sum(axis=1))
  t = np.arange(plain["segment_ids"].shape[1])
  np.testing.assert_array_equal(plain["segment_ids"], (t[None] < plain["row_lengths"][:, None]).astype(np.int32))
  ref = create("reward", preset("tiny", num_layers=2), num_attributes=9, seed=2)
  _, state = nnx.split(ref)
  cudnn = nnx.merge(nnx.split(nnx.eval_shape(lambda: create("reward", preset("tiny", num_layers=2, attention="cudnn"),
                                                               num_attributes=9, seed=2)))[0], state)
  got = reward_outputs(cudnn, {k: jnp.asarray(v) for k, v in plain.items()})
  want = reward_outputs(ref, {k: jnp.asarray(v) for k, v in plain.items()})
  assert seen and all(seen)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform, dtype, branches, cache, want", [
    ("tpu", "bfloat16", False, False, "splash"), ("tpu", "bfloat16", 2, False, "splash"),
    ("tpu", "bfloat16", 4, False, "xla"),
    ("tpu", "bfloat16", False, True, "xla"), ("gpu", "bfloat16", False, False, "cudnn"),
    ("gpu", "bfloat16", 2, False, "cudnn"), ("gpu", "float32", False, False, "xla"),
    ("gpu", "float16", False, True, "xla"), ("cpu", "bfloat16", False, False, "reference"),
    ("cpu", "float32", 2, True, "reference")])
def test_auto_attention_picks_the_kernel_by_platform(platform, dtype, branches, cache, want):
  from hs2p_jax.model.attention import choose
  assert choose("auto", platform, dtype, branches=branches, cache=cache) == want
  assert choose("xla", platform, dtype, branches=branches, cache=cache) == "xla"  # explicit choices stand


def test_auto_attention_follows_the_mesh_devices_platform():
  from jax.sharding import Mesh
  from hs2p_jax.model.attention import platform
  from hs2p_jax.sharding import use_mesh
  assert platform() == jax.default_backend()
  with use_mesh(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))):
    assert platform() == jax.devices()[0].platform


def test_incremental_decoding_with_cache_equals_full_forward(lm):
  ids = np.random.RandomState(3).randint(16, 270, (2, 10))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  full = np.asarray(lm(ids, mask))
  cache = KVCache.init(CFG, 2, 12)
  logits, cache = lm(ids[:, :6], mask[:, :6], cache=cache)
  outs = [np.asarray(logits)]
  for t in range(6, 10):
    logits, cache = lm(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
    outs.append(np.asarray(logits))
  inc = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(inc[mask == 1], full[mask == 1], atol=2e-5)


def test_bfloat16_compute_stays_close_to_float32(lm):
  ids = np.random.RandomState(4).randint(16, 270, (2, 16))
  ref = np.asarray(lm(ids))
  bf = variant(lm, dtype="bfloat16")
  out = bf(ids)
  assert out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert jax.tree.leaves(nnx.state(bf))[0].dtype == jnp.float32  # parameters stay float32
  rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
  assert 1e-5 < rel < 2e-2


def test_last_token_index_either_padding_side():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  assert last_token_index(mask).tolist() == [4, 2, 4]


def test_attribute_weights_and_scalar_reward():
  from hs2p_jax.errors import UserError
  from hs2p_jax.model.reward import attribute_weights, scalar_reward
  out = np.arange(18, dtype=np.float32).reshape(2, 9)
  assert scalar_reward(out, attribute_weights("helpfulness", 9)).tolist() == [4.0, 13.0]
  w = attribute_weights("nemotron-4-340b", 9)
  np.testing.assert_allclose(np.asarray(scalar_reward(out, w)), out @ np.asarray([0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]),
                             rtol=1e-6)
  assert attribute_weights("verbosity", 9).argmax() == 8
  assert attribute_weights("helpfulness", 1).tolist() == [1.0]
  with pytest.raises(UserError, match="3 weights for a head with 9"):
    attribute_weights([1, 2, 3], 9)
