"""Reward model: the Llama backbone plus a linear head (with bias) read at the last non-pad token."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hs2p_jax.errors import UserError
from hs2p_jax.model.config import LlamaConfig
from hs2p_jax.model.llama import Llama, param

# NeMo-Aligner's 9-output layout: OASST's 4 attributes, then HelpSteer's 5.
ATTRIBUTES = ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
              "complexity", "verbosity")
HELPFULNESS = ATTRIBUTES.index("helpfulness")
# Published 5-attribute weightings of earlier NVIDIA reward models (index order as ATTRIBUTES).
ATTRIBUTE_WEIGHTS = {
    "helpfulness": tuple(1.0 if i == HELPFULNESS else 0.0 for i in range(9)),
    "nemotron-4-340b": (0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33),
    "llama3-70b-steerlm": (0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4),
}


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """[B] index of the last non-pad token of each row of a [B, T] mask (left or right padding)."""
  mask = jnp.asarray(attention_mask) != 0
  t = mask.shape[1]
  return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def segment_last_indices(segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """[B, num_segments] index of the last token of segments 1..num_segments in each packed row (-1 if absent)."""
  seg = jnp.asarray(segment_ids)
  idx = jnp.arange(seg.shape[1], dtype=jnp.int32)
  ids = jnp.arange(1, num_segments + 1, dtype=seg.dtype)
  hit = seg[:, None, :] == ids[None, :, None]  # [B, S, T]
  return jnp.max(jnp.where(hit, idx, -1), axis=-1)


def attribute_weights(spec: str | Sequence[float], num_attributes: int) -> np.ndarray:
  """[A] weights turning the head's A outputs into one scalar: a name from ATTRIBUTE_WEIGHTS, an
  attribute name (one-hot), or explicit numbers."""
  if isinstance(spec, str):
    if num_attributes == 1:
      return np.ones(1, np.float32)
    if spec in ATTRIBUTE_WEIGHTS:
      w = np.asarray(ATTRIBUTE_WEIGHTS[spec], np.float32)
    elif spec in ATTRIBUTES:
      w = np.eye(len(ATTRIBUTES), dtype=np.float32)[ATTRIBUTES.index(spec)]
    else:
      raise UserError(f"reward weights {spec!r}: expected one of {', '.join([*ATTRIBUTE_WEIGHTS, *ATTRIBUTES])}")
  else:
    w = np.asarray(spec, np.float32)
  if w.shape != (num_attributes,):
    raise UserError(f"reward weights: {w.shape[0]} weights for a head with {num_attributes} outputs")
  return w


class RewardModel(nnx.Module):
  """Backbone + `Linear(hidden, num_attributes, bias=True)`: ids -> [B, A] float32 rewards."""

  def __init__(self, cfg: LlamaConfig, num_attributes: int = 9, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_attributes = num_attributes
    self.model = Llama(cfg, rngs=rngs)
    self.head_kernel = param(rngs, (cfg.hidden_size, num_attributes), ("embed", "attributes"))
    self.head_bias = param(None, (num_attributes,), ("attributes",), init=jax.nn.initializers.zeros)

  def head(self, hidden: jax.Array) -> jax.Array:
    """[..., D] hidden states -> [..., A] float32 outputs."""
    return hidden.astype(jnp.float32) @ self.head_kernel[...] + self.head_bias[...]

  def token_scores(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                   segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """[B, T, A] head outputs at every token (packed rows: read each segment's last token)."""
    return self.head(self.model(input_ids, attention_mask, segment_ids=segment_ids, positions=positions))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, A] outputs at the last non-pad token of each row; input_ids, attention_mask [B, T]."""
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    hidden = self.model(input_ids, attention_mask)
    last = last_token_index(attention_mask)
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return self.head(picked)


def scalar_reward(outputs: jax.Array, weights: jax.Array) -> jax.Array:
  """[B, A] head outputs, [A] weights -> [B] scalar rewards."""
  return outputs @ jnp.asarray(weights, outputs.dtype)


def reward_weights_from_spec(spec: str, num_attributes: int) -> np.ndarray:
  """[A] weights of a `--reward` spec: an attribute or weighting name (`attribute_weights`), or
  `ATTR=W,...` (attributes by name or index, the rest 0)."""
  if "=" not in spec:
    return attribute_weights(spec, num_attributes)
  names = ATTRIBUTES if num_attributes == len(ATTRIBUTES) else tuple(str(i) for i in range(num_attributes))
  w = np.zeros(num_attributes, np.float32)
  for item in spec.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    index = names.index(key) if key in names else int(key) if key.isdigit() else -1
    if not 0 <= index < num_attributes:
      raise UserError(f"reward {spec!r}: {key!r} is not one of the head's outputs ({', '.join(names)})")
    try:
      w[index] = float(value)
    except ValueError:
      raise UserError(f"reward {spec!r}: {item!r} is not ATTR=WEIGHT") from None
  return w


def scalar_head(model: RewardModel, weights: np.ndarray) -> RewardModel:
  """`model` with its head folded to one output, `weights @ outputs`: kernel [D, A] @ w -> [D, 1],
  bias . w -> [1]. The backbone is shared, not copied."""
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != (model.num_attributes,):
    raise UserError(f"reward weights: {w.shape[0]} weights for a head with {model.num_attributes} outputs")
  out = nnx.eval_shape(lambda: RewardModel(model.cfg, 1, rngs=nnx.Rngs(0)))
  out.model = model.model
  out.head_kernel = nnx.Param(model.head_kernel[...] @ w[:, None], axes=("embed", "attributes"))
  out.head_bias = nnx.Param((model.head_bias[...] @ w)[None], axes=("attributes",))
  return out
