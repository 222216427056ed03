"""`hs2p train-rm`, `hs2p reinforce`, `hs2p ppo`, `hs2p train-dpo` and `hs2p train-sft`."""

from __future__ import annotations

import importlib
import sys

from hs2p_jax import config as config_lib
from hs2p_jax.distributed import compile_cache, initialize

# command -> (its config class, "module:function" that trains it into an output directory)
TRAINERS = {
    "train-rm": ("RunConfig", "hs2p_jax.train.rm_trainer:train_rm"),
    "reinforce": ("ReinforceRunConfig", "hs2p_jax.rl.reinforce_trainer:train_reinforce"),
    "ppo": ("PPORunConfig", "hs2p_jax.rl.ppo_trainer:train_ppo"),
    "train-dpo": ("DPORunConfig", "hs2p_jax.train.dpo_trainer:train_dpo"),
    "train-sft": ("SFTRunConfig", "hs2p_jax.train.sft_trainer:train_sft"),
}


def train_command(command: str, config: str, overrides: list[str], out: str, allow_config_change: bool = False) -> int:
  """Loads and validates the config, starts the multi-host runtime, trains (or resumes) into `out`
  (`allow_config_change`: also where `out` holds this run with another config, recorded)."""
  cls, target = TRAINERS[command]
  cfg = config_lib.load(getattr(config_lib, cls), config, overrides)
  d = cfg.dist
  initialize(d.coordinator, d.num_processes, d.process_id, d.local_device_ids, d.heartbeat_timeout)
  compile_cache(d.compile_cache)
  module, fn = target.split(":")
  last = getattr(importlib.import_module(module), fn)(cfg, out, allow_config_change)
  _say_next(out, getattr(cfg, "model", None) or cfg.policy, last)
  return 0


def _say_next(out: str, mc: config_lib.ModelConfig, last: dict) -> None:
  """The closing line: where the model is and the commands that evaluate, export or serve it."""
  import jax
  from hs2p_jax import storage
  if jax.process_index() != 0:
    return
  model = storage.join(storage.absolute(out), "model")
  step = f" (step {last['step']})" if last and "step" in last else ""
  if mc.kind == "reward":
    nxt = (f"hs2p eval --checkpoint {model} --data FILE | hs2p convert --checkpoint {model} --to-hf DIR | "
           f"hs2p serve --checkpoint {model}")
  else:
    nxt = f"hs2p convert --checkpoint {model} --to-hf DIR (a transformers model)"
  print(f"done: the model is {model}{step}; next: {nxt}", file=sys.stderr, flush=True)
