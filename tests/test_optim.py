"""The optimiser's schedules against numpy (constant after a warm-up, NeMo's cosine to a floor), and
the logged learning rate read from the optimizer's own step count (REINFORCE's several updates a
step, PPO's actor and critic counting apart)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.train import optim


def _cfg(**kw):
  base = dict(lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr=1e-4, steps=5, weight_decay=0.0, b1=0.9,
              b2=0.98, eps=1e-8, grad_clip=1.0)
  return types.SimpleNamespace(**{**base, **kw})


def test_schedules_against_numpy():
  cos = optim.schedule(1e-3, 2, "cosine", 1e-4, 10)
  for step in range(14):
    if step < 2:
      want = 1e-3 * (step + 1) / 2
    else:
      t = min((step - 2) / 8, 1.0)
      want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * t))
    assert float(cos(step)) == pytest.approx(want, rel=1e-6), step
  const = optim.schedule(1e-3, 4)
  assert [float(const(s)) for s in (0, 3, 9)] == pytest.approx([2.5e-4, 1e-3, 1e-3])


def test_the_logged_lr_is_the_last_update_s_by_the_optimizer_s_count():
  params = {"w": jnp.ones((2, 2))}
  cfg = _cfg(updates_per_rollout=2)  # REINFORCE: two updates a step; the cosine spans 5 x 2 updates
  tx = optim.optimizer_from(cfg)
  state = tx.init(params)
  sched = optim.schedule(1e-3, 2, "cosine", 1e-4, 10)
  assert optim.learning_rates(cfg, state) == {"lr": pytest.approx(float(sched(0)))}
  for n in range(1, 6):
    _, state = tx.update({"w": jnp.full((2, 2), 0.1)}, state, params)
    assert optim.learning_rates(cfg, state)["lr"] == pytest.approx(float(sched(n - 1)), rel=1e-6), n


def test_ppo_s_actor_and_critic_rates_count_apart():
  from flax import nnx
  cfg = _cfg(critic_lr=1e-2, updates_per_rollout=1, epochs=1)
  params = nnx.State({"actor": {"w": jnp.ones(3)}, "critic": {"w": jnp.ones(3)}})
  tx = optim.actor_critic_optimizer(cfg)
  state = fresh = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
  for _ in range(3):  # three critic-only updates (the warm-up): the actor's state stays fresh
    _, state = tx.update(grads, state, params)
    state = state._replace(inner_states={**state.inner_states, "actor": fresh.inner_states["actor"]})
  rates = optim.learning_rates(cfg, state)
  assert rates["lr"] == pytest.approx(float(optim.schedule(1e-3, 2, "cosine", 1e-4, 5)(0)))
  assert rates["critic_lr"] == pytest.approx(float(optim.schedule(1e-2, 2, "cosine", 1e-4, 5)(2)))
