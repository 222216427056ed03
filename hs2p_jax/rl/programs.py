"""Every program an RL step runs, lowered on the run's own arrays for every prompt length its data
can bring, so that all of them compile before step 1 (a pod stalls once, at the start, not at the
step that first brings a new prompt bucket, where `dist.step_timeout` would stop it).

Per prompt bucket T (the lengths of the loader's examples, bucketed as `data.buckets` pads them):
the sampler (the training `SamplingConfig` on the step's prompts; the greedy one on the validation
batches), the log-prob function of the policy and of the reference, PPO's critic values, the update
(and PPO's critic-only warm-up step); once: the copy into the rollout layout, the KL, and the
in-run reward model at every length its scorer pads to. Each is lowered with what the call will
pass (the trainer's arrays' shardings, the batch shardings `feed.put_batch` gives), so the call
finds its compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from hs2p_jax.data.batching import bucket_lengths
from hs2p_jax.eval.scorer import RewardScorer, score_spec
from hs2p_jax.rl.setup import rollout_spec
from hs2p_jax.sample import generate_from_state
from hs2p_jax.sharding import use_mesh
from hs2p_jax.train.state import abstract_of


def at_length(cfg: Any, prompt_len: int) -> Any:
  """`cfg` with its prompts at `prompt_len` tokens (what `rollout_spec` shapes batches by)."""
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=prompt_len))


def lowerings(source: Any, trainer: Any) -> list[tuple[str, Callable[[], Any]]]:
  """(name, lower) of every program of `source`'s rollouts and `trainer`'s updates (module docstring)."""
  ph, rc, cfg = source.phases, source.rc, source.cfg
  st = ph.update.state
  mesh, rules = st.mesh, st.rules
  n = rc.prompts_per_step * rc.samples_per_prompt
  policy = abstract_of(ph.policy_params(trainer))
  reference = abstract_of(trainer.frozen_params("reference"))
  lay = ph.layout
  s_mesh, s_rules, s_graphdef, s_params = ((lay.mesh, lay.rules, lay.graphdef, lay.abstract()) if lay is not None
                                           else (mesh, rules, ph.policy_graphdef, policy))
  stops = None if source.stops is None else tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in source.stops)
  key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0), 1))
  greedy = dataclasses.replace(source.sampling, temperature=0.0, top_k=0, top_p=1.0, num_samples=1)

  def generate(rows: int, length: int, sampling) -> Callable[[], Any]:
    ids = jax.ShapeDtypeStruct((rows, length), np.int32)

    def lower():
      with use_mesh(s_mesh, s_rules):
        return generate_from_state.lower(s_graphdef, s_params, ids, ids, key, sampling, stops)
    return lower

  def under_mesh(fn: Callable[[], Any]) -> Callable[[], Any]:
    def lower():
      with use_mesh(mesh, rules):
        return fn()
    return lower

  out: list[tuple[str, Callable[[], Any]]] = []
  if lay is not None:
    out.append(("copy", lambda: lay._copy.lower(policy)))  # noqa: SLF001 - the layout's own jitted copy
  train = source.loader.length_buckets()
  val = source.validation.length_buckets() if source.validation is not None else []
  for t in sorted(set(train) | set(val)):
    rows = rollout_spec(at_length(cfg, t), mesh, rules, n)
    out += [(f"generate T={t}", generate(rc.prompts_per_step, t, source.sampling))] if t in train else []
    out += [(f"generate greedy T={t}", generate(n, t, greedy))] if t in val else []
    out += [(f"logprobs T={t}", under_mesh(lambda rows=rows: ph.logprobs.lower(policy, rows))),
            (f"reference logprobs T={t}", under_mesh(lambda rows=rows: ph.logprobs.lower(reference, rows)))]
    if ph.values is not None:
      critic = abstract_of(trainer.params["critic"])
      out.append((f"values T={t}", under_mesh(lambda rows=rows: ph.values.lower(critic, rows))))
    if t in train:
      mb = rollout_spec(at_length(cfg, t), mesh, rules, n // rc.updates_per_rollout, advantages=True)
      out.append((f"update T={t}", lambda mb=mb: ph.update.lower(mb)))
      if ph.critic_update is not None:
        out.append((f"critic warm-up T={t}", lambda mb=mb: ph.critic_update.lower(mb)))
  if train or val:
    first = rollout_spec(at_length(cfg, (train or val)[0]), mesh, rules, n)

    def kl():
      with use_mesh(mesh, rules):
        logp = ph.logprobs.lower(policy, first).compile().output_shardings
        spec = jax.ShapeDtypeStruct(first["tokens"].shape, np.float32, sharding=logp)
        return ph.kl.lower(spec, spec, first["response_mask"])
    out.append(("kl", kl))
  scorer = source.scorer
  if ph.score is not None and isinstance(scorer, RewardScorer) and "reward_model" in trainer.frozen:
    rm = abstract_of(trainer.frozen["reward_model"])
    for length in bucket_lengths(32, scorer.max_length, "pow2"):  # the lengths `RewardScorer` pads to
      out.append((f"score L={length}", under_mesh(
          lambda length=length: ph.score.lower(rm, score_spec(mesh, rules, length, scorer.batch_size)))))
  return out
