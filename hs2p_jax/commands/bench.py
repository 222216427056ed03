"""`hs2p bench`: throughput of the reward-model training step, the KV-cache sampler and the data
pipeline, each printed as one JSON object; optionally beside the same work in PyTorch/transformers.

Model FLOPs of a training step (the standard 6N + attention count, causal masking not discounted):
  6 * N * tokens + 12 * L * T^2 * (H * Dh) * rows,
where N = decoder matmul weights (L * (D * Dh * (2H + 2Hkv) + 3 * D * F)); the embedding lookup,
norms and the reward head (A outputs read at one token per row) are left out. MFU = those FLOPs
per second over the device's peak dense rate for the compute dtype (unknown, so null, on CPU).

Timings are medians over steps after a compile and a warm-up step, each step synchronised
(`block_until_ready`). The PyTorch baselines run in a child process (own threads, own peak RSS);
torch is imported only there.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

# Peak dense FLOP/s and memory bytes/s by device family (datasheets). "float32" is the rate of the
# units XLA uses for float32 matmuls at default precision: TF32 tensor cores on GPUs, one bf16 pass
# on TPUs. CPUs have no entry: their MFU is reported as null.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "h100-pcie": {"bfloat16": 756.5e12, "float16": 756.5e12, "float32": 378e12},
    "h200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "v5p": {"bfloat16": 459e12, "float32": 459e12},
    "v5e": {"bfloat16": 197e12, "float32": 197e12},
}
PEAK_BANDWIDTH: dict[str, float] = {"h100": 3.35e12, "h100-pcie": 2.0e12, "h200": 4.8e12, "a100": 2.039e12,
                                    "v5p": 2.765e12, "v5e": 0.819e12}


def device_family(kind: str) -> str | None:
  """A PEAK_FLOPS key from a JAX device kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite"); None if unknown."""
  k = kind.lower()
  if "h100" in k:
    return "h100-pcie" if "pcie" in k else "h100"
  for fam in ("h200", "a100", "v5p"):
    if fam in k:
      return fam
  if "v5e" in k or "v5 lite" in k or "v5litepod" in k:
    return "v5e"
  return None


def peak_flops(kind: str, dtype: str) -> float | None:
  return PEAK_FLOPS.get(device_family(kind) or "", {}).get(dtype)


def decoder_matmul_params(cfg) -> int:
  """N of the FLOP count: weights of the decoder layers' matrix products."""
  d, dh = cfg.hidden_size, cfg.head_dim
  attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * d * cfg.intermediate_size)


def train_flops(cfg, rows: int, seq: int) -> float:
  """Model FLOPs of one training step on `rows` sequences of `seq` tokens (see module docstring)."""
  attn = 12 * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim
  return float(6 * decoder_matmul_params(cfg) * rows * seq + attn * rows)


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (VmHWM: unlike ru_maxrss, not inherited over exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_peak_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _times(run: Callable[[], Any], steps: int) -> list[float]:
  times = []
  for _ in range(max(steps, 1)):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


def _r(x: float | None, nd: int = 4) -> float | None:
  return None if x is None else float(f"{x:.{nd}g}")


def _load() -> float:
  """1-minute load average (other processes on the machine skew CPU timings)."""
  return round(os.getloadavg()[0], 2)


def _mesh(devices: int | None):
  """A data-parallel mesh over the first `devices` devices (None = all); None for one device."""
  import jax
  from hs2p_jax.sharding import MeshConfig, make_mesh
  devs = jax.devices()[:devices] if devices else jax.devices()
  return make_mesh(MeshConfig(data=-1), devs) if len(devs) > 1 else None


def random_split(kind: str, cfg, num_attributes: int = 9, mesh=None, seed: int = 0):
  """(graphdef, state) of a model with random weights drawn on the host (no per-op compiles):
  normal(0, 0.02) matrices, unit norms, zero biases; placed on `mesh` when given."""
  import jax
  import numpy as np
  from flax import nnx
  from hs2p_jax.model import create
  from hs2p_jax.sharding import state_shardings

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create(kind, cfg, num_attributes)))
  rng = np.random.default_rng(seed)

  def one(v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    if axes[-1] == "norm":
      arr = np.ones(v.shape, np.float32)
    elif len([a for a in axes if a != "layers"]) <= 1:
      arr = np.zeros(v.shape, np.float32)
    else:
      arr = rng.standard_normal(v.shape, np.float32) * np.float32(0.02)
    return v.replace(arr)

  state = jax.tree.map(one, abstract, is_leaf=lambda v: isinstance(v, nnx.Variable))
  if mesh is None:
    return graphdef, jax.device_put(state)
  return graphdef, jax.device_put(state, state_shardings(state, mesh))


def rm_batch(pairs: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Fixed-length random pairs, stacked as one micro-batch: rows [0, P) chosen, [P, 2P) rejected."""
  import numpy as np
  rng = np.random.default_rng(seed)
  rows = 2 * pairs
  return {
      "input_ids": rng.integers(3, vocab, (1, rows, seq), dtype=np.int32),
      "segment_ids": np.ones((1, rows, seq), np.int32),
      "score_row": np.stack([np.arange(pairs), pairs + np.arange(pairs)], 1)[None].astype(np.int32),
      "score_index": np.full((1, pairs, 2), seq - 1, np.int32),
      "valid": np.ones((1, pairs), bool),
      "magnitude": rng.integers(1, 4, (1, pairs)).astype(np.float32),
  }


class RMStep:
  """The jitted scaled-BT training step (AdamW, clipping) of a reward model, compiled for one config
  and a fixed random batch. Variants of one preset share (params, opt_state) through `place`."""

  def __init__(self, cfg, pairs: int, seq: int, num_attributes: int = 9, donate: bool = True,
               devices: int | None = None, compiler_options: dict | None = None):
    import jax
    from flax import nnx
    from hs2p_jax.model import create
    from hs2p_jax.sharding import state_shardings, use_mesh
    from hs2p_jax.train.feed import put_batch
    from hs2p_jax.train.optim import make_optimizer
    from hs2p_jax.train.rm import Objective, make_train_step
    from hs2p_jax.sharding import opt_state_shardings

    self.cfg, self.donate, self.tokens = cfg, donate, 2 * pairs * seq
    self.flops = train_flops(cfg, 2 * pairs, seq)
    self.mesh = _mesh(devices)
    self.num_devices = 1 if self.mesh is None else self.mesh.size
    weights = tuple(1.0 if i == min(4, num_attributes - 1) else 0.0 for i in range(num_attributes))
    self.tx = make_optimizer(2e-6, warmup_steps=10)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("reward", cfg, num_attributes)))
    abs_opt = jax.eval_shape(self.tx.init, abstract)
    if self.mesh is None:
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      self.shardings = (jax.tree.map(lambda _: dev, abstract), jax.tree.map(lambda _: dev, abs_opt))
    else:
      psh = state_shardings(abstract, self.mesh)
      self.shardings = (psh, opt_state_shardings(abs_opt, psh, self.mesh))
    self.num_attributes, self.abstract = num_attributes, abstract
    self.batch = put_batch(rm_batch(pairs, seq, cfg.vocab_size), self.mesh, stacked=True)
    step = jax.jit(make_train_step(graphdef, self.tx, Objective("bt", "scaled", weights)),
                   donate_argnums=(0, 1) if donate else (), out_shardings=(*self.shardings, None))
    abs_args = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            (abstract, abs_opt), self.shardings)
    with use_mesh(self.mesh):
      t0 = time.perf_counter()
      self.compiled = step.lower(*abs_args, self.batch).compile(compiler_options)
      self.compile_s = time.perf_counter() - t0

  def init_state(self) -> tuple:
    """Random parameters and a fresh optimizer state, placed for this step."""
    import jax
    _, params = random_split("reward", self.cfg, self.num_attributes, self.mesh)
    return self.place((params, jax.jit(self.tx.init)(params)))

  def place(self, state: tuple) -> tuple:
    import jax
    return jax.device_put(state, self.shardings)

  def __call__(self, state: tuple) -> tuple:
    """One step, synchronised: (params, opt_state) -> (params, opt_state, metrics)."""
    import jax
    params, opt_state, metrics = self.compiled(*state, self.batch)
    jax.block_until_ready(metrics)
    return params, opt_state, metrics


def bench_rm_jax(cfg, pairs: int, seq: int, steps: int, num_attributes: int = 9, donate: bool = True,
                 devices: int | None = None) -> dict:
  """Times `RMStep` on a random reward model: compile, one warm-up step, median of `steps`."""
  import jax
  step = RMStep(cfg, pairs, seq, num_attributes, donate, devices)
  box = {"s": step.init_state()}

  def run():
    *state, box["m"] = step(box["s"])
    box["s"] = tuple(state)

  t0 = time.perf_counter()
  run()
  warmup_s = time.perf_counter() - t0
  times = _times(run, steps)
  step_s = statistics.median(times)
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind, cfg.dtype)
  return {
      "device_kind": kind, "platform": jax.devices()[0].platform, "num_devices": step.num_devices,
      "knobs": {"dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat": cfg.remat, "attention": cfg.attention,
                "weight_grad": cfg.weight_grad, "donate": donate, "xla_flags": os.environ.get("XLA_FLAGS")},
      "rows": 2 * pairs, "tokens_per_step": step.tokens, "compile_s": _r(step.compile_s),
      "warmup_step_s": _r(warmup_s), "step_s": _r(step_s), "step_s_all": [_r(t) for t in times],
      "tokens_per_s": _r(step.tokens / step_s), "tokens_per_s_best": _r(step.tokens / min(times)),
      "loss": _r(float(box["m"]["loss"])),
      "model_flops_per_step": step.flops, "model_flops_per_s": _r(step.flops / step_s),
      "peak_flops_per_s": peak, "mfu": _r(step.flops / step_s / peak) if peak else None,
      "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(),
  }


class SampleRun:
  """`generate_from_state` (prefill + `new_tokens` decode steps, EOS disabled) of an LM, compiled for
  one config and fixed random prompts; variants of one preset share the parameter state."""

  def __init__(self, cfg, batch: int, prompt: int, new_tokens: int, temperature: float = 0.0,
               devices: int | None = None, compiler_options: dict | None = None):
    import jax
    import numpy as np
    from flax import nnx
    from hs2p_jax.model import create
    from hs2p_jax.sample import SamplingConfig, generate_from_state
    from hs2p_jax.sharding import state_shardings, use_mesh
    from hs2p_jax.train.feed import put_batch

    self.cfg, self.batch, self.new_tokens = cfg, batch, new_tokens
    self.mesh = _mesh(devices)
    self.num_devices = 1 if self.mesh is None else self.mesh.size
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create("lm", cfg)))
    self.sharding = (jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
                     if self.mesh is None else state_shardings(abstract, self.mesh))
    rng = np.random.default_rng(0)
    arrays = put_batch({"prompt_ids": rng.integers(3, cfg.vocab_size, (batch, prompt), dtype=np.int32),
                        "prompt_mask": np.ones((batch, prompt), np.int32)}, self.mesh)
    self.args = (arrays["prompt_ids"], arrays["prompt_mask"], jax.random.key(0))
    abs_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                             self.sharding)

    def compile_for(n: int):
      scfg = SamplingConfig(max_new_tokens=n, temperature=temperature, eos_ids=(), pad_id=0)
      with use_mesh(self.mesh):
        return generate_from_state.lower(graphdef, abs_state, *self.args, scfg).compile(compiler_options)

    t0 = time.perf_counter()
    self.full = compile_for(new_tokens)
    self.compile_s = time.perf_counter() - t0
    self.one = compile_for(1)

  def init_state(self):
    return self.place(random_split("lm", self.cfg)[1])

  def place(self, state):
    import jax
    return jax.device_put(state, self.sharding)

  def __call__(self, state, one_token: bool = False):
    """Generates (synchronised) and returns the output; `one_token`: a single new token."""
    import jax
    out = (self.one if one_token else self.full)(state, *self.args)
    jax.block_until_ready(out.tokens)
    return out


def bench_sample_jax(cfg, batch: int, prompt: int, new_tokens: int, steps: int, temperature: float = 0.0,
                     devices: int | None = None) -> dict:
  """Times `SampleRun`: median of `steps` after a warm-up; a 1-token run separates the prefill from
  the per-token decode cost."""
  import jax
  import numpy as np
  run = SampleRun(cfg, batch, prompt, new_tokens, temperature, devices)
  state = run.init_state()
  out = run(state)
  assert int(np.min(np.asarray(out.lengths))) == new_tokens, "rows stopped early"
  total_s = statistics.median(_times(lambda: run(state), steps))
  run(state, one_token=True)
  one_s = statistics.median(_times(lambda: run(state, one_token=True), steps))
  decode_step_s = (total_s - one_s) / max(new_tokens - 1, 1)
  kind = jax.devices()[0].device_kind
  step_bytes = sample_step_bytes(cfg, batch, prompt + new_tokens / 2)
  bw = PEAK_BANDWIDTH.get(device_family(kind) or "")
  return {
      "device_kind": kind, "platform": jax.devices()[0].platform, "num_devices": run.num_devices,
      "knobs": {"dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "attention": cfg.attention,
                "xla_flags": os.environ.get("XLA_FLAGS")},
      "compile_s": _r(run.compile_s), "generate_s": _r(total_s), "tokens_per_s": _r(batch * new_tokens / total_s),
      "prefill_s": _r(max(one_s - decode_step_s, 0.0)), "decode_step_s": _r(decode_step_s),
      "decode_tokens_per_s": _r(batch / decode_step_s) if decode_step_s > 0 else None,
      "decode_bytes_per_step": step_bytes, "peak_bandwidth": bw,
      "bandwidth_fraction": _r(step_bytes / decode_step_s / bw) if bw and decode_step_s > 0 else None,
      "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": _device_peak_bytes(),
  }


def sample_step_bytes(cfg, batch: int, context: float) -> int:
  """Bytes one decode step must read: float32 parameters (LM head included) + the KV cache of
  `context` tokens per row in the compute dtype."""
  item = 4 if cfg.dtype == "float32" else 2
  kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * item
  return int(4 * cfg.num_params(with_lm_head=True) + kv)


# -- PyTorch / transformers baselines (run in a child process) -----------------------------------

def _torch_setup(hf_config: dict, cls_name: str, seed: int = 0):
  import torch
  import transformers
  torch.manual_seed(seed)
  hf = {k: v for k, v in hf_config.items() if k not in ("torch_dtype", "architectures")}
  model = getattr(transformers, cls_name)(transformers.LlamaConfig(**hf))
  return torch, model


def torch_rm_step(hf_config: dict, pairs: int, seq: int, dtype: str) -> tuple[Callable[[], float], Any]:
  """The same step in PyTorch: LlamaForSequenceClassification, scaled BT on one attribute, AdamW
  (betas 0.9/0.98, wd 0.1 on matrices), global-norm clipping at 1.0; bf16 through autocast.
  Returns (step() -> loss, model)."""
  import contextlib
  import numpy as np
  torch, model = _torch_setup(hf_config, "LlamaForSequenceClassification")
  model.train()
  a = hf_config["num_labels"]
  w = torch.zeros(a)
  w[min(4, a - 1)] = 1.0
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=2e-6, betas=(0.9, 0.98), eps=1e-8)
  b = rm_batch(pairs, seq, hf_config["vocab_size"])
  ids = torch.from_numpy(b["input_ids"][0].astype(np.int64))
  mag = torch.from_numpy(b["magnitude"][0])
  amp = torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    with amp:
      logits = model(input_ids=ids).logits
    rewards = logits.float() @ w
    loss = (mag * torch.nn.functional.softplus(-(rewards[:pairs] - rewards[pairs:]))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()

  return step, model


def torch_rm(hf_config: dict, pairs: int, seq: int, steps: int, dtype: str) -> dict:
  """Times `torch_rm_step`: one warm-up step, median of `steps`."""
  import torch
  step, model = torch_rm_step(hf_config, pairs, seq, dtype)
  out = {}

  def run():
    out["loss"] = step()

  t0 = time.perf_counter()
  run()
  warmup_s = time.perf_counter() - t0
  times = _times(run, steps)
  step_s = statistics.median(times)
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation, "num_labels": hf_config["num_labels"],
          "warmup_step_s": _r(warmup_s), "step_s": _r(step_s), "step_s_all": [_r(t) for t in times],
          "tokens_per_s": _r(2 * pairs * seq / step_s), "tokens_per_s_best": _r(2 * pairs * seq / min(times)),
          "loss": _r(out["loss"]), "peak_rss_bytes": peak_rss_bytes()}


def torch_generate(hf_config: dict, batch: int, prompt: int, new_tokens: int, dtype: str,
                   temperature: float = 0.0) -> tuple[Callable[[], Any], Any]:
  """transformers' `generate` on the same shapes: exactly `new_tokens` tokens (min = max, no EOS);
  bf16 through autocast. Returns (generate() -> ids [B, prompt + new_tokens], model)."""
  import contextlib
  import numpy as np
  torch, model = _torch_setup(hf_config, "LlamaForCausalLM")
  model.eval()
  ids = torch.from_numpy(np.random.default_rng(0).integers(3, hf_config["vocab_size"], (batch, prompt)))
  mask = torch.ones_like(ids)
  amp = torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
  sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
      "do_sample": False}

  def generate():
    with torch.inference_mode(), amp:
      return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=None, pad_token_id=0, **sampling)

  return generate, model


def torch_sample(hf_config: dict, batch: int, prompt: int, new_tokens: int, steps: int, dtype: str,
                 temperature: float = 0.0) -> dict:
  """Times `torch_generate`: median of `steps` after a warm-up."""
  import torch
  generate, model = torch_generate(hf_config, batch, prompt, new_tokens, dtype, temperature)
  out = generate()
  assert tuple(out.shape) == (batch, prompt + new_tokens), out.shape
  times = _times(generate, steps)
  total_s = statistics.median(times)
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation, "generate_s": _r(total_s),
          "generate_s_all": [_r(t) for t in times],
          "tokens_per_s": _r(batch * new_tokens / total_s), "peak_rss_bytes": peak_rss_bytes()}


def run_torch(func: str, **kwargs: Any) -> dict:
  """Runs `func` (torch_rm or torch_sample) of this module in a fresh Python process; its JSON result."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
  code = ("import json, sys; from hs2p_jax.commands import bench; "
          "print(json.dumps(getattr(bench, sys.argv[1])(**json.loads(sys.argv[2]))))")
  res = subprocess.run([sys.executable, "-c", code, func, json.dumps(kwargs)], capture_output=True, text=True,
                       env=env)
  if res.returncode:
    raise RuntimeError(f"{func} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def _hf_config(cfg, **extra) -> dict:
  from hs2p_jax.model.config import to_hf_config
  return to_hf_config(cfg, **extra)


# -- the command ---------------------------------------------------------------------------------

def rm_report(cfg, model: str, pairs: int, seq: int, steps: int, with_torch: bool, num_attributes: int = 9,
              **jax_kw: Any) -> dict:
  """The `bench rm` JSON object: JAX step, then (optionally) torch and `jax_over_torch` last."""
  res: dict = {"bench": "rm", "model": model, "pairs": pairs, "seq": seq, "steps": steps,
               "num_attributes": num_attributes, "cpu_count": os.cpu_count(), "load_avg_1m": _load(),
               "flops_formula": "6*N*tokens + 12*L*T^2*H*Dh*rows; N = L*(D*Dh*(2H+2Hkv) + 3*D*F)"}
  res.update(bench_rm_jax(cfg, pairs, seq, steps, num_attributes, **jax_kw))
  if with_torch:
    hf = _hf_config(cfg, architecture="LlamaForSequenceClassification", num_labels=num_attributes,
                    pad_token_id=0)
    res["torch"] = run_torch("torch_rm", hf_config=hf, pairs=pairs, seq=seq, steps=steps, dtype=cfg.dtype)
    res["load_avg_1m_end"] = _load()
    res["jax_over_torch"] = _r(res["tokens_per_s"] / res["torch"]["tokens_per_s"])
  return res


def sample_report(cfg, model: str, batch: int, prompt: int, new_tokens: int, steps: int, with_torch: bool,
                  temperature: float = 0.0, **jax_kw: Any) -> dict:
  """The `bench sample` JSON object: JAX sampler, then (optionally) torch and `jax_over_torch` last."""
  res: dict = {"bench": "sample", "model": model, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
               "steps": steps, "temperature": temperature, "cpu_count": os.cpu_count(), "load_avg_1m": _load()}
  res.update(bench_sample_jax(cfg, batch, prompt, new_tokens, steps, temperature, **jax_kw))
  if with_torch:
    hf = _hf_config(cfg, pad_token_id=0)
    res["torch"] = run_torch("torch_sample", hf_config=hf, batch=batch, prompt=prompt, new_tokens=new_tokens,
                             steps=steps, dtype=cfg.dtype, temperature=temperature)
    res["load_avg_1m_end"] = _load()
    res["jax_over_torch"] = _r(res["tokens_per_s"] / res["torch"]["tokens_per_s"])
  return res


def data_report(batch: int, max_length: int) -> dict:
  """One pass of the pairs pipeline over the built-in preference data with the byte tokenizer."""
  import tempfile
  from hs2p_jax.config import DataConfig
  from hs2p_jax.data import make_loader
  from hs2p_jax.tokenizer import load_tokenizer

  tok = load_tokenizer("bytes")
  cfg = DataConfig(train=None, format="helpsteer2-preference", max_length=max_length,
                   pad_multiple=min(32, max_length))
  t0 = time.perf_counter()
  loader = make_loader(cfg, tok, split="train", task="pairs", batch_size=batch, shuffle=True, repeat=False,
                       cache_dir=tempfile.mkdtemp(prefix="hs2p-bench-"))
  t1 = time.perf_counter()
  real = total = 0
  for b in loader:
    real += int((b["segment_ids"] != 0).sum())
    total += b["segment_ids"].size
  t2 = time.perf_counter()
  n = len(loader.examples)
  return {"bench": "data", "source": "builtin", "tokenizer": "bytes", "batch_pairs": batch, "max_length": max_length,
          "pairs": n, "load_s": _r(t1 - t0), "batch_s": _r(t2 - t1), "pairs_per_s": _r(n / (t2 - t0)),
          "tokens_per_s": _r(real / (t2 - t0)), "padding_fraction": _r(1 - real / max(total, 1))}


def bench_command(args) -> int:
  """`hs2p bench {rm,sample,data}`: prints one JSON object."""
  from hs2p_jax.model.config import preset
  seq = args.seq if args.seq is not None else {"rm": 256, "sample": 64, "data": 1024}[args.what]
  if args.what == "data":
    res = data_report(args.batch, seq)
  else:
    cfg = preset(args.model, dtype=args.dtype)
    if args.what == "rm":
      res = rm_report(cfg, args.model, args.pairs, seq, args.steps, args.torch)
    else:
      res = sample_report(cfg, args.model, args.batch, seq, args.new_tokens, args.steps, args.torch)
  print(json.dumps(res))
  return 0
