"""LoRA adapters on the decoder's projections: `x·W + (alpha / r)·(x·A)·B`.

A target projection W [*K, *M] (stacked: [L, *K, *M]) gains A [*K, r] (uniform in +-1/sqrt(K),
PEFT's initialisation) and B [r, *M] (zeros: at initialisation the model computes exactly what its
base computes), as `nnx.LoRAParam`s beside W on the same module (`wq_lora_a`, `wq_lora_b`). They
carry W's logical axes on the shared dimensions, so they shard like W, and nothing on the rank.
Both products go through `linear.project` with A and B as its arguments, so the custom weight
gradient applies to them too and the base W needs no gradient at all.

Why not qwix (Google's LoRA library, which tunix uses): it finds weights by intercepting
`dot_general` inside a module's call, which sees neither a weight passed through `project`'s
`custom_vjp` (its adapter becomes a closed-over value the custom rule cannot differentiate) nor a
stacked weight sliced inside `lax.scan` (no adapter, and no error). Tried with qwix 0.1.8.

Targets are named as Hugging Face / PEFT name them (`q_proj` ... `down_proj`), so that adapters
exchange with PEFT under the same names.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hs2p_jax.model.linear import project

# PEFT's target name -> (our module, our weight, contracted leading dims of the weight)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "wq", 1), "k_proj": ("attn", "wk", 1), "v_proj": ("attn", "wv", 1),
    "o_proj": ("attn", "wo", 2), "gate_proj": ("mlp", "gate", 1), "up_proj": ("mlp", "up", 1),
    "down_proj": ("mlp", "down", 1)}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def scale(cfg: Any) -> float:
  return cfg.lora_alpha / cfg.lora_rank


def attach(module: nnx.Module, cfg: Any, module_name: str, rngs: nnx.Rngs) -> None:
  """Adds A and B beside each of `module`'s weights that `cfg.lora_targets` names (nothing at rank 0)."""
  if not cfg.lora_rank:
    return
  module.lora_scale = scale(cfg)
  for target in cfg.lora_targets:
    owner, weight, in_dims = TARGETS[target]
    if owner != module_name:
      continue
    w = getattr(module, weight)
    axes = w.get_metadata().get("axes") or (None,) * w.ndim
    stacked = axes[0] == "layers"
    lead = 1 if stacked else 0
    k_shape, m_shape = w.shape[lead:lead + in_dims], w.shape[lead + in_dims:]
    k_axes, m_axes = axes[lead:lead + in_dims], axes[lead + in_dims:]
    bound = 1.0 / math.sqrt(math.prod(k_shape))
    a = jax.random.uniform(rngs.params(), (*w.shape[:lead], *k_shape, cfg.lora_rank), jnp.float32, -bound, bound)
    setattr(module, weight + SUFFIX_A, nnx.LoRAParam(a, axes=(*axes[:lead], *k_axes, None)))
    setattr(module, weight + SUFFIX_B, nnx.LoRAParam(jnp.zeros((*w.shape[:lead], cfg.lora_rank, *m_shape)),
                                                     axes=(*axes[:lead], None, *m_axes)))


def projection(module: nnx.Module, weight: str, x: jax.Array, in_dims: int, weight_grad: str) -> jax.Array:
  """`x · W` of `module`'s weight `weight` in x's dtype, plus its adapter's `scale·(x·A)·B` where it has one."""
  dt = x.dtype
  y = project(x, getattr(module, weight)[...].astype(dt), in_dims, weight_grad)
  a = getattr(module, weight + SUFFIX_A, None)
  if a is None:
    return y
  b = getattr(module, weight + SUFFIX_B)
  low = project(x, a[...].astype(dt), in_dims, weight_grad)   # [..., r]
  return y + (module.lora_scale * project(low, b[...].astype(dt), 1, weight_grad)).astype(dt)


def trainable(cfg: Any) -> Any:
  """The nnx filter of what trains: everything without adapters; with them, the adapters and the
  reward head (kernel and bias: a head is never a low-rank update of nothing) unless
  `cfg.lora_train_head` is false."""
  if not cfg.lora_rank:
    return nnx.Param
  if not getattr(cfg, "lora_train_head", True):
    return nnx.LoRAParam
  return nnx.Any(nnx.LoRAParam, nnx.PathContains("head_kernel"), nnx.PathContains("head_bias"))


def merged(model: nnx.Module, build: Callable[[Any], nnx.Module]) -> nnx.Module:
  """`model` with every adapter folded into its weight, `W + scale·A·B`, as the model `build(cfg)`
  makes without adapters (built abstractly; the untouched arrays are shared, not copied)."""
  cfg = model.cfg
  plain = nnx.eval_shape(lambda: build(cfg.replace(lora_rank=0)))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    value = flat[path].get_value()
    a = flat.get(path[:-1] + (path[-1] + SUFFIX_A,))
    if a is not None:
      a, b = a.get_value(), flat[path[:-1] + (path[-1] + SUFFIX_B,)].get_value()
      lead = a.ndim + b.ndim - 2 - value.ndim  # 1: stacked layers, one product a layer
      delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) if lead else jnp.tensordot(a, b, axes=1)
      value = value + scale(cfg) * delta
    out[path] = value
  nnx.update(plain, nnx.from_flat_state(out))
  return plain
