"""Model FLOPs and bytes of the benchmarked work, and device peaks to turn them into MFU.

Model FLOPs of a training step (the standard 6N + attention count, causal masking not discounted):
  6 * N * tokens + 12 * L * T^2 * (H * Dh) * rows,
where N = decoder matmul weights (L * (D * Dh * (2H + 2Hkv) + 3 * D * F)); the embedding lookup,
norms and the reward head (A outputs read at one token per row) are left out. With LoRA adapters
the frozen weights need no weight gradient: 4 * N (forward, input gradient) + 6 * N_lora per token. MFU = those FLOPs
per second over the device's peak dense rate for the compute dtype (unknown, so null, on CPU).
"""

from __future__ import annotations

# Peak dense FLOP/s and memory bytes/s by device family (datasheets). "float32" is the rate of the
# units XLA uses for float32 matmuls at default precision: TF32 tensor cores on GPUs, one bf16 pass
# on TPUs. CPUs have no entry: their MFU is reported as null.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "h100-pcie": {"bfloat16": 756.5e12, "float16": 756.5e12, "float32": 378e12},
    "h200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "v5p": {"bfloat16": 459e12, "float32": 459e12},
    "v5e": {"bfloat16": 197e12, "float32": 197e12},
}
PEAK_BANDWIDTH: dict[str, float] = {"h100": 3.35e12, "h100-pcie": 2.0e12, "h200": 4.8e12, "a100": 2.039e12,
                                    "v5p": 2.765e12, "v5e": 0.819e12}


def device_family(kind: str) -> str | None:
  """A PEAK_FLOPS key from a JAX device kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite"); None if unknown."""
  k = kind.lower()
  if "h100" in k:
    return "h100-pcie" if "pcie" in k else "h100"
  for fam in ("h200", "a100", "v5p"):
    if fam in k:
      return fam
  if "v5e" in k or "v5 lite" in k or "v5litepod" in k:
    return "v5e"
  return None


def peak_flops(kind: str, dtype: str) -> float | None:
  return PEAK_FLOPS.get(device_family(kind) or "", {}).get(dtype)


def decoder_matmul_params(cfg) -> int:
  """N of the FLOP count: weights of the decoder layers' matrix products."""
  d, dh = cfg.hidden_size, cfg.head_dim
  attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * d * cfg.intermediate_size)


def lora_matmul_params(cfg) -> int:
  """N_lora: weights of the LoRA adapters' matrix products, r * (K + M) per adapted K x M projection."""
  r = getattr(cfg, "lora_rank", 0)
  if not r:
    return 0
  d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, f),
          "up_proj": (d, f), "down_proj": (f, d)}
  return cfg.num_layers * sum(r * sum(dims[t]) for t in cfg.lora_targets)


def attention_flops(cfg, rows: int, seq: int) -> float:
  """The attention term of `train_flops`: 12 * L * T^2 * (H * Dh) per row (forward and backward)."""
  return float(12 * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim * rows)


def attention_forward_flops(cfg, rows: int, seq: int) -> float:
  """Attention's two matrix products in a forward pass: 4 * L * T^2 * (H * Dh) per row."""
  return float(4 * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim * rows)


def forward_flops(cfg, rows: int, seq: int, head_tokens: int = 0) -> float:
  """Model FLOPs of a forward pass over `rows` sequences of `seq` tokens: 2N per token, attention
  (`attention_forward_flops`), and the LM head (2 * D * V) at `head_tokens` positions."""
  return float(2 * (decoder_matmul_params(cfg) + lora_matmul_params(cfg)) * rows * seq
               + attention_forward_flops(cfg, rows, seq)
               + 2 * cfg.hidden_size * cfg.vocab_size * head_tokens)


def decode_flops(cfg, rows: int, new_tokens: int, prompt_len: int) -> float:
  """Model FLOPs of decoding `new_tokens` tokens for `rows` rows after a `prompt_len` prefill: per
  token 2N, the LM head, and attention over the context so far (its mean, prompt_len + new_tokens / 2)."""
  context = prompt_len + new_tokens / 2
  per_token = (2 * decoder_matmul_params(cfg) + 2 * cfg.hidden_size * cfg.vocab_size
               + 4 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim)
  return float(per_token * rows * new_tokens)


def train_flops(cfg, rows: int, seq: int) -> float:
  """Model FLOPs of one training step on `rows` sequences of `seq` tokens (see module docstring)."""
  per_token = (4 * decoder_matmul_params(cfg) + 6 * lora_matmul_params(cfg) if getattr(cfg, "lora_rank", 0)
               else 6 * decoder_matmul_params(cfg))
  return float(per_token * rows * seq) + attention_flops(cfg, rows, seq)


def sample_step_bytes(cfg, batch: int, context: float) -> int:
  """Bytes one decode step must read: float32 parameters (LM head included) + the KV cache of
  `context` tokens per row in the compute dtype."""
  item = 4 if cfg.dtype == "float32" else 2
  kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * item
  return int(4 * cfg.num_params(with_lm_head=True) + kv)

