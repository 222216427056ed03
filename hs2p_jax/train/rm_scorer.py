"""A trained reward model as a scoring function of (prompt, response) texts, in its own template and tokenizer."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hs2p_jax.checkpoint import ModelMeta, load_checkpoint_tokenizer, load_model, read_meta
from hs2p_jax.data.batching import bucket_length, pad_right, round_up
from hs2p_jax.data.encode import encode
from hs2p_jax.data.examples import NUM_LABELS, RatingExample
from hs2p_jax.errors import UserError
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.sharding import DEFAULT_RULES, Rules, batch_split, use_mesh
from hs2p_jax.train.feed import put_batch
from hs2p_jax.train.rm import make_eval_step


class RewardScorer:
  """`scorer(prompts, responses) -> [N]` scalar rewards (weights @ head outputs at the last token).

  Holds a reward model split as (graphdef, params) on `mesh`; `RewardScorer.load` reads a checkpoint."""

  def __init__(self, graphdef: Any, params: Any, meta: ModelMeta, tokenizer: Any, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES, max_length: int = 1024, batch_size: int = 16):
    if meta.kind != "reward":
      raise UserError(f"a {meta.kind} model, not a reward model")
    self.graphdef, self.params, self.meta, self.tokenizer = graphdef, params, meta, tokenizer
    self.weights = attribute_weights(meta.reward_weights, meta.num_attributes)
    self.mesh, self.rules = mesh, rules
    self.max_length, self.batch_size = max_length, batch_size
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
    self._eval = jax.jit(make_eval_step(self.graphdef), out_shardings=replicated)

  @classmethod
  def load(cls, checkpoint: str, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
           runtime: dict[str, Any] | None = None, **kwargs: Any):
    """A scorer over the reward-model checkpoint (or run dir) `checkpoint`, loaded onto `mesh`;
    `runtime` changes how it computes (dtype, attention, ...), not its parameters."""
    if read_meta(checkpoint).kind != "reward":
      raise UserError(f"{checkpoint}: a {read_meta(checkpoint).kind} checkpoint, not a reward model")
    model, meta = load_model(checkpoint, mesh, rules, **(runtime or {}))
    graphdef, params = nnx.split(model)
    return cls(graphdef, params, meta, load_checkpoint_tokenizer(checkpoint), mesh, rules, **kwargs)

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    zeros = np.zeros(NUM_LABELS, np.float32)
    examples = [RatingExample(p, r, zeros, zeros.astype(bool), f"rollout {i}")
                for i, (p, r) in enumerate(zip(prompts, responses))]
    enc = encode(examples, self.tokenizer, self.meta.template, self.max_length, "truncate")
    seqs = [s[0] for s in enc.seqs]
    out = np.zeros(len(seqs), np.float32)
    pad_id = self.tokenizer.pad_token_id or 0
    rows = round_up(self.batch_size, batch_split(self.mesh, self.rules))  # rows that split over the batch axes
    for start in range(0, len(seqs), rows):
      chunk = seqs[start:start + rows]
      n = len(chunk)
      chunk = chunk + [chunk[-1]] * (rows - n)  # fixed shapes: one compile per bucket
      t = bucket_length(max(len(s) for s in chunk), 32, self.max_length, "pow2")  # few compiled shapes
      ids, seg = pad_right(chunk, t, pad_id)
      batch = {"input_ids": ids, "segment_ids": seg, "score_row": np.arange(len(chunk), dtype=np.int32),
               "score_index": np.asarray([len(s) - 1 for s in chunk], np.int32)}
      with use_mesh(self.mesh, self.rules):
        outputs = np.asarray(self._eval(self.params, put_batch(batch, self.mesh, self.rules)))
      out[start:start + n] = (outputs @ self.weights)[:n]
    return out
