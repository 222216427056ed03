"""The model a run starts from: a preset at random, Hugging Face / GGUF weights, or one of our checkpoints."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax.checkpoint import ModelMeta, load_model, resolve_model_dir
from hs2p_jax.config import ModelConfig
from hs2p_jax.convert import load_gguf, load_hf
from hs2p_jax.convert.state import head_init
from hs2p_jax.errors import UserError
from hs2p_jax.model import RewardModel, create, preset
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import DEFAULT_RULES, Rules, state_shardings
from hs2p_jax.tokenizer import load_tokenizer


def _runtime(mc: ModelConfig) -> dict:
  return {"dtype": mc.dtype, "scan_layers": mc.scan_layers, "remat": mc.remat, "attention": mc.attention,
          "weight_grad": mc.weight_grad}


def tokenizer_spec(mc: ModelConfig) -> str:
  """The tokenizer `mc` implies: explicit, else that of its checkpoint or source, else bytes."""
  if mc.tokenizer not in ("auto", None):
    return mc.tokenizer
  if mc.init_from:
    tok_dir = os.path.join(resolve_model_dir(mc.init_from), "tokenizer")
    if os.path.isdir(tok_dir):
      return tok_dir
  if mc.source:
    if mc.source.startswith("gguf:"):
      return mc.source
    return hub_or_local(mc.source)
  return "bytes"


def hub_or_local(src: str) -> str:
  """A local directory for `hf:DIR`, `DIR` or `hf:ORG/NAME` (downloaded from the Hugging Face hub:
  config, safetensors and tokenizer files)."""
  path = src[3:] if src.startswith("hf:") else src
  if os.path.isdir(path):
    return path
  if not src.startswith("hf:") or path.startswith(("/", ".")):
    raise UserError(f"model.source={src}: no such directory")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
  except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
    raise UserError(f"model.source={src}: cannot download from the Hugging Face hub "
                    f"({str(e).splitlines()[0][:160]})") from None


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


def build_model(mc: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
  """(model, meta, tokenizer) for a run's `model:` section."""
  kind, runtime = mc.kind, _runtime(mc)
  overrides = {k: v for k, v in runtime.items()}
  if mc.num_layers is not None:
    overrides["num_layers"] = mc.num_layers
  if mc.init_from:
    model, meta = load_model(mc.init_from, mesh, rules, **runtime)
    if mc.num_layers is not None and mc.num_layers != meta.config.num_layers:
      raise UserError(f"model.num_layers={mc.num_layers}: the checkpoint model.init_from={mc.init_from} has "
                      f"{meta.config.num_layers} layers")
    if meta.kind != kind or (kind == "reward" and meta.num_attributes != mc.num_attributes):
      if kind != "reward":
        raise UserError(f"model.init_from={mc.init_from}: a {meta.kind} checkpoint cannot start a {kind} model")
      model = as_reward_model(model, mc.num_attributes, mc.seed)
  elif mc.source:
    src = mc.source
    if src.startswith("gguf:"):
      model = load_gguf(src[5:], head=kind, num_attributes=mc.num_attributes, mesh=mesh, rules=rules,
                        seed=mc.seed, **overrides)
    else:
      path = hub_or_local(src)
      model = load_hf(path, head=kind, num_attributes=mc.num_attributes, mesh=mesh, rules=rules, seed=mc.seed,
                      **overrides)
  else:
    cfg = preset(mc.preset, **overrides)
    model = random_model(kind, cfg, mc.num_attributes, mc.seed, mesh, rules)
  tokenizer = load_tokenizer(tokenizer_spec(mc))
  if len(tokenizer) > model.cfg.vocab_size:
    raise UserError(f"model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size "
                    f"{model.cfg.vocab_size}")
  n_attr = mc.num_attributes if kind == "reward" else 0
  if kind == "reward":
    np.asarray(attribute_weights(mc.reward_weights, n_attr))  # validates now, not mid-run
  meta = ModelMeta(kind=kind, config=model.cfg, num_attributes=n_attr or 9, reward_weights=mc.reward_weights)
  return model, meta, tokenizer


def with_template(meta: ModelMeta, template: str) -> ModelMeta:
  return dataclasses.replace(meta, template=template)
