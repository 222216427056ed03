"""Log-probs of given tokens from hidden states, the LM head run a chunk of positions at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hs2p_jax.model.llama import LlamaForCausalLM

LOGPROB_CHUNK = 256  # positions whose [N, chunk, V] logits exist at a time (forward and backward)


def token_logprobs(lm: LlamaForCausalLM, hidden: jax.Array, tokens: jax.Array, chunk: int = LOGPROB_CHUNK,
                   temperature: float = 1.0) -> jax.Array:
  """log p(tokens[:, t] | hidden[:, t]) [N, T] float32 under softmax(logits / temperature), from
  hidden states [N, T, D]; the LM head and log-sum-exp run `chunk` positions at a time (a
  checkpointed scan): the float32 [N, T, V] logits and their log-softmax never exist whole, in the
  forward pass or the backward."""
  n, t, d = hidden.shape
  c = max(1, min(chunk, t))
  pad = -t % c
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, (t + pad) // c, c, d).swapaxes(0, 1)
  tok = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(n, (t + pad) // c, c).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_c, tok_c):  # [N, c, D], [N, c] -> [N, c]
    logits = lm.logits(h_c)
    if temperature != 1.0:
      logits = logits / temperature
    picked = jnp.take_along_axis(logits, tok_c[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  _, out = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (h, tok))
  return out.swapaxes(0, 1).reshape(n, t + pad)[:, :t]


def target_logprobs(lm: LlamaForCausalLM, batch: dict[str, jax.Array]) -> jax.Array:
  """[R, T] float32 log-prob of each target token of a batch with log-prob targets (`target_pred`
  [R, T]: the row position whose logits predict the token, -1 where it is no target), 0 elsewhere;
  one forward over the rows (packed, branched or plain)."""
  hidden = lm.model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch.get("positions"),
                    branch_ids=batch.get("branch_ids"), lengths=batch.get("row_lengths"))  # [R, T, D]
  pred = batch["target_pred"]
  h = jnp.take_along_axis(hidden, jnp.maximum(pred, 0)[..., None], axis=1)  # the predicting positions' states
  return jnp.where(pred >= 0, token_logprobs(lm, h, batch["input_ids"]), 0.0)


def per_owner(values: jax.Array, owner: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Sums of `values` [R, T] and token counts by `owner` [R, T] (an index in [0, n), -1: none): [n], [n]."""
  idx = jnp.where(owner >= 0, owner, n).reshape(-1)  # index n is dropped
  sums = jnp.zeros((n,), jnp.float32).at[idx].add(values.reshape(-1).astype(jnp.float32), mode="drop")
  counts = jnp.zeros((n,), jnp.float32).at[idx].add(jnp.ones(values.size, jnp.float32), mode="drop")
  return sums, counts
