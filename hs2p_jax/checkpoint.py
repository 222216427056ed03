"""Model checkpoints: what `hs2p convert`, the trainers and `expo` write and every `--checkpoint` reads.

A model checkpoint is a directory: `hs2p_model.json` (kind, architecture, head, template, the length
it was trained at), `params/` (Orbax, sharded arrays) and `tokenizer/`. It exists complete or not
at all: written to a temporary sibling and renamed into place, or on object storage (`gs://`)
committed by its `hs2p_model.json`, written last.

A training run's step checkpoint, `RUN/checkpoints/<N>` (`train/checkpoints.py`), is a model too:
`RUN/run_model.json` (written when the run starts) holds its model's metadata and where its params
lie in the checkpoint (PPO: the actor's; a LoRA run: the adapters and head, over `RUN/frozen/base`),
`RUN/tokenizer/` its tokenizer; the params are read without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax import storage
from hs2p_jax.atomic import write_bytes, write_json
from hs2p_jax.errors import UserError
from hs2p_jax.fingerprint import fingerprint
from hs2p_jax.model import KINDS, LlamaConfig, create, lora, merge_lora
from hs2p_jax.model.casting import store_as
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings
from hs2p_jax.weights import random_model, read_source

META_FILE = "hs2p_model.json"
RUN_MODEL_FILE = "run_model.json"  # in a run directory: what its step checkpoints hold as a model
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
  max_length: int | None = None        # the data.max_length it was trained at (None: not trained here)
  source: str | None = None            # the weights it started from (model.source; PEFT's base model)
  # A LoRA model saved as its adapters: where its base's weights are (`source`, `init_from` a model
  # of ours, else a random preset's `seed`), the dtype they were stored in while it trained, and
  # their `fingerprint`. None: every parameter is in the checkpoint.
  base: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    cfg = dataclasses.asdict(self.config)
    return {"format_version": FORMAT_VERSION, "kind": self.kind, "config": cfg,
            "num_attributes": self.num_attributes, "reward_weights": self.reward_weights, "template": self.template,
            "max_length": self.max_length, "source": self.source, "base": self.base}

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
                 reward_weights=d.get("reward_weights", "helpfulness"), template=d.get("template", "steerlm"),
                 max_length=d.get("max_length"), source=d.get("source"), base=d.get("base"))
    except (KeyError, TypeError) as e:
      raise UserError(f"{where}: malformed model metadata ({e})") from None


def is_model_checkpoint(path: str) -> bool:
  return storage.isfile(storage.join(path, META_FILE))


def run_of_step(path: str) -> str | None:
  """The run directory of step checkpoint `RUN/checkpoints/<N>`; None for any other path."""
  path = storage.absolute(path)
  steps = storage.parent(path)
  if not (re.fullmatch(r"\d+", path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]) and
          steps.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1] == "checkpoints"):
    return None
  run = storage.parent(steps)
  if not storage.isdir(path):
    raise UserError(f"{path}: no such checkpoint")
  if not storage.isfile(storage.join(run, RUN_MODEL_FILE)):
    raise UserError(f"{path}: its run records no {RUN_MODEL_FILE} (it started before runs did); read "
                    f"{storage.join(run, 'model')} instead")
  return run


def resolve_model_dir(path: str) -> str:
  """A model checkpoint dir, a run's step checkpoint, or a run dir holding a model under `model/`
  (a local path or a URL)."""
  if is_model_checkpoint(path) or run_of_step(path) is not None:
    return path
  if is_model_checkpoint(storage.join(path, "model")):
    return storage.join(path, "model")
  steps = storage.join(path, "checkpoints")
  saved = sorted(int(n) for n in storage.listdir(steps) if n.isdigit()) if storage.isdir(steps) else []
  hint = f" (its newest step checkpoint is a model: {storage.join(steps, str(saved[-1]))})" if saved else ""
  raise UserError(f"{path}: not a model checkpoint (no {META_FILE}) nor a run directory with model/{hint}")


def tokenizer_dir(path: str) -> str | None:
  """The local directory of the tokenizer saved with a model checkpoint (a step checkpoint's: its
  run's; a URL's: copied to this host's cache); None without one."""
  path = resolve_model_dir(path)
  tok_dir = storage.join(run_of_step(path) or path, "tokenizer")
  if not storage.isdir(tok_dir):
    return None
  return storage.local_copy(tok_dir) if storage.is_url(tok_dir) else tok_dir


def load_checkpoint_tokenizer(path: str):
  """The tokenizer saved with a model checkpoint (a step checkpoint's: its run's)."""
  from hs2p_jax.tokenizer import load_tokenizer
  tok_dir = tokenizer_dir(path)
  if tok_dir is None:
    raise UserError(f"{path}: model checkpoint has no tokenizer/ directory")
  return load_tokenizer(tok_dir)


def _read_json(file: str) -> dict[str, Any]:
  try:
    return json.loads(storage.read_text(file))
  except json.JSONDecodeError as e:
    raise UserError(f"{file}: invalid JSON ({e.msg})") from None


def read_meta(path: str) -> ModelMeta:
  path = resolve_model_dir(path)
  run = run_of_step(path)
  if run is not None:
    file = storage.join(run, RUN_MODEL_FILE)
    return ModelMeta.from_json(_read_json(file).get("meta", {}), file)
  file = storage.join(path, META_FILE)
  return ModelMeta.from_json(_read_json(file), file)


def write_run_model(run_dir: str, meta: ModelMeta, tokenizer: Any, params_at: tuple[str, ...] = ("params",)) -> None:
  """Makes `run_dir`'s step checkpoints models (process 0, at the run's start): RUN_MODEL_FILE with
  `meta` and where the model's params lie in a checkpoint's state (`params_at`), and the tokenizer."""
  if jax.process_index() != 0:
    return
  if tokenizer is not None and not storage.isdir(storage.join(run_dir, "tokenizer")):
    _save_tokenizer(tokenizer, storage.join(run_dir, "tokenizer"))
  write_json(storage.join(run_dir, RUN_MODEL_FILE), {"meta": meta.to_json(), "params_at": list(params_at)})


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
  params, meta = saved_params(model, meta)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(storage.join(tmp, "params"), params)
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


def as_adapters(meta: ModelMeta) -> bool:
  """Whether `meta`'s model is saved as its adapters (and head) over a base named by reference."""
  return meta.base is not None and bool(meta.config.lora_rank)


def saved_params(model: nnx.Module, meta: ModelMeta) -> tuple[Any, ModelMeta]:
  """(the Params a checkpoint of `model` holds, its meta): all of them, or, for a LoRA model whose
  base `meta.base` names, its adapters and head, with the base's fingerprint recorded."""
  if not as_adapters(meta):
    return nnx.state(model, nnx.Param), meta
  own, base = nnx.state(model, lora.OWN, lora.BASE)
  print_ = fingerprint(store_as(base, meta.base.get("dtype", "float32")))
  return own, dataclasses.replace(meta, base={**meta.base, "fingerprint": print_})


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
  run = run_of_step(path)
  if run is not None:
    params = _restore_step(path, run, meta, abs_params)
  elif as_adapters(meta):
    abs_model = nnx.merge(graphdef, abs_params, rest)
    abs_own, abs_base = nnx.state(abs_model, lora.OWN, lora.BASE)
    own = restore_tree(storage.join(path, "params"), abs_own, path)
    flat = dict(nnx.to_flat_state(own))
    flat.update(nnx.to_flat_state(load_base(meta, abs_base, mesh, rules, path)))
    params = nnx.from_flat_state({p: flat[p] for p, _ in nnx.to_flat_state(abs_params)})
  else:
    params = restore_tree(storage.join(path, "params"), abs_params, path)
  return nnx.merge(graphdef, params, rest), meta


def describe_base(base: dict[str, Any]) -> str:
  """How a LoRA model's base reference reads in a message."""
  if base.get("init_from"):
    return f"{base['init_from']}{' (its adapters merged)' if base.get('merged', True) else ''}"
  return base.get("source") or f"random weights (seed {base.get('seed', 0)})"


def load_base(meta: ModelMeta, abstract: Any, mesh: Mesh | None, rules: Rules, where: str) -> Any:
  """The base of a LoRA model saved as its adapters (`meta.base`), in the layout of `abstract` (its
  Params less the adapters and head): read from where it names, its matrices rounded to the dtype
  they had while the adapters trained, and checked against the recorded fingerprint."""
  ref = meta.base
  cfg = meta.config.replace(lora_rank=0)
  try:
    if ref.get("init_from"):
      model, _ = load_model(ref["init_from"], mesh, rules)
      if ref.get("merged", True):
        model = merge_lora(model)
    elif ref.get("source"):
      model = read_source(ref["source"], meta.kind, meta.num_attributes, int(ref.get("seed", 0)), mesh, rules,
                          num_layers=cfg.num_layers)
    else:
      model = random_model(meta.kind, cfg, meta.num_attributes, int(ref.get("seed", 0)), mesh, rules)
  except UserError as e:
    raise UserError(f"{where}: its base {describe_base(ref)} cannot be read ({e})") from None
  have = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for p, want in nnx.to_flat_state(abstract):
    var = have.get(p)
    if var is None or tuple(var.get_value().shape) != tuple(want.get_value().shape):
      raise UserError(f"{where}: its base {describe_base(ref)} has no array {'.'.join(map(str, p))} of shape "
                      f"{tuple(want.get_value().shape)}")
    out[p] = var
  base = store_as(nnx.from_flat_state(out), ref.get("dtype", "float32"))
  got = fingerprint(base)
  if ref.get("fingerprint") and got != ref["fingerprint"]:
    raise UserError(f"{where}: its base {describe_base(ref)} is not the one its adapters trained over (weights "
                    f"fingerprint {got}, recorded {ref['fingerprint']})")
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t), out_shardings=shardings)(base)


def _restore_step(path: str, run: str, meta: ModelMeta, abs_params: Any) -> Any:
  """The model params of step checkpoint `path` of `run`: the trainable ones from its state (no
  optimizer state read), a LoRA run's base from `run/frozen/base` (in float32, as the final model)."""
  at = tuple(_read_json(storage.join(run, RUN_MODEL_FILE)).get("params_at", ["params"]))
  flat = dict(nnx.to_flat_state(abs_params))
  model = nnx.eval_shape(lambda: create(meta.kind, meta.config, meta.num_attributes))
  trains = {p for p, _ in nnx.to_flat_state(nnx.state(model, lora.trainable(meta.config)))}
  target: Any = nnx.from_flat_state({p: v for p, v in flat.items() if p in trains})
  for key in reversed(at):
    target = {key: target}
  restored = _partial_restore(storage.join(path, "state"), target, path)
  for key in at:
    restored = restored[key]
  got = dict(nnx.to_flat_state(nnx.State(restored)))
  if len(got) < len(flat):  # a LoRA run: the base is the run's frozen copy
    base = nnx.from_flat_state({p: v for p, v in flat.items() if p not in got})
    got.update(nnx.to_flat_state(nnx.State(_partial_restore(storage.join(run, "frozen", "base"), base, path,
                                                             partial=False))))
  return nnx.from_flat_state({p: got[p] for p in flat})


def _partial_restore(path: str, target: Any, where: str, partial: bool = True) -> Any:
  """The arrays of `target`'s paths (abstract, with shardings and the dtypes to cast to) from the Orbax
  tree at `path`, the rest of it left unread."""
  try:
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial))
  except (ValueError, KeyError) as e:
    raise UserError(f"{where}: checkpoint does not match the run's model ({first_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - a truncated or damaged file: Orbax/TensorStore raise many kinds
    raise UserError(f"{where}: cannot read the checkpoint's arrays ({first_line(e)})") from None


def restore_tree(path: str, target: Any, where: str) -> Any:
  """Restores an Orbax tree into `target` (abstract, with shardings); shape mismatches name the array."""
  ckptr = ocp.StandardCheckpointer()
  path = storage.absolute(path)  # Orbax reads no metadata from a relative path
  try:
    saved = ckptr.metadata(path)
    saved_tree = getattr(saved, "item_metadata", saved)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    if saved_tree is not None:
      _check_shapes(saved_tree, target, where)
  except UserError:
    raise
  except Exception:  # noqa: BLE001 - metadata layout differs across Orbax versions; restore checks too
    pass
  try:
    return ckptr.restore(path, target)
  except (ValueError, KeyError) as e:
    raise UserError(f"{where}: checkpoint does not match the model ({first_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - a truncated or damaged file: Orbax/TensorStore raise many kinds
    raise UserError(f"{where}: cannot read the checkpoint's arrays ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _names(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return ".".join(p for p in parts if p != "value")


def check_common_shapes(saved: Any, target: Any, where: str) -> None:
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


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with each array's sharding) of a concrete tree: a restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
