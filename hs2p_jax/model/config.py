"""Llama architecture hyperparameters, named presets, and the Hugging Face `config.json` mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

from hs2p_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "splash")  # see model/attention.py `choose`
WEIGHT_GRADS = ("flat", "autodiff")  # see hs2p_jax/model/linear.py
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # model/lora.py


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a Llama decoder. Parameters are always float32; `dtype` is the compute dtype."""

  family: str = "llama"          # model/families.py: what of the decoder a family changes
  attention_bias: bool = False   # biases on the q/k/v projections (Qwen2 / Qwen2.5)
  qk_norm: bool = False          # RMSNorm over each head's queries and keys before RoPE (Qwen3)
  sliding_window: int = 0        # >0: each query sees the keys fewer than this many positions back (Mistral v0.1)
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rms_norm_eps: float = 1e-5
  rope_theta: float = 100000.0
  # Llama 3.1 "llama3" scaling as sorted (name, value) pairs of "factor", "low_freq_factor",
  # "high_freq_factor", "original_max_position_embeddings" (a dict is accepted); None = plain theta.
  rope_scaling: tuple[tuple[str, float], ...] | None = None
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "reference"
  weight_grad: str = "flat"
  # LoRA adapters (model/lora.py) of this rank on the projections `lora_targets` names (PEFT's
  # names); 0: none. Their product is scaled by lora_alpha / lora_rank.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  lora_train_head: bool = True   # with adapters, a reward model's head trains in full (else it stays frozen)
  lora_dropout: float = 0.0      # dropout on the adapters' input in training steps (`lora.with_dropout`)

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted((k, float(v)) for k, v in self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.lora_targets, (list, str)):
      object.__setattr__(self, "lora_targets", (self.lora_targets,) if isinstance(self.lora_targets, str)
                         else tuple(self.lora_targets))
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if unknown:
      raise UserError(f"model.lora.targets: {', '.join(unknown)} unknown; expected some of {', '.join(LORA_TARGETS)}")
    if self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
      raise UserError(f"model.lora.rank={self.lora_rank}: expected 0 (no adapters) or a positive rank with targets")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise UserError(f"model.lora.dropout={self.lora_dropout}: expected a rate in [0, 1)")
    from hs2p_jax.model.families import FAMILIES
    if self.family not in FAMILIES:
      raise UserError(f"model family {self.family!r}: expected one of {', '.join(FAMILIES)}")
    if self.sliding_window < 0:
      raise UserError(f"model: sliding_window={self.sliding_window}: expected 0 (none) or a positive length")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"model: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLS:
      raise UserError(f"model.attention={self.attention!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    if self.weight_grad not in WEIGHT_GRADS:
      raise UserError(f"model.weight_grad={self.weight_grad!r}: expected one of {', '.join(WEIGHT_GRADS)}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise UserError(f"model.dtype={self.dtype!r}: expected float32, bfloat16 or float16")

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @property
  def rope_scaling_dict(self) -> dict[str, float] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

  def num_params(self, with_lm_head: bool = True) -> int:
    """Parameter count of the backbone (+ LM head when untied and requested)."""
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    per_layer += self.head_dim * (self.num_heads + 2 * self.num_kv_heads) * self.attention_bias
    per_layer += 2 * self.head_dim * self.qk_norm
    n = self.vocab_size * d + l * per_layer + d
    if with_lm_head and not self.tie_word_embeddings:
      n += self.vocab_size * d
    return n


PRESETS: dict[str, LlamaConfig] = {
    # A few-layer model for tests and the CPU quickstart (byte-level vocabulary).
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=2048,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "smollm2-135m": LlamaConfig(),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192},
                                max_position_embeddings=131072, tie_word_embeddings=True,
                                bos_token_id=128000, eos_token_id=(128001, 128008, 128009), dtype="bfloat16"),
    "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192},
                                max_position_embeddings=131072, tie_word_embeddings=False,
                                bos_token_id=128000, eos_token_id=(128001, 128008, 128009), dtype="bfloat16"),
    "llama-3.1-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                 rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192},
                                 max_position_embeddings=131072, tie_word_embeddings=False,
                                 bos_token_id=128000, eos_token_id=(128001, 128008, 128009), dtype="bfloat16"),
}


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> LlamaConfig:
  """Qwen3 dense (the Hub's Qwen/Qwen3-* config.json): 8 KV heads of 128, q/k norms, rope 1e6."""
  return LlamaConfig(family="qwen3", qk_norm=True, vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=tied,
                     bos_token_id=151643, eos_token_id=151645, dtype="bfloat16")


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int) -> LlamaConfig:
  """Qwen2.5 (Qwen/Qwen2.5-*-Instruct config.json): q/k/v biases, rope 1e6."""
  return LlamaConfig(family="qwen2", attention_bias=True, vocab_size=152064, hidden_size=hidden,
                     intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                     bos_token_id=151643, eos_token_id=151645, dtype="bfloat16")


PRESETS.update({
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),
    # mistralai/Mistral-7B-v0.3 (whole-context attention: v0.1's 4096-token window is not supported yet)
    "mistral-7b": LlamaConfig(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                              bos_token_id=1, eos_token_id=2, dtype="bfloat16"),
})


def preset(name: str, **overrides: Any) -> LlamaConfig:
  """A named architecture (see `PRESETS`), with field overrides."""
  if name not in PRESETS:
    raise UserError(f"model.preset={name!r}: unknown; expected one of {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides)


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
  """Maps a Hugging Face Llama `config.json` dict to a `LlamaConfig`."""
  from hs2p_jax.model.families import FAMILIES, hf_fields
  model_type = hf.get("model_type", "llama")
  if model_type not in FAMILIES:
    raise UserError(f"config.json: model_type={model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
  if hf.get("mlp_bias"):
    raise UserError("config.json: mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise UserError("config.json: attention_bias=true is not supported for llama")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
  if window and model_type != "mistral":
    raise UserError(f"config.json: {model_type}'s sliding-window attention (use_sliding_window, {window} tokens) is "
                    "not supported yet; set use_sliding_window=false to attend over the whole context")
  n_heads = hf["num_attention_heads"]
  rope_params = dict(hf.get("rope_parameters") or {})
  rope_scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
  theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
  scaling = None
  if rope_scaling:
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ("llama3", "default", None):
      raise UserError(f"config.json: rope_scaling type {kind!r} is not supported (only 'llama3')")
    if kind == "llama3":
      scaling = {k: float(rope_scaling[k]) for k in
                 ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
  cfg = LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=n_heads,
      num_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"),
      sliding_window=int(window or 0),
      **hf_fields(model_type, hf),
  )
  return cfg.replace(**overrides)


def to_hf_config(cfg: LlamaConfig, architecture: str = "LlamaForCausalLM", **extra: Any) -> dict[str, Any]:
  """The Hugging Face `config.json` dict for `cfg` (float32 weights unless `extra` says torch_dtype);
  `architecture`'s "Llama" prefix is the family's."""
  rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    rope_parameters = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling_dict}
  from hs2p_jax.model.families import FAMILIES
  family = FAMILIES[cfg.family]
  out = {
      "architectures": [architecture.replace("Llama", family.prefix, 1)],
      "model_type": family.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": ({"rope_type": "llama3", **cfg.rope_scaling_dict} if cfg.rope_scaling else None),
      "rope_parameters": rope_parameters,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_bias": cfg.attention_bias,
      "mlp_bias": False,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      "torch_dtype": "float32",
  }
  if cfg.family != "llama":
    out.update({"use_sliding_window": bool(cfg.sliding_window), "sliding_window": cfg.sliding_window or None})
  out.update(extra)
  return out
