"""Weights named by a source: a GGUF file, a Hugging Face directory (local, on the hub, or copied from
object storage), or a preset drawn at random from a seed; read onto a mesh.

A run's `model.source` names them, and so does the base of a LoRA model stored as its adapters
(`checkpoint.ModelMeta.base`): both read them here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax import storage
from hs2p_jax.convert import load_gguf, load_hf
from hs2p_jax.convert.state import ReadStats
from hs2p_jax.distributed import once_per_host
from hs2p_jax.errors import UserError
from hs2p_jax.model import LlamaConfig, create
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings

# weights on the hub: downloaded only with `weights=True`; metadata and tokenizer files by anyone
METADATA_FILES = ["*.json", "tokenizer*", "*.jinja"]

_FETCHED: dict[tuple[str, bool], str] = {}  # (source, with weights) -> this host's copy: each fetched once a process


def hub_or_local(src: str, weights: bool = False) -> str:
  """A local directory for `hf:DIR`, `DIR`, `hf:ORG/NAME` (from the Hugging Face hub) or a URL
  (`gs://BUCKET/DIR`, copied into this host's cache): config and tokenizer files, and with `weights`
  the safetensors; one process per host downloads, the others wait, and a failure on any host stops
  every process."""
  path = src[3:] if src.startswith("hf:") else src
  if storage.is_url(path):
    patterns = None if weights else METADATA_FILES
    return once_per_host(lambda: storage.local_copy(path, patterns), f"model.source={src}")
  if os.path.isdir(path):
    return path
  if not src.startswith("hf:") or path.startswith(("/", ".")):
    raise UserError(f"model.source={src}: no such directory")

  def fetch() -> str:
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(path, allow_patterns=METADATA_FILES + (["*.safetensors"] if weights else []))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
      raise UserError(f"cannot download from the Hugging Face hub ({str(e).splitlines()[0][:160]})") from None
  known = _FETCHED.get((src, weights)) or (None if weights else _FETCHED.get((src, True)))
  if known is None:  # every process asks the same sources in the same order: the same calls are skipped
    known = _FETCHED[(src, weights)] = once_per_host(fetch, f"model.source={src}")
  return known


def absolute_source(src: str) -> str:
  """`src` as it names the same weights from any working directory (local paths made absolute)."""
  if src.startswith("gguf:"):
    rest = src[5:]
    return src if rest == "smollm2" or not os.path.exists(rest) else "gguf:" + os.path.abspath(rest)
  path = src[3:] if src.startswith("hf:") else src
  if storage.is_url(path) or not os.path.exists(path):
    return src  # a URL, or a hub name
  return ("hf:" if src.startswith("hf:") else "") + os.path.abspath(path)


def random_model(kind: str, cfg: LlamaConfig, num_attributes: int, seed: int, mesh: Mesh | None, rules: Rules):
  """A freshly initialised model, created directly in its sharded layout when a mesh is given. Always
  drawn in one compiled program: the same values on any mesh, or none (eager initialisers round
  differently), so a LoRA model's random base is drawn again exactly."""
  abstract = nnx.eval_shape(lambda: create(kind, cfg, num_attributes, seed))
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules) if mesh is not None else None
  state = jax.jit(lambda: nnx.state(create(kind, cfg, num_attributes, seed)), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def read_source(source: str, kind: str, num_attributes: int, seed: int, mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES, stats: ReadStats | None = None, **runtime: Any) -> nnx.Module:
  """The model (`kind`; a reward model's head fresh from `seed`) of the weights `source` names,
  with the LlamaConfig fields `runtime` (dtype, num_layers, ...) applied."""
  stats = stats if stats is not None else ReadStats()
  if source.startswith("gguf:"):
    return load_gguf(source[5:], head=kind, num_attributes=num_attributes, mesh=mesh, rules=rules, seed=seed,
                     stats=stats, **runtime)
  return load_hf(hub_or_local(source, weights=True), head=kind, num_attributes=num_attributes, mesh=mesh,
                 rules=rules, seed=seed, stats=stats, **runtime)
