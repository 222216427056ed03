"""`hs2p pipeline`: helpfulness regression -> scaled BT from it -> ExPO search -> evaluation -> REINFORCE,
and the paper's baselines (PPO in one or more rounds, DPO, the Pairwise Justifier) and the policies'
comparison beside the paper's RLHF table, as configured.

Each stage runs in `DIR/<stage>/` and records in `DONE`, when it finishes, its key: a hash of its
resolved config (less the keys that change no number: `run_record.RUNTIME_KEYS`) and of the keys of
the stages it read (the checkpoints it started from or scored). A rerun skips a stage whose key is
unchanged, so an interrupted pipeline resumes where it stopped (a training stage resumes from its
checkpoint). A stage whose key changed is stale: one line names the keys (and inputs) that changed;
its directory is removed and it runs again, and so does every stage after it that reads it (their
keys change with its). A training stage whose only change is a larger step count continues its run
instead. `report.md` lists every stage's key and whether this run ran or reused it.
Every stage's metrics are also appended to `DIR/metrics.jsonl` with a `stage` field.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import typing
from typing import Any

from hs2p_jax import config as config_lib
from hs2p_jax import run_record, storage
from hs2p_jax.atomic import write_json, write_text
from hs2p_jax.checkpoint import is_model_checkpoint
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import use_mesh
from hs2p_jax.train.metrics import read_metrics



def _has_key(cls, dotted: str) -> bool:
  node = cls
  for part in dotted.split("."):
    if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
      return node in (dict, typing.Any)
    types = typing.get_type_hints(node)
    if part not in types:
      return False
    node = types[part]
    if typing.get_origin(node) is typing.Union:
      node = next(a for a in typing.get_args(node) if a is not type(None))
  return True


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
  """(pipeline keys, {stage: keys}, keys for every stage) from `--set` pairs."""
  stage_cls = {"regression": config_lib.RunConfig, "bt": config_lib.RunConfig,
               "reinforce": config_lib.ReinforceRunConfig, "ppo": config_lib.PPORunConfig,
               "dpo": config_lib.DPORunConfig,
               "justifier": config_lib.SFTRunConfig}
  own, per_stage, broadcast = [], {name: [] for name in stage_cls}, []
  for pair in overrides:
    key = pair.split("=", 1)[0].strip()
    head, _, rest = key.partition(".")
    if head in per_stage and rest and _has_key(stage_cls[head], rest):
      per_stage[head].append(pair[len(head) + 1:])
    elif _has_key(config_lib.PipelineConfig, key):
      own.append(pair)
    else:
      if not any(_has_key(c, key) for c in set(stage_cls.values())):
        raise UserError(f"--set {key}: not a pipeline key nor a key of any stage config")
      broadcast.append(pair)
  return own, per_stage, broadcast


class Pipeline:
  def __init__(self, config: str, overrides: list[str], out: str):
    own, self.per_stage, self.broadcast = split_overrides(overrides)
    self.cfg = config_lib.load(config_lib.PipelineConfig, config, own)
    self.base = os.path.dirname(os.path.abspath(config))
    self.out = storage.absolute(out)  # a local directory or a URL (gs://)
    unknown = sorted(set(self.cfg.stages) - {"regression", "bt", "expo", "eval", "reinforce", "ppo", "dpo",
                                             "compare", "justifier"})
    if unknown:
      raise UserError(f"{config}: unknown stage {unknown[0]!r}")
    if self.cfg.ppo_rounds < 1:
      raise UserError(f"{config}: ppo_rounds={self.cfg.ppo_rounds} must be at least 1")
    self.results: dict[str, Any] = {}
    self.overrides = list(overrides)
    self.keys: dict[str, dict[str, Any]] = {}  # stage -> {key, config, inputs, ran}

  def stage_config(self, cls, name: str, path: str, extra: dict[str, Any] | None = None):
    path = os.path.join(self.base, path)
    pairs = [p for p in self.broadcast if _has_key(cls, p.split("=", 1)[0].strip())] + self.per_stage.get(name, [])
    return config_lib.load(cls, path, pairs, extra=extra)

  def _dir(self, stage: str) -> str:
    return storage.join(self.out, stage)

  def _done(self, stage: str) -> bool:
    return storage.isfile(storage.join(self._dir(stage), "DONE"))

  def _finish(self, stage: str, info: dict[str, Any]) -> None:
    k = self.keys[stage]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(storage.join(self._dir(stage), "DONE"), {**info, "key": k["key"], "config": k["config"],
                                                         "inputs": k["inputs"], "finished": stamp})
    k["ran"] = True
    src, dst = storage.join(self._dir(stage), "metrics.jsonl"), storage.join(self.out, "metrics.jsonl")
    if storage.isfile(src):  # the pipeline's log: every stage's records, rewritten whole (object storage: no appends)
      lines = [json.dumps({**r, "stage": stage}) for r in read_metrics(src)]
      before = [r for r in read_metrics(dst) if r.get("stage") != stage] if storage.isfile(dst) else []
      write_text(dst, "".join(json.dumps(r) + "\n" for r in before) + "".join(line + "\n" for line in lines))

  def _current(self, stage: str, config: Any, inputs: tuple[str, ...] = (), training: bool = False) -> bool:
    """Whether `stage` finished with this `config` (a dataclass or dict) and these input stages; a
    stage that finished otherwise is stale: said in one line, its directory removed (a training stage
    whose step count only grew keeps its run, which continues)."""
    plain = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    flat = {k: v for k, v in run_record.normalised(run_record.flatten(json.loads(json.dumps(plain)))).items()
            if not run_record.matches(k, run_record.RUNTIME_KEYS)}
    ins = {s: self.keys[s]["key"] if s in self.keys else self._done_info(s).get("key")
           for s in inputs if s in self.keys or self._done(s)}
    key = hashlib.sha256(json.dumps({"config": flat, "inputs": ins}, sort_keys=True).encode()).hexdigest()[:16]
    self.keys[stage] = {"key": key, "config": flat, "inputs": ins, "ran": False}
    done = self._done_info(stage)
    if not done or done.get("key") == key:
      if done:
        self.keys[stage]["finished"] = done.get("finished")
      return bool(done)
    changed = run_record.differences(done.get("config", {}), flat, {})
    moved = [s for s in sorted(set(ins) | set(done.get("inputs", {}))) if ins.get(s) != done.get("inputs", {}).get(s)]
    grown = training and not moved and changed and all(
        k.endswith(".steps") and isinstance(a, int) and isinstance(b, int) and b >= a for k, (a, b) in changed.items())
    why = "; ".join(([run_record.describe(changed)] if changed else []) +
                    ([f"{', '.join(moved)} changed"] if moved else []) +
                    ([] if "key" in done else ["its DONE records no key (an older version)"]))
    import jax
    if jax.process_index() == 0:
      print(f"== pipeline stage {stage}: stale ({why}): " + ("continuing its run" if grown else "running it again"),
            file=sys.stderr, flush=True)
      storage.remove(storage.join(self._dir(stage), "DONE"))
      if not grown:
        storage.rmtree(self._dir(stage))
    if jax.process_count() > 1:  # every process reads the stage's directory only once it is gone
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"hs2p_pipeline_stale_{stage}")
    return False

  def _announce(self, stage: str) -> None:
    print(f"== pipeline stage: {stage} ({self._dir(stage)})", file=sys.stderr, flush=True)

  def run(self) -> dict[str, Any]:
    from hs2p_jax.distributed import compile_cache, initialize
    if storage.is_url(self.out):  # seconds, not minutes of retries, to say the bucket cannot be written
      storage.route_client_logs(os.path.join(storage.local_dir(self.out, "logs"), "pipeline.log"))
      storage.probe(self.out)
    run_record.claim(self.out, "pipeline", {**dataclasses.asdict(self.cfg), "set": self.overrides},
                     {**dataclasses.asdict(config_lib.PipelineConfig()), "set": []},
                     allow_change="hs2p pipeline (stale stages run again)").commit()
    storage.makedirs(self.out)
    if not any(self._done(s) for s in self.cfg.stages):
      storage.remove(storage.join(self.out, "metrics.jsonl"))
    reg = self.stage_config(config_lib.RunConfig, "regression", self.cfg.regression)
    initialize(reg.dist.coordinator, reg.dist.num_processes, reg.dist.process_id, reg.dist.local_device_ids,
               reg.dist.heartbeat_timeout)
    compile_cache(reg.dist.compile_cache)
    self.mesh_cfg = reg.mesh  # the expo and eval stages run on the training stages' mesh
    for stage in self.cfg.stages:
      getattr(self, f"_{stage}")()
    self._record_provenance()
    return self.report()

  def _record_provenance(self) -> None:
    """provenance.json of the whole pipeline: environment, and the data the expo and eval stages
    read (each training stage has its own beside its config.json)."""
    from hs2p_jax import provenance
    data = {}
    expo = self._done_info("expo")
    if expo.get("origin"):
      data["expo_search"] = {"source": self.cfg.expo.data, "origin": expo["origin"]}
    if "eval_data" in self.results:
      data["eval"] = self.results["eval_data"]
    provenance.write(self.out, self._mesh()[0], data, stages=list(self.cfg.stages))

  def _done_info(self, stage: str) -> dict[str, Any]:
    path = storage.join(self._dir(stage), "DONE")
    return json.loads(storage.read_text(path)) if storage.isfile(path) else {}

  def _rm_stage(self) -> str | None:
    """The stage of the newest reward model the pipeline made (ExPO, else BT, else regression)."""
    return next((s for s in ("expo", "bt", "regression") if is_model_checkpoint(storage.join(self._dir(s), "model"))),
                None)

  def _reward_model(self) -> str | None:
    """The newest reward model the pipeline made (ExPO, else BT, else regression)."""
    stage = self._rm_stage()
    return storage.join(self._dir(stage), "model") if stage else None

  def _mesh(self):
    from hs2p_jax.sharding import make_mesh, rules_from
    return make_mesh(self.mesh_cfg), rules_from(self.mesh_cfg.rules)

  def _regression(self) -> None:
    from hs2p_jax.train.rm_trainer import train_rm
    cfg = self.stage_config(config_lib.RunConfig, "regression", self.cfg.regression)
    if self._current("regression", cfg, training=True):
      return
    self._announce("regression")
    if cfg.train.objective != "regression":
      raise UserError(f"{self.cfg.regression}: the regression stage needs train.objective=regression")
    last = train_rm(cfg, self._dir("regression"))
    self._finish("regression", {"last": last, "attributes": cfg.data.attributes})

  def _bt(self) -> None:
    from hs2p_jax.train.rm_trainer import train_rm
    extra = {}
    if "regression" in self.cfg.stages:
      extra = {"model": {"init_from": storage.join(self._dir("regression"), "model")}}
    cfg = self.stage_config(config_lib.RunConfig, "bt", self.cfg.bt, extra)
    if self._current("bt", cfg, ("regression",) if extra else (), training=True):
      return
    self._announce("bt")
    last = train_rm(cfg, self._dir("bt"))
    self._finish("bt", {"last": last, "variant": cfg.train.bt_variant, "init_from": cfg.model.init_from})

  def _expo(self) -> None:
    from hs2p_jax.commands.expo import run_expo
    e = self.cfg.expo
    if self._current("expo", e, ("regression", "bt")):
      return
    self._announce("expo")
    mesh, rules = self._mesh()
    res = run_expo(storage.join(self._dir("regression"), "model"), storage.join(self._dir("bt"), "model"),
                   storage.join(self._dir("expo"), "model"), factor=e.factor, search=None if e.factor else e.search,
                   data=e.data, fmt=e.format, split=e.split, batch_size=e.batch_size, max_length=e.max_length,
                   cache_dir=storage.local_dir(self.out, "data"), mesh=mesh, rules=rules)
    self._finish("expo", res)

  def _eval(self) -> None:
    from hs2p_jax import provenance
    from hs2p_jax.commands.evaluate import PairScorer, pair_report, say_truncated, scoring_length
    e = self.cfg.eval
    self._current("eval", e, ("regression", "bt", "expo"))  # run again each time: its scores feed the report
    self._announce("eval")
    out = {}
    for stage in ("regression", "bt", "expo"):
      ckpt = storage.join(self._dir(stage), "model")
      if not is_model_checkpoint(ckpt):
        continue
      length = e.max_length or scoring_length("pipeline", ckpt, None)
      scorer = PairScorer.load(ckpt, *self._mesh(), batch_size=e.batch_size, max_length=length)
      loader = scorer.loader(e.data, e.format, e.split, cache_dir=storage.local_dir(self.out, "data"))
      rewards, mag, ids = scorer.rewards(loader)
      say_truncated(f"{stage}'s eval pairs", loader.report.truncated, loader.report.kept, length)
      out[stage] = pair_report(rewards, mag, ids, loader.examples, e.format)
      self.results["eval_data"] = provenance.data_entry(loader)
      if e.rewardbench2:
        out[stage]["rewardbench2"] = self._rewardbench2(scorer, e.rewardbench2)
    write_json(storage.join(self._dir("eval"), "scores.json"), out)
    self.results["eval"] = out
    self._finish("eval", {"stages": sorted(out)})

  def _rewardbench2(self, scorer, data: str) -> dict:
    """RewardBench 2 subset and overall scores of one stage's model."""
    from hs2p_jax.data.rewardbench2 import load_groups
    from hs2p_jax.data.synthetic import resolve_source
    from hs2p_jax.eval import rewardbench2
    groups, load = load_groups(resolve_source(data, "validation", "rewardbench2", storage.local_dir(self.out, "data")))
    scores = scorer.score_groups([g.prompt for g in groups], [g.completions for g in groups])
    return {**rewardbench2.report(groups, scores), "load": load.summary()}

  def _reinforce(self) -> None:
    from hs2p_jax.rl.reinforce_trainer import train_reinforce
    if not self.cfg.reinforce:
      return
    rm = self._reward_model()
    extra = {"reward_model": rm} if rm else None
    cfg = self.stage_config(config_lib.ReinforceRunConfig, "reinforce", self.cfg.reinforce, extra)
    if self._current("reinforce", cfg, tuple(filter(None, [self._rm_stage()])), training=True):
      return
    self._announce("reinforce")
    last = train_reinforce(cfg, self._dir("reinforce"))
    self._finish("reinforce", {"last": last, "reward_model": cfg.reward_model})

  def _ppo_dirs(self) -> list[str]:
    """The PPO rounds' stage names: ppo, ppo_round2, ..."""
    return ["ppo"] + [f"ppo_round{r}" for r in range(2, self.cfg.ppo_rounds + 1)]

  def _ppo(self) -> None:
    """PPO against the newest reward model, its critic initialised from it; round r > 1 restarts the
    actor and its reference from round r-1's best actor by validation reward (`DIR/<round>/best`, the
    paper's "best round-1 checkpoint"; its final actor where it ran no validation) and the critic
    again from the reward model."""
    from hs2p_jax.rl.ppo_trainer import train_ppo
    if not self.cfg.ppo:
      return
    rm = self._reward_model()
    previous = None
    for stage in self._ppo_dirs():
      extra = {"reward_model": rm} if rm else {}
      if previous:  # the paper's "best round-1 checkpoint": by validation reward where the round kept one
        best = storage.join(self._dir(previous), "best")
        extra["policy"] = {"init_from": best if is_model_checkpoint(best) else storage.join(self._dir(previous), "model")}
      cfg = self.stage_config(config_lib.PPORunConfig, "ppo", self.cfg.ppo, extra or None)
      if not self._current(stage, cfg, tuple(filter(None, [self._rm_stage(), previous])), training=True):
        self._announce(stage)
        last = train_ppo(cfg, self._dir(stage))
        self._finish(stage, {"last": last, "reward_model": cfg.reward_model, "init_from": cfg.policy.init_from})
      previous = stage

  def _dpo(self) -> None:
    from hs2p_jax.train.dpo_trainer import train_dpo
    if not self.cfg.dpo:
      return
    cfg = self.stage_config(config_lib.DPORunConfig, "dpo", self.cfg.dpo)
    if self._current("dpo", cfg, training=True):
      return
    self._announce("dpo")
    last = train_dpo(cfg, self._dir("dpo"))
    self._finish("dpo", {"last": last, "variant": cfg.dpo.variant, "beta": cfg.dpo.beta})

  def _justifier(self) -> None:
    """The Pairwise Justifier: SFT on the justifier config, then its verdicts on `judge.data`, both orders."""
    from hs2p_jax.checkpoint import load_checkpoint_tokenizer, load_model
    from hs2p_jax.data.load import load_examples
    from hs2p_jax.data.synthetic import resolve_source
    from hs2p_jax.eval.judge import judge_pairs
    from hs2p_jax.train.sft_trainer import train_sft
    if not self.cfg.justifier:
      return
    cfg = self.stage_config(config_lib.SFTRunConfig, "justifier", self.cfg.justifier)
    j = self.cfg.judge
    if self._current("justifier", {"sft": dataclasses.asdict(cfg), "judge": dataclasses.asdict(j)}):
      self.results["judge"] = self._done_info("justifier").get("judge")
      return
    self._announce("justifier")
    last = train_sft(cfg, self._dir("justifier"))
    source = resolve_source(j.data, j.split, j.format, storage.local_dir(self.out, ".data"))
    pairs, _ = load_examples(source, j.format, j.split, "pairs")
    pairs = pairs[:j.pairs] if j.pairs else pairs
    model_dir = storage.join(self._dir("justifier"), "model")
    mesh, rules = self._mesh()
    with use_mesh(mesh, rules):
      lm, _ = load_model(model_dir, mesh, rules)
    report = judge_pairs(lm, load_checkpoint_tokenizer(model_dir), cfg.data.template, pairs,
                         max_length=cfg.data.max_length, max_new_tokens=j.max_new_tokens, batch_size=j.batch_size,
                         mesh=mesh, rules=rules)
    summary = {k: report[k] for k in ("accuracy", "pairs", "unparsed", "answers", "position_consistency")}
    print(f"justifier: accuracy {summary['accuracy']:.4f} on {summary['pairs']} pairs, unparsed {summary['unparsed']}"
          f" of {summary['answers']}, position consistency {summary['position_consistency']:.4f}", file=sys.stderr)
    write_json(storage.join(self._dir("justifier"), "judge.json"), report)
    self.results["judge"] = summary
    self._finish("justifier", {"last": last, "judge": summary})

  def _compare(self) -> None:
    """The trained policies (REINFORCE, PPO's last round, DPO) against their common start on held-out prompts."""
    from hs2p_jax.checkpoint import load_model
    from hs2p_jax.data.load import load_examples
    from hs2p_jax.data.synthetic import resolve_source
    from hs2p_jax.eval.policies import compare
    from hs2p_jax.train.model_init import build_model
    from hs2p_jax.eval.scorer import RewardScorer
    stages = {"reinforce": "reinforce", "ppo": self._ppo_dirs()[-1], "dpo": "dpo"}
    trained = {name: storage.join(self._dir(s), "model") for name, s in stages.items()
               if is_model_checkpoint(storage.join(self._dir(s), "model"))}
    rm = self._reward_model()
    if not trained or rm is None:
      raise UserError("the compare stage needs a trained policy (reinforce, ppo or dpo stage) and a reward model")
    c = self.cfg.compare
    rl = self.stage_config(config_lib.ReinforceRunConfig, "reinforce", self.cfg.reinforce) if self.cfg.reinforce \
        else self.stage_config(config_lib.DPORunConfig, "dpo", self.cfg.dpo)
    inputs = tuple(stages[name] for name in trained) + (self._rm_stage(),)
    if self._current("compare", {"compare": dataclasses.asdict(c), "reference": dataclasses.asdict(rl.policy)}, inputs):
      self.results["compare"] = self._done_info("compare").get("policies", {})
      return
    self._announce("compare")
    mesh, rules = self._mesh()
    with use_mesh(mesh, rules):
      reference, _, tokenizer = build_model(rl.policy, mesh, rules)  # the policies' common start
      policies = {s: load_model(path, mesh, rules)[0] for s, path in trained.items()}
    source = resolve_source(c.data, c.split, c.format, storage.local_dir(self.out, ".data"))
    prompts = [ex.prompt for ex in load_examples(source, c.format, c.split, "prompts")[0][:c.prompts]]
    scorer = RewardScorer.load(rm, mesh, rules, max_length=rl.data.max_length + c.max_new_tokens)
    stops = list(getattr(getattr(rl, "reinforce", None), "stop_strings", []) or [])
    out = compare(policies, reference, tokenizer, rl.data.template, prompts, scorer, max_length=rl.data.max_length,
                  max_new_tokens=c.max_new_tokens, stop_strings=stops, batch_size=c.batch_size, seed=c.seed,
                  mesh=mesh, rules=rules)
    for name, m in out.items():
      print(f"compare: {name:<10} reward {m['reward']:.4f}  KL {m['kl']:.4f}  length {m['response_length']:.1f}",
            file=sys.stderr)
    self.results["compare"] = out
    self._finish("compare", {"policies": out, "prompts": len(prompts), "reward_model": rm})

  def report(self) -> dict[str, Any]:
    from hs2p_jax.commands.pipeline_report import write_pipeline_report
    return write_pipeline_report(self)


def pipeline_command(config: str, overrides: list[str], out: str) -> int:
  summary = Pipeline(config, overrides, out).run()
  print(json.dumps(summary))
  return 0
