"""REINFORCE: leave-one-out baseline, KL estimators and loss against numpy; a fixed reward goes up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax import config as config_lib
from hs2p_jax.model.logprobs import response_logprobs, shared_prompt_logprobs
from hs2p_jax.rl.kl import kl_per_token
from hs2p_jax.rl.reinforce import reinforce_loss
from hs2p_jax.rl.reinforce_trainer import trainer as reinforce_trainer
from hs2p_jax.rl.rloo import advantages, rloo_baseline
from hs2p_jax.train.metrics import read_metrics


def np_rloo(r, e):
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    for i in range(r.shape[1]):
      others = [r[p, j] for j in range(r.shape[1]) if j != i and e[p, j]]
      out[p, i] = np.mean(others) if others else r[p, i]
  return out


def test_rloo_baseline_matches_numpy_including_unended_rows():
  rng = np.random.RandomState(0)
  r = rng.randn(5, 4).astype(np.float32)
  e = rng.rand(5, 4) > 0.4
  e[0] = True
  e[1] = False          # nobody ended: baseline = own reward, no signal
  e[2] = [True, False, False, False]  # only sample 0 ended
  np.testing.assert_allclose(np.asarray(rloo_baseline(r, e)), np_rloo(r, e), rtol=1e-6)
  b = np.asarray(rloo_baseline(r, e))
  assert np.allclose(b[1], r[1])
  assert b[2, 0] == r[2, 0] and np.allclose(b[2, 1:], r[2, 0])


def test_kl_estimators_and_loss_against_numpy():
  rng = np.random.RandomState(1)
  logp, ref = -rng.rand(3, 6).astype(np.float32) * 3, -rng.rand(3, 6).astype(np.float32) * 3
  d = logp.astype(np.float64) - ref
  np.testing.assert_allclose(np.asarray(kl_per_token(logp, ref, "absolute")), np.abs(d), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(kl_per_token(logp, ref, "k1")), d, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(kl_per_token(logp, ref, "k3")), np.exp(-d) - 1 + d, rtol=1e-5, atol=1e-7)
  assert (np.asarray(kl_per_token(logp, ref, "k3")) >= 0).all()
  mask = rng.rand(3, 6) > 0.3
  adv = rng.randn(3).astype(np.float32)
  expected = -(logp * adv[:, None] * mask).sum() / mask.sum()
  assert float(reinforce_loss(logp, adv, mask)) == pytest.approx(expected, rel=1e-5)
  scores, kl = rng.randn(8).astype(np.float32), rng.rand(8).astype(np.float32)
  ended = np.ones(8, bool)
  rewards, base, a = (np.asarray(x) for x in advantages(scores, kl, ended, 0.1, 4))
  np.testing.assert_allclose(rewards, scores - 0.1 * kl, rtol=1e-6)
  np.testing.assert_allclose(base, np_rloo((scores - 0.1 * kl).reshape(2, 4), ended.reshape(2, 4)).ravel(), rtol=1e-5)
  np.testing.assert_allclose(a.reshape(2, 4).sum(1), 0, atol=1e-5)  # all ended: advantages sum to 0 per prompt


def rl_config(tmp_path, **extra):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join('{"prompt": "Say something %d"}\n' % i for i in range(8)))
  sets = {"policy.preset": "tiny", "policy.num_layers": 1, "policy.tokenizer": "bytes", "data.train": str(prompts),
          "data.format": "prompts", "data.template": "chat", "data.max_length": 64, "data.pad_multiple": 16,
          "reinforce.prompts_per_step": 4, "reinforce.samples_per_prompt": 4, "reinforce.max_new_tokens": 8,
          "reinforce.lr": 3e-3, "reinforce.kl_beta": 0.01, "reinforce.save_every": 1000, "mesh.data": 1,
          "reinforce.stop_strings": "[]", "reinforce.truncated_as_ended": "true"}
  sets.update(extra)
  return config_lib.load(config_lib.ReinforceRunConfig, None, [f"{k}={v}" for k, v in sets.items()])


def letter_reward(prompts, responses):
  """Fraction of lowercase ASCII letters in the response (about 0.1 for a random byte policy)."""
  return np.asarray([sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses], np.float32)


@pytest.mark.parametrize("attention", ["reference", "splash"])  # splash: once per sample's branch
def test_shared_prompt_logprobs_and_gradients_equal_per_row_ones(attention):
  import jax
  from flax import nnx
  from conftest import padded_batch
  from hs2p_jax.model import create, preset
  graphdef, params = nnx.split(create("lm", preset("tiny", num_layers=2), seed=3))
  shared_graphdef = nnx.split(create("lm", preset("tiny", num_layers=2, attention=attention), seed=3))[0]
  rng = np.random.RandomState(4)
  k, tr = 3, 5
  prompts, pmask = padded_batch(rng, [6, 3], 6, "left", vocab=272, low=16)  # left-aligned, as rollouts are
  ids, mask = np.repeat(prompts, k, axis=0), np.repeat(pmask, k, axis=0)
  tokens = rng.randint(16, 272, (2 * k, tr))
  resp = (np.arange(tr)[None] < rng.randint(1, tr + 1, (2 * k, 1))).astype(np.int32)  # rows end early
  adv = rng.randn(2 * k).astype(np.float32)

  def loss(p, fn, g=graphdef):
    logp = fn(nnx.merge(g, p), ids, mask, tokens, resp)
    return reinforce_loss(logp, adv, resp), logp

  shared = lambda *a: shared_prompt_logprobs(*a, k)
  (la, lpa), ga = jax.value_and_grad(loss, has_aux=True)(params, response_logprobs)
  (lb, lpb), gb = jax.value_and_grad(loss, has_aux=True)(params, shared, shared_graphdef)
  on = resp.astype(bool)
  np.testing.assert_allclose(np.asarray(lpb)[on], np.asarray(lpa)[on], atol=1e-5)
  assert float(lb) == pytest.approx(float(la), rel=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-6)


def test_reinforce_increases_a_fixed_reward_and_reports_kl(tmp_path):
  cfg = rl_config(tmp_path, **{"reinforce.steps": 30})
  reinforce_trainer(cfg, str(tmp_path / "run"), scorer=letter_reward).run()
  recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in recs] == list(range(1, 31))
  early = np.mean([r["reward"] for r in recs[:5]])
  late = np.mean([r["reward"] for r in recs[-5:]])
  assert late > early + 0.1, (early, late)
  assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference at step 1
  assert recs[-1]["kl"] > 0.0
  assert {"response_length", "ended_fraction", "advantage_mean", "sample_tokens_per_s"} <= set(recs[-1])


def test_reinforce_resume_logs_the_same_steps(tmp_path):
  straight = reinforce_trainer(rl_config(tmp_path, **{"reinforce.steps": 4}), str(tmp_path / "a"),
                              scorer=letter_reward)
  straight.run()
  first = reinforce_trainer(rl_config(tmp_path, **{"reinforce.steps": 2, "reinforce.save_every": 2}),
                           str(tmp_path / "b"), scorer=letter_reward)
  first.run()
  resumed = reinforce_trainer(rl_config(tmp_path, **{"reinforce.steps": 4, "reinforce.save_every": 2}),
                             str(tmp_path / "b"), scorer=letter_reward)
  resumed.run()
  a = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
  b = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for key in ("loss", "reward", "kl", "response_length"):
      assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (key, ra, rb)


def test_reinforce_with_a_shared_prompt_logs_the_same_steps(tmp_path):
  runs = []
  for share in ("false", "true"):
    cfg = rl_config(tmp_path, **{"reinforce.steps": 3, "reinforce.share_prompt": share,
                                 "reinforce.updates_per_rollout": 2})
    reinforce_trainer(cfg, str(tmp_path / share), scorer=letter_reward).run()
    runs.append(read_metrics(str(tmp_path / share / "metrics.jsonl")))
  for ra, rb in zip(*runs):
    assert ra["response_length"] == rb["response_length"] and ra["reward"] == pytest.approx(rb["reward"], rel=1e-6)
    for key in ("loss", "kl"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-6), (key, ra, rb)


def test_shared_prompt_minibatches_must_hold_whole_prompts(tmp_path):
  from hs2p_jax.errors import UserError
  with pytest.raises(UserError, match="updates_per_rollout must divide prompts_per_step"):
    rl_config(tmp_path, **{"reinforce.share_prompt": "true", "reinforce.prompts_per_step": 2,
                           "reinforce.updates_per_rollout": 4})


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_token_logprobs_equal_a_whole_log_softmax(chunk):
  """Values and gradients (wrt params and hidden states) of the chunked LM-head log-probs."""
  from flax import nnx
  from hs2p_jax.model import create, preset
  from hs2p_jax.model.logprobs import token_logprobs
  lm = create("lm", preset("tiny", num_layers=1), seed=0)
  graphdef, params = nnx.split(lm)
  rng = np.random.RandomState(0)
  hidden = jnp.asarray(rng.randn(2, 7, lm.cfg.hidden_size), jnp.float32)
  tokens = jnp.asarray(rng.randint(0, lm.cfg.vocab_size, (2, 7)), jnp.int32)
  weights = jnp.asarray(rng.randn(2, 7), jnp.float32)

  def whole(params, hidden):
    m = nnx.merge(graphdef, params)
    logp = jax.nn.log_softmax(m.logits(hidden), axis=-1)
    return jnp.sum(weights * jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])

  def chunked(params, hidden):
    return jnp.sum(weights * token_logprobs(nnx.merge(graphdef, params), hidden, tokens, chunk))

  want, want_g = jax.value_and_grad(whole, (0, 1))(params, hidden)
  got, got_g = jax.jit(jax.value_and_grad(chunked, (0, 1)))(params, hidden)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_reinforce_stops_at_a_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path):
  from conftest import assert_stops_at_a_non_finite_step
  cfg = rl_config(tmp_path, **{"reinforce.steps": 6, "reinforce.lr": 1e12, "reinforce.grad_clip": 0.0,
                               "reinforce.save_every": 1})
  t = reinforce_trainer(cfg, str(tmp_path / "run"), scorer=lambda p, r: np.full(len(r), 1e30, np.float32))
  assert_stops_at_a_non_finite_step(t.run, tmp_path / "run")


def test_the_objective_reads_log_probs_under_the_sampling_distribution():
  """At temperature 0.7 the loss's log-probs of the sampled tokens are the sampler's own, and equal
  a numpy log-softmax of the full forward's logits / 0.7."""
  from hs2p_jax.model import create, preset
  from hs2p_jax.sample import generate, left_align
  from hs2p_jax.model.logprobs import objective_temperature
  lm = create("lm", preset("tiny", num_layers=2), seed=3)
  rng = np.random.RandomState(1)
  ids = rng.randint(16, 270, (3, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :2] = 0  # a left-padded prompt
  t = objective_temperature(0.7)
  out = generate(lm, ids, mask, max_new_tokens=6, temperature=0.7, seed=0, eos_ids=())
  pids, pmask = (np.asarray(a) for a in left_align(jnp.asarray(ids), jnp.asarray(mask)))
  tokens = np.asarray(out.tokens)
  resp = np.ones_like(tokens)
  got = np.asarray(response_logprobs(lm, pids, pmask, tokens, resp, temperature=t))
  np.testing.assert_allclose(got, np.asarray(out.logprobs), atol=1e-4)
  logits = np.asarray(lm(np.concatenate([pids, tokens], 1), np.concatenate([pmask, resp], 1)), np.float64) / 0.7
  logits = logits[:, pids.shape[1] - 1:-1]
  want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(got, np.take_along_axis(want, tokens[..., None], -1)[..., 0], atol=1e-4)
  assert objective_temperature(0.0) == 1.0  # greedy: the model's own distribution, as the sampler reports


def test_prompt_buckets_bound_the_compiled_shapes(tmp_path):
  """Prompts of 8 different lengths: with power-of-two buckets the sampler compiles once per
  bucket the steps meet (4 powers of two here, not one per multiple of pad_multiple: 8)."""
  from hs2p_jax.data.batching import bucket_length
  from hs2p_jax.sample import generate_from_state
  prompts = tmp_path / "varied.jsonl"
  prompts.write_text("".join('{"prompt": "%s"}\n' % ("w" * n) for n in (3, 20, 37, 51, 66, 80, 95, 110)))
  cfg = rl_config(tmp_path, **{"data.train": str(prompts), "data.max_length": 256, "reinforce.prompts_per_step": 1,
                               "reinforce.samples_per_prompt": 2, "reinforce.steps": 8, "reinforce.max_new_tokens": 4,
                               "reinforce.log_every": 1})
  assert cfg.data.buckets == "pow2"  # REINFORCE's default
  trainer = reinforce_trainer(cfg, str(tmp_path / "run"), scorer=letter_reward)
  lengths = [int(trainer.loader._batches.lengths[i].max()) for i in range(8)]  # one prompt a step: all 8 seen
  buckets = {bucket_length(n, 16, 256, "pow2") for n in lengths}
  multiples = {bucket_length(n, 16, 256, "multiple") for n in lengths}
  before = generate_from_state._cache_size()
  trainer.run()
  assert generate_from_state._cache_size() - before == len(buckets) == 4 and len(multiples) == 8


@pytest.mark.parametrize("share", [False, True])
def test_micro_batched_policy_updates_equal_the_one_pass_update(share):
  import optax
  from flax import nnx
  from conftest import padded_batch
  from hs2p_jax.model import create, preset
  from hs2p_jax.train.accumulate import interleave
  from hs2p_jax.rl.reinforce import make_policy_step
  assert interleave(jnp.arange(12), 3, 2).tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
  graphdef, params = nnx.split(create("lm", preset("tiny", num_layers=1), seed=5))
  rng = np.random.RandomState(2)
  k = 2
  pids, pmask = padded_batch(rng, [5, 5, 3, 3, 6, 6, 4, 4], 6, "left")
  if share:  # the samples of a prompt share it: rows come in groups of k with equal prompts
    pids, pmask = np.repeat(pids[::k], k, 0), np.repeat(pmask[::k], k, 0)
  tokens = rng.randint(16, 270, (8, 5)).astype(np.int32)
  resp = (np.arange(5)[None] < rng.randint(1, 6, 8)[:, None]).astype(np.int32)
  batch = {"prompt_ids": pids.astype(np.int32), "prompt_mask": pmask.astype(np.int32), "tokens": tokens,
           "response_mask": resp, "advantages": rng.randn(8).astype(np.float32)}
  tx = optax.sgd(1.0)  # (Adam would amplify float noise on near-zero gradients)
  out = {}
  for m in (1, 2, 4):
    step = jax.jit(make_policy_step(graphdef, tx, k if share else None, 0.9, micro_batches=m))
    p, _, metrics = step(params, tx.init(params), {}, batch)
    out[m] = (float(metrics["loss"]), float(metrics["grad_norm"]), p)
  for m in (2, 4):
    assert out[m][0] == pytest.approx(out[1][0], rel=1e-5) and out[m][1] == pytest.approx(out[1][1], rel=1e-4)
    for a, b in zip(jax.tree.leaves(out[m][2]), jax.tree.leaves(out[1][2])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
