"""Which parameters a model computes with in its compute dtype, and its params with those stored so."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def castable(v: nnx.Variable) -> bool:
  """Whether the model computes with this parameter in its compute dtype: every matrix (embeddings,
  projections, LM head), not the norms' vectors nor the reward head (float32 in the model)."""
  axes = v.get_metadata().get("axes") or ()
  return len([a for a in axes if a != "layers"]) > 1 and "attributes" not in axes


def store_as(params: Any, dtype: str) -> Any:
  """`params` (a State, concrete or traced) with the castable matrices in `dtype`."""
  def one(v):
    x = v.get_value()
    return v.replace(x.astype(dtype)) if castable(v) and jnp.issubdtype(x.dtype, jnp.floating) else v
  return jax.tree.map(one, params, is_leaf=is_var)
