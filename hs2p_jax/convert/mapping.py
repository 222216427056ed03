"""Hugging Face Llama-family tensor names and layouts <-> paths and layouts of this project's nnx state."""

from __future__ import annotations

from typing import Callable

import numpy as np

from hs2p_jax.model.config import LlamaConfig

Path = tuple[str, ...]
Transform = Callable[[np.ndarray, LlamaConfig], np.ndarray]


def _t(w, c):
  return w.T


def _q_in(w, c):  # [H*Dh, D] -> [D, H, Dh]
  return w.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _kv_in(w, c):  # [Hkv*Dh, D] -> [D, Hkv, Dh]
  return w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)


def _qkv_out(a, c):  # [D, H, Dh] -> [H*Dh, D]
  return a.reshape(a.shape[0], -1).T


def _o_in(w, c):  # [D, H*Dh] -> [H, Dh, D]
  return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_out(a, c):  # [H, Dh, D] -> [D, H*Dh]
  return a.reshape(-1, a.shape[-1]).T


def _same(w, c):
  return w


def _bias_in(w, c):  # [H*Dh] -> [H, Dh]
  return w.reshape(-1, c.head_dim)


def _bias_out(a, c):  # [H, Dh] -> [H*Dh]
  return a.reshape(-1)


# Region readers: (source tensor, region of ours, cfg) -> that region, reading only what it needs
# from the HF-layout tensor. `index` has one concrete slice(start, stop) per dimension of ours.

def _read_same(t, index, c):
  return t.read(index)


def _read_t(t, index, c):  # ours [a, b] = hf[b, a]
  return t.read(index[::-1]).T


def _head_rows(sh: slice, dh: int) -> slice:
  return slice(sh.start * dh, sh.stop * dh)


def _read_q_in(t, index, c):  # ours [D, H, Dh] <- hf [H*Dh, D]: whole heads' rows, our D's columns
  sd, sh, se = index
  block = t.read((_head_rows(sh, c.head_dim), sd))  # [h*Dh, d]
  return block.T.reshape(sd.stop - sd.start, sh.stop - sh.start, c.head_dim)[:, :, se]


def _read_o_in(t, index, c):  # ours [H, Dh, D] <- hf [D, H*Dh]
  sh, se, sd = index
  block = t.read((sd, _head_rows(sh, c.head_dim)))  # [d, h*Dh]
  return block.T.reshape(sh.stop - sh.start, c.head_dim, sd.stop - sd.start)[:, se, :]


def _read_bias_in(t, index, c):  # ours [H, Dh] <- hf [H*Dh]
  sh, se = index
  return t.read((_head_rows(sh, c.head_dim),)).reshape(sh.stop - sh.start, c.head_dim)[:, se]


REGIONS: dict[Transform, Callable] = {_same: _read_same, _t: _read_t, _q_in: _read_q_in, _kv_in: _read_q_in,
                                      _o_in: _read_o_in, _bias_in: _read_bias_in}


def hf_shape(to_ours: Transform, ours: tuple[int, ...], c: LlamaConfig) -> tuple[int, ...]:
  """The HF tensor shape that `to_ours` turns into our `ours` shape."""
  if to_ours is _t:
    return tuple(reversed(ours))
  if to_ours in (_q_in, _kv_in):
    return (ours[1] * ours[2], ours[0])
  if to_ours is _o_in:
    return (ours[2], ours[0] * ours[1])
  if to_ours is _bias_in:
    return (ours[0] * ours[1],)
  return tuple(ours)


# (our path under the stacked layer, HF name under `model.layers.{i}.`, HF -> ours, ours -> HF)
LAYER_TENSORS: tuple[tuple[Path, str, Transform, Transform], ...] = (
    (("attn", "wq"), "self_attn.q_proj.weight", _q_in, _qkv_out),
    (("attn", "wk"), "self_attn.k_proj.weight", _kv_in, _qkv_out),
    (("attn", "wv"), "self_attn.v_proj.weight", _kv_in, _qkv_out),
    (("attn", "wo"), "self_attn.o_proj.weight", _o_in, _o_out),
    (("mlp", "gate"), "mlp.gate_proj.weight", _t, _t),
    (("mlp", "up"), "mlp.up_proj.weight", _t, _t),
    (("mlp", "down"), "mlp.down_proj.weight", _t, _t),
    (("input_norm", "weight"), "input_layernorm.weight", _same, _same),
    (("post_attn_norm", "weight"), "post_attention_layernorm.weight", _same, _same),
    # what some families add (model/families.py): only the paths a model has are read or written
    (("attn", "bq"), "self_attn.q_proj.bias", _bias_in, _bias_out),
    (("attn", "bk"), "self_attn.k_proj.bias", _bias_in, _bias_out),
    (("attn", "bv"), "self_attn.v_proj.bias", _bias_in, _bias_out),
    (("attn", "q_norm", "weight"), "self_attn.q_norm.weight", _same, _same),
    (("attn", "k_norm", "weight"), "self_attn.k_norm.weight", _same, _same),
)

# (our path below the backbone's parent, HF name, HF -> ours, ours -> HF)
GLOBAL_TENSORS: tuple[tuple[Path, str, Transform, Transform], ...] = (
    (("model", "embed"), "model.embed_tokens.weight", _same, _same),
    (("model", "norm", "weight"), "model.norm.weight", _same, _same),
    (("lm_head",), "lm_head.weight", _t, _t),
    (("head_kernel",), "score.weight", _t, _t),
    (("head_bias",), "score.bias", _same, _same),
)

LAYER_PREFIX = "model.layers.{}."
# LlamaForSequenceClassification's head has no bias: ours goes to this side file, which transformers ignores
HEAD_BIAS_FILE = "hs2p_reward_head.safetensors"
# config.json key of a one-output (scalar) export: {"weights": {attribute: w}, "bias": b}. The head's
# bias is folded out: transformers' score + b is hs2p's reward.
REWARD_KEY = "hs2p_reward"
STACK_ROOT: Path = ("model", "layers")


def hf_to_ours(names: set[str], cfg: LlamaConfig) -> dict[Path, tuple[list[str], Transform]]:
  """For each of our state paths that `names` can fill: the HF tensor names (one per layer for
  stacked tensors) and the transform to apply to each."""
  out: dict[Path, tuple[list[str], Transform]] = {}
  for path, name, to_ours, _ in GLOBAL_TENSORS:
    if name in names:
      out[path] = ([name], to_ours)
  for path, name, to_ours, _ in LAYER_TENSORS:
    out[STACK_ROOT + path] = ([LAYER_PREFIX.format(i) + name for i in range(cfg.num_layers)], to_ours)
  return out
