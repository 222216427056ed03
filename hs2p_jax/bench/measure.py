"""Timing, memory and load readings shared by the JAX and PyTorch sides of a benchmark."""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (VmHWM: unlike ru_maxrss, not inherited over exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def times_of(run: Callable[[], Any], steps: int) -> list[float]:
  times = []
  for _ in range(max(steps, 1)):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def rounded(x: float | None, nd: int = 4) -> float | None:
  return None if x is None else float(f"{x:.{nd}g}")


def load_avg() -> float:
  """1-minute load average (other processes on the machine skew CPU timings)."""
  return round(os.getloadavg()[0], 2)

