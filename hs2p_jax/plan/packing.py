"""The rows a packed reward-model micro-batch takes for a typical pair (`hs2p plan --pair-tokens P,R`).

A plan's memory is the worst case (every sequence data.max_length long: one row each, shared or
not); what a step computes depends on the lengths. For n pairs of a P-token prompt and two R-token
responses, the loader's own first-fit and row buckets (`data.batching`) give the rows without
sharing (2n sequences of P + R tokens) and with `data.share_prompt` (n units of P + 2R tokens, or
two sequences where that exceeds a row). The model's work for them (`model_flops`): 6N per token
and, per sequence, attention over its own tokens; a shared unit computes the prompt once, and
its rejected side attends to the prompt as before: 2 (P + R)^2 - P^2 token pairs instead of 2 (P + R)^2.
"""

from __future__ import annotations

import dataclasses
import math

from hs2p_jax.data.batching import bucket_rows, num_packed_rows
from hs2p_jax.data.pipeline import PACKED_ROW_MULTIPLE
from hs2p_jax.errors import UserError
from hs2p_jax.roofline.flops import decoder_matmul_params


@dataclasses.dataclass(frozen=True)
class PairProfile:
  """A typical pair: a `prompt` of P tokens and two responses of `response` tokens each."""

  prompt: int
  response: int

  @classmethod
  def parse(cls, text: str) -> "PairProfile":
    try:
      p, r = (int(x) for x in text.split(","))
    except ValueError:
      raise UserError(f"--pair-tokens {text}: expected PROMPT,RESPONSE token counts, e.g. 600,400") from None
    if p < 1 or r < 1:
      raise UserError(f"--pair-tokens {text}: token counts must be positive")
    return cls(p, r)

  def units(self, pairs: int, shared: bool, capacity: int) -> list[int]:
    """Token lengths of the packed units of `pairs` such pairs (sequences truncated to `capacity`)."""
    seq = min(self.prompt + self.response, capacity)
    if shared and self.prompt + 2 * self.response <= capacity:
      return [self.prompt + 2 * self.response] * pairs
    return [seq] * (2 * pairs)


def rows(profile: PairProfile, pairs: int, shared: bool, capacity: int, split: int, buckets) -> int:
  """Global rows of a micro-batch of `pairs` profile pairs, as the loader packs and buckets them
  (rows a multiple of the `split` devices of the batch axes)."""
  multiple = math.lcm(PACKED_ROW_MULTIPLE, split)
  return bucket_rows(num_packed_rows(profile.units(pairs, shared, capacity), capacity), multiple, 2 * pairs, buckets)


def model_flops(cfg, profile: PairProfile, pairs: int, shared: bool, capacity: int) -> float:
  """Model FLOPs of a training step's forward and backward over `pairs` profile pairs (module docstring)."""
  p, r = min(profile.prompt, capacity), profile.response
  s = min(p + r, capacity)
  if shared and p + 2 * r <= capacity:
    tokens, pairs_of_tokens = p + 2 * r, 2 * s * s - p * p
  else:
    tokens, pairs_of_tokens = 2 * s, 2 * s * s
  per_pair = 6 * decoder_matmul_params(cfg) * tokens + 12 * cfg.num_layers * pairs_of_tokens * cfg.num_heads * cfg.head_dim
  return float(per_pair * pairs)


def report(cfg, profile: PairProfile, pairs: int, micro_batches: int, capacity: int, split: int, buckets,
           shared: bool) -> dict:
  """The profile's rows per micro-batch with and without sharing, the rows of this config's layout
  and the model FLOPs of a step of such pairs."""
  out = {"profile": dataclasses.asdict(profile), "pairs_per_micro_batch": pairs,
         "rows_unshared": rows(profile, pairs, False, capacity, split, buckets),
         "rows_shared": rows(profile, pairs, True, capacity, split, buckets)}
  out["rows"] = out["rows_shared" if shared else "rows_unshared"]
  out["model_flops"] = model_flops(cfg, profile, pairs, shared, capacity) * micro_batches
  return out
