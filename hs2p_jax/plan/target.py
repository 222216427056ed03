"""What a plan is for: a chip's HBM, the device count and the mesh, and the verdict against that HBM."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hs2p_jax.errors import UserError
from hs2p_jax.sharding import MeshConfig, mesh_shape

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
  def platform(self) -> str:
    """The platform the target's devices run ("tpu", "gpu"; "cpu" without a chip)."""
    return self.chip.kind if self.chip else "cpu"

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

  def describe(self) -> dict[str, Any]:
    """The target as the report's `target` entry."""
    return {"chip": self.chip.name if self.chip else None, "devices": self.devices, "slice": self.slice_name,
            "hbm": self.hbm_bytes, "hbm_source": HBM_SOURCE, "mesh": dict(zip(("data", "fsdp", "tensor"), self.mesh))}


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


def verdict(peak: int, hbm: int | None) -> dict[str, Any]:
  """fits / tight (under 10% headroom) / does not fit, with the headroom, against `hbm` bytes."""
  if hbm is None:
    return {"fits": None, "verdict": "unknown (no --chip)", "peak": peak, "hbm": None, "headroom": None}
  headroom = hbm - peak
  word = "does not fit" if headroom < 0 else ("tight" if headroom < 0.1 * hbm else "fits")
  return {"fits": headroom >= 0, "verdict": word, "peak": peak, "hbm": hbm, "headroom": headroom,
          "headroom_fraction": round(headroom / hbm, 4)}


def final_verdict(compiled: dict[str, Any], analytic_bytes: int, target: Target, analytic_basis: str = "analytic"
                  ) -> dict[str, Any]:
  """The plan's verdict: on the TPU compiler's peak when there is one, else on `analytic_bytes`."""
  on_chip = compiled["status"] == "ok" and compiled["compiler"].startswith("tpu")
  out = verdict(compiled["peak"] if on_chip else analytic_bytes, target.hbm_bytes)
  out["basis"] = "compiled for the chip" if on_chip else analytic_basis
  return out


def gpu_warnings(target: Target) -> list[str]:
  if target.chip and target.chip.kind == "gpu":
    return [f"JAX preallocates {GPU_DEFAULT_MEM_FRACTION:.0%} of GPU memory by default; set "
            "XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95) to use more"]
  return []
