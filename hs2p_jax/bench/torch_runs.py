"""The PyTorch/transformers baselines, each run in a child process (own threads, own peak RSS; torch is
imported only there): the same reward-model step and `generate` on the same shapes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from hs2p_jax.bench.jax_runs import rm_batch
from hs2p_jax.bench.measure import peak_rss_bytes, rounded, times_of


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
  times = times_of(run, steps)
  step_s = statistics.median(times)
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation, "num_labels": hf_config["num_labels"],
          "warmup_step_s": rounded(warmup_s), "step_s": rounded(step_s), "step_s_all": [rounded(t) for t in times],
          "tokens_per_s": rounded(2 * pairs * seq / step_s), "tokens_per_s_best": rounded(2 * pairs * seq / min(times)),
          "loss": rounded(out["loss"]), "peak_rss_bytes": peak_rss_bytes()}


def torch_generate(hf_config: dict, batch: int, prompt: int, new_tokens: int, dtype: str,
                   temperature: float = 0.0, samples: int = 1) -> tuple[Callable[[], Any], Any]:
  """transformers' `generate` on the same shapes: exactly `new_tokens` tokens (min = max, no EOS),
  `samples` sequences per prompt (`num_return_sequences`); bf16 through autocast. Returns
  (generate() -> ids [B * samples, prompt + new_tokens], model)."""
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
                            eos_token_id=None, pad_token_id=0, num_return_sequences=samples, **sampling)

  return generate, model


def torch_sample(hf_config: dict, batch: int, prompt: int, new_tokens: int, steps: int, dtype: str,
                 temperature: float = 0.0, samples: int = 1) -> dict:
  """Times `torch_generate`: median of `steps` after a warm-up."""
  import torch
  generate, model = torch_generate(hf_config, batch, prompt, new_tokens, dtype, temperature, samples)
  out = generate()
  batch *= samples
  assert tuple(out.shape) == (batch, prompt + new_tokens), out.shape
  times = times_of(generate, steps)
  total_s = statistics.median(times)
  return {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation, "generate_s": rounded(total_s),
          "generate_s_all": [rounded(t) for t in times],
          "tokens_per_s": rounded(batch * new_tokens / total_s), "peak_rss_bytes": peak_rss_bytes()}


def run_torch(func: str, **kwargs: Any) -> dict:
  """Runs `func` (torch_rm or torch_sample) of this module in a fresh Python process; its JSON result."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
  code = ("import json, sys; from hs2p_jax.bench import torch_runs as bench; "
          "print(json.dumps(getattr(bench, sys.argv[1])(**json.loads(sys.argv[2]))))")
  res = subprocess.run([sys.executable, "-c", code, func, json.dumps(kwargs)], capture_output=True, text=True,
                       env=env)
  if res.returncode:
    raise RuntimeError(f"{func} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def hf_config_of(cfg, **extra) -> dict:
  from hs2p_jax.model.config import to_hf_config
  return to_hf_config(cfg, **extra)

