"""Attention masks (padding, packing, KV cache) and grouped-query dot-product attention kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hs2p_jax.sharding import current_mesh, logical_to_spec

_MASKED = -1e30
_SPLASH_BLOCK = 128  # sequence tile of the splash kernel; T is padded up to a multiple of it


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


def branch_mask(q_branch: jax.Array, k_branch: jax.Array) -> jax.Array:
  """[B, Tq, Tk] bool: key on the shared trunk (branch 0) or on the query's own branch.

  Lets the two sides of a pair share their prompt within one segment: [prompt (0) | chosen (1) |
  rejected (2)]; with the causal mask the rejected side sees the prompt but not the chosen side."""
  return (k_branch[:, None, :] == 0) | (k_branch[:, None, :] == q_branch[:, :, None])


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


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Splash attention on this device's shard: q [B, T, H, Dh], k/v [B, T, Hkv, Dh], segment_ids [B, T]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, h, dh = q.shape
  hkv = k.shape[2]
  g = h // hkv
  tp = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
  if tp != t:  # padded slots get their own segment (-1), so real tokens never see them
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)), constant_values=-1)
  block = max(n for n in (512, 256, 128) if tp % n == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(g)])
  kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=jax.default_backend() != "tpu")
  qs = (q * jnp.asarray(dh ** -0.5, q.dtype)).reshape(b, tp, hkv, g, dh).transpose(0, 2, 3, 1, 4)
  ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]
  per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads: one MQA kernel per group
  out = jax.vmap(per_row)(qs, ks, vs, sk.SegmentIds(q=segment_ids, kv=segment_ids))  # [B, Hkv, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, dh)[:, :t].astype(q.dtype)


def _splash_branched(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     branch_ids: jax.Array | None, branches: int = 2) -> jax.Array:
  """`_splash_local`, with `branch_ids` [B, T] in 0..`branches` (`branch_mask`: responses after their
  shared prompt, on branches 1, 2, ...). Splash masks by segment equality only, which cannot let
  every branch see the trunk (0) but not the other branches; so it runs once per branch j, with the
  other branches split off their segment, which is exact for the trunk and branch j, and each token
  takes its own branch's run: `branches` times the attention of the row."""
  if branch_ids is None:
    return _splash_local(q, k, v, segment_ids)
  out = None
  for j in range(1, branches + 1):
    other = (branch_ids != 0) & (branch_ids != j)
    run = _splash_local(q, k, v, segment_ids * 2 + other)  # padding (segment 0) stays 0
    out = run if out is None else jnp.where((branch_ids == j)[..., None, None], run, out)
  return out


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     branch_ids: jax.Array | None = None, branches: int = 2) -> jax.Array:
  """Causal attention within segments through the Pallas TPU splash kernel (interpreted elsewhere,
  for tests): q [B, T, H, Dh], k/v [B, T, Hkv, Dh], segment_ids [B, T] -> [B, T, H, Dh]; with
  `branch_ids` [B, T] (1..`branches`) also restricted as `branch_mask` says (`_splash_branched`).

  Under a mesh the kernel runs per shard (shard_map): batch and heads split as the activation
  rules say, the sequence whole. Rows of padding (segment 0) attend among themselves."""
  mesh = current_mesh()
  local = functools.partial(_splash_branched, branches=branches)
  if mesh is None or mesh.size == 1:
    return local(q, k, v, segment_ids, branch_ids)
  q_spec = logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
  kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # keep each query group with its KV head
    q_spec = P(q_spec[0], None, kv_spec[2], None)
  if q_spec[0] != kv_spec[0]:
    kv_spec = P(q_spec[0], None, kv_spec[2], None)
  rows = P(q_spec[0], None)
  if branch_ids is None:
    return jax.shard_map(_splash_local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows, rows),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, branch_ids)


def platform() -> str:
  """The platform the current computation is placed on: the installed mesh's devices (which may be
  compile-only TPU devices on a CPU host), else JAX's default backend ("cpu", "gpu", "tpu")."""
  mesh = current_mesh()
  devices = getattr(mesh, "devices", None)
  if devices is not None and getattr(devices, "size", 0):
    return devices.flat[0].platform
  return jax.default_backend()


def choose(impl: str, platform_name: str, dtype: str, *, branches: int = 0, cache: bool = False) -> str:
  """The kernel `impl` means here. "auto": the Pallas splash kernel on TPU (rows with up to 2
  branches too, `_splash_branched`, which runs once per branch; XLA's kernel for more), cuDNN flash
  attention on GPU in bfloat16/float16 (XLA's in float32, which cuDNN does not take), the reference
  einsum on CPU; decoding with a KV cache (one query row against the cache) uses XLA's kernel, or
  the reference on CPU. `branches`: how many branches the rows' branch ids have (0: none)."""
  if impl != "auto":
    return impl
  if cache:
    return "reference" if platform_name == "cpu" else "xla"
  if platform_name == "tpu":
    return "splash" if branches <= 2 else "xla"
  if platform_name in ("gpu", "cuda", "rocm"):
    return "cudnn" if dtype in ("bfloat16", "float16") else "xla"
  return "reference"


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str = "cudnn",
                    lengths: jax.Array | None = None) -> jax.Array:
  """Causal attention through `jax.nn.dot_product_attention` with `is_causal` (the kernel skips the
  blocks above the diagonal). With `lengths` [B] (rows right-padded, one sequence each) the kernel
  takes them as sequence lengths: no mask at all (a row of padding counts one token, so that no
  query row is empty). Otherwise the segment / padding / branch part of `mask` [B, T, S] goes as one
  boolean [B, 1, T, S] shared by every head: no [B, H, T, S] logits or probabilities, but a
  materialised bias. implementation "cudnn" on GPU; "xla" runs the same call anywhere (the tests)."""
  if lengths is not None:
    n = jnp.maximum(lengths, 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
                                        implementation=implementation)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation=implementation)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "reference",
              segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None,
              branches: int = 2, lengths: jax.Array | None = None) -> jax.Array:
  """Grouped-query attention by `impl` (resolved by `choose`): "reference" (einsum), "xla"
  (jax.nn.dot_product_attention with the full mask), "cudnn" (`flash_attention`; needs no KV cache:
  queries are the sequence itself), "splash" (Pallas TPU kernel; needs `segment_ids`, and takes
  `branch_ids` in 0..`branches`). `mask` [B, Tq, Tk] is the full mask (causal and branches included);
  `lengths` [B]: rows right-padded, one sequence each ("cudnn" takes them instead of the mask); with a
  KV cache, `segment_ids` is None and "cudnn" and "splash" run XLA's kernel and the reference."""
  if impl == "splash" and segment_ids is not None:
    return splash_attention(q, k, v, segment_ids, branch_ids, branches)
  if impl == "cudnn" and segment_ids is not None:
    return flash_attention(q, k, v, mask, "cudnn", lengths if branch_ids is None else None)
  if impl in ("reference", "splash"):
    return reference_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
