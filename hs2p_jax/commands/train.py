"""`hs2p train-rm`, `hs2p reinforce`, `hs2p ppo`, `hs2p train-dpo` and `hs2p train-sft`."""

from __future__ import annotations

import importlib

from hs2p_jax import config as config_lib
from hs2p_jax.distributed import compile_cache, initialize

# command -> (its config class, "module:function" that trains it into an output directory)
TRAINERS = {
    "train-rm": ("RunConfig", "hs2p_jax.train.rm_trainer:train_rm"),
    "reinforce": ("ReinforceRunConfig", "hs2p_jax.train.reinforce_trainer:train_reinforce"),
    "ppo": ("PPORunConfig", "hs2p_jax.train.ppo_trainer:train_ppo"),
    "train-dpo": ("DPORunConfig", "hs2p_jax.train.dpo_trainer:train_dpo"),
    "train-sft": ("SFTRunConfig", "hs2p_jax.train.sft_trainer:train_sft"),
}


def train_command(command: str, config: str, overrides: list[str], out: str) -> int:
  """Loads and validates the config, starts the multi-host runtime, trains (or resumes) into `out`."""
  cls, target = TRAINERS[command]
  cfg = config_lib.load(getattr(config_lib, cls), config, overrides)
  d = cfg.dist
  initialize(d.coordinator, d.num_processes, d.process_id, d.local_device_ids, d.heartbeat_timeout)
  compile_cache(d.compile_cache)
  module, fn = target.split(":")
  getattr(importlib.import_module(module), fn)(cfg, out)
  return 0
