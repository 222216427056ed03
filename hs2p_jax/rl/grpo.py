"""GRPO's estimator (TRL's, DeepSeekMath's): each sample's score against its prompt's group, pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grpo_advantages(scores: jax.Array, k: int, eps: float = 1e-4) -> jax.Array:
  """GRPO's group-normalised advantage [N]: each score minus its prompt's mean over its k samples,
  over their standard deviation (the unbiased one, + eps: TRL's); rows prompt-major (N = P * k). A
  group whose samples all score the same gets 0."""
  s = scores.reshape(-1, k).astype(jnp.float32)
  return ((s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, ddof=1, keepdims=True) + eps)).reshape(-1)


def flat_groups(scores: jax.Array, k: int) -> jax.Array:
  """[N] whether each row's group (its prompt's k samples) scored all the same: no signal for GRPO."""
  s = scores.reshape(-1, k)
  return jnp.repeat(jnp.all(s == s[:, :1], axis=1), k)
