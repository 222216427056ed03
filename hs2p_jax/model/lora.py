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

Adapter dropout (PEFT's `lora_dropout`) drops the adapters' input, not the base's, in training steps
only: `with_dropout(model, key)` gives each adapted module a key per layer (stacked like its
weights, so the layer scan hands each layer its own), and the steps derive `key` from the
optimizer's step count and the micro-batch (`dropout_key`): a resumed run draws the same masks.

Targets are named as Hugging Face / PEFT name them (`q_proj` ... `down_proj`), so that adapters
exchange with PEFT under the same names.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model.linear import project

# PEFT's target name -> (our module, our weight, contracted leading dims of the weight)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "wq", 1), "k_proj": ("attn", "wk", 1), "v_proj": ("attn", "wv", 1),
    "o_proj": ("attn", "wo", 2), "gate_proj": ("mlp", "gate", 1), "up_proj": ("mlp", "up", 1),
    "down_proj": ("mlp", "down", 1)}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
_WEIGHTS = tuple(w for _, w, _ in TARGETS.values())


def scale(cfg: Any) -> float:
  return cfg.lora_alpha / cfg.lora_rank


def attach(module: nnx.Module, cfg: Any, module_name: str, rngs: nnx.Rngs) -> None:
  """Adds A and B beside each of `module`'s weights that `cfg.lora_targets` names (nothing at rank 0)."""
  if not cfg.lora_rank:
    return
  module.lora_scale = scale(cfg)
  module.lora_dropout = float(getattr(cfg, "lora_dropout", 0.0))
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


class DropoutKey(nnx.Variable):
  """Per-layer PRNG keys [L] of a module's adapter dropout (set by `with_dropout`, never trained)."""


def with_dropout(model: nnx.Module, key: jax.Array | None) -> nnx.Module:
  """`model` (a LoRA model with `cfg.lora_dropout` > 0) dropping its adapters' input with `key`
  (the keys set on it in place: steps call it on the model they merge); as it is without dropout or key."""
  cfg = model.cfg
  if key is None or not cfg.lora_rank or not getattr(cfg, "lora_dropout", 0.0):
    return model
  layers = model.model.layers
  for i, name in enumerate(("attn", "mlp")):
    getattr(layers, name).lora_dropout_key = DropoutKey(jax.random.split(jax.random.fold_in(key, i), cfg.num_layers))
  return model


def dropout_key(opt_state: Any, seed: int = 0) -> jax.Array:
  """The dropout key of a training step, from the optimizer's step count (restored on resume)."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")  # Adam's and the schedule's: equal
  return jax.random.fold_in(jax.random.key(seed), counts[0][1] if counts else 0)


def training(model: nnx.Module, key: jax.Array, batch: dict[str, Any]) -> nnx.Module:
  """`model` as a training step runs it: adapter dropout (where the model has it) keyed by the
  step's `key` and the micro-batch's `micro_index` (`accumulate.summed_grads`)."""
  return with_dropout(model, jax.random.fold_in(key, batch.get("micro_index", 0)))


def projection(module: nnx.Module, weight: str, x: jax.Array, in_dims: int, weight_grad: str) -> jax.Array:
  """`x · W` of `module`'s weight `weight` in x's dtype, plus its adapter's `scale·(x·A)·B` where it
  has one (its input dropped at `cfg.lora_dropout` where `with_dropout` gave the module a key)."""
  dt = x.dtype
  y = project(x, getattr(module, weight)[...].astype(dt), in_dims, weight_grad)
  a = getattr(module, weight + SUFFIX_A, None)
  if a is None:
    return y
  b = getattr(module, weight + SUFFIX_B)
  key = getattr(module, "lora_dropout_key", None)
  if key is not None:
    rate = module.lora_dropout
    keep = jax.random.bernoulli(jax.random.fold_in(key[...], _WEIGHTS.index(weight)), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(dt)
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


# What a LoRA model saved as its adapters holds of its own: the adapters and a reward model's head;
# the rest of its Params are its base, named by reference (`checkpoint.ModelMeta.base`).
OWN = nnx.Any(nnx.LoRAParam, nnx.PathContains("head_kernel"), nnx.PathContains("head_bias"))
BASE = nnx.All(nnx.Param, nnx.Not(OWN))


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
