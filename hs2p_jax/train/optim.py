"""The paper's optimiser: AdamW (decoupled weight decay), global-norm clipping, linear warm-up then a
constant LR (the recipe's) or NeMo's cosine annealing to a floor; PPO's actor and critic each with
their own. The logged learning rate is read from the optimizer's own step count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

SCHEDULES = ("constant", "cosine")


def schedule(lr: float, warmup_steps: int, kind: str = "constant", min_lr: float = 0.0,
             decay_steps: int = 0) -> optax.Schedule:
  """The LR at optimizer update `step` (0-based): a linear warm-up from lr/warmup to lr over
  `warmup_steps`, then `constant` (NeMo's CosineAnnealing with min_lr = lr, as the HelpSteer2-Preference
  recipe sets it) or `cosine` from lr down to `min_lr` at update `decay_steps`, and `min_lr` after
  (NeMo's CosineAnnealing, the PPO actor's and critic's default there)."""
  if kind not in SCHEDULES:
    raise ValueError(f"lr schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")
  if kind == "constant" and warmup_steps <= 0:
    return optax.constant_schedule(lr)

  def at(step):
    warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
    if kind == "constant":
      return warm
    t = jnp.clip((step - warmup_steps) / max(decay_steps - warmup_steps, 1), 0.0, 1.0)
    cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup_steps, warm, cos)
  return at


def updates_per_step(cfg) -> int:
  """Optimizer updates a training step makes: PPO's minibatches x epochs, REINFORCE's minibatches, else 1."""
  return int(getattr(cfg, "updates_per_rollout", 1)) * int(getattr(cfg, "epochs", 1))


def schedule_of(cfg, lr: float | None = None) -> optax.Schedule:
  """The schedule of an `OptimizerConfig` section (at `lr`, default `cfg.lr`), decaying over the run's updates."""
  return schedule(cfg.lr if lr is None else lr, cfg.warmup_steps, getattr(cfg, "lr_schedule", "constant"),
                  getattr(cfg, "min_lr", 0.0), int(getattr(cfg, "steps", 0)) * updates_per_step(cfg))


def decay_mask(params):
  """Weight decay on matrices only; norms and biases (vectors per layer) are not decayed."""
  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("axes")
      ndim = len([a for a in axes if a != "layers"]) if axes is not None else v.ndim
      return v.replace(ndim > 1)
    return jnp.ndim(v) > 1
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(lr: float | optax.Schedule, warmup_steps: int = 10, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-8, grad_clip: float = 1.0) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(schedule(lr, warmup_steps), b1, b2, eps, weight_decay)
  (`lr` a schedule: used as it is)."""
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(lr if callable(lr) else schedule(lr, warmup_steps), b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def optimizer_from(cfg) -> optax.GradientTransformation:
  """`make_optimizer` from an `OptimizerConfig` (train:, dpo:, sft: or reinforce: section)."""
  return make_optimizer(schedule_of(cfg), cfg.warmup_steps, cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps, cfg.grad_clip)


def actor_critic_optimizer(cfg) -> optax.GradientTransformation:
  """PPO's: the actor and the critic of an `ActorCritic` each with their own AdamW state and gradient
  clipping (`make_optimizer` settings of `cfg`), at `cfg.lr` and `cfg.critic_lr` (their own step
  counts: the critic's warm-up, critic-only updates before step 1, leaves the actor's state as it was)."""
  one = lambda lr: make_optimizer(schedule_of(cfg, lr), cfg.warmup_steps, cfg.weight_decay, cfg.b1, cfg.b2,  # noqa: E731
                                  cfg.eps, cfg.grad_clip)

  def labels(params):  # "actor" / "critic": each leaf's top-level key
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[0], "key", path[0])), params)
  return optax.multi_transform({"actor": one(cfg.lr), "critic": one(cfg.critic_lr)}, labels)


def learning_rates(cfg, opt_state) -> dict[str, float]:
  """{"lr": the LR of the last update} (PPO: and "critic_lr"), from the optimizer state's own step
  count (0 updates made: the first update's LR). Reads the count from the devices."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")

  def count(part: str | None) -> int:
    found = [c for path, c in counts if part is None or f"'{part}'" in str(path)]
    return int(np.asarray(jax.device_get(found[0]))) if found else 0

  if hasattr(cfg, "critic_lr"):
    return {"lr": float(schedule_of(cfg)(max(count("actor") - 1, 0))),
            "critic_lr": float(schedule_of(cfg, cfg.critic_lr)(max(count("critic") - 1, 0)))}
  return {"lr": float(schedule_of(cfg)(max(count(None) - 1, 0)))}
