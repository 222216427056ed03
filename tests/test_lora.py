"""LoRA adapters on the decoder's projections (`model/lora.py`): the base model's outputs at
initialisation, gradients only for the adapters and the head, merged weights equal to the adapted
forward, the adapters' own gradients against the merged model's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hs2p_jax.model import create, merge_lora, preset
from hs2p_jax.model.lora import TARGETS, trainable


def _models(rank: int = 4, targets=None, scan: bool = True, kind: str = "reward"):
  """(base, adapted) with the same base weights; the adapted model's B made non-zero on request."""
  base_cfg = preset("tiny", num_layers=2, dtype="float32", scan_layers=scan)
  extra = {"lora_targets": targets} if targets is not None else {}
  cfg = base_cfg.replace(lora_rank=rank, lora_alpha=8.0, **extra)
  base, adapted = create(kind, base_cfg, 3, seed=0), create(kind, cfg, 3, seed=1)
  nnx.update(adapted, nnx.state(base, nnx.Param))  # the base's weights, the adapters' own
  return base, adapted


def _randomise_b(model, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1].endswith("_lora_b"):
      var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32))


def _batch():
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 256, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  return ids, mask


def test_at_initialisation_the_adapted_model_is_the_base_model_exactly():
  base, adapted = _models()
  ids, mask = _batch()
  np.testing.assert_array_equal(np.asarray(adapted(ids, mask)), np.asarray(base(ids, mask)))
  shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))}
  cfg = adapted.cfg
  d, h, hkv, dh, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  assert len(shapes) == 2 * len(TARGETS)  # every projection by default
  assert shapes["model/layers/attn/wq_lora_a"] == (2, d, 4) and shapes["model/layers/attn/wq_lora_b"] == (2, 4, h, dh)
  assert shapes["model/layers/attn/wk_lora_b"] == (2, 4, hkv, dh)
  assert shapes["model/layers/attn/wo_lora_a"] == (2, h, dh, 4) and shapes["model/layers/attn/wo_lora_b"] == (2, 4, d)
  assert shapes["model/layers/mlp/down_lora_a"] == (2, f, 4) and shapes["model/layers/mlp/down_lora_b"] == (2, 4, d)


@pytest.mark.parametrize("scan", [True, False])
def test_the_merged_model_equals_the_adapted_forward(scan):
  base, adapted = _models(scan=scan)
  _randomise_b(adapted)
  ids, mask = _batch()
  out = np.asarray(adapted(ids, mask))
  assert np.abs(out - np.asarray(base(ids, mask))).max() > 1e-3  # the adapters change the outputs
  merged = merge_lora(adapted)
  assert merged.cfg.lora_rank == 0 and not nnx.state(merged, nnx.LoRAParam)
  np.testing.assert_allclose(np.asarray(merged(ids, mask)), out, atol=1e-5)
  # by hand: one stacked weight's update, W + (alpha / r) A.B per layer
  a = np.asarray(adapted.model.layers.attn.wo_lora_a[...])
  b = np.asarray(adapted.model.layers.attn.wo_lora_b[...])
  want = np.asarray(base.model.layers.attn.wo[...]) + 2.0 * np.einsum("lhdr,lre->lhde", a, b)
  np.testing.assert_allclose(np.asarray(merged.model.layers.attn.wo[...]), want, atol=1e-6)


def test_gradients_reach_only_the_adapters_and_the_head_and_equal_the_merged_models():
  _, adapted = _models(targets=("q_proj", "v_proj", "down_proj"))
  _randomise_b(adapted)
  ids, mask = _batch()
  graphdef, train, frozen = nnx.split(adapted, trainable(adapted.cfg), ...)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(train)}
  assert names == {"head_kernel", "head_bias", *(f"model/layers/{m}/{w}_lora_{s}" for m, w in
                                                  (("attn", "wq"), ("attn", "wv"), ("mlp", "down")) for s in "ab")}

  def loss(train):
    return jnp.sum(nnx.merge(graphdef, train, frozen)(ids, mask) ** 2)

  grads = jax.grad(loss)(train)
  flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  assert all(np.abs(g).max() > 0 for g in flat.values())
  # the same loss through the merged weights, differentiated with respect to A and B by autodiff
  scale = adapted.cfg.lora_alpha / adapted.cfg.lora_rank
  base_state = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(adapted, nnx.Param))}
  plain = merge_lora(adapted)
  pgraph, pstate = nnx.split(plain)

  def merged_loss(ab):
    flat_p = dict(nnx.to_flat_state(pstate))
    for (m, w) in (("attn", "wq"), ("attn", "wv"), ("mlp", "down")):
      a, b = ab[f"{m}/{w}_a"], ab[f"{m}/{w}_b"]
      k = a.ndim - 2
      delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
      assert delta.shape[1:1 + k] == a.shape[1:1 + k]
      path = ("model", "layers", m, w)
      flat_p[path] = flat_p[path].replace(base_state[f"model/layers/{m}/{w}"] + scale * delta)
    state = nnx.from_flat_state(flat_p)
    return jnp.sum(nnx.merge(pgraph, state)(ids, mask) ** 2)

  ab = {f"{m}/{w}_{s}": base_state[f"model/layers/{m}/{w}_lora_{s}"] for m, w in
        (("attn", "wq"), ("attn", "wv"), ("mlp", "down")) for s in "ab"}
  want = jax.grad(merged_loss)(ab)
  for key, g in want.items():
    m, rest = key.split("/")
    w, s = rest.rsplit("_", 1)
    np.testing.assert_allclose(flat[f"model/layers/{m}/{w}_lora_{s}"], np.asarray(g), rtol=2e-4, atol=1e-6)


def test_lora_config_is_checked_by_name():
  from hs2p_jax.errors import UserError
  with pytest.raises(UserError, match="qkv_proj unknown"):
    preset("tiny", lora_rank=4, lora_targets=("q_proj", "qkv_proj"))
  with pytest.raises(UserError, match="lora.rank=-1"):
    preset("tiny", lora_rank=-1)
  assert preset("tiny", lora_rank=2, lora_targets=["q_proj"]).lora_targets == ("q_proj",)
  lm = create("lm", preset("tiny", num_layers=1, lora_rank=2, lora_targets=("gate_proj",)), seed=0)
  assert {p[-1] for p, _ in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam))} == {"gate_lora_a", "gate_lora_b"}
  assert merge_lora(lm).cfg.lora_rank == 0


def test_expo_on_adapters_equals_expo_on_the_merged_weights(tmp_path):
  """ExPO on a LoRA tuned model keeps A and scales B (and extrapolates the rest, head included): the
  result stays a LoRA model and equals W + f (W_tuned - W) on the merged weights."""
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.commands.expo import load_pair
  from hs2p_jax.expo import extrapolate
  base, adapted = _models()
  _randomise_b(adapted)
  adapted.head_kernel[...] = base.head_kernel[...] + 0.1  # the head trained in full
  from hs2p_jax.tokenizer import byte_tokenizer
  save_model(str(tmp_path / "base"), base, ModelMeta("reward", base.cfg, 3), byte_tokenizer())
  save_model(str(tmp_path / "tuned"), adapted, ModelMeta("reward", adapted.cfg, 3), byte_tokenizer())
  graphdef, b, t, meta, _ = load_pair(str(tmp_path / "base"), str(tmp_path / "tuned"))
  assert meta.config.lora_rank == adapted.cfg.lora_rank
  lora_out = nnx.merge(graphdef, extrapolate(b, t, 2.0))
  np.testing.assert_array_equal(np.asarray(lora_out.model.layers.attn.wq_lora_a[...]),
                                np.asarray(adapted.model.layers.attn.wq_lora_a[...]))
  np.testing.assert_allclose(np.asarray(lora_out.model.layers.attn.wq_lora_b[...]),
                             2.0 * np.asarray(adapted.model.layers.attn.wq_lora_b[...]), rtol=1e-6)
  out = merge_lora(lora_out)
  w0 = np.asarray(base.model.layers.attn.wq[...])
  w1 = np.asarray(merge_lora(adapted).model.layers.attn.wq[...])
  np.testing.assert_allclose(np.asarray(out.model.layers.attn.wq[...]), w0 + 2.0 * (w1 - w0), atol=1e-5)
  h0, h1 = np.asarray(base.head_kernel[...]), np.asarray(adapted.head_kernel[...])
  np.testing.assert_allclose(np.asarray(out.head_kernel[...]), h0 + 2.0 * (h1 - h0), atol=1e-6)


def test_adapter_dropout_drops_the_adapters_input_only():
  """`projection` with a dropout key: x·W + s·(drop(x)·A)·B, drop keeping each input entry with
  probability 1 - p and scaling it by 1 / (1 - p); the model without a key is unaffected."""
  import types

  import jax
  from hs2p_jax.model import lora
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 50, 16)), jnp.float32)
  w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 8), (16, 4), (4, 8)))
  key = jax.random.key(7)
  module = types.SimpleNamespace(wq=w, wq_lora_a=a, wq_lora_b=b, lora_scale=2.0, lora_dropout=0.25,
                                 lora_dropout_key=key)
  got = np.asarray(lora.projection(module, "wq", x, 1, "flat"))
  keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.75, x.shape))  # wq: the first weight
  assert 0.7 < keep.mean() < 0.8
  xd = np.where(keep, np.asarray(x) / 0.75, 0.0)
  want = np.asarray(x) @ np.asarray(w) + 2.0 * (xd @ np.asarray(a)) @ np.asarray(b)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  del module.lora_dropout_key  # evaluation: no key, no dropout
  np.testing.assert_allclose(np.asarray(lora.projection(module, "wq", x, 1, "flat")),
                             np.asarray(x) @ np.asarray(w) + 2.0 * (np.asarray(x) @ np.asarray(a)) @ np.asarray(b),
                             rtol=1e-4, atol=1e-4)
  # a whole model: dropout changes what adapters add, never the base's part
  base, adapted = _models()
  adapted = create("reward", adapted.cfg.replace(lora_dropout=0.5), 3, seed=1)
  nnx.update(adapted, nnx.state(base, nnx.Param))
  ids = np.arange(3, 23, dtype=np.int32)[None]
  plain = np.asarray(adapted(ids))
  np.testing.assert_array_equal(np.asarray(lora.with_dropout(nnx.clone(adapted), key)(ids)), plain)  # B = 0
  _randomise_b(adapted)
  np.testing.assert_allclose(np.asarray(merge_lora(adapted)(ids)), np.asarray(adapted(ids)), atol=1e-5)
  assert np.abs(np.asarray(lora.with_dropout(nnx.clone(adapted), key)(ids)) - np.asarray(adapted(ids))).max() > 1e-4
