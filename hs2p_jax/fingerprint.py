"""A content fingerprint of a model's weights that does not depend on how they are sharded.

Each float array's values (as float32) are read as uint32 bits and summed twice, each bit pattern
times an odd multiplier drawn from its flat index, in uint32 arithmetic: the sums wrap modulo 2^32,
so they are exact and the same for any sharding or reduction order, and any change to one value
changes both. The per-array sums, names and shapes are hashed on the host.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _sums(x: jax.Array) -> jax.Array:
  """[2] uint32: the array's two index-weighted sums of its float32 bit patterns."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  m1 = (index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  m2 = (index * jnp.uint32(0x85EBCA77) + jnp.uint32(0xC2B2AE3D)) | jnp.uint32(1)
  mixed = bits ^ (bits >> 15)
  return jnp.stack([jnp.sum(bits * m1, dtype=jnp.uint32), jnp.sum(mixed * m2, dtype=jnp.uint32)])


_sums_of = jax.jit(lambda arrays: [_sums(a) for a in arrays])


def fingerprint(state: Any) -> str:
  """16 hex digits of the float contents of an nnx State (or a dict path -> array), by path."""
  flat = dict(nnx.to_flat_state(state)) if isinstance(state, nnx.State) else dict(state)
  paths = sorted(flat, key=lambda p: tuple(map(str, p)))
  arrays = [flat[p].get_value() if isinstance(flat[p], nnx.Variable) else flat[p] for p in paths]
  sums = [np.asarray(s.addressable_data(0)) for s in _sums_of(arrays)]  # replicated: every process has them
  h = hashlib.sha256()
  for path, a, s in zip(paths, arrays, sums):
    h.update(f"{'.'.join(map(str, path))}:{tuple(a.shape)}:".encode() + np.asarray(s, np.uint32).tobytes())
  return h.hexdigest()[:16]
