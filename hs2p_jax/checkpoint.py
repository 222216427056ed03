"""Orbax checkpoints: standalone model checkpoints and the resumable state of training runs.

A model checkpoint (what `hs2p convert`, `train-rm`, `expo` write and `--checkpoint` reads) is a
directory: `hs2p_model.json` (kind, architecture, head, tokenizer), `params/` (Orbax, sharded
arrays) and `tokenizer/`. It exists complete or not at all: written to a temporary sibling and
renamed into place, or on object storage (`gs://`) committed by its `hs2p_model.json`, written last. A training run keeps `DIR/checkpoints/<step>/` through an Orbax
`CheckpointManager` (atomic per step, last N kept), holding params, optimizer state, step and the
data iterator's state, and `DIR/frozen/<name>/` for the frozen models it derives from its source
(written once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax import storage
from hs2p_jax.atomic import write_bytes, write_json
from hs2p_jax.errors import Stopped, UserError
from hs2p_jax.model import KINDS, LlamaConfig, create
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings

META_FILE = "hs2p_model.json"
FORMAT_VERSION = 1
# Fields that change no parameter shape: a checkpoint may be loaded with them changed.
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat", "attention", "weight_grad", "lora_dropout", "lora_train_head")


@dataclasses.dataclass(frozen=True)
class ModelMeta:
  """What a model checkpoint holds besides its arrays."""

  kind: str
  config: LlamaConfig
  num_attributes: int = 9
  reward_weights: Any = "helpfulness"
  template: str = "steerlm"

  def to_json(self) -> dict[str, Any]:
    cfg = dataclasses.asdict(self.config)
    return {"format_version": FORMAT_VERSION, "kind": self.kind, "config": cfg,
            "num_attributes": self.num_attributes, "reward_weights": self.reward_weights, "template": self.template}

  @classmethod
  def from_json(cls, d: dict[str, Any], where: str) -> "ModelMeta":
    try:
      cfg = dict(d["config"])
      if cfg.get("rope_scaling"):
        cfg["rope_scaling"] = tuple(tuple(p) for p in cfg["rope_scaling"])
      if isinstance(cfg.get("eos_token_id"), list):
        cfg["eos_token_id"] = tuple(cfg["eos_token_id"])
      if d["kind"] not in KINDS:
        raise UserError(f"{where}: kind {d['kind']!r} unknown")
      return cls(kind=d["kind"], config=LlamaConfig(**cfg), num_attributes=int(d.get("num_attributes", 9)),
                 reward_weights=d.get("reward_weights", "helpfulness"), template=d.get("template", "steerlm"))
    except (KeyError, TypeError) as e:
      raise UserError(f"{where}: malformed model metadata ({e})") from None


def is_model_checkpoint(path: str) -> bool:
  return storage.isfile(storage.join(path, META_FILE))


def resolve_model_dir(path: str) -> str:
  """A model checkpoint dir, or a run dir holding one under `model/` (a local path or a URL)."""
  if is_model_checkpoint(path):
    return path
  if is_model_checkpoint(storage.join(path, "model")):
    return storage.join(path, "model")
  raise UserError(f"{path}: not a model checkpoint (no {META_FILE}) nor a run directory with model/")


def load_checkpoint_tokenizer(path: str):
  """The tokenizer saved with a model checkpoint."""
  from hs2p_jax.tokenizer import load_tokenizer
  tok_dir = storage.join(resolve_model_dir(path), "tokenizer")
  if not storage.isdir(tok_dir):
    raise UserError(f"{path}: model checkpoint has no tokenizer/ directory")
  return load_tokenizer(storage.local_copy(tok_dir) if storage.is_url(tok_dir) else tok_dir)


def read_meta(path: str) -> ModelMeta:
  path = resolve_model_dir(path)
  file = storage.join(path, META_FILE)
  try:
    return ModelMeta.from_json(json.loads(storage.read_text(file)), file)
  except json.JSONDecodeError as e:
    raise UserError(f"{file}: invalid JSON ({e.msg})") from None


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def save_model(path: str, model: nnx.Module, meta: ModelMeta, tokenizer=None, overwrite: bool = False,
               extra_files: dict[str, bytes] | None = None) -> None:
  """Writes a model checkpoint atomically. Every process calls it (arrays are written collectively);
  it is assembled in `PATH.partial` and renamed to PATH by process 0 once complete, or, at a URL,
  written in place and committed by its metadata file, uploaded last. `extra_files` (name -> bytes:
  reports, plots) are written inside it."""
  path = storage.absolute(path)
  remote = storage.is_url(path)
  primary = jax.process_index() == 0
  if (is_model_checkpoint(path) if remote else os.path.exists(path)) and not overwrite:
    raise UserError(f"{path} already exists")
  tmp = path if remote else path + ".partial"
  if primary:
    if remote:
      storage.remove(storage.join(path, META_FILE))  # no longer a model checkpoint from here on
    storage.rmtree(tmp)
  _barrier("hs2p_save_model_start")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(storage.join(tmp, "params"), nnx.state(model, nnx.Param))
  ckptr.wait_until_finished()
  if primary:
    if tokenizer is not None:
      _save_tokenizer(tokenizer, storage.join(tmp, "tokenizer"))
    for name, data in (extra_files or {}).items():
      write_bytes(storage.join(tmp, name), data)
    write_json(storage.join(tmp, META_FILE), meta.to_json())  # last: it commits a checkpoint at a URL
  _barrier("hs2p_save_model_written")
  if primary and not remote:
    if os.path.exists(path):
      old = path + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  _barrier("hs2p_save_model_done")


def _save_tokenizer(tokenizer: Any, path: str) -> None:
  if not storage.is_url(path):
    tokenizer.save_pretrained(path)
    return
  import tempfile
  with tempfile.TemporaryDirectory(prefix="hs2p-tokenizer-") as tmp:
    tokenizer.save_pretrained(tmp)
    storage.upload_dir(tmp, path)


def abstract_model(meta: ModelMeta, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
  """(graphdef, abstract Param state with shardings) for `meta`'s model, without allocating it."""
  abstract = nnx.eval_shape(lambda: create(meta.kind, meta.config, meta.num_attributes))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if mesh is not None:
    shardings = state_shardings(params, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
  return graphdef, params, rest


def load_model(path: str, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, **runtime: Any):
  """Reads a model checkpoint (or a run dir's final model). `runtime` may change RUNTIME_FIELDS of
  the architecture (e.g. dtype="bfloat16", remat="full"). Returns (model, meta)."""
  path = resolve_model_dir(path)
  meta = read_meta(path)
  bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
  if bad:
    raise UserError(f"load_model: {bad[0]} changes parameter shapes; only {', '.join(RUNTIME_FIELDS)} may change")
  meta = dataclasses.replace(meta, config=meta.config.replace(**{k: v for k, v in runtime.items() if v is not None}))
  graphdef, abs_params, rest = abstract_model(meta, mesh, rules)
  if mesh is None:
    abs_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        abs_params)
  params = restore_tree(storage.join(path, "params"), abs_params, path)
  return nnx.merge(graphdef, params, rest), meta


def restore_tree(path: str, target: Any, where: str) -> Any:
  """Restores an Orbax tree into `target` (abstract, with shardings); shape mismatches name the array."""
  ckptr = ocp.StandardCheckpointer()
  try:
    saved = ckptr.metadata(path)
    saved_tree = getattr(saved, "item_metadata", saved)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    _check_shapes(saved_tree, target, where)
  except UserError:
    raise
  except Exception:  # noqa: BLE001 - metadata layout differs across Orbax versions; restore checks too
    pass
  try:
    return ckptr.restore(path, target)
  except (ValueError, KeyError) as e:
    raise UserError(f"{where}: checkpoint does not match the model ({_first_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - a truncated or damaged file: Orbax/TensorStore raise many kinds
    raise UserError(f"{where}: cannot read the checkpoint's arrays ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _names(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return ".".join(p for p in parts if p != "value")


def _check_common_shapes(saved: Any, target: Any, where: str) -> None:
  """A UserError for the first array both trees name with different shapes (others are left to Orbax)."""
  try:
    flat_saved = {_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  except Exception:  # noqa: BLE001 - metadata layouts differ across Orbax versions
    return
  for p, v in jax.tree_util.tree_flatten_with_path(target)[0]:
    s = flat_saved.get(_names(p))
    if s is not None and hasattr(s, "shape") and tuple(s.shape) != tuple(v.shape):
      raise UserError(f"{where}: array {_names(p)} has shape {tuple(s.shape)} in the checkpoint, this config's "
                      f"model has {tuple(v.shape)}")


def _check_shapes(saved: Any, target: Any, where: str) -> None:
  flat_saved = {_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for p, v in jax.tree_util.tree_flatten_with_path(target)[0]:
    key = _names(p)
    s = flat_saved.get(key)
    if s is None:
      raise UserError(f"{where}: checkpoint has no array {key}")
    if hasattr(s, "shape") and tuple(s.shape) != tuple(v.shape):
      raise UserError(f"{where}: array {key} has shape {tuple(s.shape)} in the checkpoint, model expects {tuple(v.shape)}")


class Unreadable(UserError):
  """A checkpoint whose files cannot be read (truncated, damaged)."""


class SaveFailed(Stopped):
  """A checkpoint could not be written (a full or read-only disk, a lost bucket): the run stops."""


def _reason(e: BaseException) -> str:
  """An I/O error's kind and its last clause ("RESOURCE_EXHAUSTED: No space left on device ...")."""
  line = _first_line(e) if len(str(e).splitlines()[0]) <= 200 else str(e).strip().splitlines()[0]
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
      raise Unreadable(f"{where}: unreadable ({_first_line(e)})") from None
    if saved is not None:
      _check_common_shapes(getattr(saved, "tree", saved), abstract_state, f"{where}: cannot resume")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
    except json.JSONDecodeError as e:  # a truncated metadata file
      raise Unreadable(f"{where}: unreadable ({_first_line(e)})") from None
    except (ValueError, KeyError) as e:
      raise UserError(f"{where}: cannot resume, checkpoint does not match this config ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated or damaged files
      raise Unreadable(f"{where}: unreadable ({_first_line(e)})") from None
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


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with each array's sharding) of a concrete tree: a restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
