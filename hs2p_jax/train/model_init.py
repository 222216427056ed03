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
from hs2p_jax.checkpoint import ModelMeta, load_model, read_meta, resolve_model_dir, run_of_step, tokenizer_dir
from hs2p_jax.config import ModelConfig
from hs2p_jax.convert import gguf_config
from hs2p_jax.convert.gguf import resolve as resolve_gguf
from hs2p_jax.convert.hf import read_config
from hs2p_jax.convert.state import ReadStats, head_init
from hs2p_jax.errors import UserError
from hs2p_jax.model import RewardModel, create, merge_lora, preset
from hs2p_jax.model.config import LORA_TARGETS, LlamaConfig, from_hf_config
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.weights import absolute_source, hub_or_local, random_model, read_source

def _runtime(mc: ModelConfig) -> dict:
  out = {"dtype": mc.dtype, "scan_layers": mc.scan_layers, "remat": mc.remat, "attention": mc.attention,
         "weight_grad": mc.weight_grad, **lora_settings(mc)}
  if mc.num_layers is not None:
    out["num_layers"] = mc.num_layers
  return out


# model.lora's keys as LlamaConfig names them, and their values where neither the config nor the
# starting model's adapters set them
LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "targets": "lora_targets", "dropout": "lora_dropout",
               "train_head": "lora_train_head"}
LORA_DEFAULTS = {"lora_rank": 0, "lora_alpha": 16.0, "lora_targets": LORA_TARGETS, "lora_dropout": 0.0,
                 "lora_train_head": True}
IDENTITY = ("lora_rank", "lora_alpha", "lora_targets")  # what makes adapters the ones they are


def start_adapters(mc: ModelConfig) -> dict[str, Any] | None:
  """The LoRA fields of the adapters `model.init_from` holds (a PEFT adapter directory, a LoRA model
  of ours), None where it holds none (or is not readable here: `hs2p plan` of a remote checkpoint)."""
  if not mc.init_from:
    return None
  if is_peft_adapter(mc.init_from):
    from hs2p_jax.convert.peft import lora_fields
    return lora_fields(mc.init_from)
  if storage.is_url(mc.init_from) or is_local_checkpoint(mc.init_from):
    cfg = read_meta(mc.init_from).config
    return {k: getattr(cfg, k) for k in LORA_DEFAULTS} if cfg.lora_rank else None
  return None


def lora_settings(mc: ModelConfig) -> dict[str, Any]:
  """The LlamaConfig LoRA fields a run of `mc` trains with. Adapters `model.init_from` holds are
  continued as they are (rank, alpha and targets theirs; dropout and whether the head trains theirs
  unless `model.lora` sets them); a `model.lora` value that contradicts them is one line, never a
  silent merge. `model.lora.rank=0` merges them and trains every weight, `model.lora.merge_init`
  merges them under fresh adapters of `model.lora`. Without adapters to start from: `model.lora`."""
  lc = mc.lora
  given = {field: getattr(lc, key) for key, field in LORA_FIELDS.items()}
  if given["lora_targets"] is not None:
    given["lora_targets"] = tuple(t for t in LORA_TARGETS if t in given["lora_targets"]) + \
        tuple(t for t in given["lora_targets"] if t not in LORA_TARGETS)  # a set, in one order (unknown: LlamaConfig says)
  start = start_adapters(mc)
  if lc.merge_init and start is None:
    raise UserError(f"model.lora.merge_init=true: model.init_from={mc.init_from} holds no LoRA adapters to merge")
  if start is None or given["lora_rank"] == 0 or lc.merge_init:
    return {k: LORA_DEFAULTS[k] if v is None else v for k, v in given.items()}
  clash = [k for k in IDENTITY if given[k] is not None and given[k] != start[k]]
  if clash:
    key = {field: key for key, field in LORA_FIELDS.items()}
    said = ", ".join(f"model.lora.{key[k]}={_show(given[k])}" for k in clash)
    theirs = ", ".join(f"{key[k]} {_show(start[k])}" for k in clash)
    raise UserError(f"{said}: model.init_from={mc.init_from} holds adapters with {theirs}; leave it unset to "
                    f"continue them, or set model.lora.rank=0 (merge them, train every weight) or "
                    f"model.lora.merge_init=true (merge them, train fresh adapters of model.lora)")
  return {k: start[k] if v is None else v for k, v in given.items()}


def _show(v: Any) -> str:
  return ",".join(v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


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


def architecture(mc: ModelConfig, download: bool = True) -> tuple[LlamaConfig, str]:
  """The model's LlamaConfig (its runtime keys applied) and where it came from, from metadata only.
  `download=False` (hs2p plan) never asks the hub: a hub source not on disk falls back to the preset."""
  runtime = _runtime(mc)
  if mc.init_from and is_peft_adapter(mc.init_from):  # adapters over the base model.source names
    _peft_base(mc)
    base = dataclasses.replace(mc, init_from=None, lora=type(mc.lora)())
    return architecture(base, download)[0].replace(**lora_settings(mc)), \
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


LORA_KEYS = IDENTITY


def with_adapters(model: nnx.Module, lora: dict[str, Any], seed: int, mesh: Mesh | None, rules: Rules,
                  fresh: bool = False) -> nnx.Module:
  """`model` with fresh LoRA adapters of `lora` (LlamaConfig's fields; B zero: it computes what
  `model` computes); only the adapters are initialised, the weights are `model`'s, not copied. A
  model with other adapters (or with `fresh`, any) has them merged first; one with these adapters is
  returned as it is."""
  if not lora.get("lora_rank"):
    return merge_lora(model)
  if not fresh and all(getattr(model.cfg, k) == lora[k] for k in LORA_KEYS):
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
  return with_adapters(model, lora, mc.seed, mesh, rules, fresh=mc.lora.merge_init)


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
  if mc.source:
    return read_source(mc.source, kind, mc.num_attributes, mc.seed, mesh, rules, stats, **runtime)
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
                   template=template, max_length=max_length, source=source, base=base_ref(mc, cfg))


def base_ref(mc: ModelConfig, cfg: LlamaConfig) -> dict[str, Any] | None:
  """Where the base of a LoRA run of `mc` (architecture `cfg`) is read from again, for its models to
  be saved as their adapters (`checkpoint.ModelMeta.base`; its fingerprint is added when they are):
  the source, the checkpoint it started from, or the seed of random weights. None (the model saved
  whole): no adapters, or a base no name reads again (adapters merged from a PEFT directory, a
  run's step checkpoint, which its run may delete)."""
  if not cfg.lora_rank:
    return None
  ref: dict[str, Any] = {"dtype": mc.dtype}
  continued = start_adapters(mc) is not None and not mc.lora.merge_init
  if mc.init_from and is_peft_adapter(mc.init_from):
    return {**ref, "source": absolute_source(mc.source)} if continued else None
  if mc.init_from:
    if continued:
      before = read_meta(mc.init_from).base
      if before is not None:  # the base its adapters trained over, rounded to the narrower dtype
        before = {k: v for k, v in before.items() if k != "fingerprint"}
        return {**before, "dtype": mc.dtype if before.get("dtype", "float32") == "float32" else before["dtype"]}
    if run_of_step(mc.init_from) is not None:
      return None
    return {**ref, "init_from": storage.absolute(resolve_model_dir(mc.init_from)), "merged": not continued}
  if mc.source:
    return {**ref, "source": absolute_source(mc.source), "seed": mc.seed}
  return {**ref, "seed": mc.seed}


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
