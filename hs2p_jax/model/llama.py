"""A Llama decoder in Flax NNX: stacked layers (leading `layers` axis), GQA, RoPE, SwiGLU, KV cache.

Parameters are float32 and carry logical axis names in their `axes` metadata; the forward pass
computes in `cfg.dtype`. Layers are always stored stacked, `[L, ...]`, and run either by
`jax.lax.scan` or by an unrolled loop (`cfg.scan_layers`), with an optional remat policy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hs2p_jax.model.attention import attention, branch_mask, platform, segment_causal_mask
from hs2p_jax.model.attention import choose as choose_attention
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model import lora
from hs2p_jax.model.rope import apply_rope, inverse_frequencies
from hs2p_jax.sharding import constrain

_init = jax.nn.initializers.normal(stddev=0.02)

BTD = ("act_batch", "act_seq", "act_embed")


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], stack: int | None = None,
          init=_init) -> nnx.Param:
  """A float32 Param with logical `axes`; `stack` prepends a `layers` dimension."""
  if stack is not None:
    shape, axes = (stack, *shape), ("layers", *axes)
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), jnp.float32), axes=tuple(axes))


def _ones(key, shape, dtype):
  return jnp.ones(shape, dtype)


def compute_dtype(cfg: LlamaConfig):
  return jnp.dtype(cfg.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys and values for incremental decoding.

  k, v: [L, B, S, Hkv, Dh]; valid: [B, S] (slot holds a real token); next_pos: [B] position id of the
  next token of each row; index: [] the next slot to write; positions: [B, S] the position id of
  each slot's token (a sliding window measures distances in positions).
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  next_pos: jax.Array
  index: jax.Array
  positions: jax.Array

  @classmethod
  def init(cls, cfg: LlamaConfig, batch: int, max_len: int) -> "KVCache":
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = compute_dtype(cfg)
    return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), bool),
               jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), jnp.int32))


def _constrain_cache(c: jax.Array) -> jax.Array:
  """[L, B, S, Hkv, Dh] keys or values on the cache's logical axes."""
  return constrain(c, (None, "cache_batch", "cache_seq", "cache_kv_heads", None))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, stack: int | None = None):
    self.eps = eps
    self.weight = param(None, (dim,), ("norm",), stack, init=_ones)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...] * y).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    self.cfg = cfg
    d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), stack)
    self.wk = param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), stack)
    self.wv = param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), stack)
    self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), stack)
    if cfg.attention_bias:  # Qwen2: q, k and v biases
      zeros = jax.nn.initializers.zeros
      self.bq = param(rngs, (h, dh), ("heads", "head_dim"), stack, init=zeros)
      self.bk = param(rngs, (hkv, dh), ("kv_heads", "head_dim"), stack, init=zeros)
      self.bv = param(rngs, (hkv, dh), ("kv_heads", "head_dim"), stack, init=zeros)
    if cfg.qk_norm:  # Qwen3: each head's queries and keys RMS-normalised before RoPE
      self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, stack=stack)
      self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, stack=stack)
    lora.attach(self, cfg, "attn", rngs)

  def __call__(self, x, positions, mask, kv=None, slot=None, segments=None, impl=None, layer=None):
    """x [B, T, D]; positions [B, T]; mask [B, T, S]; kv: (k, v) [L, B, S, Hkv, Dh], all layers'
    cache, of which this layer's slots [slot, slot + T) are written in place, or None;
    segments: (segment ids, branch ids or None [B, T], the number of branches, row lengths [B] or
    None) (no cache; for kernels that build the mask themselves) or None;
    impl: the attention kernel (`attention.choose`), default cfg.attention; layer: [] this layer's
    index into the cache."""
    inv_freq = inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling_dict)
    wg = self.cfg.weight_grad
    q = lora.projection(self, "wq", x, 1, wg)  # [B, T, H, Dh]
    k = lora.projection(self, "wk", x, 1, wg)  # [B, T, Hkv, Dh]
    v = lora.projection(self, "wv", x, 1, wg)
    if self.cfg.attention_bias:
      q, k, v = (a + b[...].astype(a.dtype) for a, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = constrain(apply_rope(q, positions, inv_freq), ("act_batch", "act_seq", "act_heads", None))
    k = constrain(apply_rope(k, positions, inv_freq), ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    if kv is not None:  # write the T new slots of this layer, then attend over its whole cache
      zero = jnp.zeros((), jnp.int32)
      at = (layer, zero, slot, zero, zero)
      kv = tuple(_constrain_cache(jax.lax.dynamic_update_slice(c, n.astype(c.dtype)[None], at))
                 for c, n in zip(kv, (k, v)))
      k, v = (jax.lax.dynamic_index_in_dim(c, layer, axis=0, keepdims=False) for c in kv)
    out = attention(q, k, v, mask, impl or self.cfg.attention, *(segments or (None, None, 0, None)))
    out = checkpoint_name(out, "attn_out")
    return lora.projection(self, "wo", out, 2, wg), kv


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.weight_grad = cfg.weight_grad
    self.gate = param(rngs, (d, f), ("embed", "mlp"), stack)
    self.up = param(rngs, (d, f), ("embed", "mlp"), stack)
    self.down = param(rngs, (f, d), ("mlp", "embed"), stack)
    lora.attach(self, cfg, "mlp", rngs)

  def __call__(self, x):
    wg = self.weight_grad
    g = lora.projection(self, "gate", x, 1, wg)
    u = lora.projection(self, "up", x, 1, wg)
    h = constrain(jax.nn.silu(g) * u, ("act_batch", "act_seq", "act_mlp"))
    return lora.projection(self, "down", h, 1, wg)


class DecoderLayer(nnx.Module):
  """Pre-norm attention + SwiGLU block. Built with `stack=L` it holds all L layers' parameters."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack)
    self.attn = Attention(cfg, rngs=rngs, stack=stack)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack)
    self.mlp = MLP(cfg, rngs=rngs, stack=stack)

  def __call__(self, x, positions, mask, kv=None, slot=None, segments=None, impl=None, layer=None):
    h, kv = self.attn(self.input_norm(x), positions, mask, kv, slot, segments, impl, layer)
    x = constrain(x + h, BTD)
    x = constrain(x + self.mlp(self.post_attn_norm(x)), BTD)
    return x, kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] position of each token within its segment (0 at each segment start; pad positions 0)."""
  idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
  prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
  return jnp.where(segment_ids != 0, idx - start, 0)


class Llama(nnx.Module):
  """Token embedding, `num_layers` decoder layers and the final norm: ids -> hidden states."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    self.layers = DecoderLayer(cfg, rngs=rngs, stack=cfg.num_layers)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               branch_ids: jax.Array | None = None, branches: int = 2, lengths: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """Hidden states [B, T, D] after the final norm; with `cache`, also the updated cache.

    input_ids, attention_mask [B, T] (mask 1 = token, 0 = pad, either side). segment_ids [B, T]
    (packed sequences, 0 = pad) replaces attention_mask; positions default to the index within
    each segment. branch_ids [B, T] (with explicit positions, no cache) further restricts a token
    to keys on branch 0 or its own branch (`attention.branch_mask`: pairs sharing a prompt), one of
    1..`branches` (2 for a pair; the splash kernel runs once per branch). lengths [B] (no cache):
    every row is one sequence of that many tokens from slot 0, padding after it (the cuDNN kernel
    then takes the lengths instead of a mask). With
    a cache, the T new tokens are written at slots [index, index + T).
    """
    cfg = self.cfg
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if segment_ids is None:
      segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                     else (jnp.asarray(attention_mask) != 0).astype(jnp.int32))
    impl = choose_attention(cfg.attention, platform(), cfg.dtype, branches=branches if branch_ids is not None else 0,
                            cache=cache is not None)
    if branch_ids is not None and (cache is not None or positions is None):
      raise ValueError("branch_ids need explicit positions and no KV cache")
    if cache is None:
      if positions is None:
        positions = segment_positions(segment_ids)
      slots = jnp.arange(t)
      mask = segment_causal_mask(slots, slots, segment_ids, segment_ids)
      if branch_ids is not None:
        mask &= branch_mask(branch_ids, branch_ids)
    else:
      valid = (segment_ids != 0)
      if positions is None:
        positions = cache.next_pos[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid
      kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.index, axis=1)
      kv_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions.astype(jnp.int32), cache.index,
                                                         axis=1)
      q_slots = cache.index + jnp.arange(t)
      k_slots = jnp.arange(kv_valid.shape[1])
      mask = segment_causal_mask(q_slots, k_slots, valid.astype(jnp.int32), kv_valid.astype(jnp.int32))
    if cfg.sliding_window:  # Mistral: every layer sees the last `sliding_window` positions only
      keys = positions if cache is None else kv_positions
      mask &= (positions[:, :, None] - keys[:, None, :]) < cfg.sliding_window
      if impl in ("splash", "cudnn"):
        impl = "xla"  # the kernels take no window here yet: XLA's, with the full mask
    x = jnp.take(self.embed[...].astype(compute_dtype(cfg)), input_ids, axis=0)
    x = constrain(x, BTD)
    kv = None if cache is None else (cache.k, cache.v)
    slot = None if cache is None else cache.index
    x, kv = self._layers(x, positions, mask, kv, slot, (segment_ids, branch_ids, branches, lengths) if cache is None else None,
                         impl)
    x = self.norm(x)
    if cache is None:
      return x
    new_cache = KVCache(kv[0], kv[1], kv_valid, cache.next_pos + jnp.sum(valid, axis=1, dtype=jnp.int32),
                        cache.index + t, kv_positions)
    return x, new_cache

  def _layers(self, x, positions, mask, kv, slot, segments, impl):
    cfg = self.cfg
    graphdef, state = nnx.split(self.layers)

    # the cache [L, ...] rides in the carry and each layer writes its new slots in place (no
    # per-layer slices stacked again into a new cache)
    def body(carry, xs):
      x, kv = carry
      layer_state, layer = xs
      return nnx.merge(graphdef, layer_state)(x, positions, mask, kv, slot, segments, impl, layer), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    if cfg.scan_layers:
      return jax.lax.scan(body, (x, kv), (state, layers))[0]
    carry = (x, kv)
    for i in range(cfg.num_layers):
      carry, _ = body(carry, jax.tree.map(lambda a: a[i], (state, layers)))
    return carry


class LlamaForCausalLM(nnx.Module):
  """The Llama backbone with its LM head (tied to the embedding or separate): ids -> logits."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = Llama(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] hidden states -> [B, T, V] float32 logits."""
    if self.cfg.tie_word_embeddings:
      w = self.model.embed[...].astype(hidden.dtype)
      out = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
    else:
      out = jnp.einsum("btd,dv->btv", hidden, self.lm_head[...].astype(hidden.dtype),
                       preferred_element_type=jnp.float32)
    return constrain(out, ("act_batch", "act_seq", "act_vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits [B, T, V] float32 (and the updated cache when one is given). Arguments as `Llama`."""
    out = self.model(input_ids, attention_mask, segment_ids=segment_ids, positions=positions, cache=cache)
    if cache is None:
      return self.logits(out)
    hidden, cache = out
    return self.logits(hidden), cache
