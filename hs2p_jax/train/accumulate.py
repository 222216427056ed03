"""Gradients summed over stacked micro-batches, and the optimizer update from summed gradients."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def summed_grads(grad_fn: Callable, params: Any, batches: Any, *args: Any) -> tuple[Any, Any]:
  """(gradient sum, aux sum) of `grad_fn(params, *args, batch) -> ((loss, aux), grads)` over the
  micro-batches stacked on the leading axis of `batches` (a scan: one micro-batch's activations
  at a time); `aux` is a pytree of sums (the loss sum, counts, metric sums). Each micro-batch
  carries its index as `micro_index` (a dropout key's)."""
  if isinstance(batches, dict):
    batches = {**batches, "micro_index": jnp.arange(jax.tree.leaves(batches)[0].shape[0], dtype=jnp.int32)}
  def micro(carry, batch):
    g_acc, a_acc = carry
    (_, aux), grads = grad_fn(params, *args, batch)
    return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, a_acc, aux)), None

  first = jax.tree.map(lambda a: a[0], batches)
  aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda b: grad_fn(params, *args, b)[0][1], first))
  (grads, aux), _ = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), aux0), batches)
  return grads, aux


def apply_mean_grads(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                     count: jax.Array) -> tuple[Any, Any, jax.Array]:
  """(params, opt_state, grad norm) after one update with the gradient `grads / count` (count >= 1)."""
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, grad_norm


def interleave(a: jax.Array, m: int, group: int = 1) -> jax.Array:
  """[N, ...] rows -> [m, N / m, ...] micro-batches taking every m-th group of `group` rows, so that
  each device's shard of the rows (a contiguous block) holds its part of every micro-batch."""
  n = a.shape[0]
  x = a.reshape(n // (group * m), m, group, *a.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(m, n // m, *a.shape[1:])
