"""Stops a run at the first step whose loss or gradient norm is not finite, before its params are saved."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hs2p_jax.errors import UserError

WATCHED = ("loss", "grad_norm")


class FiniteGuard:
  """Keeps, on the device, the first step whose watched metrics are not finite (no host sync per
  step); `check()` reads it (one scalar) and raises a one-line UserError naming that step."""

  def __init__(self, run_dir: str, last_good: int | None = None):
    self.run_dir = run_dir
    self.first_bad = jnp.int32(-1)
    self.last_good = last_good

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in WATCHED if k in metrics]))
    self.first_bad = jnp.where((self.first_bad < 0) & ~ok, jnp.int32(step), self.first_bad)

  def check(self) -> None:
    bad = int(jax.device_get(self.first_bad))
    if bad >= 0:
      kept = (f"the last good checkpoint (step {self.last_good}) is kept in {self.run_dir}/checkpoints"
              if self.last_good else "no checkpoint was written")
      raise UserError(f"step {bad}: the loss or gradient norm is not finite; the run stopped without saving "
                      f"these params ({kept}); lower the learning rate or check the data")

  def saved(self, step: int) -> None:
    self.last_good = step
