"""ExPO extrapolation against numpy, over nested pytrees and model states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.expo import extrapolate, factor_from_alpha, factor_grid, search_factor


def tree(seed, dtype=np.float32):
  rng = np.random.RandomState(seed)
  return {"a": rng.randn(3, 4).astype(dtype), "b": [rng.randn(5).astype(dtype), {"c": rng.randn(2, 2).astype(dtype)}]}


def test_matches_numpy_and_endpoints():
  base, tuned = tree(0), tree(1)
  for f in (0.0, 1.0, 1.52, -0.5):
    out = extrapolate(base, tuned, f)
    for o, b, t in zip(jax.tree.leaves(out), jax.tree.leaves(base), jax.tree.leaves(tuned)):
      np.testing.assert_allclose(np.asarray(o), b + f * (t - b), rtol=1e-6, atol=1e-6)
  for o, t in zip(jax.tree.leaves(extrapolate(base, tuned, 1.0)), jax.tree.leaves(tuned)):
    np.testing.assert_array_equal(np.asarray(o), t)


def test_expo_alpha_convention():
  base, tuned = tree(0), tree(1)
  alpha = 0.52
  out = extrapolate(base, tuned, factor_from_alpha(alpha))
  for o, b, t in zip(jax.tree.leaves(out), jax.tree.leaves(base), jax.tree.leaves(tuned)):
    np.testing.assert_allclose(np.asarray(o), t + alpha * (t - b), rtol=1e-5, atol=1e-6)


def test_dtype_kept_and_bf16_computed_in_float32():
  base = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
  tuned = {"w": jnp.asarray([1.5, 1.0], jnp.bfloat16)}
  out = extrapolate(base, tuned, 2.0)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [2.0, 0.0])


def test_jittable_with_traced_factor():
  base, tuned = tree(0), tree(1)
  f = jax.jit(extrapolate)
  np.testing.assert_allclose(np.asarray(f(base, tuned, 1.3)["a"]), base["a"] + 1.3 * (tuned["a"] - base["a"]), rtol=1e-6)


def test_structure_shape_dtype_mismatches_are_named():
  base = tree(0)
  other = tree(1)
  other["b"][1]["d"] = other["b"][1].pop("c")
  with pytest.raises(ValueError, match="structure"):
    extrapolate(base, other, 1.5)
  bad_shape = tree(1)
  bad_shape["a"] = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"\['a'\].*shape"):
    extrapolate(base, bad_shape, 1.5)
  bad_dtype = tree(1)
  bad_dtype["a"] = bad_dtype["a"].astype(np.float16)
  with pytest.raises(ValueError, match="float16"):
    extrapolate(base, bad_dtype, 1.5)


def test_on_reward_model_state():
  from flax import nnx
  from hs2p_jax.model import create, preset
  cfg = preset("tiny", num_layers=2)
  g, base = nnx.split(create("reward", cfg, 9, seed=0))
  _, tuned = nnx.split(create("reward", cfg, 9, seed=1))
  out = extrapolate(base, tuned, 1.5)
  model = nnx.merge(g, out)
  expected = np.asarray(base["head_kernel"][...]) + 1.5 * (np.asarray(tuned["head_kernel"][...]) - np.asarray(base["head_kernel"][...]))
  np.testing.assert_allclose(np.asarray(model.head_kernel[...]), expected, rtol=1e-6, atol=1e-7)


def test_factor_grid_and_search_tie_break():
  assert factor_grid("1:2:0.25") == [1.0, 1.25, 1.5, 1.75, 2.0]
  assert factor_grid("1.0:1.5:0.2") == [1.0, 1.2, 1.4]
  with pytest.raises(ValueError):
    factor_grid("2:1:0.1")
  scores = {1.0: (0.8, 0.5), 1.5: (0.9, 0.4), 2.0: (0.9, 0.3), 2.5: (0.7, 0.2)}
  best, table = search_factor(lambda f: scores[f], [1.0, 1.5, 2.0, 2.5])
  assert best == 2.0 and [r["factor"] for r in table] == [1.0, 1.5, 2.0, 2.5]
