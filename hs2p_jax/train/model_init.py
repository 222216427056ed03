"""The model a run starts from: a preset at random, Hugging Face / GGUF weights, or one of our checkpoints.

`architecture` says what the model is from metadata alone (a checkpoint's `hs2p_model.json`, a
Hugging Face `config.json`, a GGUF header, else the preset): a run's state and its plan are built
from it before, or instead of, reading any weights. `load_params` reads the weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax import storage
from hs2p_jax.checkpoint import ModelMeta, load_model, read_meta, resolve_model_dir, tokenizer_dir
from hs2p_jax.config import ModelConfig
from hs2p_jax.convert import gguf_config, load_gguf, load_hf
from hs2p_jax.convert.gguf import resolve as resolve_gguf
from hs2p_jax.convert.hf import read_config
from hs2p_jax.convert.state import ReadStats, head_init
from hs2p_jax.distributed import once_per_host
from hs2p_jax.errors import UserError
from hs2p_jax.model import RewardModel, create, merge_lora, preset
from hs2p_jax.model.config import LlamaConfig, from_hf_config
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings
from hs2p_jax.tokenizer import load_tokenizer

# weights on the hub: downloaded only by `load_params`; metadata and tokenizer files by anyone
_METADATA_FILES = ["*.json", "tokenizer*", "*.jinja"]


def _runtime(mc: ModelConfig) -> dict:
  lc = mc.lora
  out = {"dtype": mc.dtype, "scan_layers": mc.scan_layers, "remat": mc.remat, "attention": mc.attention,
         "weight_grad": mc.weight_grad, "lora_rank": lc.rank, "lora_alpha": float(lc.alpha),
         "lora_targets": tuple(lc.targets), "lora_train_head": bool(lc.train_head),
         "lora_dropout": float(lc.dropout)}
  if mc.num_layers is not None:
    out["num_layers"] = mc.num_layers
  return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_spec(mc: ModelConfig) -> str:
  """The tokenizer `mc` implies: explicit, else that of its weights (`weights_tokenizer`), else bytes."""
  if mc.tokenizer not in ("auto", None):
    return mc.tokenizer
  own = weights_tokenizer(mc)
  if own is not None:
    return own
  if mc.source or (mc.init_from and not is_peft_adapter(mc.init_from)):
    raise UserError(f"model.tokenizer=auto: {mc.init_from or mc.source} has no tokenizer; set model.tokenizer "
                    f"(a Hugging Face directory, gguf:PATH or bytes)")
  return "bytes"


def weights_tokenizer(mc: ModelConfig) -> str | None:
  """The tokenizer that comes with `mc`'s weights: a checkpoint's `tokenizer/`, a GGUF file's, a
  Hugging Face source's tokenizer files; None for random weights or a source without one."""
  if mc.init_from and not is_peft_adapter(mc.init_from):
    return tokenizer_dir(mc.init_from)  # a step checkpoint's: its run's; a URL's: copied (small: any process may)
  if not mc.source:
    return None
  if mc.source.startswith("gguf:"):
    return mc.source
  path = hub_or_local(mc.source)
  return path if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES) else None


def run_tokenizer(mc: ModelConfig, key: str = "model") -> Any:
  """The tokenizer a run of `mc` (its `key:` section) trains with, checked against the weights before any
  data is read: its tokens fit the model's vocabulary, and a tokenizer set explicitly where the weights
  come with their own (a byte tokenizer over a real model, say) has their vocabulary."""
  spec = tokenizer_spec(mc)
  tokenizer = load_tokenizer(spec)
  arch = architecture(mc)[0]
  if len(tokenizer) > arch.vocab_size:
    raise UserError(f"{key}.tokenizer={mc.tokenizer} ({spec}): {len(tokenizer)} tokens do not fit the model's "
                    f"vocabulary of {arch.vocab_size}")
  own = weights_tokenizer(mc) if mc.tokenizer not in ("auto", None) else None
  if own is not None and own != spec:
    theirs = load_tokenizer(own)
    if theirs.get_vocab() != tokenizer.get_vocab():
      raise UserError(f"{key}.tokenizer={mc.tokenizer}: the weights of {key}.{'init_from' if mc.init_from else 'source'}"
                      f"={mc.init_from or mc.source} come with another tokenizer ({len(theirs)} tokens, this one has "
                      f"{len(tokenizer)}); leave {key}.tokenizer unset (auto) to train with theirs")
  return tokenizer


_FETCHED: dict[tuple[str, bool], str] = {}  # (source, with weights) -> this host's copy: each fetched once a process


def hub_or_local(src: str, weights: bool = False) -> str:
  """A local directory for `hf:DIR`, `DIR`, `hf:ORG/NAME` (from the Hugging Face hub) or a URL
  (`gs://BUCKET/DIR`, copied into this host's cache): config and tokenizer files, and with `weights`
  the safetensors; one process per host downloads, the others wait, and a failure on any host stops
  every process."""
  path = src[3:] if src.startswith("hf:") else src
  if storage.is_url(path):
    patterns = None if weights else _METADATA_FILES
    return once_per_host(lambda: storage.local_copy(path, patterns), f"model.source={src}")
  if os.path.isdir(path):
    return path
  if not src.startswith("hf:") or path.startswith(("/", ".")):
    raise UserError(f"model.source={src}: no such directory")

  def fetch() -> str:
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(path, allow_patterns=_METADATA_FILES + (["*.safetensors"] if weights else []))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
      raise UserError(f"cannot download from the Hugging Face hub ({str(e).splitlines()[0][:160]})") from None
  known = _FETCHED.get((src, weights)) or (None if weights else _FETCHED.get((src, True)))
  if known is None:  # every process asks the same sources in the same order: the same calls are skipped
    known = _FETCHED[(src, weights)] = once_per_host(fetch, f"model.source={src}")
  return known


def architecture(mc: ModelConfig, download: bool = True) -> tuple[LlamaConfig, str]:
  """The model's LlamaConfig (its runtime keys applied) and where it came from, from metadata only.
  `download=False` (hs2p plan) never asks the hub: a hub source not on disk falls back to the preset."""
  runtime = _runtime(mc)
  if mc.init_from and is_peft_adapter(mc.init_from):  # adapters over the base model.source names
    _peft_base(mc)
    return architecture(dataclasses.replace(mc, init_from=None), download)[0], \
        f"model.init_from={mc.init_from} (PEFT adapter) over model.source={mc.source}"
  if mc.init_from and not download and not is_local_checkpoint(mc.init_from):
    return preset(mc.preset, **runtime), f"model.preset={mc.preset} ({mc.init_from}: not read by plan here)"
  if mc.init_from:
    meta = read_meta(mc.init_from)
    if mc.num_layers is not None and mc.num_layers != meta.config.num_layers:
      raise UserError(f"model.num_layers={mc.num_layers}: the checkpoint model.init_from={mc.init_from} has "
                      f"{meta.config.num_layers} layers")
    if meta.kind != mc.kind and mc.kind != "reward":
      raise UserError(f"model.init_from={mc.init_from}: a {meta.kind} checkpoint cannot start a {mc.kind} model")
    return meta.config.replace(**runtime), f"model.init_from={mc.init_from}"
  if mc.source and mc.source.startswith("gguf:"):
    return gguf_config(resolve_gguf(mc.source[5:]), **runtime), f"model.source={mc.source}"
  if mc.source:
    path = mc.source[3:] if mc.source.startswith("hf:") else mc.source
    if download or (not storage.is_url(path) and os.path.isfile(os.path.join(path, "config.json"))):
      return from_hf_config(read_config(hub_or_local(mc.source)), **runtime), f"model.source={mc.source}"
    return preset(mc.preset, **runtime), f"model.preset={mc.preset} ({mc.source}: not read by plan here)"
  return preset(mc.preset, **runtime), f"model.preset={mc.preset}"


def random_model(kind: str, cfg, num_attributes: int, seed: int, mesh: Mesh | None, rules: Rules):
  """A freshly initialised model, created directly in its sharded layout when a mesh is given."""
  if mesh is None:
    return create(kind, cfg, num_attributes, seed)
  abstract = nnx.eval_shape(lambda: create(kind, cfg, num_attributes, seed))
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.state(create(kind, cfg, num_attributes, seed)), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def as_reward_model(src: nnx.Module, num_attributes: int, seed: int) -> RewardModel:
  """A reward model with `src`'s backbone and a fresh head (src: a causal LM or a reward model
  with another head size)."""
  cfg = src.cfg
  rm = nnx.eval_shape(lambda: create("reward", cfg, num_attributes, seed))
  rm.model = src.model
  kernel = head_init(seed)((cfg.hidden_size, num_attributes))
  rm.head_kernel = nnx.Param(jax.numpy.asarray(kernel), axes=("embed", "attributes"))
  rm.head_bias = nnx.Param(jax.numpy.zeros((num_attributes,)), axes=("attributes",))
  return rm


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")


def with_adapters(model: nnx.Module, lora: dict[str, Any], seed: int, mesh: Mesh | None, rules: Rules) -> nnx.Module:
  """`model` with fresh LoRA adapters of `lora` (LlamaConfig's fields; B zero: it computes what
  `model` computes); only the adapters are initialised, the weights are `model`'s, not copied. A
  model with other adapters has them merged first; one with these adapters is returned as it is."""
  if not lora.get("lora_rank"):
    return merge_lora(model)
  if {k: getattr(model.cfg, k) for k in LORA_KEYS} == lora:
    return model
  model = merge_lora(model)
  cfg = model.cfg.replace(**lora)
  n = getattr(model, "num_attributes", 9)
  kind = "reward" if isinstance(model, RewardModel) else "lm"
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create(kind, cfg, n, seed)))
  adapters_abstract = nnx.state(nnx.merge(graphdef, abstract), nnx.LoRAParam)
  shardings = state_shardings(adapters_abstract, mesh, rules) if mesh is not None else None
  adapters = jax.jit(lambda: nnx.state(create(kind, cfg, n, seed), nnx.LoRAParam), out_shardings=shardings)()
  state = dict(nnx.to_flat_state(nnx.state(model)))
  state.update(nnx.to_flat_state(adapters))
  return nnx.merge(graphdef, nnx.from_flat_state(state))


def load_source(mc: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                stats: ReadStats | None = None) -> nnx.Module:
  """The model of a run's `model:` section with its weights, read onto `mesh` (`stats` counts the
  bytes read from the source files: each process reads only its devices' shards), with fresh
  adapters where `model.lora` asks for them."""
  runtime = _runtime(mc)
  lora = {k: runtime.pop(k) for k in LORA_KEYS}
  model = _load_weights(mc, runtime, mesh, rules, stats if stats is not None else ReadStats())
  if not lora["lora_rank"] and not model.cfg.lora_rank:
    return model
  return with_adapters(model, lora, mc.seed, mesh, rules)


def is_peft_adapter(path: str | None) -> bool:
  """Whether `path` is a PEFT adapter directory (adapter_config.json) on this machine."""
  from hs2p_jax.convert.peft import CONFIG
  return bool(path) and not storage.is_url(path) and os.path.isfile(os.path.join(path, CONFIG))


def _peft_base(mc: ModelConfig) -> None:
  """Checks that a PEFT `model.init_from` has its base: `model.source`, the base's weights."""
  if mc.source:
    return
  from hs2p_jax.convert.peft import read_adapter_config
  named = read_adapter_config(mc.init_from).get("base_model_name_or_path")
  hint = f" (its adapter_config.json names {named})" if named else ""
  raise UserError(f"model.init_from={mc.init_from}: a PEFT adapter; set model.source to its base model{hint}")


def _load_weights(mc: ModelConfig, runtime: dict[str, Any], mesh: Mesh | None, rules: Rules,
                  stats: ReadStats) -> nnx.Module:
  kind = mc.kind
  if mc.init_from and is_peft_adapter(mc.init_from):  # the base from model.source, then the adapters (and head)
    from hs2p_jax.convert.peft import load_adapter, lora_fields
    _peft_base(mc)
    model = _load_weights(dataclasses.replace(mc, init_from=None), runtime, mesh, rules, stats)
    return load_adapter(with_adapters(model, lora_fields(mc.init_from), mc.seed, mesh, rules), mc.init_from)
  if mc.init_from:
    architecture(mc)  # the kind and depth checks
    model, meta = load_model(mc.init_from, mesh, rules, **{k: v for k, v in runtime.items() if k != "num_layers"})
    stats.add(sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model)) for s in x.addressable_shards))
    if meta.kind != kind or (kind == "reward" and meta.num_attributes != mc.num_attributes):
      model = as_reward_model(merge_lora(model), mc.num_attributes, mc.seed)
    return model
  if mc.source and mc.source.startswith("gguf:"):
    return load_gguf(mc.source[5:], head=kind, num_attributes=mc.num_attributes, mesh=mesh, rules=rules,
                     seed=mc.seed, stats=stats, **runtime)
  if mc.source:
    return load_hf(hub_or_local(mc.source, weights=True), head=kind, num_attributes=mc.num_attributes, mesh=mesh,
                   rules=rules, seed=mc.seed, stats=stats, **runtime)
  return random_model(kind, preset(mc.preset, **runtime), mc.num_attributes, mc.seed, mesh, rules)


def load_params(mc: ModelConfig, abstract: Any, mesh: Mesh | None, rules: Rules, stats: ReadStats) -> Any:
  """The trainable params of `mc`'s model, read from its source into the layout of `abstract` (the
  run state's: an error naming the first array whose shape the weights do not have)."""
  params = nnx.state(load_source(mc, mesh, rules, stats))
  got = dict(nnx.to_flat_state(params))
  for path, want in nnx.to_flat_state(abstract):
    have = got.get(path)
    if have is None or tuple(have.get_value().shape) != tuple(want.get_value().shape):
      shape = tuple(have.get_value().shape) if have is not None else "no array"
      raise UserError(f"{mc.init_from or mc.source}: {'.'.join(map(str, path))} is {shape}, the model's "
                      f"architecture needs {tuple(want.get_value().shape)}")
  return params


def check_tokenizer(tokenizer: Any, cfg: LlamaConfig) -> None:
  if len(tokenizer) > cfg.vocab_size:
    raise UserError(f"model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size {cfg.vocab_size}")


def model_meta(mc: ModelConfig, cfg: LlamaConfig, template: str = "steerlm", max_length: int | None = None) -> ModelMeta:
  """The checkpoint metadata of a run's model trained at `max_length` tokens (its reward weights
  checked now, not mid-run)."""
  n_attr = mc.num_attributes if mc.kind == "reward" else 0
  if mc.kind == "reward":
    np.asarray(attribute_weights(mc.reward_weights, n_attr))
  source = mc.source
  if source is None and mc.init_from and not is_peft_adapter(mc.init_from):
    source = read_meta(mc.init_from).source  # the weights the checkpoint it continues started from
  return ModelMeta(kind=mc.kind, config=cfg, num_attributes=n_attr or 9, reward_weights=mc.reward_weights,
                   template=template, max_length=max_length, source=source)


def build_model(mc: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
  """(model, meta, tokenizer) for a run's `model:` section, weights read."""
  model = load_source(mc, mesh, rules)
  tokenizer = load_tokenizer(tokenizer_spec(mc))
  check_tokenizer(tokenizer, model.cfg)
  return model, model_meta(mc, model.cfg), tokenizer


def with_template(meta: ModelMeta, template: str) -> ModelMeta:
  return dataclasses.replace(meta, template=template)


def is_local_checkpoint(path: str | None) -> bool:
  """Whether `path` is one of our model checkpoints (a run dir holding one, a run's step checkpoint) on
  this machine."""
  if not path or storage.is_url(path):
    return False
  try:
    resolve_model_dir(path)
  except UserError:
    return False
  return True
