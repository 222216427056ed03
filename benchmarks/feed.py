"""Feeding a multi-host run: 2 processes x 1 device against 1 process x 2 devices: prints ONE JSON object.

Both train the same reward model on the same global batches (`configs/quickstart/regression.yaml`
unless `--config`), through `hs2p train-rm` in fresh processes; tokens/s is the median of the logged
rates after `--skip` steps (compilation and warm-up excluded). Each process of the 2-process run feeds
its own block of every global batch (`hs2p_jax/feed.py`), so the ratio shows what the processes
cost beyond the devices: on one CPU host they also share its cores, so a ratio near 1 means feeding
adds nothing measurable. The losses of both runs are compared too (they must agree).

`--replay` takes feeding out of both runs: each process reads and places its first batch once and
steps on it again and again (the step's shapes and collectives unchanged), so the ratio left is what
the second process costs the step itself (its gradient all-reduce crossing processes).

  python benchmarks/feed.py [--steps 60] [--skip 10] [--config FILE] [--set key=value ...] [--one-thread-per-device]
                            [--replay]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from hs2p_jax.train.metrics import read_metrics  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# `hs2p` with the feed's read cached: every step gets the first step's placed batch (--replay)
REPLAY = """
import sys
from hs2p_jax import feed
from hs2p_jax.cli import main
read = feed.StepFeed._read
def first(self):
  if not hasattr(self, "_first"):
    self._first = read(self)
  return self._first
feed.StepFeed._read = first
sys.exit(main(sys.argv[1:]))
"""


def _run(config: str, out: str, sets: list[str], processes: int, devices: int,
         replay: bool = False) -> tuple[float, list[dict]]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  hs2p = [sys.executable, "-c", REPLAY] if replay else [sys.executable, "-m", "hs2p_jax"]
  cmd = hs2p + ["train-rm", "--config", config, "--out", out, "--set", *sets]
  port = _free_port()
  extra = (lambda i: [f"dist.coordinator=127.0.0.1:{port}", f"dist.num_processes={processes}",
                      f"dist.process_id={i}"]) if processes > 1 else (lambda i: [])
  t0 = time.perf_counter()
  procs = [subprocess.Popen(cmd + extra(i), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  for p in procs:
    _, err = p.communicate()
    if p.returncode:
      sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{err[-2000:]}")
  return time.perf_counter() - t0, read_metrics(os.path.join(out, "metrics.jsonl"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart", "regression.yaml"))
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--skip", type=int, default=10, help="steps left out of the rate (compilation, warm-up)")
  ap.add_argument("--set", nargs="*", default=[], dest="sets")
  ap.add_argument("--one-thread-per-device", action="store_true",
                  help="XLA's CPU dots single-threaded in both runs: each device one core, as each host "
                       "would own its cores (two processes on one host otherwise each spread over both)")
  ap.add_argument("--replay", action="store_true", help="no feeding: every step on the first step's batch")
  args = ap.parse_args()
  if args.one_thread_per_device:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
  sets = [f"train.steps={args.steps}", "train.log_every=1", f"train.save_every={args.steps}", "train.eval_every=0",
          "data.validation=null", "data.eval_pairs=null", "mesh.data=-1", *args.sets]
  runs = {}
  with tempfile.TemporaryDirectory(prefix="hs2p-feed-") as tmp:
    for name, (procs, devs) in {"1_process_x_2_devices": (1, 2), "2_processes_x_1_device": (2, 1)}.items():
      wall, recs = _run(args.config, os.path.join(tmp, name), sets, procs, devs, args.replay)
      rates = [r["tokens_per_s"] for r in recs if r["step"] > args.skip]
      runs[name] = {"tokens_per_s": statistics.median(rates), "wall_s": round(wall, 1),
                    "losses": [r["loss"] for r in recs]}
  one, two = runs["1_process_x_2_devices"], runs["2_processes_x_1_device"]
  worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], two["losses"]))
  print(json.dumps({
      "config": os.path.relpath(args.config, ROOT), "steps": args.steps, "rate_after_step": args.skip,
      "one_thread_per_device": args.one_thread_per_device, "replay": args.replay,
      "load_avg_1m": os.getloadavg()[0],
      **{name: {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items() if k != "losses"}
         for name, r in runs.items()},
      "ratio_2proc_over_1proc": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
      "max_rel_loss_difference": worst}, indent=2))


if __name__ == "__main__":
  main()
