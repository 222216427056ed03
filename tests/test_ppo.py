"""PPO's pure functions against numpy loops: per-token rewards, GAE with masks and rows cut short,
whitening, the clipped surrogate and value losses, GRPO's group-normalised advantage."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.rl import gae as gae_lib, grpo, ppo


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
  adv, ret = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam, jnp.asarray(boot))
  want = np_gae(r * mask, v * mask, lengths, boot, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), (want + v) * mask, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(adv)[mask == 0] == 0)
  # no bootstrap: every row ends where its mask does
  adv0, _ = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
  np.testing.assert_allclose(np.asarray(adv0), np_gae(r * mask, v * mask, lengths, np.zeros(5), gamma, lam),
                             rtol=1e-5, atol=1e-6)


def test_token_rewards_put_the_score_at_the_last_token_and_the_kl_everywhere():
  rng, lengths, mask = _rows(1)
  logp, ref = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(2))
  scores = rng.normal(size=5).astype(np.float32)
  got = np.asarray(gae_lib.token_rewards(jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask), 0.1))
  want = -0.1 * np.abs(logp - ref) * mask
  for i, n in enumerate(lengths):
    if n:
      want[i, n - 1] += scores[i]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_whiten_and_the_clipped_losses_against_numpy():
  rng, _, mask = _rows(2)
  on = mask.astype(bool)
  x = rng.normal(2.0, 3.0, size=mask.shape).astype(np.float32)
  w = np.asarray(gae_lib.whiten(jnp.asarray(x), jnp.asarray(mask)))
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


def test_grpo_advantages_are_group_normalised_as_trl_and_never_whitened_again():
  s = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 5.0, 2.5, 2.5, 2.5, 2.5], np.float32)
  got = np.asarray(grpo.grpo_advantages(jnp.asarray(s), 4))
  g = s.reshape(3, 4)  # TRL: (r - mean) / (std + 1e-4), torch's std: unbiased
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(got[8:] == 0.0)  # a group whose samples all score the same: no signal
  np.testing.assert_array_equal(np.asarray(grpo.flat_groups(jnp.asarray(s), 4)), [False] * 8 + [True] * 4)
  mask = np.ones((12, 3), np.int32)
  zeros = jnp.zeros((12, 3))
  for whitened in (True, False):  # `whiten` applies to GAE's advantages only
    adv, _ = ppo.rollout_targets(jnp.asarray(s), zeros, zeros, jnp.zeros(12), zeros, jnp.asarray(mask), beta=0.1,
                                 estimator="k3", gamma=1.0, lam=0.95, advantage="grpo", k=4, whitened=whitened)
    np.testing.assert_allclose(np.asarray(adv), np.repeat(want[:, None], 3, axis=1), rtol=1e-5)


def _trl_grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type):
  """TRL's GRPOTrainer._compute_loss, re-derived in numpy: the clipped surrogate per token plus
  beta * k3 (exp(ref - logp) - (ref - logp) - 1), aggregated as "grpo" (a mean over sequences of their
  token means) or "dapo" / "bnpo" (one mean over all tokens)."""
  ratio = np.exp(logp - old)
  per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None])
  per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
  if loss_type == "grpo":
    return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
  return (per_token * mask).sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("agg,loss_type", [("sequence", "grpo"), ("token", "dapo")])
def test_the_grpo_actor_loss_is_trls(agg, loss_type):
  rng, _, mask = _rows(3)
  mask[:, 0] = 1  # TRL's "grpo" mean counts every sequence: none empty here
  logp, old, ref = (rng.normal(-2.0, 0.3, size=mask.shape).astype(np.float32) for _ in range(3))
  adv = rng.normal(size=mask.shape[0]).astype(np.float32)
  per_token, _ = ppo.surrogate(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv)[:, None] * mask, 0.2, 0.28)
  from hs2p_jax.rl.kl import kl_per_token
  per_token = per_token + 0.04 * kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3")
  got = float(jnp.sum(per_token * ppo.actor_weights(jnp.asarray(mask), agg)))
  assert got == pytest.approx(_trl_grpo_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, loss_type), rel=1e-5)


def test_the_critic_starts_as_the_reward_model_and_the_first_minibatch_is_unclipped():
  """An ActorCritic with the critic copied from a reward model: its value after each row's last
  token is the reward model's score of that sequence; on the rollout's first minibatch the ratio is
  1 and nothing is clipped; during the critic's warm-up only the critic moves."""
  import types

  import jax
  from flax import nnx
  from hs2p_jax.model import create, preset
  from hs2p_jax.model.actor_critic import response_values
  from hs2p_jax.train.optim import actor_critic_optimizer
  from hs2p_jax.model.logprobs import response_logprobs
  actor_cfg, critic_cfg = preset("tiny", num_layers=1), preset("tiny", num_layers=2)
  rm, lm = create("reward", critic_cfg, 9, seed=3), create("lm", actor_cfg, seed=1)
  ac = create("actor_critic", actor_cfg, 9, critic=critic_cfg)
  nnx.update(ac.actor, nnx.state(lm))
  nnx.update(ac.critic, nnx.state(rm))
  rng = np.random.default_rng(0)
  n, tp, tr = 4, 6, 5
  prompt_len, lengths = np.array([6, 3, 4, 2]), np.array([5, 2, 0, 4])
  prompts = rng.integers(16, 250, (n, tp)).astype(np.int32)
  pmask = (np.arange(tp)[None] >= tp - prompt_len[:, None]).astype(np.int32)  # left-padded
  prompts *= pmask
  tokens = rng.integers(16, 250, (n, tr)).astype(np.int32)
  rmask = (np.arange(tr)[None] < lengths[:, None]).astype(np.int32)
  w = np.eye(9, dtype=np.float32)[4]
  values = np.asarray(nnx.jit(response_values)(ac.critic, prompts, pmask, tokens, rmask, w))
  score = nnx.jit(lambda m, seq: m(seq))
  for i in range(n):
    seq = np.concatenate([prompts[i, tp - prompt_len[i]:], tokens[i, :lengths[i]]])[None]
    assert values[i, lengths[i]] == pytest.approx(float(np.asarray(score(rm, seq))[0] @ w), rel=1e-5, abs=1e-6), i

  batch = {"prompt_ids": prompts, "prompt_mask": pmask, "tokens": tokens, "response_mask": rmask}
  old_logp = np.asarray(nnx.jit(response_logprobs)(ac.actor, prompts, pmask, tokens, rmask))
  scores = rng.normal(size=n).astype(np.float32)
  rewards = gae_lib.token_rewards(jnp.asarray(scores), jnp.asarray(old_logp), jnp.asarray(old_logp), rmask, 0.01)
  adv, ret = gae_lib.gae(rewards, jnp.asarray(values[:, :-1]), rmask, 1.0, 0.95)
  batch.update(old_logp=old_logp, old_values=values[:, :-1], advantages=np.asarray(gae_lib.whiten(adv, rmask)),
               returns=np.asarray(ret), actor_mask=rmask)
  opt_cfg = types.SimpleNamespace(lr=1e-3, critic_lr=1e-3, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.98,
                                  eps=1e-8, grad_clip=1.0)
  tx = actor_critic_optimizer(opt_cfg)
  graphdef, params = nnx.split(ac)
  opt_state = tx.init(params)
  step, warm = (jax.jit(ppo.make_ppo_step(graphdef, tx, w, critic_only=c)) for c in (False, True))
  flat = lambda p: {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(p)}  # noqa: E731
  start, fresh = flat(params), opt_state
  for _ in range(2):  # the critic's warm-up: the actor and its AdamW state as they were
    params, opt_state, m = warm(params, opt_state, {}, batch)
  now = flat(params)
  assert all(np.array_equal(now[k], start[k]) for k in start if k[0] == "actor")
  assert any(not np.array_equal(now[k], start[k]) for k in start if k[0] == "critic")
  for a, b in zip(jax.tree.leaves(opt_state.inner_states["actor"]), jax.tree.leaves(fresh.inner_states["actor"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the first actor update after the warm-up is a fresh AdamW's first update
  _, reference_state, _ = step(params, tx.init(params), {}, batch)
  metrics = []
  for _ in range(2):
    params, opt_state, m = step(params, opt_state, {}, batch)
    metrics.append({k: float(v) for k, v in m.items()})
    if len(metrics) == 1:
      for a, b in zip(jax.tree.leaves(opt_state.inner_states["actor"]),
                      jax.tree.leaves(reference_state.inner_states["actor"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  first = metrics[0]
  assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0.0
  assert first["approx_kl"] == pytest.approx(0.0, abs=1e-9)
  assert metrics[-1]["approx_kl"] > 0.0  # the actor moved after the warm-up


def test_micro_batched_ppo_updates_equal_the_one_pass_update():
  """Two micro-batches of a minibatch (gradients of the token sums accumulated) give the one-pass
  step's losses, statistics and parameters."""
  import jax
  from flax import nnx
  from hs2p_jax.model import create, preset
  import optax
  cfg = preset("tiny", num_layers=1)
  graphdef, params = nnx.split(create("actor_critic", cfg, 9, critic=cfg))
  rng = np.random.default_rng(1)
  n, tp, tr = 4, 5, 6
  lengths = np.array([6, 1, 0, 4])
  rmask = (np.arange(tr)[None] < lengths[:, None]).astype(np.int32)
  batch = {"prompt_ids": rng.integers(16, 250, (n, tp)).astype(np.int32), "prompt_mask": np.ones((n, tp), np.int32),
           "tokens": rng.integers(16, 250, (n, tr)).astype(np.int32), "response_mask": rmask,
           "actor_mask": rmask * np.array([[0], [1], [1], [1]], np.int32),  # row 0 was cut at max_new_tokens
           **{k: (rng.normal(scale=0.5, size=(n, tr)) - (5.5 if k == "old_logp" else 0)).astype(np.float32) * rmask
              for k in ("old_logp", "old_values", "advantages", "returns")}}
  tx = optax.sgd(1.0)  # the update is the gradient (Adam's first step would be its sign)
  w = np.eye(9, dtype=np.float32)[4]
  for agg in ("token", "sequence"):
    outs = []
    for m in (1, 2):
      step = jax.jit(ppo.make_ppo_step(graphdef, tx, w, ppo.Losses(agg=agg), micro_batches=m))
      outs.append(step(params, tx.init(params), {}, batch))
    (p1, _, m1), (p2, _, m2) = outs
    for k in m1:
      assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-4, abs=1e-6), (agg, k)
    assert 0.0 < float(m1["clip_fraction"]) < 1.0
    for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(b) - np.asarray(p0), np.asarray(a) - np.asarray(p0), rtol=1e-3,
                                 atol=1e-7)


def test_a_truncated_row_trains_the_critic_not_the_actor():
  """NeMo-Aligner's is_end mask: a row cut at max_new_tokens (out of `actor_mask`) moves no actor
  parameter whatever its advantages, and still moves the critic through its returns."""
  import jax
  import optax
  from flax import nnx
  from hs2p_jax.model import create, preset
  cfg = preset("tiny", num_layers=1)
  graphdef, params = nnx.split(create("actor_critic", cfg, 9, critic=cfg))
  rng = np.random.default_rng(2)
  n, tp, tr = 3, 4, 5
  rmask = np.ones((n, tr), np.int32)
  batch = {"prompt_ids": rng.integers(16, 250, (n, tp)).astype(np.int32), "prompt_mask": np.ones((n, tp), np.int32),
           "tokens": rng.integers(16, 250, (n, tr)).astype(np.int32), "response_mask": rmask,
           "actor_mask": rmask * np.array([[0], [1], [1]], np.int32),
           **{k: rng.normal(scale=0.5, size=(n, tr)).astype(np.float32) for k in ("old_values", "advantages", "returns")}}
  tx = optax.sgd(1.0)
  step = jax.jit(ppo.make_ppo_step(graphdef, tx, np.eye(9, dtype=np.float32)[4]))
  from hs2p_jax.model.logprobs import response_logprobs
  batch["old_logp"] = np.asarray(nnx.jit(response_logprobs)(nnx.merge(graphdef, params).actor, batch["prompt_ids"],
                                                             batch["prompt_mask"], batch["tokens"], rmask))

  def moved(b):
    new, _, _ = step(params, tx.init(params), {}, b)
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(new)}
  base = moved(batch)
  other = {**batch, "advantages": batch["advantages"] * np.array([[50.0], [1.0], [1.0]], np.float32),
           "returns": batch["returns"] + np.array([[3.0], [0.0], [0.0]], np.float32)}
  changed = moved(other)
  assert all(np.array_equal(changed[k], base[k]) for k in base if k[0] == "actor")
  assert any(not np.allclose(changed[k], base[k]) for k in base if k[0] == "critic")


def _ppo_config(tmp_path, **extra):
  from hs2p_jax import config as config_lib
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.model import create, preset
  from hs2p_jax.tokenizer import byte_tokenizer
  rm_cfg = preset("tiny", num_layers=1)
  if not (tmp_path / "rm").exists():
    save_model(str(tmp_path / "rm"), create("reward", rm_cfg, 9, seed=5), ModelMeta("reward", rm_cfg, 9, template="chat"),
               byte_tokenizer())
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join('{"prompt": "Say something %d"}\n' % i for i in range(8)))
  sets = {"policy.preset": "tiny", "policy.num_layers": 1, "policy.tokenizer": "bytes", "data.train": str(prompts),
          "data.format": "prompts", "data.template": "chat", "data.max_length": 64, "data.pad_multiple": 16,
          "data.buckets": "[64]", "ppo.prompts_per_step": 8, "ppo.max_new_tokens": 8, "ppo.lr": 1e-3,
          "ppo.critic_lr": 3e-3, "ppo.save_every": 1000, "ppo.stop_strings": "[]", "mesh.data": 1,
          "reward_model": str(tmp_path / "rm"), **extra}
  return config_lib.load(config_lib.PPORunConfig, None, [f"{k}={v}" for k, v in sets.items()])


def test_ppo_trains_the_actor_and_the_critic_from_the_reward_model(tmp_path):
  """`hs2p ppo`'s trainer: the critic starts as the reward model, every update is its rollout's first
  minibatch (ratio 1, nothing clipped), the value loss falls, the KL starts at 0; DIR/model is the
  actor; a run stopped after step 2 and resumed logs the uninterrupted run's numbers."""
  from hs2p_jax.checkpoint import read_meta
  from hs2p_jax.train.metrics import read_metrics
  from hs2p_jax.rl.ppo_trainer import trainer
  t = trainer(_ppo_config(tmp_path, **{"ppo.steps": 5, "ppo.truncated_in_actor_loss": True}), str(tmp_path / "run"))
  assert set(t.state.params) == {"actor", "critic"} and set(t.state.frozen) == {"reference", "reward_model"}
  t.run()
  recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in recs] == list(range(1, 6))
  assert all(r["ratio"] == pytest.approx(1.0, abs=1e-5) and r["clip_fraction"] == 0.0 for r in recs)
  assert recs[0]["kl"] == 0.0 and recs[-1]["kl"] > 0.0
  assert np.mean([r["value_loss"] for r in recs[-2:]]) < recs[0]["value_loss"]
  assert {"loss", "reward", "kl", "value_loss", "return_mean", "approx_kl"} <= set(recs[-1])
  assert read_meta(str(tmp_path / "run" / "model")).kind == "lm"
  # 2 minibatches x 2 epochs, reshuffled each epoch: stopped after step 2 and resumed, the
  # uninterrupted run's numbers (the LR is constant: the first steps do not depend on the total)
  shuffled = {"ppo.save_every": 2, "ppo.truncated_in_actor_loss": True, "ppo.epochs": 2,
              "ppo.updates_per_rollout": 2}
  trainer(_ppo_config(tmp_path, **{"ppo.steps": 4, **shuffled}), str(tmp_path / "a")).run()
  trainer(_ppo_config(tmp_path, **{"ppo.steps": 2, **shuffled}), str(tmp_path / "b")).run()
  trainer(_ppo_config(tmp_path, **{"ppo.steps": 4, **shuffled}), str(tmp_path / "b")).run()
  a, b = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("a", "b"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    for key in ("loss", "value_loss", "reward", "kl"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_each_epoch_takes_the_rollout_in_its_own_order_of_whole_prompt_groups():
  import types

  import jax
  from hs2p_jax.sharding import MeshConfig, make_mesh
  from hs2p_jax.rl.rollouts import RolloutSource
  mesh = make_mesh(MeshConfig(data=1))
  source = RolloutSource.__new__(RolloutSource)
  source.shuffle = True
  source.rc = types.SimpleNamespace(updates_per_rollout=2, samples_per_prompt=2, epochs=3, seed=0)
  source.phases = types.SimpleNamespace(update=types.SimpleNamespace(state=types.SimpleNamespace(mesh=mesh, rules=())))
  upd = {"tokens": np.arange(8, dtype=np.int32)[:, None]}  # 4 prompts x 2 samples, rows prompt-major
  orders = [[int(x) for mb in source.minibatches(upd, step) for x in np.asarray(jax.device_get(mb["tokens"]))[:, 0]]
            for step in (3, 3, 4)]
  assert orders[0] == orders[1] != orders[2]  # drawn from the step: a resume draws the same
  epochs = [orders[0][i * 8:(i + 1) * 8] for i in range(3)]
  assert len({tuple(e) for e in epochs}) > 1  # the epochs see different orders
  for e in epochs:
    assert sorted(e) == list(range(8)) and all(e[i] // 2 == e[i + 1] // 2 for i in range(0, 8, 2))  # whole groups


def test_the_quickstart_ppo_config_raises_a_reward_with_the_kl_bounded(tmp_path):
  """configs/quickstart/ppo.yaml's PPO settings (16 prompts a step, 2 minibatches x 2 epochs, critic
  warm-up) against a fixed reward (the fraction of lowercase letters), its critic from a reward
  model: the mean reward rises and the KL to the reference stays under 1 nat per token."""
  import os
  from hs2p_jax import config as config_lib
  from hs2p_jax.train.metrics import read_metrics
  from hs2p_jax.rl.ppo_trainer import trainer
  from test_reinforce import letter_reward
  _ppo_config(tmp_path)  # writes the reward model
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart", "ppo.yaml")
  cfg = config_lib.load(config_lib.PPORunConfig, path, [
      f"reward_model={tmp_path / 'rm'}", "ppo.steps=20", "ppo.max_new_tokens=16", "policy.num_layers=1",
      "data.builtin_size=64", "data.buckets=[128]", "ppo.save_every=1000", "ppo.sample_every=0"])
  trainer(cfg, str(tmp_path / "run"), scorer=letter_reward).run()
  recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  early, late = (np.mean([r["reward"] for r in part]) for part in (recs[:4], recs[-4:]))
  assert late > 1.4 * early, (early, late)  # 0.16 -> 0.29 when written
  assert recs[0]["kl"] == 0.0 and recs[1]["kl"] > 0.0  # the warm-up ran before step 1 and left the actor
  assert 0.0 < max(r["kl"] for r in recs) < 1.0
  # its last step checkpoint is a model: the actor, as DIR/model holds it (the critic left unread)
  from flax import nnx

  from hs2p_jax.checkpoint import load_model
  (step, meta), (final, _) = (load_model(str(tmp_path / "run" / p)) for p in ("checkpoints/20", "model"))
  assert meta.kind == "lm"
  for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(step)), nnx.to_flat_state(nnx.state(final))):
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))


def test_ppo_stops_at_a_non_finite_step_naming_it(tmp_path):
  """A reward of 1e30 and no gradient clipping: the run stops at the first non-finite step, naming
  it, with the last good checkpoint kept and no final model."""
  from conftest import assert_stops_at_a_non_finite_step
  from hs2p_jax.rl.ppo_trainer import trainer
  cfg = _ppo_config(tmp_path, **{"ppo.steps": 6, "ppo.lr": 1e12, "ppo.critic_lr": 1e12, "ppo.grad_clip": 0.0,
                                 "ppo.save_every": 1})
  t = trainer(cfg, str(tmp_path / "run"), scorer=lambda p, r: np.full(len(r), 1e30, np.float32))
  assert_stops_at_a_non_finite_step(t.run, tmp_path / "run")


def test_grpo_with_its_options_runs_on_the_trainer(tmp_path):
  """GRPO as configured in full (k3 KL in the loss, clip-higher, sequence aggregation, flat groups
  dropped) trains: finite losses, the KL term logged, the actor's share of tokens reported."""
  from hs2p_jax.rl.ppo_trainer import trainer
  from hs2p_jax.train.metrics import read_metrics
  cfg = _ppo_config(tmp_path, **{"ppo.steps": 2, "ppo.advantage": "grpo", "ppo.samples_per_prompt": 2,
                                 "ppo.prompts_per_step": 4, "ppo.kl_in_loss": True, "ppo.clip_high": 0.28,
                                 "ppo.loss_agg": "sequence", "ppo.drop_flat_groups": True,
                                 "ppo.truncated_in_actor_loss": True})
  trainer(cfg, str(tmp_path / "run")).run()
  recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
  assert recs[0]["kl_loss"] == pytest.approx(0.0, abs=1e-6) and 0.0 <= recs[-1]["actor_token_fraction"] <= 1.0
