"""The decoder families beside Llama, each described by what it changes in the shared decoder.

A family is a row: its Hugging Face `model_type` and class prefix, and the switches of
`LlamaConfig` it turns on (`attention_bias`: biases on the q/k/v projections, Qwen2 / Qwen2.5;
`qk_norm`: an RMSNorm over each head's queries and keys before RoPE, Qwen3). The modules read the
switches (`model/llama.py`), `config.from_hf_config` and `to_hf_config` read and write them. Why
switches on one decoder rather than a module per family: the families differ in a few tensors of
the same blocks, and one decoder keeps one set of logical axes, kernels, LoRA targets, KV cache and
plans for all of them; the next family is a row and, where it brings one, a module for its
difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str           # config.json's model_type
  prefix: str               # transformers' class names: f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification"
  attention_bias: bool = False  # always (Qwen2) or as config.json's `attention_bias` says (None)
  qk_norm: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama"),
    "mistral": Family("mistral", "Mistral"),
    "qwen2": Family("qwen2", "Qwen2", attention_bias=True),
    "qwen3": Family("qwen3", "Qwen3", qk_norm=True),
}


def hf_class(family: str, kind: str) -> str:
  """transformers' class of `family` for a causal LM (`kind` "lm") or a reward model ("reward")."""
  return FAMILIES[family].prefix + ("ForCausalLM" if kind == "lm" else "ForSequenceClassification")


def hf_fields(family: str, hf: dict[str, Any]) -> dict[str, Any]:
  """The LlamaConfig switches a family's config.json sets."""
  f = FAMILIES[family]
  return {"family": family, "attention_bias": f.attention_bias or bool(hf.get("attention_bias", False)),
          "qk_norm": f.qk_norm}
