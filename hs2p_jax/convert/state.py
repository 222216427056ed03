"""Fill an abstract nnx model with arrays from a named-tensor source, placing each on the mesh."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax.convert.mapping import Path, hf_to_ours
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings

TensorSource = Mapping[str, Callable[[], np.ndarray]]


def place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A host array -> a (possibly sharded, possibly multi-process) jax.Array."""
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def head_init(seed: int) -> Callable[[tuple[int, ...]], np.ndarray]:
  """Initialiser of a fresh reward-head kernel: normal(0, 0.02), seeded."""
  def init(shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32)) * 0.02
  return init


def fill_model(make: Callable[[], nnx.Module], cfg: LlamaConfig, source: TensorSource, origin: str,
               init_missing: Mapping[Path, Callable[[tuple[int, ...]], np.ndarray]] | None = None, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Builds `make()` with weights from `source` (HF tensor names -> loaders), without first
  materialising a random model. Paths in `init_missing` that the source lacks are initialised by
  the given function of their shape; any other missing tensor, or one of the wrong shape, is an error naming it."""
  abstract = nnx.eval_shape(make)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules) if mesh is not None else None
  sharding_of = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  plan = hf_to_ours(set(source), cfg)
  init_missing = init_missing or {}
  leaves = []
  for path, var in nnx.to_flat_state(abs_state):
    want = tuple(var.shape)
    if path in plan:
      names, to_ours = plan[path]
      stacked = path[:2] == ("model", "layers")
      part_shape = want[1:] if stacked else want
      parts = []
      for name in names:
        if name not in source:
          raise UserError(f"{origin}: tensor {name} is missing (needed for {'.'.join(path)})")
        raw = np.asarray(source[name](), np.float32)
        try:
          arr = to_ours(raw, cfg)
        except ValueError:
          arr = None
        if arr is None or arr.shape != part_shape:
          raise UserError(f"{origin}: tensor {name} has shape {raw.shape}, which does not fit "
                          f"{'.'.join(path)} of shape {part_shape}")
        parts.append(arr)
      arr = np.stack(parts) if stacked else parts[0]
    elif path in init_missing:
      arr = np.asarray(init_missing[path](want), np.float32)
    else:
      raise UserError(f"{origin}: no tensor for {'.'.join(path)}")
    sharding = sharding_of[path].get_value() if path in sharding_of else None
    leaves.append((path, var.replace(place(arr, sharding))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))
