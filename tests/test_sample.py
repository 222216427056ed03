"""The KV-cache sampler: greedy parity with transformers' generate, log-probs, truncation, stopping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_torch, padded_batch, requires_smollm2
from hs2p_jax.model import create, preset
from hs2p_jax.sample import SamplingConfig, generate, left_align, process_logits


@pytest.fixture(scope="module")
def tiny_lm():
  return create("lm", preset("tiny", num_layers=2), seed=0)


def full_forward_logprobs(lm, ids, mask, tokens):
  ids_l, mask_l = (np.asarray(a) for a in left_align(jnp.asarray(ids), jnp.asarray(mask)))
  full = np.concatenate([ids_l, tokens], axis=1)
  fmask = np.concatenate([mask_l, np.ones_like(tokens)], axis=1)
  logp = np.asarray(jax.nn.log_softmax(lm(full, fmask), axis=-1))
  t = ids.shape[1]
  return np.take_along_axis(logp[:, t - 1:-1], tokens[..., None], axis=-1)[..., 0], logp[:, t - 1:-1]


def test_greedy_tokens_and_logprobs_match_a_full_forward(tiny_lm):
  ids, mask = padded_batch(np.random.RandomState(0), [9, 5, 2], 9, "left", vocab=272, low=16)
  out = generate(tiny_lm, ids, mask, max_new_tokens=10, temperature=0.0, eos_ids=[])
  tokens = np.asarray(out.tokens)
  lp, all_lp = full_forward_logprobs(tiny_lm, ids, mask, tokens)
  assert (all_lp.argmax(-1) == tokens).all()
  np.testing.assert_allclose(np.asarray(out.logprobs), lp, atol=1e-5)
  assert (np.asarray(out.lengths) == 10).all() and not np.asarray(out.ended).any()


def test_right_padding_gives_the_left_padding_result(tiny_lm):
  ids_l, mask_l = padded_batch(np.random.RandomState(1), [7, 3], 7, "left", vocab=272, low=16)
  ids_r, mask_r = np.zeros_like(ids_l), np.zeros_like(mask_l)
  for i in range(2):
    n = mask_l[i].sum()
    ids_r[i, :n], mask_r[i, :n] = ids_l[i, -n:], 1
  a = generate(tiny_lm, ids_l, mask_l, max_new_tokens=6)
  b = generate(tiny_lm, ids_r, mask_r, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_sampling_logprobs_are_under_the_truncated_distribution_and_seeded(tiny_lm):
  ids, mask = padded_batch(np.random.RandomState(2), [6, 6], 6, "left", vocab=272, low=16)
  kw = dict(max_new_tokens=8, temperature=0.7, top_k=5, eos_ids=[])
  a = generate(tiny_lm, ids, mask, seed=3, **kw)
  b = generate(tiny_lm, ids, mask, seed=3, **kw)
  c = generate(tiny_lm, ids, mask, seed=4, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  tokens = np.asarray(a.tokens)
  _, all_lp = full_forward_logprobs(tiny_lm, ids, mask, tokens)
  logits = all_lp / 0.7  # log-softmax shifts do not change the softmax
  for i in range(2):
    for j in range(8):
      row = logits[i, j]
      top = np.argsort(row)[-5:]
      assert tokens[i, j] in top
      ref = row[tokens[i, j]] - np.log(np.exp(row[top] - row[top].max()).sum()) - row[top].max()
      assert float(a.logprobs[i, j]) == pytest.approx(ref, abs=1e-4)


def test_samples_per_prompt_share_one_prefill_and_match_repeated_prompts(tiny_lm):
  ids, mask = padded_batch(np.random.RandomState(5), [7, 4], 7, "left", vocab=272, low=16)
  rep_ids, rep_mask = np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0)
  greedy = generate(tiny_lm, ids, mask, max_new_tokens=6, eos_ids=[], num_samples=3)
  ref = generate(tiny_lm, rep_ids, rep_mask, max_new_tokens=6, eos_ids=[])
  np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(greedy.logprobs), np.asarray(ref.logprobs), atol=1e-5)
  kw = dict(max_new_tokens=8, temperature=1.0, eos_ids=[], seed=7)
  sampled = generate(tiny_lm, ids, mask, num_samples=3, **kw)
  tokens = np.asarray(sampled.tokens)
  assert tokens.shape == (6, 8) and len({tuple(r) for r in tokens[:3]}) == 3  # k different samples
  lp, _ = full_forward_logprobs(tiny_lm, rep_ids, rep_mask, tokens)  # each row continues its own prompt
  np.testing.assert_allclose(np.asarray(sampled.logprobs), lp, atol=1e-4)
  with pytest.raises(ValueError, match="num_samples=0"):
    generate(tiny_lm, ids, mask, num_samples=0)


def test_process_logits_top_k_and_top_p_against_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 50).astype(np.float32) * 2
  out = np.asarray(process_logits(jnp.asarray(logits), SamplingConfig(temperature=0.5, top_p=0.8)))
  for i in range(3):
    z = logits[i] / 0.5
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[:np.searchsorted(np.cumsum(p[order]), 0.8) + 1]  # smallest prefix reaching 0.8
    ref = np.full(50, -np.inf)
    ref[keep] = z[keep] - np.log(np.exp(z[keep]).sum())
    np.testing.assert_allclose(np.exp(out[i]), np.exp(ref), atol=1e-6)
  k3 = np.asarray(process_logits(jnp.asarray(logits), SamplingConfig(temperature=1.0, top_k=3)))
  assert (np.isfinite(k3).sum(-1) == 3).all()


def test_eos_and_stop_sequences_end_rows_and_pad_after(tiny_lm):
  ids, mask = padded_batch(np.random.RandomState(3), [5, 5], 5, "left", vocab=272, low=16)
  free = np.asarray(generate(tiny_lm, ids, mask, max_new_tokens=8, eos_ids=[]).tokens)
  eos = int(free[0, 2])
  out = generate(tiny_lm, ids, mask, max_new_tokens=8, eos_ids=[eos], pad_id=0)
  toks, lengths, ended = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.ended)
  first = int(np.flatnonzero(free[0] == eos)[0])
  assert lengths[0] == first + 1 and ended[0]
  assert (toks[0, :first + 1] == free[0, :first + 1]).all() and (toks[0, first + 1:] == 0).all()
  assert (np.asarray(out.logprobs)[0, first + 1:] == 0).all()
  seq = tuple(int(t) for t in free[1, 3:5])
  out2 = generate(tiny_lm, ids, mask, max_new_tokens=8, eos_ids=[], stop_sequences=[seq])
  hit = next(j for j in range(1, 8) if tuple(free[1, j - 1:j + 1]) == seq)
  assert int(out2.lengths[1]) == hit + 1 and bool(out2.ended[1])


@pytest.mark.slow
@requires_smollm2
def test_smollm2_greedy_matches_transformers_generate(smollm2_torch, smollm2_jax):
  torch = need_torch()
  from hs2p_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("gguf:smollm2")
  ref, lm = smollm2_torch, smollm2_jax
  chats = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colours."]
  texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
           for c in chats]
  enc = [tok.encode(t, add_special_tokens=False) for t in texts]
  t = max(map(len, enc))
  ids = np.full((len(enc), t), tok.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for i, e in enumerate(enc):
    ids[i, t - len(e):], mask[i, t - len(e):] = e, 1
  n = 20
  with torch.no_grad():
    hf = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, t:].numpy()
  out = generate(lm, ids, mask, max_new_tokens=n, temperature=0.0, eos_ids=[tok.eos_token_id],
                 pad_id=tok.pad_token_id)
  ours = np.asarray(out.tokens)
  for i in range(len(chats)):
    length = int(out.lengths[i])
    np.testing.assert_array_equal(ours[i, :length], hf[i, :length])
  assert "Paris" in tok.decode(ours[0, :int(out.lengths[0])].tolist())
  lp, _ = full_forward_logprobs(lm, ids, mask, ours)
  valid = np.arange(n)[None] < np.asarray(out.lengths)[:, None]
  np.testing.assert_allclose(np.asarray(out.logprobs)[valid], lp[valid], atol=2e-3)
