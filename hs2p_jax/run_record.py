"""A run directory's record of what ran: the config it started with, written once, and every command since.

`DIR/config.json` is the resolved config of the command that started the run; it is never rewritten
once the run holds state (a checkpoint or a final model). `DIR/run.json` names that command and
lists each session: when it started, the step it resumed from, the keys it changed and by what leave.
A later command into the same directory compares its resolved config with the run's current one
(config.json with the changes recorded since) before it writes anything:
  - a command of another kind (`hs2p train-dpo` into a `train-rm` run) is refused;
  - keys in `CONTINUATION_KEYS` may change (the step count, cadences, the mesh, the runtime): the
    change is recorded as a session of the run;
  - any other difference is refused with one line naming each key and both values (exit 2), unless
    the command is given `--allow-config-change`, which is recorded with the keys it changed.
A directory whose earlier attempt saved nothing (no checkpoint, no model, no finished pipeline stage)
holds no run yet: a new config starts it afresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import re
import sys
from typing import Any

import jax

from hs2p_jax import storage
from hs2p_jax.atomic import write_json
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LORA_TARGETS

CONFIG, RECORD = "config.json", "run.json"

# Keys whose change leaves every number a run computes as it was: where the arrays live, how the
# processes meet, how often it logs, evaluates and saves, the kernels and remat of the same model.
RUNTIME_KEYS = ("mesh.*", "dist.*", "name", "data.num_workers", "*.log_every", "*.eval_every", "*.eval_batches",
                "*.save_every", "*.keep_checkpoints", "*.async_checkpoint", "*.sample_every", "*.reward_timeout",
                "*.reward_retries", "*.remat", "*.attention", "*.scan_layers", "*.weight_grad")
# Keys a continuation may change: the runtime keys and the step count (never below the steps done).
CONTINUATION_KEYS = RUNTIME_KEYS + ("*.steps",)
# Keys whose default became "unset" (null) in a later version, and the value they had: a recorded
# value equal to it counts as unset (model.lora's keys, now the starting adapters' where they exist).
FORMER_DEFAULTS = {"lora.rank": 0, "lora.alpha": 16.0, "lora.dropout": 0.0, "lora.targets": list(LORA_TARGETS),
                   "lora.train_head": True}
# The section that tells a run's command apart (a config.json from before run.json existed).
_COMMAND_OF = {"train": "train-rm", "dpo": "train-dpo", "sft": "train-sft", "reinforce": "reinforce", "ppo": "ppo",
               "stages": "pipeline"}
_ABSENT = "<absent>"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf value} of a nested dict (an empty dict is a leaf)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def normalised(flat: dict[str, Any]) -> dict[str, Any]:
  """`flat` (dotted keys) with each unset key of FORMER_DEFAULTS given the value it had: a config
  recorded before the default changed, and its stage keys, read as they did."""
  out = dict(flat)
  for key, value in flat.items():
    tail = ".".join(key.split(".")[-2:])
    if value is None and tail in FORMER_DEFAULTS:
      out[key] = FORMER_DEFAULTS[tail]
  return out


def _plain(tree: Any) -> Any:
  """The value as JSON gives it back (tuples as lists)."""
  return json.loads(json.dumps(tree))


def matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def differences(recorded: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, list]:
  """{key: [recorded value, given value]} of every leaf that differs. A key the record lacks counts as
  its default (a key added by a later version of this package)."""
  old, new, default = (normalised(flatten(_plain(t))) for t in (recorded, given, defaults))
  out = {}
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, default.get(key, _ABSENT)), new.get(key, _ABSENT)
    if a != b:
      out[key] = [a, b]
  return out


def describe(changes: dict[str, list], limit: int = 6) -> str:
  """'train.lr 0.001 -> 0.0005, ...' (at most `limit` keys, then how many more)."""
  parts = [f"{k} {json.dumps(a) if a is not _ABSENT else a} -> {json.dumps(b) if b is not _ABSENT else b}"
           for k, (a, b) in list(changes.items())[:limit]]
  more = len(changes) - limit
  return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def checkpoint_steps(run_dir: str) -> list[int]:
  """The steps of a run's checkpoints (DIR/checkpoints/<step>), oldest first."""
  path = storage.join(run_dir, "checkpoints")
  if not storage.isdir(path):
    return []
  return sorted(int(n) for n in storage.listdir(path) if re.fullmatch(r"\d+", n))


def _holds_state(run_dir: str) -> bool:
  """Whether the run in `run_dir` has anything to continue: a checkpoint, a final model, a finished
  pipeline stage (DIR/<stage>/DONE)."""
  if checkpoint_steps(run_dir) or storage.isfile(storage.join(run_dir, "model", "hs2p_model.json")):
    return True
  return storage.isdir(run_dir) and any(storage.isfile(storage.join(run_dir, name, "DONE"))
                                        for name in storage.listdir(run_dir) if "." not in name)


def _read(path: str) -> dict[str, Any] | None:
  if not storage.isfile(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e.msg}); the run's record is damaged") from None


def current_config(run_dir: str) -> dict[str, Any] | None:
  """The run's config now: config.json with the changes its sessions recorded (None: no run here)."""
  cfg = _read(storage.join(run_dir, CONFIG))
  if cfg is None:
    return None
  record = _read(storage.join(run_dir, RECORD)) or {}
  for session in record.get("sessions", []):
    for key, (_, new) in (session.get("changed") or {}).items():
      _set(cfg, key, new)
  return cfg


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *heads, last = dotted.split(".")
  for h in heads:
    tree = tree.setdefault(h, {})
  if value == _ABSENT:
    tree.pop(last, None)
  else:
    tree[last] = value


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Claim:
  """A command's checked claim on a run directory: `session` is what `commit()` records (process 0;
  call it once the run is about to start: a command that fails before writes no record)."""

  run_dir: str
  command: str
  config: dict[str, Any]
  session: dict[str, Any]
  fresh: bool

  def commit(self) -> None:
    if jax.process_index() != 0:
      return
    record_path = storage.join(self.run_dir, RECORD)
    if self.fresh:
      storage.makedirs(self.run_dir)
      write_json(storage.join(self.run_dir, CONFIG), self.config)
      record = {"command": self.command, "created": self.session["time"], "sessions": []}
    else:
      record = _read(record_path) or {"command": self.command, "created": None, "sessions": []}
    record["sessions"] = list(record.get("sessions", [])) + [self.session]
    write_json(record_path, record)


def claim(run_dir: str, command: str, config: dict[str, Any], defaults: dict[str, Any],
          allow_change: str | None = None) -> Claim:
  """Checks that `command` with resolved `config` may write into `run_dir` (a UserError, before anything
  is written, where it may not); `commit()` the result to record it.

  `defaults`: the config class's defaults (keys a later version added). `allow_change`: what lets keys
  outside CONTINUATION_KEYS change (e.g. "--allow-config-change"), recorded with them; None refuses.
  The session: {"time", "from_step", "changed", ["allowed_by"]}."""
  run_dir = storage.absolute(run_dir)
  config = _plain(config)
  record = _read(storage.join(run_dir, RECORD))
  recorded = _read(storage.join(run_dir, CONFIG))
  steps = checkpoint_steps(run_dir)
  if storage.isfile(storage.join(run_dir, "hs2p_model.json")):
    raise UserError(f"{run_dir}: a model checkpoint, not a run directory; hs2p {command} needs another --out")
  if recorded is None or not _holds_state(run_dir):
    if recorded is not None and jax.process_index() == 0:
      print(f"{run_dir}: the earlier attempt there saved no checkpoint; starting the run afresh with this config",
            file=sys.stderr, flush=True)
    return Claim(run_dir, command, config, {"time": _now(), "from_step": 0, "changed": {}}, fresh=True)

  kind = (record or {}).get("command") or next((c for k, c in _COMMAND_OF.items() if k in recorded), None)
  if kind != command:
    raise UserError(f"{run_dir}: holds a {kind or 'different'} run ({RECORD}); hs2p {command} needs its own --out")
  changes = differences(current_config(run_dir), config, defaults)
  done = steps[-1] if steps else None
  for key, (old, new) in changes.items():
    if key.endswith(".steps") and matches(key, CONTINUATION_KEYS) and done is not None and isinstance(new, int) \
        and new < done:
      raise UserError(f"{run_dir}: {key}={new}, but the run has a checkpoint at step {done} already; "
                      f"use a new --out for a shorter run")
  refused = {k: v for k, v in changes.items() if not matches(k, CONTINUATION_KEYS)}
  if refused and not allow_change:
    raise UserError(f"{run_dir}: this config differs from the run's ({CONFIG}) in {describe(refused)}; only "
                    f"continuation keys (steps, cadences, mesh.*, dist.*; see hs2p_jax/run_record.py) may change: "
                    f"use a new --out, or --allow-config-change to continue anyway (recorded in {RECORD})")
  session: dict[str, Any] = {"time": _now(), "from_step": done or 0, "changed": changes}
  if refused:
    session["allowed_by"] = allow_change
  return Claim(run_dir, command, config, session, fresh=False)


def config_of(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(resolved config, the defaults of its class) of a config dataclass, as `claim` takes them."""
  from hs2p_jax.config import to_dict
  return to_dict(cfg), to_dict(type(cfg)())
