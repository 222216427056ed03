"""ExPO (model extrapolation) as pytree arithmetic, and the search for its factor.

`extrapolate(base, tuned, factor)` returns `base + factor * (tuned - base)`: factor 1 gives `tuned`,
0 gives `base`. ExPO's own paper writes `tuned + alpha * (tuned - base)`, which is `factor = 1 + alpha`
(`factor_from_alpha`). The HelpSteer2-Preference paper reports an "optimal extrapolation factor" of
1.52 without saying which convention it means; with base = helpfulness regression and tuned =
scaled BT initialised from it, search both readings (e.g. `--search 1.0:2.6:0.1`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def factor_from_alpha(alpha: float) -> float:
  """ExPO's alpha (tuned + alpha * (tuned - base)) as this module's factor."""
  return 1.0 + alpha


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def extrapolate(base: Any, tuned: Any, factor: float | jax.Array) -> Any:
  """`base + factor * (tuned - base)` leaf by leaf, each leaf keeping its dtype (float32 arithmetic).

  base and tuned must have the same tree structure, shapes and dtypes; non-float leaves must be equal.
  """
  base_leaves, base_def = jax.tree_util.tree_flatten_with_path(base)
  tuned_leaves, tuned_def = jax.tree_util.tree_flatten_with_path(tuned)
  if base_def != tuned_def:
    base_paths = {_path_str(p) for p, _ in base_leaves}
    tuned_paths = {_path_str(p) for p, _ in tuned_leaves}
    diff = sorted(base_paths ^ tuned_paths)
    where = diff[0] if diff else "(same leaves, different containers)"
    raise ValueError(f"extrapolate: base and tuned differ in structure at {where}")
  out = []
  for (path, b), (_, t) in zip(base_leaves, tuned_leaves):
    if jnp.shape(b) != jnp.shape(t):
      raise ValueError(f"extrapolate: {_path_str(path)} has shape {jnp.shape(b)} in base, {jnp.shape(t)} in tuned")
    dtype = jnp.result_type(b)
    if jnp.result_type(t) != dtype:
      raise ValueError(f"extrapolate: {_path_str(path)} is {dtype} in base, {jnp.result_type(t)} in tuned")
    if not jnp.issubdtype(dtype, jnp.floating):
      if not bool(jnp.all(jnp.asarray(b) == jnp.asarray(t))):
        raise ValueError(f"extrapolate: non-float leaf {_path_str(path)} differs between base and tuned")
      out.append(t)
      continue
    f = jnp.asarray(factor, jnp.float32)
    # (1 - f) * base + f * tuned: exact at both ends (factor 0 -> base, factor 1 -> tuned)
    out.append(((1.0 - f) * jnp.asarray(b, jnp.float32) + f * jnp.asarray(t, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(base_def, out)


def factor_grid(spec: str) -> list[float]:
  """"LO:HI:STEP" -> [LO, LO+STEP, ..., HI] (HI included when on the grid)."""
  try:
    lo, hi, step = (float(x) for x in spec.split(":"))
  except ValueError:
    raise ValueError(f"--search {spec!r}: expected LO:HI:STEP") from None
  if step <= 0 or hi < lo:
    raise ValueError(f"--search {spec!r}: need STEP > 0 and HI >= LO")
  n = int(np.floor((hi - lo) / step + 1e-9)) + 1
  return [round(lo + i * step, 10) for i in range(n)]


def search_factor(score: Callable[[float], tuple[float, float]], factors: Sequence[float]
                  ) -> tuple[float, list[dict[str, float]]]:
  """Evaluates `score(factor) -> (accuracy, bt_loss)` on each factor; the best has the highest
  accuracy, ties broken by the lower loss, then by the factor closest to 1. Returns (best, table)."""
  table = []
  for f in factors:
    acc, loss = score(float(f))
    table.append({"factor": float(f), "accuracy": float(acc), "loss": float(loss)})
  best = max(table, key=lambda r: (r["accuracy"], -r["loss"], -abs(r["factor"] - 1.0)))
  return best["factor"], table
