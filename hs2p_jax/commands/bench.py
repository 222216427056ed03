"""`hs2p bench`: throughput of the reward-model training step, the KV-cache sampler and the data
pipeline, each printed as one JSON object; optionally beside the same work in PyTorch/transformers.

Model FLOPs and MFU: hs2p_jax/roofline/flops.py. Timings are medians over steps after a compile and a warm-up step, each step synchronised
(`block_until_ready`). The PyTorch baselines run in a child process (own threads, own peak RSS);
torch is imported only there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from hs2p_jax.bench.jax_runs import bench_rm_jax, bench_sample_jax
from hs2p_jax.bench.measure import load_avg, rounded
from hs2p_jax.bench.torch_runs import hf_config_of, run_torch


def rm_report(cfg, model: str, pairs: int, seq: int, steps: int, with_torch: bool, num_attributes: int = 9,
              **jax_kw: Any) -> dict:
  """The `bench rm` JSON object: JAX step, then (optionally) torch and `jax_over_torch` last."""
  res: dict = {"bench": "rm", "model": model, "pairs": pairs, "seq": seq, "steps": steps,
               "num_attributes": num_attributes, "cpu_count": os.cpu_count(), "load_avg_1m": load_avg(),
               "flops_formula": "6*N*tokens + 12*L*T^2*H*Dh*rows; N = L*(D*Dh*(2H+2Hkv) + 3*D*F)"}
  res.update(bench_rm_jax(cfg, pairs, seq, steps, num_attributes, **jax_kw))
  if with_torch:
    hf = hf_config_of(cfg, architecture="LlamaForSequenceClassification", num_labels=num_attributes,
                    pad_token_id=0)
    res["torch"] = run_torch("torch_rm", hf_config=hf, pairs=pairs, seq=seq, steps=steps, dtype=cfg.dtype)
    res["load_avg_1m_end"] = load_avg()
    res["jax_over_torch"] = rounded(res["tokens_per_s"] / res["torch"]["tokens_per_s"])
  return res


def sample_report(cfg, model: str, batch: int, prompt: int, new_tokens: int, steps: int, with_torch: bool,
                  temperature: float = 0.0, **jax_kw: Any) -> dict:
  """The `bench sample` JSON object: JAX sampler, then (optionally) torch and `jax_over_torch` last."""
  res: dict = {"bench": "sample", "model": model, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
               "steps": steps, "temperature": temperature, "cpu_count": os.cpu_count(), "load_avg_1m": load_avg()}
  res.update(bench_sample_jax(cfg, batch, prompt, new_tokens, steps, temperature, **jax_kw))
  if with_torch:
    hf = hf_config_of(cfg, pad_token_id=0)
    res["torch"] = run_torch("torch_sample", hf_config=hf, batch=batch, prompt=prompt, new_tokens=new_tokens,
                             steps=steps, dtype=cfg.dtype, temperature=temperature,
                             samples=jax_kw.get("samples", 1))
    res["load_avg_1m_end"] = load_avg()
    res["jax_over_torch"] = rounded(res["tokens_per_s"] / res["torch"]["tokens_per_s"])
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
          "pairs": n, "load_s": rounded(t1 - t0), "batch_s": rounded(t2 - t1), "pairs_per_s": rounded(n / (t2 - t0)),
          "tokens_per_s": rounded(real / (t2 - t0)), "padding_fraction": rounded(1 - real / max(total, 1))}


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

