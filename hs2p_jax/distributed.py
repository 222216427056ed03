"""Multi-host start-up through `jax.distributed`, before anything touches the devices."""

from __future__ import annotations

import os
import socket
from typing import Callable

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


_fetches = 0


def once_per_host(fetch: Callable[[], str], what: str, timeout_s: int = 24 * 3600) -> str:
  """`fetch()` (a download into this host's cache, returning its local path) run by one process per
  host while the host's other processes wait; the path it returns, on every process. If it fails on
  any host, every process raises one UserError naming the first failure (process and host)."""
  global _fetches
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None or jax.process_count() == 1:
    try:
      return fetch()
    except UserError as e:
      raise UserError(f"{what}: {e}") from None
  _fetches += 1
  key, me = f"hs2p/fetch/{_fetches}", jax.process_index()
  client.key_value_set(f"{key}/host/{me}", socket.gethostname())
  client.wait_at_barrier(f"{key}/hosts", timeout_s * 1000)
  hosts = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(f"{key}/host/")}
  leader = min(p for p, h in hosts.items() if h == hosts[me])
  if me == leader:
    try:
      client.key_value_set(f"{key}/done/{me}", "ok:" + fetch())
    except UserError as e:
      client.key_value_set(f"{key}/done/{me}", f"error:process {me} on {hosts[me]}: {e}")
  client.wait_at_barrier(f"{key}/fetched", timeout_s * 1000)
  done = dict(client.key_value_dir_get(f"{key}/done/"))
  failed = sorted(v for v in done.values() if v.startswith("error:"))
  if failed:
    raise UserError(f"{what}: {failed[0][6:]}" + (f" (and {len(failed) - 1} more hosts)" if len(failed) > 1 else ""))
  return done[f"{key}/done/{leader}"][3:]
