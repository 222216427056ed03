"""Fill an abstract nnx model from a named-tensor source, each process reading only its shards.

A source maps Hugging Face tensor names to `Tensor`s: a shape, and `read(index)` returning the
float32 region `index` (a tuple of slices in that tensor's layout) read from the file. Every
parameter is built with `jax.make_array_from_callback`: for each of this process's devices, the
region of our parameter that device holds is mapped back to regions of the source tensors
(`mapping.REGIONS`), read, converted and put on the device. No process reads or holds the whole
model: with FSDP over two processes, each reads about half of the file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax.convert.mapping import Path, REGIONS, hf_shape, hf_to_ours
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings

Index = tuple[slice, ...]


class Tensor(Protocol):
  shape: tuple[int, ...]

  def read(self, index: Index) -> np.ndarray:
    """float32 [region] of the tensor; `index` has one `slice(start, stop)` per dimension."""


TensorSource = Mapping[str, Tensor]


@dataclasses.dataclass
class ReadStats:
  """Bytes this process read from weight files (as stored: quantised blocks, bf16, ...)."""

  bytes_read: int = 0
  reads: int = 0

  def add(self, n: int) -> None:
    self.bytes_read += int(n)
    self.reads += 1


def full_index(shape: tuple[int, ...]) -> Index:
  return tuple(slice(0, n) for n in shape)


def normalize(index: tuple, shape: tuple[int, ...]) -> Index:
  """A device's index (slices that may be open, or Ellipsis) as concrete `slice(start, stop)`s."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A host array -> a (possibly sharded, possibly multi-process) jax.Array."""
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def place_regions(shape: tuple[int, ...], sharding: jax.sharding.Sharding | None,
                  region: Callable[[Index], np.ndarray]) -> jax.Array:
  """A jax.Array of `shape` whose every addressable shard is `region(its index)` (read once per
  distinct index: replicas on this process share the read)."""
  if sharding is None:
    return jnp.asarray(region(full_index(shape)))
  cache: dict[tuple, np.ndarray] = {}

  def shard(idx):
    key = tuple((s.start, s.stop) for s in normalize(idx, shape))
    if key not in cache:
      cache[key] = np.ascontiguousarray(region(normalize(idx, shape)), np.float32)
    return cache[key]

  return jax.make_array_from_callback(shape, sharding, shard)


def head_init(seed: int) -> Callable[[tuple[int, ...]], np.ndarray]:
  """Initialiser of a fresh reward-head kernel: normal(0, 0.02), seeded."""
  def init(shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32)) * 0.02
  return init


def fill_model(make: Callable[[], nnx.Module], cfg: LlamaConfig, source: TensorSource, origin: str,
               init_missing: Mapping[Path, Callable[[tuple[int, ...]], np.ndarray]] | None = None, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Builds `make()` with weights from `source`, without first materialising a random model.
  Paths in `init_missing` that the source lacks are initialised by the given function of their
  shape; any other missing tensor, or one of the wrong shape, is an error naming it (checked from
  the file headers before anything is read)."""
  abstract = nnx.eval_shape(make)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules) if mesh is not None else None
  sharding_of = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  plan = hf_to_ours(set(source), cfg)
  init_missing = init_missing or {}
  leaves = []
  for path, var in nnx.to_flat_state(abs_state):
    want = tuple(var.shape)
    sharding = sharding_of[path].get_value() if path in sharding_of else None
    if path in plan:
      names, to_ours = plan[path]
      stacked = path[:2] == ("model", "layers")
      part_shape = want[1:] if stacked else want
      for name in names:
        if name not in source:
          raise UserError(f"{origin}: tensor {name} is missing (needed for {'.'.join(path)})")
        if tuple(source[name].shape) != hf_shape(to_ours, part_shape, cfg):
          raise UserError(f"{origin}: tensor {name} has shape {tuple(source[name].shape)}, which does not fit "
                          f"{'.'.join(path)} of shape {part_shape}")
      read = REGIONS[to_ours]
      tensors = [source[n] for n in names]
      if stacked:
        def region(idx, tensors=tensors, read=read):  # [layers, ...]: one source tensor per layer
          return np.stack([read(tensors[i], idx[1:], cfg) for i in range(idx[0].start, idx[0].stop)])
      else:
        def region(idx, t=tensors[0], read=read):
          return read(t, idx, cfg)
      value = place_regions(want, sharding, region)
    elif path in init_missing:
      value = place(np.asarray(init_missing[path](want), np.float32), sharding)
    else:
      raise UserError(f"{origin}: no tensor for {'.'.join(path)}")
    leaves.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))
