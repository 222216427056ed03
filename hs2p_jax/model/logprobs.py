"""Log-probs of given tokens from hidden states, the LM head run a chunk of positions at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax import nnx

from hs2p_jax.model import model_from
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


def response_logprobs(lm: LlamaForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                      response_mask: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Log-probs of each response token given what precedes it. prompt_* [N, Tp] (left-padded),
  tokens / response_mask [N, Tr] -> [N, Tr] float32 (the LM head runs on response positions only,
  in chunks: `token_logprobs`)."""
  ids = jnp.concatenate([prompt_ids, tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  hidden = lm.model(ids, mask)  # [N, Tp + Tr, D]
  tp, tr = prompt_ids.shape[1], tokens.shape[1]
  return token_logprobs(lm, hidden[:, tp - 1:tp - 1 + tr], tokens, temperature=temperature)  # t predicts t + 1


def shared_prompt_logprobs(lm: LlamaForCausalLM, prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                           response_mask: jax.Array, k: int, temperature: float = 1.0) -> jax.Array:
  """`response_logprobs` for N = P * k rows ordered prompt-major (rows i * k .. i * k + k - 1 share
  prompt i), computing each prompt once: one row [prompt | sample 1 | ... | sample k] per prompt,
  sample j on branch j + 1 (it sees the prompt and itself, `attention.branch_mask`), its positions
  continuing the prompt's. Same shapes in and out as `response_logprobs`; prompts left-aligned."""
  n, tp = prompt_ids.shape
  tr = tokens.shape[1]
  p = n // k
  seg = jnp.concatenate([prompt_mask[::k], response_mask.reshape(p, k * tr)], axis=1).astype(jnp.int32)
  ids = jnp.concatenate([prompt_ids[::k], tokens.reshape(p, k * tr)], axis=1)  # [P, Tp + k * Tr]
  prompt_len = jnp.sum(prompt_mask[::k] != 0, axis=1, dtype=jnp.int32)[:, None]  # [P, 1]
  t = jnp.arange(tr, dtype=jnp.int32)
  positions = jnp.concatenate([jnp.maximum(jnp.cumsum(seg[:, :tp], axis=1) - 1, 0),
                               jnp.tile(prompt_len + t[None], (1, k))], axis=1)
  branch = jnp.concatenate([jnp.zeros((tp,), jnp.int32), jnp.repeat(jnp.arange(1, k + 1, dtype=jnp.int32), tr)])
  hidden = lm.model(ids, segment_ids=seg, positions=positions, branch_ids=jnp.broadcast_to(branch, ids.shape),
                    branches=k)
  # sample j's token t is predicted at its token t - 1, or for t = 0 at the prompt's last slot
  pred = jnp.where(t[None] == 0, tp - 1, tp + jnp.arange(k, dtype=jnp.int32)[:, None] * tr + t[None] - 1)
  out = token_logprobs(lm, hidden[:, pred.reshape(-1)], tokens.reshape(p, k * tr), temperature=temperature)
  return out.reshape(n, tr)


def _logprobs(lm: LlamaForCausalLM, batch: dict, share_prompt_k: int | None, temperature: float) -> jax.Array:
  args = (lm, batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"])
  if share_prompt_k:
    return shared_prompt_logprobs(*args, share_prompt_k, temperature=temperature)
  return response_logprobs(*args, temperature=temperature)


def objective_temperature(sampling_temperature: float) -> float:
  """The temperature of the distribution the loss and KL read log-probs under: the sampler's
  (greedy decoding reports, and is scored under, the model's own distribution: 1).

  Top-k and top-p are not applied to them: under the reference model's own truncation, or after a
  first minibatch update, a sampled token can fall outside the kept set, giving a -inf log-prob and
  an infinite KL. With top_k=0 and top_p=1 (the paper configs) the objective's distribution is
  exactly the sampler's."""
  return sampling_temperature if sampling_temperature > 0 else 1.0


def make_logprob_fn(graphdef: nnx.GraphDef, share_prompt_k: int | None = None, temperature: float = 1.0):
  """A pure `logprobs(params, batch) -> [N, Tr]` under the model `params` describe (as
  `model.model_from` takes them), at `temperature`."""

  def logprobs(params, batch):
    return _logprobs(model_from(graphdef, params), batch, share_prompt_k, temperature)

  return logprobs
