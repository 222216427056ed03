"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, out and in.

PEFT names an adapter `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r] (in and out as Hugging Face's Linear lays them out: heads flattened
head-major), scales it by lora_alpha / r as `model.lora` does, and saves a reward model's head
(`modules_to_save: ["score"]`) as `base_model.model.score.weight` [labels, hidden]. Hugging Face's
`score` has no bias: ours goes to the side file `convert.mapping.HEAD_BIAS_FILE` (PEFT ignores it;
`load_adapter` reads it). The files follow from the parameters alone, so `PeftModel.from_pretrained`
over the base model's Hugging Face export computes what the adapted model computes (tested).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hs2p_jax.atomic import atomic_dir
from hs2p_jax.convert.mapping import HEAD_BIAS_FILE
from hs2p_jax.errors import UserError
from hs2p_jax.model import RewardModel
from hs2p_jax.model.lora import SUFFIX_A, SUFFIX_B, TARGETS

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def _name(target: str, layer: int, side: str) -> str:
  owner = _HF_MODULE[TARGETS[target][0]]
  return f"{PREFIX}model.layers.{layer}.{owner}.{target}.lora_{side}.weight"


def _replicated(tree: Any) -> Any:
  """Host numpy copies of `tree`'s arrays (gathered to every device first where they are sharded)."""
  leaf = jax.tree.leaves(tree)[0]
  mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
  if mesh is not None and mesh.size > 1:
    tree = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if hasattr(a, "addressable_data") else np.asarray(a),
                      tree)


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
  """PEFT's tensors of `model`'s adapters (and a reward model's head), float32."""
  cfg = model.cfg
  if not cfg.lora_rank:
    raise UserError("the model has no LoRA adapters (model.lora.rank is 0)")
  layers = model.model.layers
  out: dict[str, np.ndarray] = {}
  for target in cfg.lora_targets:
    owner, weight, _ = TARGETS[target]
    module = getattr(layers, owner)
    a, b = _replicated((getattr(module, weight + SUFFIX_A)[...], getattr(module, weight + SUFFIX_B)[...]))
    r = cfg.lora_rank
    for i in range(cfg.num_layers):
      out[_name(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)  # [*K, r] -> [r, in]
      out[_name(target, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)  # [r, *M] -> [out, r]
  if isinstance(model, RewardModel):
    out[PREFIX + "score.weight"] = np.ascontiguousarray(_replicated(model.head_kernel[...]).T)
  return out


def adapter_config(model: nnx.Module, base: str | None = None) -> dict[str, Any]:
  """`adapter_config.json` with the fields PEFT's LoraConfig writes (0.22): a LoRA of the model's
  rank, alpha and targets; SEQ_CLS with the head saved whole for a reward model, CAUSAL_LM for a policy."""
  cfg = model.cfg
  reward = isinstance(model, RewardModel)
  alpha = float(cfg.lora_alpha)
  return {"task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "peft_type": "LORA", "auto_mapping": None,
          "base_model_name_or_path": base, "revision": None, "inference_mode": True, "r": cfg.lora_rank,
          "target_modules": list(cfg.lora_targets), "exclude_modules": None,
          "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
          "lora_dropout": float(getattr(cfg, "lora_dropout", 0.0)), "fan_in_fan_out": False, "bias": "none",
          "use_rslora": False, "modules_to_save": ["score"] if reward else None, "init_lora_weights": True,
          "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
          "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
          "loftq_config": {}, "use_dora": False, "layer_replication": None, "lora_bias": False,
          "target_parameters": None}


def export_adapter(model: nnx.Module, out_dir: str, base: str | None = None, overwrite: bool = False) -> None:
  """Writes `model`'s adapters (and head) as a PEFT LoRA directory, atomically; every process calls
  it (the gathers are collective), process 0 writes. `base`: the base model's name or path, recorded."""
  from safetensors.numpy import save_file
  tensors = adapter_tensors(model)
  bias = _replicated(model.head_bias[...]) if isinstance(model, RewardModel) else None
  if jax.process_index() != 0:
    return
  if os.path.exists(out_dir) and not overwrite:
    raise UserError(f"{out_dir} already exists")
  try:
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
      save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
      if bias is not None:
        save_file({"score.bias": np.asarray(bias, np.float32)}, os.path.join(tmp, HEAD_BIAS_FILE))
      with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(model, base), f, indent=2)
  except OSError as e:
    raise UserError(f"{out_dir}: the adapter could not be written ({e.strerror or e})") from None


def read_adapter_config(path: str) -> dict[str, Any]:
  """A PEFT LoRA directory's config; one line naming what does not fit `model.lora`."""
  file = os.path.join(path, CONFIG)
  try:
    with open(file, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{file}: not a readable PEFT adapter config ({e})") from None
  if config.get("peft_type") != "LORA":
    raise UserError(f"{file}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
  for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
    if config.get(key, ok) != ok:
      raise UserError(f"{file}: {key}={config[key]} is not supported")
  if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("layers_to_transform"):
    raise UserError(f"{file}: per-layer ranks, alphas or layers are not supported")
  for key in ("exclude_modules", "trainable_token_indices", "target_parameters", "layer_replication"):
    if config.get(key):
      raise UserError(f"{file}: {key}={config[key]!r} is not supported")
  if config.get("bias", "none") != "none" or config.get("lora_bias"):
    raise UserError(f"{file}: adapters with biases (bias={config.get('bias')!r}, lora_bias="
                    f"{config.get('lora_bias', False)}) are not supported")
  targets = config.get("target_modules")
  if isinstance(targets, str) or not targets or set(targets) - set(TARGETS):
    raise UserError(f"{file}: target_modules {targets!r}: expected a list of {', '.join(TARGETS)}")
  return config


def lora_fields(path: str) -> dict[str, Any]:
  """The LlamaConfig LoRA fields of a PEFT adapter directory: rank, alpha, targets, dropout, and
  whether a reward model's head trains in full (PEFT saves it whole: `modules_to_save`)."""
  config = read_adapter_config(path)
  saved = config.get("modules_to_save") or []
  return {"lora_rank": int(config["r"]), "lora_alpha": float(config["lora_alpha"]),
          "lora_targets": tuple(t for t in TARGETS if t in config["target_modules"]),
          "lora_dropout": float(config.get("lora_dropout") or 0.0),
          "lora_train_head": "score" in saved or config.get("task_type") == "SEQ_CLS"}


def load_adapter(model: nnx.Module, path: str) -> nnx.Module:
  """Fills `model`'s adapters (built with `lora_fields(path)`) and, for a reward model saved with
  its head, the head, from the PEFT directory `path`; returns the model."""
  from safetensors.numpy import load_file
  cfg = model.cfg
  fields = lora_fields(path)
  mine = {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": tuple(cfg.lora_targets)}
  if mine["lora_rank"] != fields["lora_rank"] or set(mine["lora_targets"]) != set(fields["lora_targets"]):
    raise UserError(f"{path}: a rank-{fields['lora_rank']} adapter of {', '.join(fields['lora_targets'])}; "
                    f"the model has rank {cfg.lora_rank} on {', '.join(cfg.lora_targets)}")
  try:
    tensors = load_file(os.path.join(path, WEIGHTS))
  except (OSError, ValueError) as e:
    raise UserError(f"{os.path.join(path, WEIGHTS)}: not a readable safetensors file ({e})") from None
  known = {_name(t, i, side) for t in cfg.lora_targets for i in range(cfg.num_layers) for side in "AB"}
  extra = sorted(set(tensors) - known - {PREFIX + "score.weight"})
  if extra:  # e.g. modules_to_save: ["embed_tokens"], saved whole: not a part of a LoRA model here
    raise UserError(f"{path}: {WEIGHTS} holds {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}; "
                    f"only LoRA A/B of {', '.join(cfg.lora_targets)} and a reward head (score) load")
  layers, r = model.model.layers, cfg.lora_rank
  for target in cfg.lora_targets:
    owner, weight, _ = TARGETS[target]
    module = getattr(layers, owner)
    for suffix, side in ((SUFFIX_A, "A"), (SUFFIX_B, "B")):
      var = getattr(module, weight + suffix)
      shape = var.shape
      stack = []
      for i in range(cfg.num_layers):
        name = _name(target, i, side)
        if name not in tensors:
          raise UserError(f"{path}: {WEIGHTS} has no {name}")
        t = tensors[name].astype(np.float32).T  # [in, r] or [r, out]
        want = (int(np.prod(shape[1:-1])), r) if side == "A" else (r, int(np.prod(shape[2:])))
        if t.shape != want:
          raise UserError(f"{path}: {name} has shape {tensors[name].shape}, expected {want[::-1]}")
        stack.append(t.reshape(shape[1:]))
      var.set_value(jax.device_put(np.stack(stack), var.get_value().sharding))
  score = tensors.get(PREFIX + "score.weight")
  if isinstance(model, RewardModel) and score is not None:
    if score.shape != (model.num_attributes, cfg.hidden_size):
      raise UserError(f"{path}: score.weight has shape {score.shape}, the head is "
                      f"{(model.num_attributes, cfg.hidden_size)}")
    model.head_kernel.set_value(jax.device_put(score.astype(np.float32).T, model.head_kernel.get_value().sharding))
    bias_file = os.path.join(path, HEAD_BIAS_FILE)
    bias = load_file(bias_file)["score.bias"] if os.path.isfile(bias_file) else np.zeros(model.num_attributes)
    model.head_bias.set_value(jax.device_put(np.asarray(bias, np.float32), model.head_bias.get_value().sharding))
  return model
