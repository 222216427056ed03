"""PPO's pure functions against numpy loops: per-token rewards, GAE with masks and rows cut short,
whitening, the clipped surrogate and value losses, GRPO's group-normalised advantage."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.train import ppo


def np_gae(r, v, lengths, boot, gamma, lam):
  adv = np.zeros_like(r)
  for i, n in enumerate(lengths):
    nxt = 0.0
    for t in reversed(range(n)):
      v_next = v[i, t + 1] if t + 1 < n else boot[i]
      delta = r[i, t] + gamma * v_next - v[i, t]
      nxt = delta + gamma * lam * nxt
      adv[i, t] = nxt
  return adv


def _rows(seed=0, n=5, t=7):
  rng = np.random.default_rng(seed)
  lengths = np.array([7, 3, 0, 5, 1])[:n]  # full, short, empty, ...
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return rng, lengths, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0)])
def test_gae_equals_numpy_with_masks_and_rows_cut_short(gamma, lam):
  rng, lengths, mask = _rows()
  r = rng.normal(size=mask.shape).astype(np.float32)
  v = rng.normal(size=mask.shape).astype(np.float32)
  ended = np.array([False, True, True, False, True])
  boot = np.where(ended, 0.0, rng.normal(size=5)).astype(np.float32)  # rows cut short bootstrap
  adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam, jnp.asarray(boot))
  want = np_gae(r * mask, v * mask, lengths, boot, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), (want + v) * mask, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(adv)[mask == 0] == 0)
  # no bootstrap: every row ends where its mask does
  adv0, _ = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
  np.testing.assert_allclose(np.asarray(adv0), np_gae(r * mask, v * mask, lengths, np.zeros(5), gamma, lam),
                             rtol=1e-5, atol=1e-6)


def test_token_rewards_put_the_score_at_the_last_token_and_the_kl_everywhere():
  rng, lengths, mask = _rows(1)
  logp, ref = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(2))
  scores = rng.normal(size=5).astype(np.float32)
  got = np.asarray(ppo.token_rewards(jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask), 0.1))
  want = -0.1 * np.abs(logp - ref) * mask
  for i, n in enumerate(lengths):
    if n:
      want[i, n - 1] += scores[i]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_whiten_and_the_clipped_losses_against_numpy():
  rng, _, mask = _rows(2)
  on = mask.astype(bool)
  x = rng.normal(2.0, 3.0, size=mask.shape).astype(np.float32)
  w = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)))
  assert abs(w[on].mean()) < 1e-5 and abs(w[on].std() - 1) < 1e-3 and np.all(w[~on] == 0)

  logp, old, adv = (rng.normal(scale=s, size=mask.shape).astype(np.float32) for s in (0.3, 0.3, 1.0))
  loss, stats = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)
  ratio = np.exp(logp - old)
  a, b = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
  assert float(loss) == pytest.approx(np.maximum(a, b)[on].mean(), rel=1e-5)
  assert float(stats["clip_fraction"]) == pytest.approx((b > a)[on].mean(), rel=1e-6)
  # the first minibatch of a rollout: its log-probs are the old ones, the ratio 1, nothing clipped
  loss1, s1 = ppo.policy_loss(jnp.asarray(old), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)
  assert float(s1["ratio"]) == 1.0 and float(s1["clip_fraction"]) == 0.0 and float(s1["approx_kl"]) == 0.0
  assert float(loss1) == pytest.approx(-adv[on].mean(), rel=1e-5)

  v, v_old, ret = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(3))
  vl, vs = ppo.value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(ret), jnp.asarray(mask), 0.2)
  c = v_old + np.clip(v - v_old, -0.2, 0.2)
  want = 0.5 * np.maximum((v - ret) ** 2, (c - ret) ** 2)[on].mean()
  assert float(vl) == pytest.approx(want, rel=1e-5)
  assert float(vs["value_clip_fraction"]) == pytest.approx(((c - ret) ** 2 > (v - ret) ** 2)[on].mean(), rel=1e-6)


def test_grpo_advantages_are_group_normalised():
  s = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0], np.float32)
  got = np.asarray(ppo.grpo_advantages(jnp.asarray(s), 4))
  g = s.reshape(2, 4)
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).ravel()
  np.testing.assert_allclose(got, want, rtol=1e-5)
