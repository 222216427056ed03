"""REINFORCE's estimator (NeMo-Aligner's): the leave-one-out baseline over a prompt's k samples.

For k samples of each prompt, reward R_i = r_RM(x, y_i) - beta * KL_i; the baseline b_i is the mean R
of the other samples of the same prompt that ended properly (b_i = R_i, no signal, when none did)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def rloo_baseline(rewards: jax.Array, ended: jax.Array) -> jax.Array:
  """Leave-one-out baseline. rewards, ended [P, K] (K samples per prompt) -> [P, K]."""
  e = ended.astype(jnp.float32)
  r = rewards.astype(jnp.float32)
  others_sum = jnp.sum(r * e, axis=1, keepdims=True) - r * e
  others_n = jnp.sum(e, axis=1, keepdims=True) - e
  return jnp.where(others_n > 0, others_sum / jnp.maximum(others_n, 1.0), r)


def advantages(rm_scores: jax.Array, kl: jax.Array, ended: jax.Array, beta: float, k: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(rewards R, baselines b, advantages R - b), each [N], for N = P * k rows ordered prompt-major."""
  rewards = rm_scores - beta * kl
  base = rloo_baseline(rewards.reshape(-1, k), ended.reshape(-1, k)).reshape(-1)
  return rewards, base, rewards - base


def rloo(source: Any, r: Any, trainer: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """REINFORCE's estimator on a `rollouts.RolloutSource`'s scored `Rollout`: leave-one-out advantages
  per rollout ([N], `advantages`)."""
  rc = source.rc
  counted = r.ended | rc.truncated_as_ended
  rewards, base, adv = (np.asarray(a) for a in advantages(jnp.asarray(r.scores), jnp.asarray(r.kl),
                                                          jnp.asarray(counted), rc.kl_beta, rc.samples_per_prompt))
  return {"advantages": adv.astype(np.float32)}, {
      "total_reward": float(rewards.mean()), "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
      "baseline_mean": float(base.mean())}
