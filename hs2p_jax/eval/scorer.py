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
from hs2p_jax.feed import batch_sharding, put_batch
from hs2p_jax.model.reward import attribute_weights
from hs2p_jax.model.scoring import make_eval_step
from hs2p_jax.sharding import DEFAULT_RULES, Rules, batch_split, use_mesh


SCORE_ROWS = 16  # sequences per forward pass, rounded up to split over the mesh's batch axes


def score_fn(graphdef: Any, mesh: Mesh | None) -> Any:
  """The jitted `eval(params, batch) -> [R, A]` head outputs a scorer runs, its result replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
  return jax.jit(make_eval_step(graphdef), out_shardings=replicated)


def score_spec(mesh: Mesh, rules: Rules, seq_len: int, batch_size: int = SCORE_ROWS) -> dict[str, jax.ShapeDtypeStruct]:
  """A scorer's batch at its longest (`seq_len` tokens), placed as `put_batch` places it."""
  rows = round_up(batch_size, batch_split(mesh, rules))
  shapes = {"input_ids": (rows, seq_len), "segment_ids": (rows, seq_len), "score_row": (rows,), "score_index": (rows,)}
  return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding(k, shape, mesh, rules))
          for k, shape in shapes.items()}


class RewardScorer:
  """`scorer(prompts, responses) -> [N]` scalar rewards (weights @ head outputs at the last token).

  Holds a reward model split as (graphdef, params) on `mesh` (`params` may be set later: REINFORCE
  scores with the frozen model of its run state); `RewardScorer.load` reads a checkpoint. `eval_fn`
  is the jitted `eval(params, batch)` to score with (default: `score_fn`)."""

  def __init__(self, graphdef: Any, params: Any, meta: ModelMeta, tokenizer: Any, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES, max_length: int = 1024, batch_size: int = SCORE_ROWS, eval_fn: Any = None):
    if meta.kind != "reward":
      raise UserError(f"a {meta.kind} model, not a reward model")
    self.graphdef, self.params, self.meta, self.tokenizer = graphdef, params, meta, tokenizer
    self.weights = attribute_weights(meta.reward_weights, meta.num_attributes)
    self.mesh, self.rules = mesh, rules
    self.max_length, self.batch_size = max_length, batch_size
    self._eval = eval_fn or score_fn(graphdef, mesh)
    self.encoded = self.truncated = 0  # sequences encoded, and of them cut to max_length, so far

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
    seqs = self.encode(prompts, responses)
    rows = self.rows
    return self._score([seqs[i:i + rows] for i in range(0, len(seqs), rows)])

  def score_groups(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """[len(completions[i])] rewards of each prompt's completions, all of a prompt's in one batch:
    a batch takes whole groups up to `batch_size` rows; a larger group is a batch of its own."""
    flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
    seqs = self.encode(flat_p, [c for cs in completions for c in cs])
    chunks, start, rows = [], 0, self.rows
    for cs in completions:
      if chunks and chunks[-1][1] + len(cs) <= rows:
        chunks[-1][1] += len(cs)
      else:
        chunks.append([start, len(cs)])
      start += len(cs)
    flat = self._score([seqs[a:a + n] for a, n in chunks])
    bounds = np.cumsum([0] + [len(cs) for cs in completions])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  @property
  def rows(self) -> int:
    """Sequences per forward pass: `batch_size` rounded up to split over the mesh's batch axes."""
    return round_up(self.batch_size, batch_split(self.mesh, self.rules))  # rows that split over the batch axes

  def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[np.ndarray]:
    """Token sequences of (prompt, response) pairs rendered in the model's template, cut to `max_length`."""
    zeros = np.zeros(NUM_LABELS, np.float32)
    examples = [RatingExample(p, r, zeros, zeros.astype(bool), f"rollout {i}")
                for i, (p, r) in enumerate(zip(prompts, responses))]
    enc = encode(examples, self.tokenizer, self.meta.template, self.max_length, "truncate")
    self.encoded, self.truncated = self.encoded + len(examples), self.truncated + enc.truncated
    return [s[0] for s in enc.seqs]

  def _score(self, chunks: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Rewards of the sequences of `chunks`, one forward pass a chunk, concatenated."""
    out = [self.forward(chunk, bucket_length(max(len(s) for s in chunk), 32, self.max_length, "pow2"))
           for chunk in chunks]
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def forward(self, seqs: Sequence[np.ndarray], length: int, rows: int | None = None) -> np.ndarray:
    """[n] rewards of n sequences of at most `length` tokens, one forward pass on a batch of
    [n rounded up to a multiple of `rows` (default: the batch rows), length] (fixed shapes: one
    compile per length and row count)."""
    n = len(seqs)
    seqs = list(seqs) + [seqs[-1]] * (round_up(n, rows or self.rows) - n)
    ids, seg = pad_right(seqs, length, self.tokenizer.pad_token_id or 0)
    batch = {"input_ids": ids, "segment_ids": seg, "score_row": np.arange(len(seqs), dtype=np.int32),
             "score_index": np.asarray([len(s) - 1 for s in seqs], np.int32)}
    with use_mesh(self.mesh, self.rules):
      outputs = np.asarray(self._eval(self.params, put_batch(batch, self.mesh, self.rules)))
    return (outputs @ self.weights)[:n]
