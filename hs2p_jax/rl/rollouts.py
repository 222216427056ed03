"""REINFORCE's and PPO's batch source: each step's prompts sampled k times by the policy, scored,
and turned into update minibatches.

A rollout samples from the policy's copy in the rollout layout (`hs2p_jax.rl.layout`: cast and
resharded once, not at every token), scores the responses with the reward model, computes the KL
to the frozen reference from the sampled tokens' log-probs and an estimator's advantages
(REINFORCE's leave-one-out `rloo`; PPO's GAE, `ppo_trainer.estimate`), and hands the trainer
`updates_per_rollout` minibatches (times PPO's `epochs`), each one optimizer step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hs2p_jax.feed import gather_processes, host_global, put_batch
from hs2p_jax.rl.rloo import rloo
from hs2p_jax.sample import SamplingConfig, generate_from_state, left_align
from hs2p_jax.sharding import use_mesh
from hs2p_jax.stops import cut_at_stop, stop_automaton

TRAIN, WARMUP = 0, 1  # what a rollout is for: its key and minibatch order derive from it


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


@dataclasses.dataclass
class Rollout:
  """One step's sampled, scored rollouts: the update rows (host) and what an estimator reads."""

  rows: dict[str, np.ndarray]   # prompt_ids, prompt_mask, tokens, response_mask [N, ...]
  dev: dict[str, jax.Array]     # the same rows on the mesh
  logp: jax.Array               # [N, Tr] the policy's log-probs of the sampled tokens (on the mesh)
  ref_logp: jax.Array           # [N, Tr] the reference's
  kl: np.ndarray                # [N] masked mean KL estimate
  scores: np.ndarray            # [N] reward-model scores (times reward_scale)
  ended: np.ndarray             # [N] whether each response ended (EOS / stop string)
  lengths: np.ndarray           # [N] response lengths


class RolloutSource:
  """`next(step, trainer) -> (update minibatches on the mesh, host metrics)` (module docstring).
  `phases` are the run's jitted functions (`rl.setup.Phases`); `scorer(prompts,
  responses) -> [N]` rewards; `eos_ids` end a response; `estimate(source, rollout, trainer) ->
  (update arrays, metrics)` turns scored rollouts into what the update step reads (REINFORCE's
  `rloo`, PPO's GAE); `section` the run's `reinforce:` or `ppo:` settings."""

  def __init__(self, cfg: Any, loader: Any, phases: Any, scorer: Callable, tokenizer: Any, eos_ids: tuple[int, ...],
               estimate: Callable = rloo, section: Any = None, shuffle: bool = False, validation: Any = None):
    rc = section if section is not None else cfg.reinforce
    self.estimate, self.shuffle, self.validation = estimate, shuffle, validation
    self.cfg, self.rc, self.loader, self.phases = cfg, rc, loader, phases
    self.scorer, self.tokenizer = scorer, tokenizer
    self.eos_ids = eos_ids
    self.stops = stop_automaton(tokenizer, rc.stop_strings, phases.policy_graphdef_config.vocab_size)
    self.sampling = SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                   top_p=rc.top_p, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id or 0,
                                   num_samples=rc.samples_per_prompt)
    self._it = None
    self._rate = 0.0

  @property
  def position(self):
    """The data position a checkpoint holds: the prompt loader's (no batch is read ahead)."""
    return self.loader

  def begin(self) -> None:
    self._it = iter(self.loader)

  def tokens_per_s(self) -> float:
    return self._rate

  def next(self, step: int, trainer: Any) -> tuple[list[dict[str, jax.Array]], dict[str, Any]]:
    batch = gather_processes(next(self._it))  # every process holds the step's global prompts
    upd, metrics = self.rollout(step, batch, trainer)
    return self.minibatches(upd, step), metrics

  def minibatches(self, upd: dict[str, np.ndarray], step: int, phase: int = TRAIN) -> list[dict[str, jax.Array]]:
    """The rollout rows as `updates_per_rollout` minibatches on the mesh, `epochs` passes (PPO); with
    `shuffle` each pass in its own order of whole prompt groups, drawn from the run's seed, the step
    and the pass (a resume draws the same)."""
    rc, state = self.rc, self.phases.update.state
    n, u, k = upd["tokens"].shape[0], rc.updates_per_rollout, rc.samples_per_prompt
    out = []
    for epoch in range(getattr(rc, "epochs", 1)):
      order = np.arange(n)
      if self.shuffle:
        groups = np.random.default_rng([rc.seed, phase, step, epoch]).permutation(n // k)
        order = (groups[:, None] * k + np.arange(k)[None]).reshape(-1)
      out += [put_batch({key: v[order[i * n // u:(i + 1) * n // u]] for key, v in upd.items()}, state.mesh,
                        state.rules) for i in range(u)]
    return out

  def before_first_step(self, trainer: Any) -> None:
    """PPO's critic warm-up (NeMo-Aligner's): `critic_warmup_steps` rollouts whose minibatches train
    the critic alone (`phases.critic_update`), the actor and its optimizer state left as they are.
    They read prompts from the data (their own rollout keys), not steps."""
    n = getattr(self.rc, "critic_warmup_steps", 0)
    for i in range(1, n + 1):
      upd, metrics = self.rollout(i, gather_processes(next(self._it)), trainer, phase=WARMUP)
      for mb in self.minibatches(upd, i, WARMUP):
        trainer.params, trainer.opt_state, out = self.phases.critic_update(trainer.params, trainer.opt_state,
                                                                          trainer.frozen, mb)
      if jax.process_index() == 0:
        print(f"critic warm-up {i}/{n}: reward {metrics['reward']:.4f} | value loss "
              f"{float(out['value_loss']):.4f}", file=sys.stderr, flush=True)

  def rollout(self, step: int, batch: dict[str, np.ndarray], trainer: Any,
              phase: int = TRAIN) -> tuple[dict[str, np.ndarray], dict]:
    """Samples k responses per prompt, scores them; the update rows and the step's metrics."""
    rc, k = self.rc, self.rc.samples_per_prompt
    key = jax.random.fold_in(jax.random.key(rc.seed), step)  # per-step key: resumes reproduce rollouts
    if phase != TRAIN:
      key = jax.random.fold_in(key, phase)
    t0 = time.time()
    upd, ended, lengths = self._sample(batch, trainer, self.sampling, key)
    self._rate = float(lengths.sum() / max(time.time() - t0, 1e-9))
    dev, logp, ref_logp, kl = self._kl(upd, trainer)
    prompts, responses, scores = self._score(self.loader, batch, upd, lengths, k, trainer)
    extra, est_metrics = self.estimate(self, Rollout(upd, dev, logp, ref_logp, kl, scores, ended, lengths), trainer)
    upd.update(extra)
    metrics = {"reward": float(scores.mean()), "kl": float(kl.mean()), **est_metrics,
               "response_length": float(lengths.mean()), "ended_fraction": float(ended.mean()),
               "sample_tokens_per_s": self._rate, "tokens_per_s": self._rate}
    if rc.sample_every and (step % rc.sample_every == 0 or step == rc.steps):
      metrics["_samples"] = [{"prompt": prompts[i], "response": responses[i], "reward": float(scores[i]),
                              "kl": float(kl[i])} for i in range(0, len(prompts), k)]
    return upd, metrics

  def validate(self, trainer: Any) -> dict[str, float]:
    """The validation rollouts: a greedy response to each held-out prompt (the first `val_prompts`),
    its reward-model score and KL to the reference; {val_reward, val_kl, val_response_length,
    val_ended_fraction}, means over the prompts."""
    if self.validation is None:
      return {}
    greedy = dataclasses.replace(self.sampling, temperature=0.0, top_k=0, top_p=1.0, num_samples=1)
    limit = self.rc.val_prompts or len(self.validation.examples)
    got: dict[str, list] = {"reward": [], "kl": [], "response_length": [], "ended_fraction": []}
    for batch in self.validation:
      batch = gather_processes(batch)
      upd, ended, lengths = self._sample(batch, trainer, greedy, jax.random.key(0))
      _, _, _, kl = self._kl(upd, trainer)
      valid = np.asarray(batch["valid"]).astype(bool)[:len(lengths)]
      _, _, scores = self._score(self.validation, batch, upd, lengths, 1, trainer, valid)
      take = np.flatnonzero(valid)[:limit - len(got["reward"])]  # scores are the valid rows', in order
      got["reward"] += list(scores[:len(take)])
      for name, v in (("kl", kl), ("response_length", lengths), ("ended_fraction", ended)):
        got[name] += list(np.asarray(v, np.float64)[take])
      if len(got["reward"]) >= limit:
        break
    return {f"val_{k}": float(np.mean(v)) for k, v in got.items()}

  def _sample(self, batch: dict[str, np.ndarray], trainer: Any, sampling: SamplingConfig,
              key: jax.Array) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(rows: prompt_ids, prompt_mask, tokens, response_mask [N, ...], ended [N], lengths [N]) of
    `sampling.num_samples` responses to each prompt of `batch` (row i * k + j: sample j of prompt i)."""
    ph = self.phases
    state = ph.update.state
    ids, mask = (np.asarray(a) for a in left_align(jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])))
    if ph.layout is not None:  # cast and resharded once, not at every token
      lay = ph.layout
      mesh, rules, graphdef, params = lay.mesh, lay.rules, lay.graphdef, lay.copy(ph.policy_params(trainer))
    else:
      mesh, rules, graphdef, params = state.mesh, state.rules, ph.policy_graphdef, ph.policy_params(trainer)
    with use_mesh(mesh, rules):  # one prefill per prompt, k samples from its cache
      out = generate_from_state(graphdef, params, ids, mask, key, sampling, self.stops)
    del params  # the decode copy lives for the sampling only
    k = sampling.num_samples
    ids, mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)
    tokens, lengths, ended = (host_global(x) for x in (out.tokens, out.lengths, out.ended))
    resp_mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
    return {"prompt_ids": ids, "prompt_mask": mask, "tokens": tokens, "response_mask": resp_mask}, ended, lengths

  def _kl(self, upd: dict[str, np.ndarray], trainer: Any) -> tuple[dict[str, jax.Array], jax.Array, jax.Array,
                                                                    np.ndarray]:
    """(the rows on the mesh, the policy's and the reference's log-probs of their tokens, the KL [N])."""
    ph = self.phases
    state = ph.update.state
    dev = put_batch(upd, state.mesh, state.rules)
    with use_mesh(state.mesh, state.rules):
      logp = ph.logprobs(ph.policy_params(trainer), dev)
      ref_logp = ph.logprobs(trainer.frozen_params("reference"), dev)
      kl = host_global(ph.kl(logp, ref_logp, dev["response_mask"]))
    return dev, logp, ref_logp, kl

  def _score(self, loader: Any, batch: dict[str, np.ndarray], upd: dict[str, np.ndarray], lengths: np.ndarray, k: int,
             trainer: Any, rows: np.ndarray | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, responses, reward-model scores) of the rows (those `rows` marks, if given)."""
    rc, tokens = self.rc, upd["tokens"]
    ids = np.repeat(batch["example_id"], k)[:len(tokens)]
    keep = np.arange(len(tokens)) if rows is None else np.flatnonzero(rows)
    prompts = [loader.examples[int(ids[i])].prompt for i in keep]
    responses = [response_text(self.tokenizer, tokens[i], int(lengths[i]), rc.stop_strings, self.eos_ids)
                 for i in keep]
    if "reward_model" in trainer.frozen:  # the scorer reads the run's frozen reward model
      self.scorer.params = trainer.frozen["reward_model"]
    return prompts, responses, np.asarray(self.scorer(prompts, responses)) * rc.reward_scale
