"""Objectives: SteerLM regression, Bradley-Terry (regular, margin, scaled) with accuracy, and DPO in the same three variants.

All are pure jit-compatible functions of arrays; they compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BT_VARIANTS = ("regular", "margin", "scaled")


def _check_same_1d(**arrays: jax.Array) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  first = next(iter(shapes.values()))
  if len(first) != 1 or any(s != first for s in shapes.values()):
    # A [B] margin against [B, 1] rewards would silently broadcast to [B, B]: refuse it.
    raise ValueError(f"expected 1-D arrays of one shape [B], got {shapes}")


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def regression_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the entries where `mask` is true. pred, target, mask [B, A] -> []."""
  if jnp.shape(pred) != jnp.shape(target) or jnp.shape(pred) != jnp.shape(mask):
    raise ValueError(f"pred, target, mask must share a shape, got {jnp.shape(pred)}, "
                     f"{jnp.shape(target)}, {jnp.shape(mask)}")
  m = jnp.asarray(mask, jnp.float32)
  err = (jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)) ** 2
  return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def bt_losses(r_chosen: jax.Array, r_rejected: jax.Array, magnitude: jax.Array, variant: str) -> jax.Array:
  """Per-pair Bradley-Terry losses [B] (see `bt_loss`)."""
  _check_same_1d(r_chosen=r_chosen, r_rejected=r_rejected, magnitude=magnitude)
  diff = jnp.asarray(r_chosen, jnp.float32) - jnp.asarray(r_rejected, jnp.float32)
  m = jnp.asarray(magnitude, jnp.float32)
  if variant == "regular":
    return jax.nn.softplus(-diff)  # -log sigmoid(d), stable for large |d|
  if variant == "margin":
    return jax.nn.softplus(-(diff - m))
  if variant == "scaled":
    return m * jax.nn.softplus(-diff)
  raise ValueError(f"bt variant {variant!r}: expected one of {', '.join(BT_VARIANTS)}")


def bt_loss(r_chosen: jax.Array, r_rejected: jax.Array, magnitude: jax.Array, variant: str, *,
            mask: jax.Array | None = None) -> jax.Array:
  """Bradley-Terry loss, mean over pairs. r_chosen, r_rejected, magnitude, mask [B] -> [].

  regular: -log sigmoid(c - r); margin: -log sigmoid(c - r - m); scaled: m * -log sigmoid(c - r).
  `mask` (optional) leaves filler pairs out of the mean.
  """
  return _masked_mean(bt_losses(r_chosen, r_rejected, magnitude, variant), mask)


def pairwise_accuracy(r_chosen: jax.Array, r_rejected: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of pairs with chosen strictly above rejected (a tie counts as wrong). [B] -> []."""
  _check_same_1d(r_chosen=r_chosen, r_rejected=r_rejected)
  return _masked_mean((jnp.asarray(r_chosen) > jnp.asarray(r_rejected)).astype(jnp.float32), mask)


def dpo_rewards(pi_chosen: jax.Array, pi_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
                beta: float) -> jax.Array:
  """DPO's implicit reward difference z = beta * ((pi_c - ref_c) - (pi_r - ref_r)). [B] each -> [B]."""
  _check_same_1d(pi_chosen=pi_chosen, pi_rejected=pi_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return beta * ((f(pi_chosen) - f(ref_chosen)) - (f(pi_rejected) - f(ref_rejected)))


def dpo_losses(pi_chosen: jax.Array, pi_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
               magnitude: jax.Array, variant: str, beta: float) -> jax.Array:
  """Per-pair DPO losses [B] (see `dpo_loss`): the Bradley-Terry variants on the implicit rewards."""
  z = dpo_rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
  return bt_losses(z, jnp.zeros_like(z), magnitude, variant)


def dpo_loss(pi_chosen: jax.Array, pi_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             magnitude: jax.Array, variant: str, beta: float, *, mask: jax.Array | None = None) -> jax.Array:
  """DPO loss, mean over pairs; sequence log-probs (summed over response tokens) [B] each -> [].

  z = beta * ((pi_c - ref_c) - (pi_r - ref_r)); regular: -log sigmoid(z); margin:
  -log sigmoid(z - m); scaled: m * -log sigmoid(z), with m = magnitude (|preference strength|).
  """
  return _masked_mean(dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, magnitude, variant, beta), mask)
