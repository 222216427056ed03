"""Policies compared on held-out prompts: reward-model score of their samples and KL to the reference.

Each policy samples one response per prompt (temperature 1, a fixed seed, the same prompts for
all); the reward model scores it; the KL is the mean over the response's tokens of
log pi(y_t | ...) - log pi_ref(y_t | ...) under the policy's own samples (the k1 estimator, an
unbiased per-token KL), averaged over the prompts. The reference is the policies' common start.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from hs2p_jax.data.batching import pad_left
from hs2p_jax.data.encode import encode
from hs2p_jax.data.examples import PromptExample
from hs2p_jax.feed import host_global, put_batch
from hs2p_jax.model.logprobs import make_logprob_fn
from hs2p_jax.sample import SamplingConfig, generate_from_state
from hs2p_jax.sharding import DEFAULT_RULES, batch_split, use_mesh
from hs2p_jax.stops import cut_at_stop, stop_automaton


def compare(policies: dict[str, Any], reference: Any, tokenizer: Any, template: str, prompts: Sequence[str],
            scorer: Callable[[Sequence[str], Sequence[str]], np.ndarray], *, max_length: int, max_new_tokens: int,
            stop_strings: Sequence[str] = (), batch_size: int = 16, seed: int = 0, mesh=None,
            rules=DEFAULT_RULES) -> dict[str, dict[str, float]]:
  """{name: {reward, kl, response_length}} for each LM in `policies` (and "reference" itself)."""
  enc = encode([PromptExample(p, f"prompt {i}") for i, p in enumerate(prompts)], tokenizer, template, max_length)
  ref_graphdef, ref_params = nnx.split(reference)
  logprobs = jax.jit(make_logprob_fn(ref_graphdef))
  out = {}
  for name, lm in {"reference": reference, **policies}.items():
    graphdef, params = nnx.split(lm)
    eos = tuple(lm.cfg.eos_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_ids=eos, pad_id=tokenizer.pad_token_id or 0)
    stops = stop_automaton(tokenizer, stop_strings, lm.cfg.vocab_size)
    rewards, kls, lengths = [], [], []
    split = batch_split(mesh, rules) if mesh is not None else 1
    for i in range(0, len(enc.seqs), batch_size):
      seqs = [s[0] for s in enc.seqs[i:i + batch_size]]
      n = len(seqs)
      rows = -(-n // split) * split
      ids, mask = pad_left(seqs + [seqs[0]] * (rows - n), max(len(s) for s in seqs), cfg.pad_id)
      with use_mesh(mesh, rules):
        gen = generate_from_state(graphdef, params, ids, mask, jax.random.fold_in(jax.random.key(seed), i), cfg, stops)
        tokens, length = host_global(gen.tokens), host_global(gen.lengths)
        resp = (np.arange(tokens.shape[1])[None] < length[:, None]).astype(np.int32)
        batch = put_batch({"prompt_ids": ids, "prompt_mask": mask, "tokens": tokens, "response_mask": resp}, mesh, rules)
        lp, ref = (host_global(logprobs(p, batch)) for p in (params, ref_params))
      per_token = ((lp - ref) * resp).sum(1) / np.maximum(resp.sum(1), 1)
      texts = [cut_at_stop(tokenizer.decode([int(t) for t in tokens[r, :length[r]]], skip_special_tokens=True),
                           stop_strings).strip() for r in range(n)]
      rewards.append(np.asarray(scorer(list(prompts[i:i + n]), texts)))
      kls.append(per_token[:n])
      lengths.append(length[:n])
    out[name] = {"reward": float(np.mean(np.concatenate(rewards))), "kl": float(np.mean(np.concatenate(kls))),
                 "response_length": float(np.mean(np.concatenate(lengths)))}
  return out
