"""Weight projections `x · w` with a choice of how their gradients are formed.

`project(x, w, in_dims)` contracts the last `in_dims` axes of x with the first `in_dims` axes of w.
Under `weight_grad="flat"` its VJP flattens every leading axis of x into one token axis and forms
the weight gradient as one plain matrix product, `x[N, K]^T @ dy[N, M]`, and the input gradient as
`dy[N, M] @ w[K, M]^T`. That is the same arithmetic autodiff derives, in the canonical GEMM form:
XLA:CPU otherwise transposes the large activation gradients (fused into the SwiGLU backward) to fit
its dot layouts, which costs about a fifth of a reward-model training step on CPU
(benchmarks/README.md). `weight_grad="autodiff"` leaves the VJP to JAX.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, in_dims: int = 1, weight_grad: str = "flat") -> jax.Array:
  """x [..., *K] · w [*K, *M] -> [..., *M], K = w.shape[:in_dims]."""
  if x.shape[x.ndim - in_dims:] != w.shape[:in_dims]:
    raise ValueError(f"project: x {x.shape} and w {w.shape} do not share {in_dims} contracted axes")
  if weight_grad == "autodiff":
    return jnp.tensordot(x, w, axes=in_dims)
  return _flat_vjp(x, w, in_dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _flat_vjp(x: jax.Array, w: jax.Array, in_dims: int) -> jax.Array:
  return jnp.tensordot(x, w, axes=in_dims)


def _fwd(x, w, in_dims):
  return jnp.tensordot(x, w, axes=in_dims), (x, w)


def _bwd(in_dims, res, dy):
  x, w = res
  k = math.prod(w.shape[:in_dims])
  m = math.prod(w.shape[in_dims:])
  x2, dy2, w2 = x.reshape(-1, k), dy.reshape(-1, m), w.reshape(k, m)
  dw = (x2.T @ dy2).reshape(w.shape)
  dx = (dy2 @ w2.T).reshape(x.shape)
  return dx, dw


_flat_vjp.defvjp(_fwd, _bwd)
