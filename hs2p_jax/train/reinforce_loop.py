"""`hs2p reinforce`: rollouts from the KV-cache sampler, reward-model scores, leave-one-out REINFORCE updates, on the shared loop (`train.loop`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hs2p_jax import provenance
from hs2p_jax.checkpoint import ModelMeta, resolve_model_dir, save_model
from hs2p_jax.config import ReinforceRunConfig, to_dict
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.errors import UserError
from hs2p_jax.rollout import layout_for
from hs2p_jax.sample import SamplingConfig, generate_from_state, left_align
from hs2p_jax.stops import cut_at_stop, stop_automaton
from hs2p_jax.sharding import make_mesh, rules_from, state_shardings, use_mesh
from hs2p_jax.train.feed import gather_processes, host_global, put_batch
from hs2p_jax.train.loop import LoopConfig, run as run_loop
from hs2p_jax.train.metrics import truncate_jsonl_after
from hs2p_jax.tokenizer import load_tokenizer
from hs2p_jax.train.model_init import build_model, tokenizer_spec
from hs2p_jax.train.optim import optimizer_from
from hs2p_jax.train.reinforce import (advantages, kl_per_token, make_logprob_fn, make_policy_step, masked_mean,
                                      objective_temperature)
from hs2p_jax.sharding import opt_state_shardings
from hs2p_jax.train.rm_scorer import RewardScorer


def response_text(tokenizer, tokens: np.ndarray, length: int, stop_strings: list[str], eos_ids) -> str:
  """The decoded response without its stopping token or stop string."""
  toks = [int(t) for t in tokens[:length]]
  if toks and toks[-1] in eos_ids:
    toks = toks[:-1]
  text = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=False), stop_strings)
  for special in (tokenizer.pad_token, tokenizer.eos_token):
    if special:
      text = text.replace(special, "")
  return text.strip()


class ReinforceTrainer:
  """One REINFORCE run. `scorer(prompts, responses) -> [N] rewards` defaults to the reward-model
  checkpoint `cfg.reward_model`; any function of texts can stand in (e.g. a rule-based reward)."""

  def __init__(self, cfg: ReinforceRunConfig, out_dir: str, scorer=None):
    if not cfg.reward_model and scorer is None:
      raise UserError("reinforce: set reward_model=CKPT (a reward-model checkpoint)")
    self.cfg, self.out_dir = cfg, os.path.abspath(out_dir)
    rc = cfg.reinforce
    self.mesh, self.rules = make_mesh(cfg.mesh), rules_from(cfg.mesh.rules)
    if cfg.reward_model and scorer is None:
      resolve_model_dir(cfg.reward_model)  # fail now, not after the policy has loaded
    # data first: a bad prompt file fails in seconds, before any model is loaded
    self.loader = make_loader(cfg.data, load_tokenizer(tokenizer_spec(cfg.policy)), split="train", task="prompts",
                              batch_size=rc.prompts_per_step, seed=rc.seed, shuffle=True, repeat=True,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              cache_dir=os.path.join(self.out_dir, "data"))
    with use_mesh(self.mesh, self.rules):
      policy, self.meta, self.tokenizer = build_model(cfg.policy, self.mesh, self.rules)
    if self.meta.kind != "lm":
      raise UserError("reinforce: policy.kind must be lm")
    self.graphdef, self.params = nnx.split(policy)
    self.ref_params = jax.tree.map(jnp.copy, self.params)  # the frozen reference: the initial policy
    self.scorer = scorer or RewardScorer.load(cfg.reward_model, self.mesh, self.rules,
                                              max_length=cfg.data.max_length + rc.max_new_tokens)
    self.tx = optimizer_from(rc)
    param_sh = state_shardings(self.params, self.mesh, self.rules)
    self.opt_sh = opt_state_shardings(jax.eval_shape(self.tx.init, self.params), param_sh, self.mesh)
    with use_mesh(self.mesh, self.rules):
      self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.params)
    share = rc.samples_per_prompt if rc.share_prompt else None  # rows come in prompt-major groups of k
    temp = objective_temperature(rc.temperature)  # the loss and KL read the sampler's distribution
    self._step = jax.jit(make_policy_step(self.graphdef, self.tx, share, temp, rc.micro_batches), donate_argnums=(0, 1),
                         out_shardings=(param_sh, self.opt_sh, None))
    self._logprobs = jax.jit(make_logprob_fn(self.graphdef, share, temp))
    self._kl = jax.jit(lambda lp, ref, m: masked_mean(kl_per_token(lp, ref, rc.kl_estimator), m, axis=1),
                       out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    eos = tuple(self.meta.config.eos_ids) or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
    self.eos_ids = eos
    self.stops = stop_automaton(self.tokenizer, rc.stop_strings, self.meta.config.vocab_size)
    self.layout = None  # sample from the training params where rollout_copy is off
    if rc.rollout_copy:
      self.layout = layout_for(self.params, self.meta.config, self.mesh, self.rules, tensor=rc.rollout_tensor,
                               dtype=rc.rollout_dtype, rows=rc.prompts_per_step * rc.samples_per_prompt)
      if jax.process_index() == 0:
        print(self.layout.describe(), file=sys.stderr, flush=True)
    self.sampling = SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                   top_p=rc.top_p, eos_ids=eos,
                                   pad_id=self.tokenizer.pad_token_id or 0, num_samples=rc.samples_per_prompt)

  def rollout(self, step: int, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Samples k responses per prompt, scores them, and returns the update batch and metrics."""
    rc = self.cfg.reinforce
    k = rc.samples_per_prompt
    ids, mask = (np.asarray(a) for a in left_align(jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])))
    key = jax.random.fold_in(jax.random.key(rc.seed), step)  # per-step key: resumes reproduce rollouts
    t0 = time.time()
    if self.layout is not None:  # cast and resharded once, not at every token
      mesh, rules, graphdef, params = self.layout.mesh, self.layout.rules, self.layout.graphdef, \
          self.layout.copy(self.params)
    else:
      mesh, rules, graphdef, params = self.mesh, self.rules, self.graphdef, self.params
    with use_mesh(mesh, rules):  # one prefill per prompt, k samples from its cache
      # host arrays, the same on every process: the global prompts, each device sampling its rows
      out = generate_from_state(graphdef, params, ids, mask, key, self.sampling, self.stops)
    del params  # the decode copy lives for the sampling only
    ids, mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)  # row i * k + j: sample j of prompt i
    tokens, lengths, ended = (host_global(x) for x in (out.tokens, out.lengths, out.ended))
    sample_time = time.time() - t0
    resp_mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
    upd = {"prompt_ids": ids, "prompt_mask": mask, "tokens": tokens, "response_mask": resp_mask}
    dev = put_batch(upd, self.mesh, self.rules)
    with use_mesh(self.mesh, self.rules):
      logp = self._logprobs(self.params, dev)
      ref_logp = self._logprobs(self.ref_params, dev)
    kl = host_global(self._kl(logp, ref_logp, dev["response_mask"]))
    prompts = [self.loader.examples[int(i)].prompt for i in np.repeat(batch["example_id"], k)]
    responses = [response_text(self.tokenizer, tokens[i], int(lengths[i]), rc.stop_strings, self.eos_ids)
                 for i in range(len(tokens))]
    scores = self.scorer(prompts, responses) * rc.reward_scale
    counted = ended | rc.truncated_as_ended
    rewards, base, adv = (np.asarray(a) for a in advantages(jnp.asarray(scores), jnp.asarray(kl),
                                                            jnp.asarray(counted), rc.kl_beta, k))
    upd["advantages"] = adv.astype(np.float32)
    metrics = {"reward": float(scores.mean()), "kl": float(kl.mean()), "total_reward": float(rewards.mean()),
               "response_length": float(lengths.mean()), "ended_fraction": float(ended.mean()),
               "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
               "baseline_mean": float(base.mean()),
               "sample_tokens_per_s": float(lengths.sum() / max(sample_time, 1e-9))}
    samples = [{"prompt": prompts[i], "response": responses[i], "reward": float(scores[i]), "kl": float(kl[i])}
               for i in range(0, len(prompts), k)]
    return upd, {**metrics, "_samples": samples}

  def update(self, upd: dict[str, np.ndarray]) -> dict[str, float]:
    rc = self.cfg.reinforce
    n = upd["tokens"].shape[0]
    chunk = n // rc.updates_per_rollout
    losses, norms = [], []
    t0 = time.time()
    for u in range(rc.updates_per_rollout):
      mb = {key: v[u * chunk:(u + 1) * chunk] for key, v in upd.items()}
      with use_mesh(self.mesh, self.rules):
        self.params, self.opt_state, m = self._step(self.params, self.opt_state, put_batch(mb, self.mesh, self.rules))
      losses.append(m["loss"])
      norms.append(m["grad_norm"])
    losses, norms = jax.device_get((losses, norms))
    tokens = int(upd["prompt_mask"].sum() + upd["response_mask"].sum())
    return {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)),
            "train_tokens_per_s": tokens / max(time.time() - t0, 1e-9)}

  def provenance(self) -> None:
    cfg, rc = self.cfg, self.cfg.reinforce
    data = {"prompts": provenance.data_entry(self.loader, rc.steps, rc.prompts_per_step)}
    if jax.process_index() == 0:
      print(provenance.describe("prompts", data["prompts"]), file=sys.stderr, flush=True)
    provenance.write(self.out_dir, self.mesh, data,
                     model={"source": cfg.policy.source, "init_from": cfg.policy.init_from,
                            "reward_model": os.path.abspath(cfg.reward_model) if cfg.reward_model else None})

  def begin(self, start: int) -> None:
    self._samples_path = os.path.join(self.out_dir, "samples.jsonl")
    if jax.process_index() == 0:
      truncate_jsonl_after(self._samples_path, start)
    self._it = iter(self.loader)

  def step(self, step: int) -> dict[str, Any]:
    batch = gather_processes(next(self._it))  # every process holds the step's global prompts
    upd, roll = self.rollout(step, batch)
    self._samples = roll.pop("_samples")
    roll.update(self.update(upd))
    roll["tokens_per_s"] = roll["sample_tokens_per_s"]
    return roll  # host numbers already: the loop's checks cost no extra sync

  def evaluate(self) -> dict[str, Any]:
    return {}  # the rollouts' metrics are the record; the pipeline compares policies on held-out prompts

  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics

  def after_step(self, step: int) -> None:
    rc = self.cfg.reinforce
    if rc.sample_every and (step % rc.sample_every == 0 or step == rc.steps) and jax.process_index() == 0:
      with open(self._samples_path, "a", encoding="utf-8") as f:
        for s in self._samples:
          f.write(json.dumps({"step": step, **s}) + "\n")

  def save_final(self) -> None:
    save_model(os.path.join(self.out_dir, "model"), nnx.merge(self.graphdef, self.params),
               ModelMeta(kind="lm", config=self.meta.config, template=self.cfg.data.template), self.tokenizer,
               overwrite=True)

  def run(self) -> dict[str, Any]:
    rc = self.cfg.reinforce
    loop = LoopConfig(rc.steps, rc.log_every, rc.save_every, rc.keep_checkpoints, False, self.cfg.name)
    return run_loop(self, loop, self.out_dir, to_dict(self.cfg))


def train_reinforce(cfg: ReinforceRunConfig, out_dir: str) -> dict[str, Any]:
  """Runs (or resumes) REINFORCE into `out_dir`; returns the last logged metrics."""
  return ReinforceTrainer(cfg, out_dir).run()
