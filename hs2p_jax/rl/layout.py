"""The rollout layout: the policy's copy for decoding, cast and resharded once before sampling.

Training keeps float32 parameters sharded over `fsdp` (and `tensor`). Decoding from that layout
would all-gather every weight and convert it to the compute dtype at every new token. Before each
rollout the policy is instead copied once (one jitted cast + reshard) onto a mesh of the same
devices reshaped to `(data = n / t, fsdp = 1, tensor = t)`: tensor-parallel over groups of `t`
consecutive devices, replicated across the groups, the batch split over the groups. A decode step
then moves no weights between devices (activations only, within a group). Among the divisors of
the device count (and of the KV heads) whose share of the copy fits in half a device's memory, `t`
is the one whose decode step is fastest on the chip (`roofline.decode_time`: decoding is bound by the
bytes each device reads per token, the copy's 1 / t share of them falls with t, the group's
all-reduces grow with it); on a device without those figures (CPU), the smallest that fits. `t = 1`
is a replicated copy, one model per device. The copy is in the compute dtype by default, so the
sampler computes exactly what it computed from the training layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from hs2p_jax.errors import UserError
from hs2p_jax.model import create, merge_lora, model_from
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.roofline import decode_time
from hs2p_jax.roofline.flops import device_family
from hs2p_jax.sharding import MESH_AXES, MeshConfig, Rules, batch_split, make_mesh, state_shardings

COPY_FRACTION = 0.5  # of a device's memory, at most, for its share of the decode copy


@dataclasses.dataclass(frozen=True)
class RolloutLayout:
  """Where and how the sampler's copy of the policy lives (module docstring)."""

  mesh: Mesh
  rules: Rules
  graphdef: nnx.GraphDef   # the policy computing in `dtype`
  shardings: Any           # NamedShardings of the copy, on `mesh`
  dtype: str
  tensor: int
  plain: Any = dataclasses.field(repr=False, compare=False, default=None)  # the copy's abstract params, float32
  _copy: Any = dataclasses.field(repr=False, compare=False, default=None)

  def copy(self, params: Any) -> Any:
    """The decode copy of the training params (cast to `dtype`, placed on `mesh`; a LoRA policy's
    (adapters, base) merged first); one compiled call."""
    return self._copy(params)

  def abstract(self) -> Any:
    """ShapeDtypeStructs of the copy (for `hs2p plan`)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, _cast_dtype(a.dtype, self.dtype), sharding=s),
                        self.plain, self.shardings)

  def bytes_per_device(self) -> int:
    """Bytes of the copy on each device."""
    return sum(int(np.prod(s.shard_shape(a.shape))) * jnp.dtype(_cast_dtype(a.dtype, self.dtype)).itemsize
               for a, s in zip(jax.tree.leaves(self.plain), jax.tree.leaves(self.shardings)))

  def copy_bytes(self) -> int:
    """Bytes of the whole copy."""
    return copy_bytes(self.plain, self.dtype)

  def describe(self) -> str:
    d, t = self.mesh.shape["data"], self.tensor
    kind = "replicated on every device" if t == 1 else f"tensor-parallel over {t} devices, {d} groups"
    groups = tensor_groups(self.mesh) if t > 1 else None
    where = ""
    if groups:
      where = (f", each group a {groups['extent']} block of chips" if groups["compact"] else
               f", WARNING: tensor groups span up to {groups['extent']} chips, more links than their {t} need")
    return f"rollout copy: {self.dtype}, {kind} (mesh data={d} fsdp=1 tensor={t}{where})"


def copy_bytes(params: Any, dtype: str) -> int:
  """Bytes of the whole copy of `params` (arrays or ShapeDtypeStructs) in `dtype`."""
  return sum(int(np.prod(a.shape)) * jnp.dtype(_cast_dtype(a.dtype, dtype)).itemsize for a in jax.tree.leaves(params))


def _cast_dtype(dtype, target: str):
  return jnp.dtype(target) if jnp.issubdtype(dtype, jnp.floating) else dtype


def decode_mesh(train_mesh: Mesh | AbstractMesh, tensor: int) -> Mesh | AbstractMesh:
  """The training mesh's devices as (data = n / tensor, fsdp = 1, tensor), laid out along their links
  (`sharding.make_mesh`: on a TPU slice each tensor group is a compact block of chips, whose decode
  all-reduces stay short; on CPU the devices in order)."""
  shape = (train_mesh.size // tensor, 1, tensor)
  if isinstance(train_mesh, AbstractMesh):  # `hs2p plan` without devices
    return AbstractMesh(shape, MESH_AXES)
  return make_mesh(MeshConfig(data=shape[0], fsdp=1, tensor=tensor), list(np.asarray(train_mesh.devices).flat))


def tensor_groups(mesh: Mesh | AbstractMesh) -> dict[str, Any] | None:
  """How the decode mesh's tensor groups lie on the chips' torus, where devices have coordinates:
  {"extent": the largest bounding box of a group's chips, e.g. "2x2x2", "compact": whether every
  group fills its box (no group stretches over more links than its size needs)}; None elsewhere."""
  if isinstance(mesh, AbstractMesh):
    return None
  devices = np.asarray(mesh.devices)
  groups = devices.reshape(-1, devices.shape[-1])
  if getattr(groups[0, 0], "coords", None) is None:
    return None
  spans = [np.ptp(np.asarray([d.coords for d in g]), axis=0) + 1 for g in groups]
  widest = max(spans, key=lambda e: int(np.prod(e)))
  return {"extent": "x".join(str(int(x)) for x in widest),
          "compact": all(int(np.prod(e)) == groups.shape[1] for e in spans)}


def device_memory(device: jax.Device) -> int | None:
  """Bytes a device can hold (None where the runtime does not say, e.g. CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def degrees(devices: int, cfg: LlamaConfig, rows: int) -> list[int]:
  """Tensor-parallel degrees a copy can take: divisors of `devices` and of the heads whose
  devices / t groups split the `rows` decode rows."""
  return [t for t in range(1, devices + 1)
          if devices % t == 0 and cfg.num_heads % t == 0 and cfg.num_kv_heads % t == 0 and rows % (devices // t) == 0]


def smallest_fitting(copy_bytes: int, devices: int, cfg: LlamaConfig, rows: int, memory: int | None) -> int:
  """The smallest degree (`degrees`) whose share of a `copy_bytes` copy fits COPY_FRACTION of
  `memory`: the first where memory is unknown, the largest where none fits, 0 where there is none."""
  ok = degrees(devices, cfg, rows)
  fits = [t for t in ok if memory is None or copy_bytes / t <= COPY_FRACTION * memory]
  return (fits or ok[-1:] or [0])[0]


def choose_tensor(copy_bytes: int, devices: int, cfg: LlamaConfig, rows: int, memory: int | None,
                  chip: str | None = None, context: float = 0.0, dtype: str | None = None) -> int:
  """The rollout copy's degree (module docstring) for a `copy_bytes` copy in `dtype` (default
  cfg.dtype) on `devices` devices of `chip` with `memory` bytes each, `rows` rows decoding with
  `context` cached tokens; 0 where no degree splits the rows and heads."""
  t0 = smallest_fitting(copy_bytes, devices, cfg, rows, memory)
  if not t0 or not decode_time.known(chip):
    return t0
  fits = [t for t in degrees(devices, cfg, rows)
          if t == t0 or memory is None or copy_bytes / t <= COPY_FRACTION * memory]
  times = {t: decode_time.decode_time(cfg, copy_bytes, dtype or cfg.dtype, devices, t, rows, context, chip).seconds
           for t in fits}
  return min(times, key=lambda t: (times[t], t))


def layout_for(cfg: LlamaConfig, train_mesh: Mesh, rules: Rules, *, tensor: int = 0, dtype: str = "auto",
               rows: int, context: float = 0.0, memory: int | None = None, chip: str | None = None,
               train_graphdef: nnx.GraphDef | None = None) -> RolloutLayout:
  """The rollout layout of a policy of architecture `cfg` trained on `train_mesh`: `tensor` 0
  chooses the degree (`choose_tensor`, for `rows` rows decoding with `context` cached tokens on
  devices of `chip` with `memory` bytes; both default to the first device's), `dtype` "auto" is the
  compute dtype. The copy is of the model without adapters: a LoRA policy (`cfg.lora_rank`) is
  copied from its (adapters, base) merged through `train_graphdef`, so decoding pays nothing for them."""
  dtype = cfg.dtype if dtype == "auto" else dtype
  n = train_mesh.size
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("lm", cfg.replace(dtype=dtype, lora_rank=0))))
  if tensor == 0:
    if isinstance(train_mesh, Mesh):
      first = np.asarray(train_mesh.devices).flat[0]
      memory = device_memory(first) if memory is None else memory
      chip = chip or device_family(first.device_kind)
    tensor = choose_tensor(copy_bytes(abstract, dtype), n, cfg, rows, memory, chip, context, dtype)
    if tensor == 0:
      raise UserError(f"reinforce.rollout_tensor: no tensor-parallel degree splits {rows} decode rows and "
                      f"{cfg.num_kv_heads} KV heads over {n} devices; set reinforce.rollout_copy=false")
  elif n % tensor:
    raise UserError(f"reinforce.rollout_tensor={tensor} does not divide the {n} devices")
  mesh = decode_mesh(train_mesh, tensor)
  split = batch_split(mesh, rules, "cache_batch")
  if rows % split:
    raise UserError(f"reinforce.rollout_tensor={tensor}: {rows} decode rows do not split over its {split} groups")
  shardings = state_shardings(abstract, mesh, rules)
  stacked = jax.tree.map(lambda v: v.replace((v.get_metadata().get("axes") or (None,))[0] == "layers"), abstract,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
  if cfg.lora_rank and train_graphdef is None:
    raise ValueError("layout_for: a LoRA policy's copy needs its train_graphdef to merge the adapters")
  return RolloutLayout(mesh, rules, graphdef, shardings, dtype, tensor, abstract,
                       jax.jit(functools.partial(_cast_and_move, dtype, shardings, stacked, train_graphdef),
                               out_shardings=shardings))


def _cast_and_move(dtype: str, shardings: Any, stacked: Any, train_graphdef: Any, params: Any) -> Any:
  """Casts `params` to `dtype` and moves them to `shardings`, a layer at a time for stacked
  parameters: XLA moves between these layouts by gathering a whole array, so this bounds the
  transient to one layer of one matrix instead of the largest stacked tensor. A LoRA policy's
  (adapters, base) is merged first (`W + scale·A·B`, in float32 before the cast)."""
  if isinstance(params, tuple):
    params = nnx.state(merge_lora(model_from(train_graphdef, params)))
  def one(a, sh, is_stacked):
    a = a.astype(_cast_dtype(a.dtype, dtype))
    if not is_stacked:
      return a
    layer = NamedSharding(sh.mesh, P(*sh.spec[1:]))
    return jax.lax.map(lambda w: jax.lax.with_sharding_constraint(w, layer), a)
  return jax.tree.map(one, params, shardings, stacked)
