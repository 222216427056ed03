"""PPO's estimator (NeMo-Aligner's): per-token rewards, generalised advantage estimation, whitening; pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hs2p_jax.rl.kl import kl_per_token, masked_mean


def token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta: float,
                  estimator: str = "absolute") -> jax.Array:
  """Per-token rewards [N, T]: the KL penalty on every response token, the score [N] added at the
  row's last response token (rows without one get nothing)."""
  m = mask.astype(jnp.float32)
  r = -beta * kl_per_token(logp, ref_logp, estimator) * m
  length = jnp.sum(mask != 0, axis=1)
  last = jax.nn.one_hot(length - 1, mask.shape[1], dtype=jnp.float32) * (length > 0)[:, None]
  return r + scores[:, None].astype(jnp.float32) * last


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float,
        next_value: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns), each [N, T] (0 off the mask), of per-token `rewards` and critic
  `values` [N, T] over response tokens `mask` [N, T] (left-aligned); `next_value` [N]: the value
  after each row's last token (a row cut short bootstraps from it; 0 or None: it ended)."""
  m = mask.astype(jnp.float32)
  r, v = rewards.astype(jnp.float32) * m, values.astype(jnp.float32) * m
  boot = jnp.zeros(r.shape[0], jnp.float32) if next_value is None else next_value.astype(jnp.float32)

  def back(carry, xs):  # from the last position to the first
    adv_next, v_next, started = carry
    r_t, v_t, m_t = xs
    # at a row's last token the next value is the bootstrap; past it, nothing
    v_after = jnp.where(started, v_next, boot)
    delta = r_t + gamma * v_after - v_t
    adv = delta + gamma * lam * jnp.where(started, adv_next, 0.0)
    adv = adv * m_t
    on = m_t > 0
    return (jnp.where(on, adv, adv_next), jnp.where(on, v_t, v_next), started | on), adv

  init = (jnp.zeros_like(boot), jnp.zeros_like(boot), jnp.zeros(boot.shape, bool))
  _, adv = jax.lax.scan(back, init, (r.T, v.T, m.T), reverse=True)
  adv = adv.T
  return adv, (adv + v) * m


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """`x` scaled to unit variance over the masked entries (and centred with `shift_mean`); 0 off the mask."""
  m = mask.astype(jnp.float32)
  mean = masked_mean(x, m)
  var = masked_mean((x - mean) ** 2, m)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return (out if shift_mean else out + mean) * m
