"""Device mesh and logical-axis sharding.

Model code names the axes of every parameter (`nnx.Param(..., axes=("embed", "mlp"))`) and of the
activations it constrains (`constrain(x, ("act_batch", "act_seq", "act_embed"))`). Rules, which are
data, map those logical names to the mesh axes `data`, `fsdp` and `tensor`. Model code never sees
the mesh shape: the mesh and rules are installed around a computation with `use_mesh`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hs2p_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Logical name -> mesh axis (or tuple of axes, or None = replicated). FSDP shards the `embed` side
# of every matrix; tensor parallelism splits heads, MLP and vocabulary; the batch is split over
# data x fsdp. A mesh axis is dropped from a dimension it does not divide, but for the batch.
DEFAULT_RULES: Rules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("attributes", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
)


@dataclasses.dataclass
class MeshConfig:
  """Mesh axis sizes (-1 takes the devices the other axes leave) and logical-rule overrides."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: dict = dataclasses.field(default_factory=dict)  # logical axis -> mesh axis (or list, or null)
  allow_padding: bool = False  # run micro-batches whose rows are over a quarter padding (too few for the batch axes)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries of `cfg` for `num_devices`; a clear error when they do not divide."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise UserError(f"mesh.{name}={size}: sizes must be positive or -1")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise UserError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(
        f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} "
        f"but there are {num_devices} devices")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  cfg = cfg or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  if devices[0].platform == "cpu":  # no links to follow: the devices in order
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception as e:  # noqa: BLE001 - jax says why in many ways; a mesh in plain order would be slow, not wrong
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"mesh {dict(zip(MESH_AXES, shape))}: no device order along the {len(devices)} "
                    f"{devices[0].device_kind} devices' links gives this shape ({reason}); choose mesh sizes that "
                    f"follow the slice's topology") from None
  return Mesh(arr, MESH_AXES)


def rules_from(overrides: dict[str, Any] | None) -> Rules:
  """DEFAULT_RULES with entries replaced by `overrides` (logical name -> mesh axis / list / None)."""
  table = dict(DEFAULT_RULES)
  for name, target in (overrides or {}).items():
    if isinstance(target, list):
      target = tuple(target)
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise UserError(f"mesh.rules.{name}={target!r}: mesh axes are {', '.join(MESH_AXES)}")
    table[name] = target
  return tuple(table.items())


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Rules = DEFAULT_RULES


_ctx = _Context()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Installs `mesh` and `rules` for `constrain` and `logical_to_spec` inside the block."""
  old = (_ctx.mesh, _ctx.rules)
  _ctx.mesh, _ctx.rules = mesh, rules
  try:
    yield
  finally:
    _ctx.mesh, _ctx.rules = old


def current_mesh() -> Mesh | None:
  """The mesh installed by `use_mesh` (None outside one)."""
  return _ctx.mesh


def current_rules() -> Rules:
  """The rules installed by `use_mesh` (DEFAULT_RULES outside one)."""
  return _ctx.rules


# Logical axes that must split over their mesh axes: the batch is never silently replicated (every
# device would compute all of it). Data loaders pad rows to `batch_split`; anything else is an error.
STRICT_AXES = ("act_batch", "cache_batch")


def batch_split(mesh: Mesh | None, rules: Rules = DEFAULT_RULES, name: str = "act_batch") -> int:
  """Devices the batch (rows) of logical axis `name` is split over: the product of its mesh axes."""
  if mesh is None:
    return 1
  target = dict(rules).get(name)
  targets = target if isinstance(target, tuple) else ((target,) if target else ())
  return math.prod(mesh.shape[t] for t in targets if t in mesh.shape)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Rules | None = None) -> P:
  """Maps logical axis names to a PartitionSpec. A mesh axis that does not divide a dimension is
  dropped (that dimension is replicated over it), except for STRICT_AXES, where it is a UserError."""
  mesh = mesh if mesh is not None else _ctx.mesh
  table = dict(rules if rules is not None else _ctx.rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    targets = target if isinstance(target, tuple) else ((target,) if target else ())
    keep = []
    size = 1
    for t in targets:
      if t in used or mesh is None or t not in mesh.shape:
        continue
      n = mesh.shape[t]
      if shape is not None and shape[i] % (size * n):
        if name in STRICT_AXES and n > 1:
          split = "*".join(f"{a}={mesh.shape[a]}" for a in targets if a in mesh.shape)
          raise UserError(f"{name}: {shape[i]} rows do not split over the mesh's batch axes ({split}); make the "
                          f"batch (train.micro_batch_size, rows per step) a multiple of "
                          f"{math.prod(mesh.shape[a] for a in targets if a in mesh.shape)}")
        continue
      keep.append(t)
      size *= n
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op with no mesh or a 1-device mesh."""
  mesh = _ctx.mesh
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for an nnx State (concrete or abstract), from each Variable's `axes`."""
  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
      return v.replace(NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh, rules)))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def opt_state_shardings(abs_opt: Any, params_shardings: Any, mesh) -> Any:
  """Shardings for an optax state: leaves that mirror a parameter take its sharding, the rest are replicated."""
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    by_path[_names(path)] = s
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def one(path, leaf):
    names = _names(path)
    for i in range(len(names)):
      s = by_path.get(names[i:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(one, abs_opt)


def _names(path) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
               if str(getattr(k, "key", getattr(k, "name", ""))) != "value")
