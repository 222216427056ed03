"""Attention masks (padding, packing, KV cache) and grouped-query dot-product attention kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def segment_causal_mask(q_slots: jax.Array, k_slots: jax.Array, q_segments: jax.Array,
                        k_segments: jax.Array) -> jax.Array:
  """[B, Tq, Tk] bool: key at or before the query, in the same segment, and not padding (segment 0).

  q_slots [Tq] / k_slots [Tk] are positions in the (cache) sequence; q_segments [B, Tq] and
  k_segments [B, Tk] are segment ids, 0 for padding. One segment per row is ordinary padding;
  several are packed sequences.
  """
  causal = k_slots[None, :] <= q_slots[:, None]  # [Tq, Tk]
  same = q_segments[:, :, None] == k_segments[:, None, :]  # [B, Tq, Tk]
  return causal[None] & same & (k_segments[:, None, :] != 0)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention with float32 logits. q [B, Tq, H, Dh]; k, v [B, Tk, Hkv, Dh]; mask [B, Tq, Tk]."""
  b, tq, h, dh = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, tq, hkv, h // hkv, dh)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, dh).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "reference") -> jax.Array:
  """Grouped-query attention by `impl`: "reference" (einsum), "xla" or "cudnn" (jax.nn.dot_product_attention)."""
  if impl == "reference":
    return reference_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
