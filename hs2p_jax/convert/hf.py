"""Hugging Face Llama directories (config.json + safetensors, single or sharded) in: read region by
region onto the mesh (`convert.state`); out: `convert.hf_export`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from hs2p_jax.convert.mapping import HEAD_BIAS_FILE, REWARD_KEY
from hs2p_jax.convert.state import ReadStats, TensorSource, fill_model, head_init
from hs2p_jax.errors import UserError
from hs2p_jax.model import LlamaForCausalLM, RewardModel, create, from_hf_config
from hs2p_jax.sharding import DEFAULT_RULES, Rules


def _recorded_bias(hf: dict[str, Any], path: str) -> float | None:
  """The folded head's bias a scalar export recorded in its config.json (hf_export.REWARD_KEY)."""
  record = hf.get(REWARD_KEY)
  if record is None:
    return None
  try:
    return float(record["bias"])
  except (KeyError, TypeError, ValueError):
    raise UserError(f"{path}/config.json: {REWARD_KEY} has no numeric 'bias'") from None


def read_config(path: str) -> dict[str, Any]:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
  try:
    with open(cfg_file, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_file}: invalid JSON ({e.msg} at line {e.lineno})") from None


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}


@dataclasses.dataclass
class SafetensorsTensor:
  """One tensor of a safetensors file, read region by region through a memory map."""

  file: str
  name: str
  dtype: str
  shape: tuple[int, ...]
  offset: int          # of the tensor's first byte in the file
  stats: ReadStats

  def read(self, index) -> np.ndarray:
    import ml_dtypes
    dtype = ml_dtypes.bfloat16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
    arr = np.memmap(self.file, dtype=dtype, mode="r", offset=self.offset, shape=self.shape)
    region = np.array(arr[tuple(index)])  # copies just this region out of the mapping
    self.stats.add(region.nbytes)
    return region.astype(np.float32)


def _header(file: str) -> tuple[dict[str, Any], int]:
  """(tensor entries, data start) of a safetensors file; a damaged header is one line naming it."""
  try:
    with open(file, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{file}: not a readable safetensors file ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


def safetensors_source(path: str, stats: ReadStats | None = None) -> TensorSource:
  """Every tensor of a directory's `model.safetensors` (or sharded index), readable by region."""
  stats = stats if stats is not None else ReadStats()
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f != HEAD_BIAS_FILE)
    if not files:
      raise UserError(f"{path}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
  if os.path.isfile(os.path.join(path, HEAD_BIAS_FILE)):
    files.append(HEAD_BIAS_FILE)
  out: dict[str, SafetensorsTensor] = {}
  for fname in files:
    file = os.path.join(path, fname)
    header, data_start = _header(file)
    for name, meta in header.items():
      if meta["dtype"] not in _ST_DTYPES:
        raise UserError(f"{file}: tensor {name} has dtype {meta['dtype']}, which is not supported")
      out[name] = SafetensorsTensor(file, name, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                    data_start + meta["data_offsets"][0], stats)
  return out


def load_hf(path: str, *, head: str = "lm", num_attributes: int | None = None, dtype: str = "float32",
            mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0, stats: ReadStats | None = None,
            **config_overrides: Any) -> LlamaForCausalLM | RewardModel:
  """A Hugging Face Llama directory -> `LlamaForCausalLM` (head="lm") or `RewardModel` (head="reward").

  A reward model reads the directory's `score` head (its outputs: `num_attributes`, default the
  head's, or 9 without one) and its bias (a scalar export's from config.json, else the side file),
  else starts a fresh head (normal(0.02) kernel, zero bias, seeded). `dtype` is the compute dtype;
  parameters are float32. With `mesh`, every parameter is placed sharded by `rules`, and each
  process reads from the files only the regions its devices hold (`stats` counts the bytes).
  """
  if head not in ("lm", "reward"):
    raise UserError(f"load_hf: head={head!r}, expected 'lm' or 'reward'")
  hf = read_config(path)
  cfg = from_hf_config(hf, dtype=dtype, **config_overrides)
  source = safetensors_source(path, stats)
  if head == "lm" and not cfg.tie_word_embeddings and "lm_head.weight" not in source:
    raise UserError(f"{path}: untied model without lm_head.weight")
  init_missing = {}
  if head == "reward":
    if "score.weight" in source:
      shape = source["score.weight"].shape
      if num_attributes is None:
        num_attributes = shape[0]
      if shape[0] != num_attributes:
        raise UserError(f"{path}: score.weight has {shape[0]} outputs, num_attributes={num_attributes}")
    bias = _recorded_bias(hf, path)
    init_missing = {("head_kernel",): head_init(seed),
                    ("head_bias",): (lambda shape: np.full(shape, bias, np.float32)) if bias is not None else np.zeros}
  num_attributes = num_attributes or 9
  kind = "lm" if head == "lm" else "reward"
  return fill_model(lambda: create(kind, cfg, num_attributes, seed), cfg, source, path,
                    init_missing=init_missing, mesh=mesh, rules=rules)
