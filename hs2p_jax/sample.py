"""Batched autoregressive sampling with a KV cache: one prefill, then a jit-compiled decode loop.

Prompts may be padded on either side (rows are re-aligned to the left internally). Sampling is
greedy (temperature 0) or from the temperature-scaled distribution truncated by top-k / top-p.
`logprobs` are the log-probabilities of the emitted tokens under the distribution they were drawn
from (for greedy decoding: under the model's untruncated, temperature-1 distribution). A row stops
after an EOS token, a stop sequence of token ids or a stop string in its decoded text (all
included in its length); later slots hold `pad_id`.
Several samples per prompt (`num_samples`) share one prefill of that prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hs2p_jax.model import model_from
from hs2p_jax.model.llama import KVCache, LlamaForCausalLM
from hs2p_jax.sharding import batch_split, constrain, current_mesh, current_rules


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0                 # 0 = no top-k truncation
  top_p: float = 1.0             # 1 = no nucleus truncation
  eos_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row
  pad_id: int = 0
  num_samples: int = 1           # continuations per prompt (one prefill per prompt, its cache repeated)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
  tokens: jax.Array    # [B, N] new tokens (pad_id after a row ends); B = prompts * num_samples
  logprobs: jax.Array  # [B, N] log-prob of each emitted token (0 after a row ends)
  lengths: jax.Array   # [B] new tokens per row, the stopping token included
  ended: jax.Array     # [B] whether the row stopped on EOS / a stop sequence (False: ran out of tokens)


def left_align(input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves every row's real tokens to the right end, keeping their order: [B, T] -> [B, T]."""
  mask = (attention_mask != 0).astype(jnp.int32)
  perm = jnp.argsort(mask, axis=1, stable=True)
  return jnp.take_along_axis(input_ids, perm, axis=1), jnp.take_along_axis(mask, perm, axis=1)


def process_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """[B, V] float32 logits -> log-probabilities of the sampling distribution (temperature, top-k, top-p)."""
  if cfg.temperature <= 0.0:
    return jax.nn.log_softmax(logits, axis=-1)
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def _stop_hit(history: jax.Array, step: jax.Array, seqs: tuple[tuple[int, ...], ...]) -> jax.Array:
  """[B] whether the tokens emitted up to `step` end with one of `seqs`. history [B, N]."""
  hit = jnp.zeros(history.shape[0], bool)
  for seq in seqs:
    n = len(seq)
    idx = step - n + 1 + jnp.arange(n)
    window = jnp.take(history, jnp.clip(idx, 0, history.shape[1] - 1), axis=1)
    hit |= (step + 1 >= n) & jnp.all(window == jnp.asarray(seq, history.dtype), axis=1)
  return hit


def _constrain_cache(cache: KVCache) -> KVCache:
  spec = (None, "cache_batch", "cache_seq", "cache_kv_heads", None)
  return dataclasses.replace(cache, k=constrain(cache.k, spec), v=constrain(cache.v, spec))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def generate_from_state(graphdef: nnx.GraphDef, state, input_ids: jax.Array, attention_mask: jax.Array,
                        key: jax.Array, cfg: SamplingConfig, stops=None) -> GenerateOutput:
  """`generate` on a split model (graphdef, state): the jit-compiled core. `stops`: the
  (table, accept) of `stops.automaton` for stop strings matched on the decoded text, or None."""
  lm: LlamaForCausalLM = model_from(graphdef, state)  # a LoRA policy: (adapters, base)
  ids, mask = left_align(input_ids, attention_mask)
  b, t = ids.shape
  n = cfg.max_new_tokens
  share = cfg.num_samples > 1
  if share and b % batch_split(current_mesh(), current_rules(), "cache_batch"):
    # the prompts do not split over the mesh's batch axes, their samples may: prefill each sample's
    # copy of its prompt (the same rows, logits and samples as the shared prefill, more compute)
    ids, mask, b, share = jnp.repeat(ids, cfg.num_samples, axis=0), jnp.repeat(mask, cfg.num_samples, axis=0), \
        b * cfg.num_samples, False
  cache = _constrain_cache(KVCache.init(lm.cfg, b, t + n))
  hidden, cache = lm.model(ids, mask, cache=cache)
  logits = lm.logits(hidden[:, -1:])[:, 0]  # [B, V]
  if share:  # the prompts' caches and next-token logits serve all their samples
    k = cfg.num_samples
    cache = _constrain_cache(KVCache(jnp.repeat(cache.k, k, axis=1), jnp.repeat(cache.v, k, axis=1),
                                     jnp.repeat(cache.valid, k, axis=0), jnp.repeat(cache.next_pos, k, axis=0),
                                     cache.index, jnp.repeat(cache.positions, k, axis=0)))
    logits, b = jnp.repeat(logits, k, axis=0), b * k
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
  table, accept = (jnp.asarray(stops[0]), jnp.asarray(stops[1])) if stops is not None else (None, None)

  def body(carry):
    i, cache, logits, tokens, logps, lengths, done, ended, key, text_state = carry
    key, sub = jax.random.split(key)
    logp_all = process_logits(logits, cfg)
    if cfg.temperature <= 0.0:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok = jax.random.categorical(sub, logp_all, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, cfg.pad_id, tok)
    logp = jnp.where(done, 0.0, logp)
    tokens = tokens.at[:, i].set(tok)
    logps = logps.at[:, i].set(logp)
    lengths = lengths + (~done).astype(jnp.int32)
    stop = jnp.isin(tok, eos) | _stop_hit(tokens, i, cfg.stop_sequences)
    if table is not None:  # [B, S]: how much of each stop string the decoded text now ends with
      text_state = table[jnp.arange(table.shape[0])[None, :], text_state, tok[:, None]]
      stop |= jnp.any(text_state == accept[None, :], axis=1) & ~done
    ended = ended | (~done & stop)
    done = done | stop
    hidden, cache = lm.model(tok[:, None], (~done | stop)[:, None].astype(jnp.int32), cache=cache)
    logits = lm.logits(hidden)[:, 0]
    return i + 1, cache, logits, tokens, logps, lengths, done, ended, key, text_state

  def cond(carry):
    i, done = carry[0], carry[6]
    return (i < n) & ~jnp.all(done)

  text_state = jnp.zeros((b, 0 if table is None else table.shape[0]), jnp.int32)
  init = (jnp.int32(0), cache, logits, jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), bool), key, text_state)
  _, _, _, tokens, logps, lengths, _, ended, _, _ = jax.lax.while_loop(cond, body, init)
  return GenerateOutput(tokens, logps, lengths, ended)


def generate(lm: LlamaForCausalLM, input_ids, attention_mask=None, max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int | jax.Array = 0, *, top_k: int = 0, top_p: float = 1.0,
             eos_ids: Sequence[int] | None = None, stop_sequences: Sequence[Sequence[int]] = (),
             stop_strings: Sequence[str] = (), tokenizer=None,
             pad_id: int | None = None, num_samples: int = 1) -> GenerateOutput:
  """Samples `max_new_tokens` continuations of `input_ids` [B, T] (see module docstring).

  eos_ids default to the model config's; `seed` is an int or a PRNG key (same seed, same output).
  `stop_sequences` end a row on those token ids; `stop_strings` (with `tokenizer`) on that text
  appearing in the decoded output, however the tokens spell it (`hs2p_jax.stops`).
  `num_samples` = k continuations per prompt from one prefill: output rows [B * k], row i * k + j
  the j-th sample of prompt i (the rows of `np.repeat(input_ids, k, axis=0)`).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: must be >= 1")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  cfg = SamplingConfig(
      max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
      eos_ids=tuple(int(e) for e in (lm.cfg.eos_ids if eos_ids is None else eos_ids)),
      stop_sequences=tuple(tuple(int(t) for t in s) for s in stop_sequences),
      pad_id=int(pad_id if pad_id is not None else (lm.cfg.pad_token_id if lm.cfg.pad_token_id is not None else 0)),
      num_samples=int(num_samples))
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  stops = None
  if stop_strings:
    if tokenizer is None:
      raise ValueError("stop_strings need the tokenizer whose tokens spell them")
    from hs2p_jax.stops import stop_automaton
    stops = stop_automaton(tokenizer, stop_strings, lm.cfg.vocab_size)
  graphdef, state = nnx.split(lm)
  return generate_from_state(graphdef, state, input_ids, attention_mask, key, cfg, stops)
