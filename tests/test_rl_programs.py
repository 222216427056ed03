"""REINFORCE and PPO compile every model-sized program before step 1: over a run whose prompts fall
in several length buckets, no sampler, log-prob, critic, reward-model or update program is lowered
after `Trainer.begin`."""

from __future__ import annotations

import pytest

from conftest import lowerings

MODEL_SIZED = {"jit(generate_from_state)", "jit(logprobs)", "jit(step)", "jit(critic_values)", "jit(_cast_and_move)",
               "jit(evaluate)"}


@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_every_rl_program_is_compiled_before_step_1(tmp_path, algo):
  from hs2p_jax import config as config_lib
  from test_ppo import _ppo_config
  with lowerings() as events:
    lengths = (3, 20, 37, 51, 3, 20)  # rendered, they pad to three buckets of 16..128
    prompts = tmp_path / "varied.jsonl"
    prompts.write_text("".join('{"prompt": "%s"}\n' % ("w" * n) for n in lengths))
    sets = {"data.train": str(prompts), "data.max_length": 128, "data.buckets": "pow2", "ppo.steps": 6,
            "ppo.prompts_per_step": 1, "ppo.samples_per_prompt": 2, "ppo.max_new_tokens": 4,
            "ppo.critic_warmup_steps": 1, "ppo.sample_every": 0}
    cfg = _ppo_config(tmp_path, **sets)  # writes the reward model (and the critic's start)
    if algo == "ppo":
      from hs2p_jax.rl.ppo_trainer import trainer
    else:
      from hs2p_jax.rl.reinforce_trainer import trainer
      cfg = config_lib.load(config_lib.ReinforceRunConfig, None, [
          "policy.preset=tiny", "policy.num_layers=1", "policy.tokenizer=bytes", f"data.train={prompts}",
          "data.format=prompts", "data.template=chat", "data.max_length=128", "data.pad_multiple=16",
          "reinforce.steps=6", "reinforce.prompts_per_step=1", "reinforce.samples_per_prompt=2",
          "reinforce.max_new_tokens=4", "reinforce.stop_strings=[]", "reinforce.sample_every=0", "mesh.data=1",
          f"reward_model={tmp_path / 'rm'}"])
    t = trainer(cfg, str(tmp_path / "run"))
    seen = set(t.source.loader.length_buckets())
    t.run()
  assert len(seen) >= 3, seen
  late = [name for name, after in events if after and name in MODEL_SIZED]
  assert late == [], late
  assert "jit(step)" in {n for n, after in events if not after}  # compiled ahead (others may be cached in-process)
