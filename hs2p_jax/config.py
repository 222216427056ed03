"""Typed run configuration: nested dataclasses loaded from YAML with `key=value` overrides, validated up front."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from hs2p_jax.config_checks import validate
from hs2p_jax.errors import UserError
from hs2p_jax.sharding import MeshConfig
from hs2p_jax.yaml_config import build, merge, parse_overrides, read_with_includes, read_yaml, to_dict

# the loader is re-exported: `config.build`, `config.parse_overrides`, ... (callers import them from here)
__all__ = ["build", "load", "load_tool", "merge", "parse_overrides", "read_yaml", "to_dict"]


@dataclasses.dataclass
class LoraConfig:
  """LoRA adapters (`hs2p_jax/model/lora.py`); rank 0: none, every parameter trains. A key left unset
  (null) is the starting model's adapters' (`model.init_from`: a PEFT adapter or a LoRA model of ours),
  else its default: rank 0, alpha 16, dropout 0, every target, the head trained. A key that
  contradicts the starting adapters is an error (`train.model_init.lora_settings`)."""

  rank: Optional[int] = None
  alpha: Optional[float] = None        # the adapters' product is scaled by alpha / rank
  dropout: Optional[float] = None      # dropout on the adapters' input while training (PEFT's lora_dropout)
  targets: Optional[list] = None       # PEFT's module names (default: every projection)
  train_head: Optional[bool] = None    # a reward model's head (kernel and bias) trains in full; false:
                                       # frozen with the base (e.g. BT from a regression model's head)
  merge_init: bool = False             # merge the starting model's adapters into its weights, train fresh ones


@dataclasses.dataclass
class ModelConfig:
  preset: str = "tiny"                 # architecture preset (hs2p_jax.model.config.PRESETS)
  source: Optional[str] = None         # weights: None (random), "gguf:PATH|smollm2", "hf:DIR" or a DIR
  init_from: Optional[str] = None      # one of our model checkpoints to start from (overrides `source`)
  kind: str = "reward"                 # "reward" or "lm"
  num_attributes: int = 9              # reward head outputs (NeMo layout: 9)
  reward_weights: Any = "helpfulness"  # scalar reward: attribute name, named weighting or list of A floats
  tokenizer: str = "auto"              # "auto" (from init_from / source, else bytes), "bytes", "gguf:PATH", HF dir
  dtype: str = "float32"               # compute dtype; params are float32
  num_layers: Optional[int] = None     # override (e.g. keep the first N layers of pretrained weights)
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "reference"
  weight_grad: str = "flat"            # "flat" (one GEMM per weight gradient) or "autodiff"; see model/linear.py
  seed: int = 0
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class DataConfig:
  train: Optional[str] = None          # .jsonl / .jsonl.gz / .parquet, or hf:NAME[:DATA_DIR]; None = built-in
  validation: Optional[str] = None
  format: str = "helpsteer2"           # helpsteer2 | helpsteer2-preference | helpsteer3-preference | pairs | hh | rewardbench
  attributes: str = "helpfulness"      # regression labels: "helpfulness" (index 4 only) or "all" (5 HelpSteer)
  template: str = "steerlm"            # "steerlm" (NeMo <extra_id_*> format) or "chat" (tokenizer template)
  max_length: int = 256
  overlong: str = "truncate"           # "truncate" (keep the end of the prompt) or "drop"
  pad_multiple: int = 32               # pad batches to a multiple of this (bucketing); <= max_length
  buckets: Any = "pow2"                # "pow2" (log2 compiled shapes), "multiple" (of pad_multiple: least padding) or [lengths]
  packing: bool = False
  share_prompt: bool = False           # pairs, packed: chosen and rejected share their common prefix in one segment
  skip_invalid: bool = False
  eval_pairs: Optional[str] = None     # extra pairwise-accuracy set for regression runs (same sources as train)
  eval_pairs_format: str = "helpsteer2-preference"
  builtin_size: int = 512              # examples of the built-in data set per split scale
  domains: Optional[list] = None       # helpsteer3-preference: keep these domains only (None = all)
  languages: Optional[list] = None     # helpsteer3-preference: keep these languages only (None = all)
  num_workers: int = 0


@dataclasses.dataclass
class OptimizerConfig:
  """AdamW with global-norm clipping and linear warm-up then constant LR (the paper's recipe) or a cosine."""

  lr: float = 2e-6
  warmup_steps: int = 10
  lr_schedule: str = "constant"        # after the warm-up: constant (the recipe's) or cosine (NeMo's annealing)
  min_lr: float = 0.0                  # cosine: the floor reached at the run's last update
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  grad_clip: float = 1.0


@dataclasses.dataclass
class LMTrainConfig(OptimizerConfig):
  """The keys every trainer shares (`train:`, `dpo:`, `sft:`); `batch_size` counts examples, or pairs."""

  steps: int = 100
  batch_size: int = 8                  # global: examples (regression, SFT) or pairs (BT, DPO) per optimizer step
  micro_batch_size: Optional[int] = None  # per accumulation step; None = batch_size
  seed: int = 0
  log_every: int = 1
  eval_every: int = 0                  # 0 = only at the end
  eval_batches: int = 0                # 0 = the whole validation set
  save_every: int = 50
  keep_checkpoints: int = 2
  async_checkpoint: bool = True        # a save's writes overlap the following steps


@dataclasses.dataclass
class TrainConfig(LMTrainConfig):
  """`train:` of `hs2p train-rm`: the shared trainer keys and the reward-model objective."""

  objective: str = "regression"        # regression | bt
  bt_variant: str = "scaled"           # regular | margin | scaled


@dataclasses.dataclass
class DistConfig:
  coordinator: Optional[str] = None    # HOST:PORT; unset = auto-detect (TPU pods, SLURM) or single process
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Any] = None
  heartbeat_timeout: float = 30.0      # s without a peer's heartbeat before every process stops (exit 75)
  step_timeout: float = 0.0            # s a training step (with its log and save) may run; 0 = no limit
  compile_cache: Optional[str] = None  # persistent compilation cache dir (shared storage): a relaunch compiles
                                       # nothing it compiled before; None: JAX_COMPILATION_CACHE_DIR, if set


@dataclasses.dataclass
class RunConfig:
  """`hs2p train-rm` configuration."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)
  name: str = "run"


@dataclasses.dataclass
class ReinforceConfig(OptimizerConfig):
  steps: int = 20
  prompts_per_step: int = 4
  samples_per_prompt: int = 4          # k rollouts per prompt (leave-one-out baseline over them)
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_strings: list = dataclasses.field(default_factory=lambda: ["<extra_id_1>"])
  kl_beta: float = 0.01                # reward = RM score - kl_beta * KL(policy || reference)
  kl_estimator: str = "absolute"       # absolute: |logp - ref| (NeMo); k1: logp - ref; k3: (r - 1) - log r
  truncated_as_ended: bool = False     # count samples cut at max_new_tokens in the baseline (NeMo: no)
  updates_per_rollout: int = 1         # optimizer steps per rollout batch (minibatches of it)
  micro_batches: int = 1               # each minibatch through the model in this many slices (grads accumulated)
  share_prompt: bool = False           # policy / reference log-probs compute each prompt once for its k samples
  rollout_copy: bool = True            # sample from a copy in the rollout layout (`hs2p_jax.rl.layout`); false:
                                       # from the training params and layout
  rollout_tensor: int = 0              # the copy's tensor-parallel degree (0: chosen for decode time among
                                       # those that fit half a device, `hs2p_jax.rl.layout`; 1: replicated)
  rollout_dtype: str = "auto"          # the copy's dtype (auto: policy.dtype, the compute dtype)
  frozen_dtype: str = "auto"           # the reference's and reward model's matrices (auto: policy.dtype)
  reward_scale: float = 1.0
  reward_timeout: float = 120.0        # served reward model (reward_model: http://...): seconds a request may take
  reward_retries: int = 5              # ... and tries after the first before the run stops (backoff 1, 2, 4, ... s)
  lr: float = 1e-6
  warmup_steps: int = 0
  seed: int = 0
  log_every: int = 1
  sample_every: int = 10               # write example responses to samples.jsonl every N steps
  eval_every: int = 0                  # validation rollouts every N steps (and at the last): greedy responses to
                                       # data.validation's prompts, their reward and KL (val_*); the best kept in
                                       # DIR/best; 0: none
  val_prompts: int = 0                 # the first N validation prompts (0: all)
  save_every: int = 50
  keep_checkpoints: int = 2
  async_checkpoint: bool = True        # a save's writes overlap the following steps


@dataclasses.dataclass
class ReinforceRunConfig:
  """`hs2p reinforce` configuration: a policy (its reference is a frozen copy) and a reward model."""

  policy: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(kind="lm"))
  reward_model: Optional[str] = None   # model checkpoint (kind reward; its own tokenizer and template), or the
                                       # URL of an `hs2p serve` of one (http://HOST:PORT; token: $HS2P_SERVE_TOKEN)
  data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(format="prompts", template="chat",
                                                                         buckets="pow2"))
  reinforce: ReinforceConfig = dataclasses.field(default_factory=ReinforceConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)
  name: str = "reinforce"


@dataclasses.dataclass
class PPOConfig(ReinforceConfig):
  """PPO (`hs2p ppo`): NeMo-Aligner's defaults, the paper publishing none of its own [unverified]."""

  samples_per_prompt: int = 1
  lr: float = 9e-7                     # the actor's
  critic_lr: float = 9e-6
  critic_warmup_steps: int = 0         # critic-only rollouts before step 1 (NeMo's): the actor and its AdamW
                                       # state untouched; they read prompts, not steps
  gamma: float = 1.0                   # GAE discount
  lam: float = 0.95                    # GAE lambda
  clip: float = 0.2                    # the policy ratio's clip: [1 - clip, 1 + clip]
  clip_high: Optional[float] = None    # the ratio's upper clip 1 + clip_high (DAPO's clip-higher, e.g. 0.28); None: clip
  value_clip: float = 0.2              # the value's clip around the rollout's values
  epochs: int = 1                      # passes over each rollout batch, its minibatches reshuffled each pass
  advantage: str = "gae"               # gae | grpo (group-normalised scores over samples_per_prompt; never whitened)
  whiten: bool = True                  # GAE's advantages whitened over the rollout batch's response tokens
  truncated_in_actor_loss: bool = False  # responses cut at max_new_tokens train the actor too (NeMo: no; they
                                       # always train the critic and count in whitening)
  loss_agg: str = "token"              # the actor loss: token (one mean over all tokens: NeMo, DAPO) or sequence
                                       # (a mean over responses of their token means: GRPO's paper, TRL's "grpo")
  kl_in_loss: bool = False             # the KL to the reference as a loss term kl_beta * k3 on every token
                                       # (GRPO's) instead of a penalty in the rewards (NeMo's)
  drop_flat_groups: bool = False       # grpo: groups whose samples all score the same leave the actor loss (DAPO)


@dataclasses.dataclass
class PPORunConfig:
  """`hs2p ppo` configuration: a policy (actor; its reference a frozen copy), the reward model, and
  the critic, initialised from the reward model (`critic`: another reward-model checkpoint)."""

  policy: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(kind="lm"))
  reward_model: Optional[str] = None   # model checkpoint (kind reward)
  critic: Optional[str] = None         # the critic's initial weights (default: reward_model)
  data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(format="prompts", template="chat",
                                                                         buckets="pow2"))
  ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)
  name: str = "ppo"


@dataclasses.dataclass
class DPOConfig(LMTrainConfig):
  variant: str = "regular"             # regular | margin | scaled (the BT variants on DPO's implicit reward)
  beta: float = 0.1
  frozen_dtype: str = "auto"           # the reference's matrices (auto: policy.dtype, the compute dtype)


@dataclasses.dataclass
class SFTConfig(LMTrainConfig):
  pass


@dataclasses.dataclass
class DPORunConfig:
  """`hs2p train-dpo` configuration: a policy (its reference is a frozen copy) and preference pairs."""

  policy: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(kind="lm"))
  data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(format="helpsteer2-preference",
                                                                         template="chat"))
  dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)
  name: str = "dpo"


@dataclasses.dataclass
class SFTRunConfig:
  """`hs2p train-sft` configuration: a policy and (prompt, response) examples (`data.format` sft,
  justifier, or the chosen side of pairs)."""

  policy: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(kind="lm"))
  data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(format="sft", template="chat"))
  sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)
  name: str = "sft"


@dataclasses.dataclass
class RuntimeConfig:
  """`model.*` keys of a command that loads a saved model: how it computes, not its parameters
  (None keeps the checkpoint's choice)."""

  dtype: Optional[str] = None
  attention: Optional[str] = None
  remat: Optional[str] = None
  scan_layers: Optional[bool] = None

  def fields(self) -> dict[str, Any]:
    """The keys given, as `load_model(**runtime)` takes them."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class ToolConfig:
  """`--set` keys of `hs2p expo`, `eval` and `convert`: the mesh, the multi-host start-up, the
  model's runtime and the data keys the command applies (`load_tool`)."""

  model: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)


@dataclasses.dataclass
class ExpoStage:
  search: str = "1.0:2.6:0.2"          # LO:HI:STEP factors, scored on `data` (base + f * (tuned - base))
  factor: Optional[float] = None       # a fixed factor instead of the search
  data: str = "builtin"                # pairs to score factors on (validation split)
  format: str = "helpsteer2-preference"
  split: str = "validation"
  batch_size: int = 16
  max_length: Optional[int] = None     # tokens per scored sequence (None: the length the model was trained at)


@dataclasses.dataclass
class EvalStage:
  data: str = "builtin"                # a RewardBench-format file (or hf:allenai/reward-bench)
  format: str = "rewardbench"
  rewardbench2: Optional[str] = None   # also RewardBench 2: a file, hf:allenai/reward-bench-2 or builtin
  split: str = "validation"
  batch_size: int = 16
  max_length: Optional[int] = None     # tokens per scored sequence (None: the length the model was trained at)


@dataclasses.dataclass
class CompareStage:
  data: str = "builtin"                # held-out prompts (any format with prompts; validation split)
  format: str = "prompts"
  split: str = "validation"
  prompts: int = 64                    # the first N distinct prompts
  max_new_tokens: int = 32
  batch_size: int = 16
  seed: int = 0


@dataclasses.dataclass
class JudgeStage:
  data: str = "builtin"                # pairs for the justifier's verdicts (any pair format)
  format: str = "helpsteer2-preference"
  split: str = "validation"
  pairs: int = 0                       # the first N pairs; 0 = all
  max_new_tokens: int = 128
  batch_size: int = 16


@dataclasses.dataclass
class PipelineConfig:
  """`hs2p pipeline`: stage configs (paths relative to this file) and the ExPO / eval settings.

  `--set regression.KEY=V` (or bt., reinforce., ppo., dpo., justifier.) overrides one stage's config; `--set
  expo.KEY=V`, `eval.KEY=V`, `compare.KEY=V`, `judge.KEY=V`, `stages=[...]` the pipeline's own keys; any other key (`train.steps=6`,
  `mesh.data=2`) is applied to every stage config that has it.
  """

  regression: str = "regression.yaml"
  bt: str = "scaled_bt.yaml"
  reinforce: Optional[str] = "reinforce.yaml"
  ppo: Optional[str] = "ppo.yaml"       # PPO config (stage "ppo")
  ppo_rounds: int = 1                   # the paper's 2: round r restarts actor and reference from round r-1's
                                        # final actor, the critic again from the reward model (DIR/ppo_round<r>)
  dpo: Optional[str] = "dpo.yaml"
  justifier: Optional[str] = "justifier.yaml"  # SFT config of the Pairwise Justifier (stage "justifier")
  stages: list = dataclasses.field(default_factory=lambda: ["regression", "bt", "expo", "eval", "reinforce"])
  expo: ExpoStage = dataclasses.field(default_factory=ExpoStage)
  eval: EvalStage = dataclasses.field(default_factory=EvalStage)
  compare: CompareStage = dataclasses.field(default_factory=CompareStage)
  judge: JudgeStage = dataclasses.field(default_factory=JudgeStage)
  name: str = "pipeline"


def load(cls, path: str | None, overrides: list[str] = (), extra: dict[str, Any] | None = None):
  """`cls` from a YAML file (may `include:` another, relative to it), then `extra`, then `key=value`s."""
  data = read_with_includes(path) if path else {}
  if extra:
    data = merge(data, extra)
  data = merge(data, parse_overrides(list(overrides)))
  try:
    cfg = build(cls, data)
  except UserError as e:
    raise UserError(f"{path or 'config'}: {e}") from None
  validate(cfg)
  return cfg


def load_tool(command: str, overrides: list[str], data: dict[str, Any] | None = None,
              data_keys: tuple[str, ...] = ()) -> ToolConfig:
  """The ToolConfig of `hs2p COMMAND --set ...`: `data` are the command's defaults for the data
  section (from its flags and the checkpoint); `--set data.KEY` is refused unless KEY is in `data_keys`."""
  given = parse_overrides(list(overrides))
  for key in sorted(given.get("data", {})):
    if key not in data_keys:
      takes = f"it takes data.{', data.'.join(data_keys)}" if data_keys else "it reads no data"
      raise UserError(f"--set data.{key}: does not apply to hs2p {command} ({takes})")
  try:
    cfg = build(ToolConfig, merge({"data": data or {}}, given))
  except UserError as e:
    raise UserError(f"--set: {e}") from None
  validate(cfg)
  return cfg
