"""A model -> a Hugging Face Llama directory, streamed a layer at a time from wherever it lives.

Every process calls `export_hf` (the gathers are collective); process 0 writes. The parameters stay
in place (sharded on the mesh, or on one device). The files' layout (which tensor goes to which
safetensors shard, at which offset) follows from the shapes alone and is fixed first; then, one
group at a time (the embedding, each decoder layer's tensors, the final norm and head), the group
is gathered replicated and cast to the export dtype on the devices, fetched by process 0, turned
into Hugging Face's layout and appended to its shard. No device or host holds more than one group
whole; the bytes do not depend on the mesh or the number of processes. (The files are written
here, not by the safetensors package, whose writer takes a whole shard's tensors in memory; the
format is a JSON header and the tensors' bytes back to back, which that package reads back in the tests.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax.atomic import atomic_dir, write_json
from hs2p_jax.convert.mapping import (GLOBAL_TENSORS, HEAD_BIAS_FILE, LAYER_PREFIX, LAYER_TENSORS, Path, REWARD_KEY,
                                      STACK_ROOT, hf_shape)
from hs2p_jax.errors import UserError
from hs2p_jax.model import RewardModel, to_hf_config
from hs2p_jax.model.reward import ATTRIBUTES, scalar_head

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
SHARD_BYTES = 4 << 30
DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", ml_dtypes.bfloat16), "float16": ("F16", np.float16)}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Hugging Face tensor: where it comes from (our path, layer) and its shape in their layout."""

  name: str
  path: Path
  layer: int | None
  shape: tuple[int, ...]
  to_hf: Callable[[np.ndarray, Any], np.ndarray]


def entries(model: nnx.Module) -> list[list[Entry]]:
  """The model's Hugging Face tensors in groups, in the order they are written: the embedding,
  then each layer's, then the final norm and the head (a tied LM head and the reward head's bias,
  which goes to a side file, left out)."""
  cfg = model.cfg
  shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  skip = {"score.bias"} | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  globals_ = [Entry(name, path, None, hf_shape(to_ours, shapes[path], cfg), to_hf)
              for path, name, to_ours, to_hf in GLOBAL_TENSORS if path in shapes and name not in skip]
  layers = [[Entry(LAYER_PREFIX.format(i) + name, STACK_ROOT + path, i,
                   hf_shape(to_ours, shapes[STACK_ROOT + path][1:], cfg), to_hf)
             for path, name, to_ours, to_hf in LAYER_TENSORS if STACK_ROOT + path in shapes]
            for i in range(cfg.num_layers)]
  return [g for g in [globals_[:1], *layers, globals_[1:]] if g]  # GLOBAL_TENSORS: the embedding first


def shard_files(groups: list[list[Entry]], itemsize: int, shard_bytes: int = SHARD_BYTES) -> list[list[Entry]]:
  """The tensors of each safetensors file, in write order: a new file where the next tensor would
  take the current one past `shard_bytes`."""
  files: list[list[Entry]] = [[]]
  size = 0
  for e in (e for g in groups for e in g):
    n = int(np.prod(e.shape)) * itemsize
    if files[-1] and size + n > shard_bytes:
      files.append([])
      size = 0
    files[-1].append(e)
    size += n
  return files


def safetensors_header(tensors: list[Entry], code: str, itemsize: int) -> bytes:
  """The 8-byte length and JSON header of a safetensors file holding `tensors` back to back, in order."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for e in tensors:
    n = int(np.prod(e.shape)) * itemsize
    header[e.name] = {"dtype": code, "shape": list(e.shape), "data_offsets": [offset, offset + n]}
    offset += n
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  return len(text).to_bytes(8, "little") + text


def _file_names(count: int) -> list[str]:
  if count == 1:
    return ["model.safetensors"]
  return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@functools.lru_cache(maxsize=None)
def _gather(dtype: str, sharding: Any) -> Callable:
  """A jitted (arrays, layer) -> those arrays (layer `layer` of stacked ones) in `dtype`, replicated."""
  def take(arrays: dict[Path, jax.Array], layer: jax.Array) -> dict[Path, jax.Array]:
    return {p: (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) if p[:2] == STACK_ROOT else a)
            .astype(dtype) for p, a in arrays.items()}
  return jax.jit(take, out_shardings=sharding)


def gather_fn(model: nnx.Module, dtype: str) -> Callable:
  """The collective that fetches one group: (arrays, layer) -> replicated arrays in `dtype`."""
  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  mesh = getattr(leaf.sharding, "mesh", None)
  return _gather(dtype, NamedSharding(mesh, P()) if mesh is not None and mesh.size > 1 else None)


def _exists_anywhere(path: str) -> bool:
  """Whether process 0 sees `path` (every process gets its answer, so all stop or none)."""
  here = os.path.exists(path)
  if jax.process_count() == 1:
    return here
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(here)))


def hf_config(model: nnx.Module, dtype: str, reward: dict[str, Any] | None = None) -> dict[str, Any]:
  """The `config.json` of the export: LlamaForCausalLM, or LlamaForSequenceClassification with
  `num_labels` = the reward model's outputs; `reward` (a scalar export: its weights and the folded
  head's bias) is recorded under `REWARD_KEY`."""
  cfg = model.cfg
  if not isinstance(model, RewardModel):
    return to_hf_config(cfg, "LlamaForCausalLM", torch_dtype=dtype)
  n = model.num_attributes
  names = ATTRIBUTES if n == len(ATTRIBUTES) else [f"LABEL_{i}" for i in range(n)]  # HelpSteer's nine, in order
  labels = ["reward"] if reward is not None else list(names)
  extra = {"num_labels": n, "id2label": {str(i): name for i, name in enumerate(labels)},
           "label2id": {name: i for i, name in enumerate(labels)}, "torch_dtype": dtype}
  if reward is not None:
    extra[REWARD_KEY] = reward
  if cfg.pad_token_id is None:
    extra["pad_token_id"] = cfg.eos_ids[0] if cfg.eos_ids else 0
  return to_hf_config(cfg, "LlamaForSequenceClassification", **extra)


def export_hf(model: nnx.Module, out_dir: str, tokenizer_dir: str | None = None, overwrite: bool = False,
              dtype: str = "float32", shard_bytes: int = SHARD_BYTES, reward: np.ndarray | None = None) -> None:
  """Writes `model` as a Hugging Face directory with `dtype` weights, atomically (module docstring).

  Every process calls it. A causal LM becomes `LlamaForCausalLM`; a reward model
  `LlamaForSequenceClassification`, whose head has no bias. With `reward` ([A] weights), the head is
  folded to one output (`num_labels=1`, the one-score reward model TRL, OpenRLHF and verl load)
  and its bias recorded in config.json (`REWARD_KEY`); without, all A outputs are written and the
  bias goes to a side file (`hs2p_reward_head.safetensors`) that transformers ignores. `load_hf`
  reads either bias back.
  """
  if dtype not in DTYPES:
    raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
  if getattr(model.cfg, "lora_rank", 0):
    raise UserError("the model has LoRA adapters, which Hugging Face's Llama layout cannot hold: "
                    "export hs2p_jax.model.merge_lora(model)")
  if reward is not None and not isinstance(model, RewardModel):
    raise UserError("a scalar reward export (--reward) needs a reward model; this checkpoint is a causal LM")
  if not overwrite and _exists_anywhere(out_dir):
    raise UserError(f"{out_dir} already exists")
  record = None
  if reward is not None:
    names = ATTRIBUTES if model.num_attributes == len(ATTRIBUTES) else [str(i) for i in range(model.num_attributes)]
    record = {"weights": {n: float(w) for n, w in zip(names, reward) if w != 0}}
    model = scalar_head(model, reward)
  groups = entries(model)
  files = shard_files(groups, np.dtype(DTYPES[dtype][1]).itemsize, shard_bytes)
  names = _file_names(len(files))
  try:
    _write(model, out_dir, overwrite, dtype, groups, files, names, tokenizer_dir, record)
  except OSError as e:  # a full disk, an unwritable directory: one line; atomic_dir left nothing behind
    raise UserError(f"{out_dir}: the export could not be written ({e.strerror or e})") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("hs2p_export_hf_done")


def _write(model: nnx.Module, out_dir: str, overwrite: bool, dtype: str, groups: list[list[Entry]],
           files: list[list[Entry]], names: list[str], tokenizer_dir: str | None,
           record: dict[str, Any] | None) -> None:
  """Gathers each group (every process) and, on process 0, appends it to its shard in a temporary
  directory renamed to `out_dir` at the end."""
  code, np_dtype = DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  file_of = {e.name: i for i, f in enumerate(files) for e in f}
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  gather = gather_fn(model, dtype)
  primary = jax.process_index() == 0
  with (atomic_dir(out_dir, overwrite=overwrite) if primary else contextlib.nullcontext()) as tmp:
    out, current = None, -1
    try:
      for group in groups:
        arrays = {e.path: flat[e.path].get_value() for e in group}
        layer = group[0].layer if group[0].layer is not None else 0
        got = gather(arrays, np.int32(layer))
        if not primary:
          jax.block_until_ready(got)
          continue
        for e in group:
          if file_of[e.name] != current:
            if out is not None:
              out.close()
            current = file_of[e.name]
            out = open(os.path.join(tmp, names[current]), "wb")
            out.write(safetensors_header(files[current], code, itemsize))
          host = np.asarray(got[e.path].addressable_data(0))
          out.write(np.ascontiguousarray(e.to_hf(host, model.cfg)).astype(np_dtype, copy=False).tobytes())
        del got
    finally:
      if out is not None:
        out.close()
    bias = flat.get(("head_bias",))
    if bias is not None:  # small: replicated
      bias = gather({("head_bias",): bias.get_value()}, np.int32(0))[("head_bias",)]
    if primary:
      _finish(tmp, files, names, itemsize, model, dtype, bias, tokenizer_dir, record)


def _finish(tmp: str, files: list[list[Entry]], names: list[str], itemsize: int, model: nnx.Module, dtype: str,
            bias: jax.Array | None, tokenizer_dir: str | None, record: dict[str, Any] | None) -> None:
  """The index (several shards), the head's bias (config.json of a scalar export, else a side file),
  config.json and the tokenizer."""
  if len(files) > 1:
    total = sum(int(np.prod(e.shape)) * itemsize for f in files for e in f)
    write_json(os.path.join(tmp, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": {e.name: names[i] for i, f in enumerate(files)
                                                                  for e in f}})
  if record is not None:
    record = {**record, "bias": float(np.asarray(bias.addressable_data(0))[0])}
  elif bias is not None:
    from safetensors.numpy import save_file
    save_file({"score.bias": np.asarray(bias.addressable_data(0)).astype(DTYPES[dtype][1])},
              os.path.join(tmp, HEAD_BIAS_FILE))
  write_json(os.path.join(tmp, "config.json"), hf_config(model, dtype, record))
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(tmp, name))
