"""What a training run holds, described once for the run and for its plan.

A run holds one trainable model (float32 parameters and their optimizer state, sharded by the
logical-axis rules) and the frozen models it reads but never updates (the DPO / REINFORCE
reference, the reward model REINFORCE scores with). A frozen model keeps the matrices it computes
with in its compute dtype (`Part.dtype`: bfloat16 in the paper configs, half of float32's bytes)
and the rest (norms, the reward head, which compute in float32) in float32, so it computes exactly
what a float32 copy computes in that dtype.

`RunState.build` describes it all from configs alone: ShapeDtypeStructs carrying their
NamedShardings, nothing allocated or read. `Step` jits a pure step on that description. Trainers
fill the state (from the source weights, or straight from a checkpoint into these shardings) and
call the jitted step; `hs2p plan` lowers the same jitted step on the abstract state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hs2p_jax.model import create, lora
from hs2p_jax.model.casting import castable, is_var as _is_var, store_as  # noqa: F401 - store_as: for the trainers
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import Rules, opt_state_shardings, state_shardings, use_mesh


@dataclasses.dataclass(frozen=True)
class Part:
  """One model of a run: kind, architecture (with its compute dtype), storage dtype of its matrices."""

  kind: str                  # "lm" | "reward"
  config: LlamaConfig
  num_attributes: int = 9
  dtype: str = "float32"     # float32 for the trainable model; the compute dtype for frozen ones
  adapters: bool = False     # a frozen copy of a LoRA run's trainable params only, over its base
  critic: LlamaConfig | None = None  # kind "actor_critic": the critic's architecture
  of: str = ""               # a frozen copy of this sub-model of the trainable one (PPO's reference: "actor")

  def build(self) -> nnx.Module:
    """A fresh model of this part (call under `nnx.eval_shape` for its abstract state)."""
    return create(self.kind, self.config, self.num_attributes, critic=self.critic)


def frozen_dtype(setting: str, compute_dtype: str) -> str:
  """The storage dtype of a frozen model's matrices: `setting`, or the compute dtype for "auto"."""
  return compute_dtype if setting in ("auto", None) else setting


def _placed(state: Any, dtype: str, mesh: Any, rules: Rules) -> Any:
  """Abstract `state` with its shardings, the castable matrices in `dtype`."""
  shardings = state_shardings(state, mesh, rules)

  def one(v, s):
    x = v.get_value()
    want = dtype if castable(v) and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return v.replace(jax.ShapeDtypeStruct(x.shape, jnp.dtype(want), sharding=s.get_value()))
  return jax.tree.map(one, state, shardings, is_leaf=_is_var)


def abstract_part(part: Part, mesh: Any, rules: Rules) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, abstract params: ShapeDtypeStructs in the part's storage dtypes, with shardings)."""
  graphdef, state = nnx.split(nnx.eval_shape(part.build))
  return graphdef, _placed(state, part.dtype, mesh, rules)


def lora_split(part: Part, mesh: Any, rules: Rules) -> tuple[nnx.GraphDef, Any, Any]:
  """A LoRA model's (graphdef, abstract trainable params in float32, abstract frozen base in the
  compute dtype), split by `lora.trainable`."""
  model = nnx.eval_shape(part.build)
  graphdef, train, base = nnx.split(model, lora.trainable(part.config), ...)
  return graphdef, _placed(train, part.dtype, mesh, rules), _placed(base, part.config.dtype, mesh, rules)


def with_base(tree: Any, frozen: dict[str, Any]) -> Any:
  """What `model_from` takes for `tree` (trainable params, or a frozen copy of them) in a step whose
  frozen models are `frozen`: with a LoRA run's base where it has one."""
  return (tree, frozen["base"]) if "base" in frozen else tree


def initial_copy(arch: LlamaConfig, stored: str) -> Part:
  """The frozen copy of a policy as its run starts (the DPO / REINFORCE reference): the whole model
  with its matrices in `stored`; of a LoRA policy, only its initial adapters (float32, read over the
  run's base: the base is not copied)."""
  return Part("lm", arch, dtype="float32" if arch.lora_rank else stored, adapters=bool(arch.lora_rank))


def subset(tree: Any, like: Any) -> Any:
  """The arrays of State `tree` at the paths of State `like`."""
  flat = dict(nnx.to_flat_state(tree))
  return nnx.from_flat_state({path: flat[path] for path, _ in nnx.to_flat_state(like)})


def shardings_of(tree: Any) -> Any:
  """The shardings of a tree of arrays or ShapeDtypeStructs, in its structure."""
  return jax.tree.map(lambda a: a.sharding, tree)


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (replicated leaves count fully)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass
class RunState:
  """The layout of a run's state: graphdefs and abstract arrays (with shardings) of the trainable
  params, their optimizer state and each frozen model."""

  mesh: Any
  rules: Rules
  tx: optax.GradientTransformation
  trainable: Part
  frozen_parts: dict[str, Part]
  graphdef: nnx.GraphDef
  frozen_graphdefs: dict[str, nnx.GraphDef]
  params: Any
  opt_state: Any
  frozen: dict[str, Any]

  @classmethod
  def build(cls, trainable: Part, frozen: dict[str, Part], tx: optax.GradientTransformation, mesh: Any,
            rules: Rules) -> "RunState":
    """The abstract state of a run on `mesh` (a Mesh or an AbstractMesh); nothing is allocated."""
    frozen = dict(frozen)
    if trainable.config.lora_rank:  # the base is frozen, in the compute dtype: part "base"
      graphdef, params, base = lora_split(trainable, mesh, rules)
      frozen_base = ("base", Part(trainable.kind, trainable.config, trainable.num_attributes, trainable.config.dtype))
    else:
      graphdef, params = abstract_part(trainable, mesh, rules)
      base = frozen_base = None
    abs_opt = jax.eval_shape(tx.init, params)
    opt_sh = opt_state_shardings(abs_opt, shardings_of(params), mesh)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt, opt_sh)
    built = {name: (graphdef, params) if part.adapters else abstract_part(part, mesh, rules)
             for name, part in frozen.items()}
    if any(part.adapters for part in frozen.values()) and frozen_base is None:
      raise ValueError("a frozen part of adapters needs a LoRA trainable part")
    if frozen_base is not None:
      frozen[frozen_base[0]] = frozen_base[1]
      built[frozen_base[0]] = (graphdef, base)
    return cls(mesh, rules, tx, trainable, frozen, graphdef, {n: g for n, (g, _) in built.items()},
               params, opt_state, {n: p for n, (_, p) in built.items()})

  @property
  def lora(self) -> bool:
    """Whether the trainable params are LoRA adapters (and head) over the frozen part "base"."""
    return "base" in self.frozen_parts

  def model_params(self, params: Any, frozen: dict[str, Any]) -> Any:
    """What `model_from(self.graphdef, .)` takes for the trainable `params`: with the base in a LoRA run."""
    return (params, frozen["base"]) if self.lora else params

  def frozen_params(self, name: str, frozen: dict[str, Any]) -> Any:
    """What `model_from(self.frozen_graphdefs[name], .)` takes for frozen part `name`."""
    return (frozen[name], frozen["base"]) if self.frozen_parts[name].adapters else frozen[name]

  def checkpointed(self) -> dict[str, Any]:
    """The abstract tree a run's checkpoints hold (and restore into): params and optimizer state."""
    return {"params": self.params, "opt_state": self.opt_state}

  def init_opt_state(self, params: Any) -> Any:
    """A fresh optimizer state for `params`, placed in its shardings."""
    with use_mesh(self.mesh, self.rules):
      return jax.jit(self.tx.init, out_shardings=shardings_of(self.opt_state))(params)

  def freeze(self, name: str, params: Any) -> Any:
    """Frozen part `name` as a copy of `params` (e.g. the initial policy) in its storage dtype and shardings."""
    part = self.frozen_parts[name]
    params = subset(params[part.of] if part.of else params, self.frozen[name])  # e.g. a LoRA model's base
    with use_mesh(self.mesh, self.rules):
      return jax.jit(lambda p: store_as(jax.tree.map(jnp.copy, p), part.dtype),
                     out_shardings=shardings_of(self.frozen[name]))(params)

  def final_model_bytes(self) -> int:
    """Bytes of the run's final model (DIR/model, float32): every parameter, or a LoRA run's adapters
    and reward head alone (its base is named, not saved: `checkpoint.ModelMeta.base`)."""
    flat = list(nnx.to_flat_state(self.params))
    if self.lora:
      flat += [(p, v) for p, v in nnx.to_flat_state(self.frozen["base"]) if str(p[-1]).startswith("head_")]
    return sum(math.prod(v.get_value().shape) * 4 for _, v in flat)

  def resident_bytes(self) -> dict[str, int]:
    """Per-device bytes of what lives through the run: params, optimizer state, each frozen model."""
    return {"params": device_bytes(self.params), "optimizer": device_bytes(self.opt_state),
            **{name: device_bytes(tree) for name, tree in self.frozen.items()}}


@dataclasses.dataclass
class Step:
  """A pure `fn(params, opt_state, frozen, batch) -> (params, opt_state, metrics)` on a run's state,
  jitted once with the state's shardings (params and optimizer state donated). `frozen` holds the
  frozen models named in `takes`."""

  state: RunState
  fn: Callable
  takes: tuple[str, ...] = ()

  @functools.cached_property
  def jitted(self) -> Any:
    st = self.state
    return jax.jit(self.fn, donate_argnums=(0, 1),
                   out_shardings=(shardings_of(st.params), shardings_of(st.opt_state), None))

  def frozen_args(self, frozen: dict[str, Any]) -> dict[str, Any]:
    """The frozen models the step reads: those it `takes`, and a LoRA run's base."""
    return {name: frozen[name] for name in self.takes + (("base",) if self.state.lora else ())}

  def args(self, batch: dict[str, jax.ShapeDtypeStruct]) -> tuple:
    """The step's abstract arguments for the abstract `batch`: what `hs2p plan` compiles."""
    st = self.state
    return st.params, st.opt_state, self.frozen_args(st.frozen), batch

  def lower(self, batch: dict[str, jax.ShapeDtypeStruct]) -> Any:
    with use_mesh(self.state.mesh, self.state.rules):
      return self.jitted.lower(*self.args(batch))

  def __call__(self, params: Any, opt_state: Any, frozen: dict[str, Any], batch: dict[str, jax.Array]) -> tuple:
    with use_mesh(self.state.mesh, self.state.rules):
      return self.jitted(params, opt_state, self.frozen_args(frozen), batch)
