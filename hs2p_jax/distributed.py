"""Multi-host start-up through `jax.distributed`, before anything touches the devices."""

from __future__ import annotations

import os

import jax

from hs2p_jax.errors import UserError

_started = False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids=None, heartbeat_timeout: float = 30.0) -> None:
  """Starts the multi-process runtime once.

  With a coordinator, num_processes and process_id given, uses them. Otherwise, on a TPU pod, under
  SLURM (several tasks) or with JAX's own environment variables, lets `jax.distributed` detect
  the cluster; on one machine with none of these it does nothing (single process). jax's own
  heartbeat timeout is set a minute past `heartbeat_timeout`, so that the run's watchdog
  (`train.watchdog`) reports a lost process before jax aborts.
  """
  global _started
  if _started:
    return
  explicit = [coordinator, num_processes, process_id]
  if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
    raise UserError("dist: set all of dist.coordinator, dist.num_processes, dist.process_id, or none")
  if coordinator is not None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f"dist.process_id={process_id} out of range for dist.num_processes={num_processes}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=jax_heartbeat(heartbeat_timeout))
  elif _cluster_detected():
    jax.distributed.initialize(local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=jax_heartbeat(heartbeat_timeout))
  _started = True


def jax_heartbeat(heartbeat_timeout: float) -> int:
  return max(100, int(heartbeat_timeout) + 60)


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
    return True
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  # Multi-host TPU slices publish their worker list; single-host TPU VMs need no initialisation.
  return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))


def compile_cache(path: str | None) -> None:
  """Keeps compiled programs under `path` (on storage every host shares, for pods), so that a relaunched
  or resumed run loads its steps instead of compiling them again. Call before anything compiles."""
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
