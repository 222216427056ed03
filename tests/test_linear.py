"""`project`: forward and both gradients against numpy, for 1 and 2 contracted axes, under jit and remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.model.linear import project


@pytest.mark.parametrize("in_dims,x_shape,w_shape", [(1, (2, 5, 6), (6, 7)), (1, (2, 5, 6), (6, 3, 4)),
                                                     (2, (2, 5, 3, 4), (3, 4, 6))])
@pytest.mark.parametrize("weight_grad", ["flat", "autodiff"])
def test_project_value_and_grads_match_numpy(in_dims, x_shape, w_shape, weight_grad):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
  y_shape = x_shape[:len(x_shape) - in_dims] + w_shape[in_dims:]
  c = rng.standard_normal(y_shape)  # loss = sum(c * y), so dL/dy = c
  k, m = int(np.prod(w_shape[:in_dims])), int(np.prod(w_shape[in_dims:]))
  x2, c2, w2 = x.reshape(-1, k), c.reshape(-1, m), w.reshape(k, m)
  y_np = (x2 @ w2).reshape(y_shape)
  dx_np, dw_np = (c2 @ w2.T).reshape(x_shape), (x2.T @ c2).reshape(w_shape)

  def loss(x, w):
    return jnp.sum(jnp.asarray(c, jnp.float32) * project(x, w, in_dims, weight_grad))

  xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  np.testing.assert_allclose(np.asarray(project(xj, wj, in_dims, weight_grad)), y_np, rtol=1e-5, atol=1e-5)
  for fn in (jax.grad(loss, (0, 1)), jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))):
    dx, dw = fn(xj, wj)
    np.testing.assert_allclose(np.asarray(dx), dx_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), dw_np, rtol=1e-5, atol=1e-5)


def test_project_keeps_low_precision_dtype_and_rejects_mismatched_axes():
  x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: jnp.sum(project(x, w).astype(jnp.float32)), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16 and float(dw[0, 0]) == 6.0
  with pytest.raises(ValueError, match="do not share 1 contracted axes"):
    project(x, jnp.ones((5, 4)))
