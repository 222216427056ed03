"""The paper's optimiser: AdamW (decoupled weight decay), global-norm clipping, linear warm-up then constant LR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def schedule(lr: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from lr/warmup to lr over `warmup_steps`, then constant (NeMo's CosineAnnealing
  with min_lr = lr, as the HelpSteer2-Preference recipe sets it)."""
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda step: lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)


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
  parts.append(optax.adamw(lr if callable(lr) else schedule(lr, warmup_steps), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def optimizer_from(cfg) -> optax.GradientTransformation:
  """`make_optimizer` from an `OptimizerConfig` (train: or reinforce: section)."""
  return make_optimizer(cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps, cfg.grad_clip)


def actor_critic_optimizer(cfg, updates_per_step: int = 1) -> optax.GradientTransformation:
  """PPO's: the actor and the critic of an `ActorCritic` each with their own AdamW and gradient
  clipping (`make_optimizer` settings of `cfg`), at `cfg.lr` and `cfg.critic_lr`; the actor's
  learning rate is 0 for the first `cfg.critic_warmup_steps` rollout steps of `updates_per_step`
  optimizer updates each (the critic learns first, as NeMo-Aligner counts its warm-up)."""
  actor, hold = schedule(cfg.lr, cfg.warmup_steps), cfg.critic_warmup_steps * updates_per_step
  actor_lr = (lambda step: jnp.where(step < hold, 0.0, actor(step - hold))) if hold else actor
  one = lambda lr: make_optimizer(lr, cfg.warmup_steps, cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps,  # noqa: E731
                                  cfg.grad_clip)
  def labels(params):  # "actor" / "critic": each leaf's top-level key
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[0], "key", path[0])), params)
  return optax.multi_transform({"actor": one(actor_lr), "critic": one(cfg.critic_lr)}, labels)
