"""`hs2p train-rm`, `hs2p reinforce`, `hs2p train-dpo` and `hs2p train-sft`."""

from __future__ import annotations

from hs2p_jax import config as config_lib
from hs2p_jax.distributed import initialize


def _start(cfg) -> None:
  d = cfg.dist
  initialize(d.coordinator, d.num_processes, d.process_id, d.local_device_ids)


def train_rm_command(config: str, overrides: list[str], out: str) -> int:
  cfg = config_lib.load(config_lib.RunConfig, config, overrides)
  _start(cfg)
  from hs2p_jax.train.rm_loop import train_rm
  train_rm(cfg, out)
  return 0


def reinforce_command(config: str, overrides: list[str], out: str) -> int:
  cfg = config_lib.load(config_lib.ReinforceRunConfig, config, overrides)
  _start(cfg)
  from hs2p_jax.train.reinforce_loop import train_reinforce
  train_reinforce(cfg, out)
  return 0


def train_dpo_command(config: str, overrides: list[str], out: str) -> int:
  cfg = config_lib.load(config_lib.DPORunConfig, config, overrides)
  _start(cfg)
  from hs2p_jax.train.lm_loop import train_dpo
  train_dpo(cfg, out)
  return 0


def train_sft_command(config: str, overrides: list[str], out: str) -> int:
  cfg = config_lib.load(config_lib.SFTRunConfig, config, overrides)
  _start(cfg)
  from hs2p_jax.train.lm_loop import train_sft
  train_sft(cfg, out)
  return 0
