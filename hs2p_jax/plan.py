"""Per-device memory of the reward-model train step on a mesh, against a chip's HBM.

Parameters, AdamW state and the batch are counted exactly: each leaf of the abstract model
(`nnx.eval_shape`), of its optax state and of the stacked batch holds prod(shard shape) * itemsize
bytes on a device, its shard shape coming from the PartitionSpec the logical-axis rules give it on
the mesh (a replicated leaf counts fully). Gradients are float32 like the parameters, twice over
(accumulator + one micro-batch's gradient) when a step accumulates several micro-batches.

Activations are an estimate (`activations`). Per device: r rows of a micro-batch (the batch axes
split the rows where they divide them), T = data.max_length tokens per row, hidden size d, h query
and g key/value heads, head dim e, MLP width f (heads and MLP split by the tensor axis), compute
dtype bytes b, L layers.
  saved for the backward pass, per layer; the scan keeps each layer's input, the remat policy
  decides what else:
    every policy          r*T*d*b                                layer input
    save_attention_out    + r*T*h*e*b                            attention output
    dots_no_batch         + r*T*((h + 2g)*e + 2d + 2f)*b         projection and MLP matmuls
    dots                  dots_no_batch + r*h*T*T*4 + r*T*h*e*4  + attention matmuls (float32)
    none                  dots + r*h*T*T*b + r*T*(2d + (h + g)*e + 2f)*b   + softmax, norms, RoPE, SwiGLU
  transient, once (one layer's recomputed forward and its backward):
    attention             r*h*T*T*(4 + 4 + b)  logits and their gradient (float32), probabilities:
                          the "reference" and "xla" kernels materialise [r, h, T, T]; "splash" is
                          fused (0); "cudnn" is fused but for its head-shared mask bias, r*T*T*b
    MLP                   3*r*T*f*b
    mask                  r*T*T (bool; none with "splash", which masks by segment ids)
    FSDP gather           one layer's weights gathered over the batch axes, in b bytes, plus their
                          float32 gradient before the reduce-scatter
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax.config import RunConfig
from hs2p_jax.errors import UserError
from hs2p_jax.model import create
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.plan_table import size
from hs2p_jax.sharding import MESH_AXES, MeshConfig, Rules, batch_split, logical_to_spec, mesh_shape, state_shardings
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.rm import Objective

GiB = 1 << 30
# Per-chip HBM, GiB: Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p,
# v6e) and NVIDIA's A100 80GB, H100 SXM and H200 datasheets (their "GB" taken as GiB).
HBM_SOURCE = "Cloud TPU system architecture docs (v4, v5e, v5p, v6e); NVIDIA A100 80GB, H100 SXM, H200 datasheets"
# JAX on a GPU preallocates this fraction of its memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
GPU_DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator: HBM per device (a JAX device: a TPU chip, megacore included, or a GPU)."""

  name: str
  hbm_gib: float
  kind: str                  # "tpu" | "gpu"
  cores_per_chip: int = 1    # TPU slice names count TensorCores: v5p-128 is 64 chips
  torus_dims: int = 0        # TPU topology rank (libtpu topology names "v5p:4x4x8")


CHIPS = {c.name: c for c in (
    Chip("v4", 32, "tpu", 2, 3), Chip("v5e", 16, "tpu", 1, 2), Chip("v5p", 95, "tpu", 2, 3),
    Chip("v6e", 32, "tpu", 1, 2), Chip("a100", 80, "gpu"), Chip("h100", 80, "gpu"), Chip("h200", 141, "gpu"))}

# Chips -> the slice shape Cloud TPU uses for that many chips (3D torus: v4, v5p; 2D: v5e, v6e).
_TOPOLOGIES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
        512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


@dataclasses.dataclass(frozen=True)
class Target:
  """What to plan for: `devices` JAX devices of `chip` (None: unknown HBM) in a (data, fsdp, tensor) mesh."""

  chip: Chip | None
  devices: int
  mesh: tuple[int, int, int]

  @property
  def hbm_bytes(self) -> int | None:
    return int(self.chip.hbm_gib * GiB) if self.chip else None

  @property
  def slice_name(self) -> str | None:
    """The Cloud TPU accelerator type of this many chips (e.g. v5p-128 = 64 chips)."""
    if not self.chip or self.chip.kind != "tpu":
      return None
    return f"{self.chip.name}-{self.devices * self.chip.cores_per_chip}"

  @property
  def topology(self) -> str | None:
    """libtpu's topology name for AOT compilation ("v5p:4x4x8"), None where there is none."""
    if not self.chip or self.chip.kind != "tpu":
      return None
    shape = _TOPOLOGIES[self.chip.torus_dims].get(self.devices)
    return f"{self.chip.name}:{shape}" if shape else None


def resolve_target(chip: str | None, devices: int | None, mesh: MeshConfig) -> Target:
  """`--chip` (a chip, or a TPU slice such as v5p-128) and `--devices` -> the device count and mesh shape."""
  spec, slice_devices = None, None
  if chip:
    name, _, size = chip.lower().partition("-")
    if name not in CHIPS:
      raise UserError(f"--chip {chip}: unknown; expected one of {', '.join(CHIPS)} (or a TPU slice such as v5p-128)")
    spec = CHIPS[name]
    if size:
      if spec.kind != "tpu" or not size.isdigit() or int(size) % spec.cores_per_chip or int(size) == 0:
        raise UserError(f"--chip {chip}: expected a TPU slice name such as v5p-128 (TensorCores) or v5e-16 (chips)")
      slice_devices = int(size) // spec.cores_per_chip
  if devices is not None and devices <= 0:
    raise UserError(f"--devices {devices}: must be positive")
  if devices is not None and slice_devices is not None and devices != slice_devices:
    raise UserError(f"--devices {devices} disagrees with --chip {chip} ({slice_devices} chips)")
  n = devices or slice_devices
  if n is None:
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    n = math.prod(sizes) if all(s > 0 for s in sizes) else 1
  return Target(spec, n, mesh_shape(mesh, n))


# ---------------------------------------------------------------------------------------------
# Abstract step inputs


@dataclasses.dataclass
class StepInputs:
  """Everything the jitted train step takes, as ShapeDtypeStructs carrying their shardings."""

  graphdef: Any
  tx: optax.GradientTransformation
  objective: Objective
  params: Any                # nnx State of float32 parameters
  opt_state: Any             # optax state (AdamW mu, nu, counts)
  batch: dict[str, jax.ShapeDtypeStruct]  # stacked micro-batches [k, ...]


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_layout(cfg: RunConfig, split: int = 1) -> dict[str, int]:
  """Worst-case micro-batch shape: N examples or pairs, R rows of T tokens (`real_rows` of them
  sequences, the rest padding so that R divides the `split` devices of the batch axes, as the data
  loader pads them), k micro-batches a step."""
  tc = cfg.train
  n = tc.micro_batch_size or tc.batch_size
  real = n if tc.objective == "regression" else 2 * n
  return {"examples": n, "rows": -(-real // split) * split, "real_rows": real, "seq_len": cfg.data.max_length,
          "micro_batches": tc.batch_size // n}


def abstract_batch(cfg: RunConfig, num_attributes: int, mesh, rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The stacked batch `hs2p_jax.train.rm` steps take, sharded as `train.feed.put_batch` places it:
  input_ids, segment_ids [k, R, T] split over the batch axes; the rest [k, N, ...] replicated."""
  lay = batch_layout(cfg, batch_split(mesh, rules))
  k, n, r, t = lay["micro_batches"], lay["examples"], lay["rows"], lay["seq_len"]
  rows = NamedSharding(mesh, logical_to_spec((None, "act_batch", None), (k, r, t), mesh, rules))
  rep = NamedSharding(mesh, P())

  def sds(shape, dtype, sharding=rep):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  out = {"input_ids": sds((k, r, t), jnp.int32, rows), "segment_ids": sds((k, r, t), jnp.int32, rows),
         "valid": sds((k, n), jnp.bool_), "example_id": sds((k, n), jnp.int32)}
  if cfg.train.objective == "regression":
    out.update(score_row=sds((k, n), jnp.int32), score_index=sds((k, n), jnp.int32),
               labels=sds((k, n, num_attributes), jnp.float32), label_mask=sds((k, n, num_attributes), jnp.bool_))
  else:
    out.update(score_row=sds((k, n, 2), jnp.int32), score_index=sds((k, n, 2), jnp.int32),
               magnitude=sds((k, n), jnp.float32))
  return out


def step_inputs(cfg: RunConfig, model_cfg: LlamaConfig, mesh, rules: Rules) -> StepInputs:
  """Abstract, sharded inputs of the train step for `model_cfg` on `mesh` (a Mesh or an AbstractMesh)."""
  from hs2p_jax.sharding import opt_state_shardings

  tc, n_attr = cfg.train, cfg.model.num_attributes
  model = nnx.eval_shape(lambda: create("reward", model_cfg, n_attr, cfg.model.seed))
  graphdef, state = nnx.split(model)
  param_sh = state_shardings(state, mesh, rules)
  params = _with_shardings(state, param_sh)
  tx = optimizer_from(tc)
  abs_opt = jax.eval_shape(tx.init, params)
  opt_state = _with_shardings(abs_opt, opt_state_shardings(abs_opt, param_sh, mesh))
  weights = tuple(float(w) for w in attribute_weights(cfg.model.reward_weights, n_attr))
  objective = Objective(tc.objective, tc.bt_variant, weights)
  return StepInputs(graphdef, tx, objective, params, opt_state, abstract_batch(cfg, n_attr, mesh, rules))


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (replicated leaves count fully)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def num_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# Activations and the breakdown


def _per_device(axes: tuple, shape: tuple, mesh, rules: Rules) -> tuple[int, ...]:
  spec = logical_to_spec(axes, shape, mesh, rules)
  return NamedSharding(mesh, spec).shard_shape(shape)


def _batch_axes(rules: Rules) -> set[str]:
  target = dict(rules).get("act_batch")
  return set(target if isinstance(target, tuple) else (target,)) - {None}


def gathered_layer_bytes(params: Any, mesh, rules: Rules, dtype_bytes: int) -> int:
  """Bytes of one layer's weights on a device once gathered over the batch (FSDP) axes."""
  sizes, batch_axes = dict(mesh.shape), _batch_axes(rules)
  total = 0
  for x in jax.tree.leaves(params.get("model", {}).get("layers", {})):
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    elems = 1
    for dim, entry in zip(x.shape[1:], spec[1:]):  # [L, ...]: one layer
      names = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
      elems *= dim // math.prod(sizes[a] for a in names if a not in batch_axes)
    total += elems * dtype_bytes
  return total


def activations(model_cfg: LlamaConfig, layout: dict[str, int], params: Any, mesh, rules: Rules) -> dict[str, int]:
  """Estimated activation bytes per device (module docstring): saved per layer x L, and transients."""
  c = model_cfg
  b = jnp.dtype(c.dtype).itemsize
  rows, t = layout["rows"], layout["seq_len"]
  r = _per_device(("act_batch",), (rows,), mesh, rules)[0]
  h = _per_device(("act_heads",), (c.num_heads,), mesh, rules)[0]
  g = _per_device(("act_kv_heads",), (c.num_kv_heads,), mesh, rules)[0]
  f = _per_device(("act_mlp",), (c.intermediate_size,), mesh, rules)[0]
  d, e, tok = c.hidden_size, c.head_dim, r * t
  logits = r * h * t * t
  dots_nb = tok * ((h + 2 * g) * e + 2 * d + 2 * f) * b
  extra = {
      "full": 0,
      "save_attention_out": tok * h * e * b,
      "dots_no_batch": dots_nb,
      "dots": dots_nb + logits * 4 + tok * h * e * 4,
      "none": dots_nb + logits * 4 + tok * h * e * 4 + logits * b + tok * (2 * d + (h + g) * e + 2 * f) * b,
  }[c.remat]
  per_layer = tok * d * b + extra
  fsdp = math.prod(dict(mesh.shape)[a] for a in _batch_axes(rules)) > 1
  gathered = gathered_layer_bytes(params, mesh, rules, b) if fsdp else 0
  return {
      "rows_per_device": r,
      "saved_per_layer": per_layer,
      "saved": per_layer * c.num_layers,
      "attention_transient": {"splash": 0, "cudnn": r * t * t * b}.get(c.attention, logits * (8 + b)),
      "mlp_transient": 3 * tok * f * b,
      "mask": 0 if c.attention == "splash" else r * t * t,
      "fsdp_gathered_layer": gathered + (gathered // b) * 4,
  }


def model_flops(cfg: RunConfig, model_cfg: LlamaConfig, attention_only: bool = False) -> float:
  """Model FLOPs of one optimizer step over its real rows (`bench.flops.train_flops`: 6N per token
  plus attention; padding rows, remat recomputation and the head not counted); `attention_only`:
  the attention term alone (12 L T^2 H Dh per row)."""
  from hs2p_jax.bench.flops import attention_flops, train_flops
  lay = batch_layout(cfg)
  rows, t = lay["real_rows"] * lay["micro_batches"], lay["seq_len"]
  return attention_flops(model_cfg, rows, t) if attention_only else train_flops(model_cfg, rows, t)


def analytic(cfg: RunConfig, model_cfg: LlamaConfig, inputs: StepInputs, mesh, rules: Rules) -> dict[str, Any]:
  """Per-device bytes of params, optimizer state, gradients, batch and activations (module docstring)."""
  layout = batch_layout(cfg, batch_split(mesh, rules))
  params = device_bytes(inputs.params)
  grads = params * (2 if layout["micro_batches"] > 1 else 1)
  act = activations(model_cfg, layout, inputs.params, mesh, rules)
  act_total = sum(v for k, v in act.items() if k not in ("rows_per_device", "saved_per_layer"))
  out = {"params": params, "optimizer": device_bytes(inputs.opt_state), "gradients": grads,
         "batch": device_bytes(inputs.batch), "activations": act_total}
  out["total"] = sum(out.values())
  out["activation_terms"] = act
  return out


def warnings_for(cfg: RunConfig, target: Target, analytic: dict[str, Any], rules: Rules) -> list[str]:
  """Lines worth reading: a batch the batch axes cannot split, state too big for the devices, GPU preallocation."""
  out = []
  sizes = dict(zip(MESH_AXES, target.mesh))
  split = math.prod(sizes[a] for a in _batch_axes(rules))
  lay = batch_layout(cfg, split)
  if lay["rows"] != lay["real_rows"]:
    out.append(f"micro-batch rows ({lay['real_rows']}) are padded to {lay['rows']} to split over the batch axes "
               f"data*fsdp ({split} devices): {1 - lay['real_rows'] / lay['rows']:.0%} of the step computes padding; "
               f"make train.micro_batch_size a multiple of {split // math.gcd(split, 2) if cfg.train.objective == 'bt' else split}")
  hbm = target.hbm_bytes
  state = analytic["params"] + analytic["optimizer"] + analytic["gradients"]
  if hbm and state > hbm:
    out.append(f"params, AdamW state and gradients alone take {size(state)} per device: sharded further (mesh.fsdp) "
               f"they need at least {math.ceil(state * target.devices / hbm)} x {target.chip.name}, before activations")
  if target.chip and target.chip.kind == "gpu":
    out.append(f"JAX preallocates {GPU_DEFAULT_MEM_FRACTION:.0%} of GPU memory by default; set "
               "XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95) to use more")
  return out


def verdict(peak: int, hbm: int | None) -> dict[str, Any]:
  """fits / tight (under 10% headroom) / does not fit, with the headroom, against `hbm` bytes."""
  if hbm is None:
    return {"fits": None, "verdict": "unknown (no --chip)", "peak": peak, "hbm": None, "headroom": None}
  headroom = hbm - peak
  word = "does not fit" if headroom < 0 else ("tight" if headroom < 0.1 * hbm else "fits")
  return {"fits": headroom >= 0, "verdict": word, "peak": peak, "hbm": hbm, "headroom": headroom,
          "headroom_fraction": round(headroom / hbm, 4)}
