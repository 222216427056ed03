"""What tells runs apart: code and library versions, devices and mesh, and the data each run read.

`write(run_dir, ...)` puts `provenance.json` beside a run's `config.json`:
  hs2p_jax: {version, git: {commit, dirty} | null}   python, platform
  packages: {jax, jaxlib, flax, optax, orbax-checkpoint, grain, transformers, datasets, numpy: version | null}
  devices: {platform, kind, count, local_count, processes}   mesh: {data, fsdp, tensor}
  data: {name: {source, origin: {path, bytes, sha256} | {dataset, data_dir, split, rows, revision,
         fingerprint}, read, kept, dropped, invalid, truncated, dropped_overlong, [steps, examples_asked,
         epochs, wraps_at_step]}}
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import jax

from hs2p_jax import storage
from hs2p_jax.atomic import write_json

FILE = "provenance.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "datasets", "numpy")


def _version(dist: str) -> Optional[str]:
  try:
    return md.version(dist)
  except md.PackageNotFoundError:
    return None


@functools.lru_cache(maxsize=1)
def git_state() -> Optional[dict[str, Any]]:
  """{commit, dirty} of the git checkout this package is imported from; None outside one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return None  # an installed wheel, or a checkout of some other project around site-packages
  try:
    run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10, check=True)
    commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


def environment(mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """Code, library and device facts of this process (the same on every process of a run)."""
  from hs2p_jax import __version__
  devices = jax.devices()
  return {
      "hs2p_jax": {"version": _version("hs2p-jax") or __version__, "git": git_state()},
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "packages": {p: _version(p) for p in PACKAGES},
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                  "local_count": jax.local_device_count(), "processes": jax.process_count()},
      "mesh": dict(mesh.shape) if mesh is not None else None,
  }


def device_line(mesh: Optional[jax.sharding.Mesh] = None) -> str:
  """One line for the start of a command: the devices (kind, count, processes) and the mesh."""
  devices = jax.devices()
  n, procs = len(devices), jax.process_count()
  line = (f"devices: {n} x {devices[0].device_kind} ({devices[0].platform}), {procs} process"
          f"{'es' if procs > 1 else ''}")
  if mesh is not None:
    shape = dict(mesh.shape)
    line += "; mesh " + " x ".join(f"{k} {v}" for k, v in shape.items())
  return line


def epoch_plan(num_examples: int, batch_size: int, steps: int) -> dict[str, Any]:
  """How `steps` steps of `batch_size` examples cover `num_examples`: epochs, and the first step
  that reads an example a second time (None if none does)."""
  asked = steps * batch_size
  wraps = num_examples // batch_size + 1 if asked > num_examples else None
  return {"steps": steps, "examples_asked": asked, "epochs": asked / num_examples, "wraps_at_step": wraps}


def data_entry(loader, steps: Optional[int] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
  """A loader's source, origin and load counts; with `steps`, its epoch plan."""
  r = loader.report
  out = {"source": r.source, "origin": dict(r.origin), "read": r.read, "kept": r.kept, "dropped": dict(r.dropped),
         "invalid": r.invalid, "truncated": r.truncated, "dropped_overlong": r.dropped_overlong}
  if steps is not None:
    out.update(epoch_plan(len(loader.examples), batch_size, steps))
  return out


def describe(name: str, entry: dict[str, Any]) -> str:
  """One line for the start of a run: what was kept, dropped and truncated, and whether steps wrap."""
  dropped = sum(entry["dropped"].values())
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(entry["dropped"].items()))
  line = (f"{name} data {entry['source']}: kept {entry['kept']} of {entry['read']} read, dropped {dropped}"
          + (f" ({reasons})" if reasons else "") + f", invalid {entry['invalid']}, truncated {entry['truncated']}"
          + f", dropped as over-long {entry['dropped_overlong']}")
  if "epochs" in entry:
    line += f"; {entry['steps']} steps read {entry['examples_asked']} examples = {entry['epochs']:.2f} epochs"
    if entry["wraps_at_step"] is not None:
      line += f" (wraps into epoch 2 at step {entry['wraps_at_step']})"
  return line


def write(run_dir: str, mesh: Optional[jax.sharding.Mesh], data: dict[str, dict[str, Any]],
          **extra: Any) -> dict[str, Any]:
  """Writes `run_dir/provenance.json` (process 0) and returns its contents."""
  info = {**environment(mesh), "data": data, **extra}
  if jax.process_index() == 0:
    write_json(storage.join(run_dir, FILE), _plain(info))
  return info


def _plain(obj: Any) -> Any:
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return _plain(dataclasses.asdict(obj))
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  return obj
