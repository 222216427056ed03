"""Per-token KL estimates of a policy against its reference, and masked means over response tokens."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: str = "absolute") -> jax.Array:
  """Per-token KL estimates of policy vs reference from the sampled tokens' log-probs. [N, T] -> [N, T]."""
  d = logp - ref_logp
  if estimator == "absolute":
    return jnp.abs(d)
  if estimator == "k1":
    return d
  if estimator == "k3":  # (r - 1) - log r with r = p_ref / p: non-negative, unbiased
    return jnp.expm1(-d) + d
  raise ValueError(f"kl estimator {estimator!r}: expected absolute, k1 or k3")


def masked_mean(x: jax.Array, mask: jax.Array, axis: Any = None) -> jax.Array:
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)
