"""A training run's resumable checkpoints: `DIR/checkpoints/<step>/` (params, optimizer state, the data
iterator's state) through an Orbax `CheckpointManager` (atomic per step, the last N kept), and
`DIR/frozen/<name>/`, the frozen models a run derives from its source, written once."""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from hs2p_jax import storage
from hs2p_jax.checkpoint import check_common_shapes, first_line, restore_tree
from hs2p_jax.errors import Stopped, UserError


class Unreadable(UserError):
  """A checkpoint whose files cannot be read (truncated, damaged)."""


class SaveFailed(Stopped):
  """A checkpoint could not be written (a full or read-only disk, a lost bucket): the run stops."""


def _reason(e: BaseException) -> str:
  """An I/O error's kind and its last clause ("RESOURCE_EXHAUSTED: No space left on device ...")."""
  line = first_line(e) if len(str(e).splitlines()[0]) <= 200 else str(e).strip().splitlines()[0]
  head, tail = line.split(":", 1)[0], line.rsplit(": ", 1)[-1]
  return f"{head}: {tail}"[:240] if tail != line and head != line else line[:240]


class RunCheckpoints:
  """The resumable checkpoints of one training run, under `DIR/checkpoints/`. With `async_save` a
  save's writes overlap the following steps; a save that fails raises `SaveFailed` (at the next
  save or wait) naming it, and the checkpoints before it stay intact."""

  def __init__(self, run_dir: str, keep: int = 2, async_save: bool = False):
    self.dir = storage.join(storage.absolute(run_dir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                       enable_async_checkpointing=async_save))
    self._pending: int | None = None  # the step whose writes may still be in flight

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int) -> str:
    return storage.join(self.dir, str(step))

  def _failed(self, step: int, e: BaseException) -> SaveFailed:
    kept = [s for s in self.manager.all_steps() if s != step]
    left = (f"checkpoint {max(kept)} is intact: resume from it once the storage is fixed" if kept
            else "no earlier checkpoint")
    return SaveFailed(f"{self.step_path(step)}: the checkpoint could not be written ({_reason(e)}); the run "
                      f"stopped; {left}")

  def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> None:
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds; an async save's error surfaces here
      raise self._failed(self._pending if self._pending is not None else step, e) from None
    self._pending = step

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, data state) of checkpoint `step`. A checkpoint whose arrays do not fit `abstract_state`
    is a UserError (the config changed); one that cannot be read raises `Unreadable`."""
    where = f"{self.dir}/{step}"
    try:
      meta = self.manager.item_metadata(step)
      saved = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else None
    except Exception as e:  # noqa: BLE001
      raise Unreadable(f"{where}: unreadable ({first_line(e)})") from None
    if saved is not None:
      check_common_shapes(getattr(saved, "tree", saved), abstract_state, f"{where}: cannot resume")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
    except json.JSONDecodeError as e:  # a truncated metadata file
      raise Unreadable(f"{where}: unreadable ({first_line(e)})") from None
    except (ValueError, KeyError) as e:
      raise UserError(f"{where}: cannot resume, checkpoint does not match this config ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated or damaged files
      raise Unreadable(f"{where}: unreadable ({first_line(e)})") from None
    return out.state, out.data

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any] | None]:
    """(step, state, data state) of the newest readable checkpoint, saying on stderr which ones it
    skips as unreadable; (0, None, None) when there is none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state)
      except Unreadable as e:
        if jax.process_index() == 0:
          print(f"resume: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
        continue
      return step, state, data
    if steps:
      raise UserError(f"{self.dir}: no readable checkpoint among steps {', '.join(map(str, sorted(steps)))}")
    return 0, None, None

  def snapshot_path(self, name: str) -> str:
    return storage.join(storage.parent(self.dir), "frozen", name)

  def save_snapshot(self, name: str, tree: Any) -> None:
    """Writes a frozen model the run derives from its source (the DPO / REINFORCE reference) under
    `DIR/frozen/NAME`, once, before the first step: a resume reads it from there, not from the source.
    Every process calls it; Orbax writes into a temporary directory and renames it into place."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(self.snapshot_path(name), tree, force=True)
    ckptr.wait_until_finished()

  def restore_snapshot(self, name: str, target: Any) -> Any | None:
    """Frozen model `name` restored into `target` (abstract, with shardings); None if the run has none."""
    path = self.snapshot_path(name)
    if not storage.isdir(path):
      return None
    return restore_tree(path, target, path)

  def wait(self) -> None:
    """Until every save has been written (`SaveFailed` if one could not be)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(self._pending if self._pending is not None else -1, e) from None
    self._pending = None

  def close(self, quiet: bool = False) -> None:
    """Waits for the saves in flight and releases the manager; `quiet` (the run is already failing):
    without raising."""
    try:
      self.wait()
    except SaveFailed:
      if not quiet:
        raise
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - a failed save is reported by wait()
        pass
