"""Time of one decode step of the rollout copy, from datasheet figures: what the rollout layout's
tensor-parallel degree is chosen by (`hs2p_jax.rl.layout`) and what `hs2p plan` reports.

`n` devices in groups of `t` (tensor-parallel within a group, the rows split over the n / t groups).
Per new token, each device
  reads its share of the copy (copy_bytes / t) and of its group's KV cache from HBM,
  computes its share of the group's FLOPs (2 N + LM head + attention over the context, per row),
  and, for t > 1, all-reduces the [rows / (n / t), D] activations twice per layer within its group
  (after attention and after the MLP), as a ring: 2 (t - 1) hops of latency and 2 (t - 1) / t of
  the message over one link.
  time = max(bytes / HBM bandwidth, FLOPs / peak) + 2 L * all-reduce
The KV bytes a device reads do not depend on t (a group t times larger holds t times the rows and
1 / t of their heads); the weight bytes fall as 1 / t and the all-reduces grow with t, hence a best
degree. Decoding is bandwidth-bound: this is a lower bound on the real step, not a measurement.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hs2p_jax.roofline.flops import PEAK_BANDWIDTH, PEAK_FLOPS, decoder_matmul_params

# (bytes/s of one link in one direction, seconds per hop) for the all-reduce of a tensor-parallel
# group [estimates from datasheets: v5p ICI 4,800 Gbps per chip over 6 links; v5e 1,600 Gbps over
# 4; NVLink 4 (H100, H200) 900 GB/s and NVLink 3 (A100) 600 GB/s both directions together; hop
# latencies of NCCL's and the ICI's small-message all-reduce, order of magnitude].
LINKS: dict[str, tuple[float, float]] = {
    "v5p": (100e9, 1e-6), "v5e": (50e9, 1e-6),
    "h100": (450e9, 2e-6), "h100-pcie": (450e9, 2e-6), "h200": (450e9, 2e-6), "a100": (300e9, 2e-6)}
# GPU groups larger than a host (8 GPUs) cross the network: 400 Gb/s per GPU [estimate].
GPUS_PER_HOST = 8
NETWORK_LINK = (50e9, 5e-6)


@dataclasses.dataclass(frozen=True)
class DecodeTime:
  """One decode step (one new token for every row) at degree `tensor`, per device."""

  tensor: int
  bytes: int            # HBM bytes read: the copy's share + the KV cache's
  flops: float          # model FLOPs
  comm_seconds: float   # the group's all-reduces
  seconds: float        # max(bytes / bandwidth, flops / peak) + comm_seconds

  def as_dict(self, new_tokens: int) -> dict:
    return {"tensor": self.tensor, "bytes_per_token": self.bytes, "flops_per_token": self.flops,
            "comm_seconds_per_token": self.comm_seconds, "seconds_per_token": self.seconds,
            "seconds_per_rollout": self.seconds * new_tokens}


def known(chip: str | None) -> bool:
  """Whether `chip` (a PEAK_FLOPS family name) has the figures `decode_time` needs."""
  return chip in PEAK_BANDWIDTH and chip in LINKS and chip in PEAK_FLOPS


def decode_time(cfg, copy_bytes: int, dtype: str, devices: int, tensor: int, rows: int, context: float,
                chip: str) -> DecodeTime:
  """The step of `rows` rows (all groups together) with `context` cached tokens each, `copy_bytes`
  the whole copy, computing in `dtype` (its activations and KV cache too); module docstring."""
  itemsize = jnp.dtype(dtype).itemsize
  group_rows = rows * tensor / devices
  kv = 2 * cfg.num_layers * group_rows * context * cfg.num_kv_heads / tensor * cfg.head_dim * itemsize
  hbm = copy_bytes / tensor + kv
  per_row = (2 * decoder_matmul_params(cfg) + 2 * cfg.hidden_size * cfg.vocab_size
             + 4 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim)
  flops = per_row * group_rows / tensor
  comm = 0.0
  if tensor > 1:
    link, hop = NETWORK_LINK if chip in ("h100", "h100-pcie", "h200", "a100") and tensor > GPUS_PER_HOST \
        else LINKS[chip]
    message = group_rows * cfg.hidden_size * itemsize
    comm = 2 * cfg.num_layers * (2 * (tensor - 1) * hop + 2 * (tensor - 1) / tensor * message / link)
  peak = PEAK_FLOPS[chip].get(dtype) or PEAK_FLOPS[chip]["bfloat16"]
  seconds = max(hbm / PEAK_BANDWIDTH[chip], flops / peak) + comm
  return DecodeTime(tensor, int(hbm), float(flops), comm, seconds)
