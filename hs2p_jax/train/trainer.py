"""The one trainer on the shared loop: a run's state filled from its source or a checkpoint, and a
jitted step fed by a batch source.

A trainer page (`rm_trainer`, `dpo_trainer`, `sft_trainer`, `reinforce_trainer`) builds its
`state.Step` (the pure step on the run's abstract state, which `hs2p plan` compiles too), its batch
source and its evaluation, and hands them to `Trainer`:
  source.position                the data position a checkpoint holds (get_state / set_state)
  source.begin()                 start reading at that position (after a restore)
  source.next(step, trainer)     ([device batches: one optimizer step each], host metrics)
  source.before_first_step(t)    (optional) work on the state before step 1 of a fresh run (PPO's critic warm-up)
  source.tokens_per_s()          tokens per second since the previous call
  evaluate(trainer) -> dict      validation metrics (optional)
Frozen models come from `frozen_from`: INITIAL (a copy of the trainable model as the run starts,
kept once in the run directory) or a model checkpoint, read straight into the frozen layout. A
resume builds nothing from the source: the checkpoint restores into the state's shardings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hs2p_jax import provenance, run_record, storage
from hs2p_jax.checkpoint import ModelMeta, resolve_model_dir, restore_tree, save_model, write_run_model
from hs2p_jax.config import ModelConfig
from hs2p_jax.convert.state import ReadStats
from hs2p_jax.data.pipeline import make_loader
from hs2p_jax.eval.scoring import collect
from hs2p_jax.feed import feed_layout
from hs2p_jax.model import model_from
from hs2p_jax.sharding import batch_split, use_mesh
from hs2p_jax.train.loop import LoopConfig, run as run_loop
from hs2p_jax.train.model_init import load_params
from hs2p_jax.train.optim import learning_rates
from hs2p_jax.train.state import Step, store_as, subset

INITIAL = "initial"  # `frozen_from`: the trainable model as the run starts


def run_datasets(data: Any, tokenizer: Any, task: str, section: Any, out_dir: str, mesh: Any, rules: Any,
             targets: bool = False) -> dict[str, tuple[Any, int | None, int | None]]:
  """A run's {"train", and with data.validation "validation"}: (loader, steps, batch size) each, the
  loaders reading micro-batches of `section` (`train:`, `dpo:`, `sft:`)."""
  micro = section.micro_batch_size or section.batch_size
  out = {"train": (run_loader(data, tokenizer, "train", task, micro, section.seed, out_dir, mesh, rules, targets),
                   section.steps, section.batch_size)}
  if data.validation:
    out["validation"] = (run_loader(data, tokenizer, "validation", task, micro, section.seed, out_dir, mesh, rules,
                                    targets), None, None)
  return out


def run_loader(data: Any, tokenizer: Any, split: str, task: str, batch_size: int, seed: int, out_dir: str, mesh: Any,
               rules: Any, targets: bool = False) -> Any:
  """This process's loader of a run's `split` (training: shuffled, repeating; else in order, once),
  its rows padded to split over the mesh's batch axes, built-in data cached in the run directory."""
  train = split == "train"
  layout = feed_layout(mesh, rules)  # this process reads its block of each global batch
  return make_loader(data, tokenizer, split=split, task=task, batch_size=batch_size, seed=seed if train else 0,
                     shuffle=train, repeat=train, process_index=layout.slot, process_count=layout.slots,
                     cache_dir=storage.local_dir(out_dir, "data"), row_multiple=batch_split(mesh, rules),
                     targets=targets)


def replicated_jit(fn: Callable, mesh: Any) -> Any:
  """`fn` jitted with its result replicated on every device (evaluation outputs the host reads)."""
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def on_validation(sets: dict[str, Any], section: Any, mesh: Any, rules: Any, fn_of: Callable[["Trainer"], Callable],
                  metrics_of: Callable[[dict[str, Any]], dict[str, float]]) -> Callable[["Trainer"], dict[str, float]]:
  """A trainer's `evaluate`: `metrics_of` the outputs of `fn_of(trainer)(params, batch)` over the
  validation set (`section.eval_batches` of it; 0: all), as `val_*`; {} without one."""
  def evaluate(t: "Trainer") -> dict[str, float]:
    if "validation" not in sets:
      return {}
    with use_mesh(mesh, rules):
      res = collect(fn_of(t), t.model_params(), sets["validation"][0], mesh, rules, section.eval_batches)
    return {f"val_{k}": v for k, v in metrics_of(res).items()}
  return evaluate


class Trainer:
  """One run of a trainer page's step on the shared loop (module docstring); `run()` trains (or
  resumes) to `section.steps`. `source_reads` counts the bytes read from the source weights."""

  def __init__(self, cfg: Any, out_dir: str, *, section: Any, model: ModelConfig, step: Step, source: Any,
               tokenizer: Any, meta: ModelMeta, frozen_from: dict[str, str] | None = None,
               evaluate: Callable[["Trainer"], dict[str, float]] | None = None,
               datasets: dict[str, tuple[Any, int | None, int | None]] | None = None,
               batch_info: dict[str, Any] | None = None, notes: tuple[str, ...] = (),
               model_info: dict[str, Any] | None = None, compile_for: list[dict[str, Any]] | None = None,
               read_source: Callable[["Trainer"], Any] | None = None,
               final_part: str = "", keep_best: str | None = None,
               programs: Callable[["Trainer"], list[tuple[str, Callable[[], Any]]]] | None = None):
    self.cfg, self.out_dir, self.section, self.model_cfg = cfg, storage.absolute(out_dir), section, model
    self.step_fn, self.source, self.loader = step, source, source.position
    self.state = step.state
    self.mesh, self.rules, self.graphdef = self.state.mesh, self.state.rules, self.state.graphdef
    self.tokenizer, self.meta = tokenizer, meta
    self.frozen_from = dict(frozen_from or {})
    if self.state.lora:  # the base a LoRA run's adapters train over: kept once, like a reference
      self.frozen_from["base"] = INITIAL
    self._evaluate = evaluate
    self.datasets, self.batch_info, self.notes = datasets or {}, batch_info, notes
    self.model_info = {"source": model.source, "init_from": model.init_from, **(model_info or {})}
    self.params: Any = None
    self.opt_state: Any = None
    self.frozen: dict[str, Any] = {}
    self.source_reads = ReadStats()
    self.compile_for = list(compile_for or [])
    self._read = read_source   # the initial params of a trainable model `load_params` cannot read (PPO's pair)
    self._final = final_part  # the part of the trained model `DIR/model` holds (PPO: "actor"; "": all of it)
    self.keep_best = keep_best  # the evaluation metric (higher: better) whose best model DIR/best holds
    self._programs = programs  # (name, lower) of programs besides the step to compile before step 1 (RL's)

  # -- the state ---------------------------------------------------------------------------------

  def checkpoint_target(self) -> Any:
    return self.state.checkpointed()

  def checkpoint_state(self) -> Any:
    return {"params": self.params, "opt_state": self.opt_state}

  def snapshot_targets(self) -> dict[str, Any]:
    return {name: self.state.frozen[name] for name, src in self.frozen_from.items() if src == INITIAL}

  def snapshot(self, name: str) -> Any:
    return self.frozen[name]

  def start(self, restored: Any | None, snapshots: dict[str, Any]) -> None:
    """Fills the state: from a checkpoint (`restored`) and the run's snapshots, or from the source."""
    if restored is None:
      if self.params is not None:
        return  # started fresh already (evaluated before the run)
      initial = self._read_source()
      self.params = subset(initial, self.state.params)  # a LoRA run: the adapters and the head
      self.opt_state = self.state.init_opt_state(self.params)
    else:
      self.params, self.opt_state = restored["params"], restored["opt_state"]
      initial = None
    for name, src in self.frozen_from.items():
      if src != INITIAL:
        path = resolve_model_dir(src)
        self.frozen[name] = restore_tree(storage.join(path, "params"), self.state.frozen[name], path)
      elif snapshots.get(name) is not None:
        self.frozen[name] = snapshots[name]
      else:
        if initial is None:  # a run directory from before snapshots: the source once more
          self._say(f"resume: no {self.out_dir}/frozen/{name}; reading it from the source again")
          initial = self._read_source()
        self.frozen[name] = self.state.freeze(name, initial)
    if restored is not None and not self.source_reads.bytes_read:
      self._say("resume: state restored from the run's checkpoint; the source weights were not read")

  def model_params(self, float32: bool = False) -> Any:
    """What `model.model_from` makes the model of: the params, or a LoRA run's (params, base) (the
    base's matrices back in float32 with `float32`)."""
    if not self.state.lora:
      return self.params
    base = self.frozen["base"]
    return self.params, (store_as(base, "float32") if float32 else base)

  def frozen_params(self, name: str) -> Any:
    """What `model.model_from` makes frozen model `name` of (`RunState.frozen_params`)."""
    return self.state.frozen_params(name, self.frozen)

  def _read_source(self) -> Any:
    if self._read is not None:
      return self._read(self)
    return load_params(self.model_cfg, self.state.params, self.mesh, self.rules, self.source_reads)

  def _say(self, line: str) -> None:
    if jax.process_index() == 0:
      print(line, file=sys.stderr, flush=True)

  # -- the loop's trainer (train/loop.py) --------------------------------------------------------

  def provenance(self) -> None:
    """provenance.json and run_model.json (what a step checkpoint holds as a model), and at the start
    one line for the devices and mesh and one per data set: kept/dropped/truncated, epochs."""
    data = {name: provenance.data_entry(loader, steps, batch) for name, (loader, steps, batch) in self.datasets.items()}
    lines = [provenance.device_line(self.mesh)] + [provenance.describe(name, entry) for name, entry in data.items()]
    for line in lines + list(self.notes):
      self._say(line)
    extra = {"batch": self.batch_info} if self.batch_info is not None else {}
    provenance.write(self.out_dir, self.mesh, data, **extra, model=self.model_info)
    write_run_model(self.out_dir, self.meta, self.tokenizer, ("params", self._final) if self._final else ("params",))

  def begin(self, start: int) -> None:
    """Compiles the step for every batch shape the source can give, and the other `programs` (a pod
    stalls once, here, not at whichever step first brings a new length), then starts the source."""
    programs = self._programs(self) if self._programs else []
    if self.compile_for or programs:
      n = len(self.compile_for)
      self._say(f"compiling the step for {n} batch shape{'s' * (n > 1)} (data.buckets)..." if n else
                f"compiling {len(programs)} programs (every prompt bucket's sampling, log-probs, update...)...")
      t0 = time.perf_counter()
      for spec in self.compile_for:
        self.step_fn.lower(spec).compile()
      for _, lower in programs:
        lower().compile()
      self._say(f"compiled in {time.perf_counter() - t0:.0f} s")
    self.source.begin()
    if start == 0 and hasattr(self.source, "before_first_step"):  # e.g. PPO's critic warm-up
      self.source.before_first_step(self)

  def step(self, step: int) -> dict[str, Any]:
    batches, info = self.source.next(step, self)
    outs = []
    for batch in batches:
      self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, self.frozen, batch)
      outs.append(metrics)
    metrics = outs[0] if len(outs) == 1 else jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *outs)
    return {**metrics, **info}

  def record(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
    rec.setdefault("tokens_per_s", self.source.tokens_per_s())
    return {**rec, **learning_rates(self.section, self.opt_state)}  # as the optimizer's own step count says

  def evaluate(self) -> dict[str, float]:
    self.start(None, {})  # the state the run would start from, where it has none yet
    return self._evaluate(self) if self._evaluate is not None else {}

  def save_final(self, where: str = "model", extra_files: dict[str, bytes] | None = None) -> None:
    model = model_from(self.graphdef, self.model_params(float32=True))
    save_model(storage.join(self.out_dir, where), getattr(model, self._final) if self._final else model, self.meta,
               self.tokenizer, overwrite=True, extra_files=extra_files)

  def best(self) -> float | None:
    """The best `keep_best` value so far (DIR/best/best.json), None before any."""
    path = storage.join(self.out_dir, "best", "best.json")
    return json.loads(storage.read_text(path))["value"] if self.keep_best and storage.isfile(path) else None

  def save_best(self, step: int, value: float) -> None:
    """DIR/best: the model of `step`, whose `keep_best` metric is the best so far (a model checkpoint)."""
    record = {"step": step, "metric": self.keep_best, "value": value}
    self.save_final("best", {"best.json": json.dumps(record).encode()})
    self._say(f"best {self.keep_best} so far: {value:.4f} at step {step}; saved {storage.join(self.out_dir, 'best')}")

  def run(self) -> dict[str, Any]:
    s = self.section
    d = self.cfg.dist
    loop = LoopConfig(s.steps, s.log_every, s.save_every, s.keep_checkpoints, s.async_checkpoint, self.cfg.name,
                      getattr(s, "eval_every", 0), d.heartbeat_timeout, d.step_timeout, self.keep_best)
    return run_loop(self, loop, self.out_dir)


def train(command: str, page: Callable[[Any, str], Trainer], cfg: Any, out_dir: str,
          allow_config_change: bool = False) -> dict[str, Any]:
  """`hs2p COMMAND`: claims `out_dir` for the run of `cfg` (`run_record`: refused, before anything is
  written, where the directory holds another run or this one with another config), then builds the
  trainer page's trainer (`page(cfg, out_dir)`) and trains or resumes; returns the last logged metrics."""
  if storage.is_url(out_dir):  # seconds, not minutes of retries, to say the bucket cannot be written
    storage.route_client_logs(os.path.join(storage.local_dir(out_dir, "logs"), f"process_{jax.process_index()}.log"))
    storage.probe(out_dir)
  claim = run_record.claim(out_dir, command, *run_record.config_of(cfg),
                           "--allow-config-change" if allow_config_change else None)
  trainer = page(cfg, out_dir)  # the tokenizer, data and weights' metadata checked: the run can start
  claim.commit()
  session = claim.session
  if session["changed"] and jax.process_index() == 0:
    allowed = f" (allowed by {session['allowed_by']})" if session.get("allowed_by") else ""
    print(f"continuing the run in {storage.absolute(out_dir)} from step {session['from_step']} with "
          f"{run_record.describe(session['changed'])}{allowed}; recorded in {run_record.RECORD}", file=sys.stderr,
          flush=True)
  return trainer.run()
