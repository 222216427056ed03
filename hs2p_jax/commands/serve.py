"""`hs2p serve`: a reward-model checkpoint behind HTTP (`serve.app`), on the mesh of every process.

Process 0 listens (uvicorn) and leads the forward passes; the others follow them. SIGTERM (or
Ctrl-C) stops accepting connections, answers the requests in flight, releases the followers and
exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time

from hs2p_jax import storage
from hs2p_jax.errors import UserError

TOKEN_ENV = "HS2P_SERVE_TOKEN"


def _listen(host: str, port: int) -> socket.socket:
  try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def serve_command(args) -> int:
  import jax
  import uvicorn

  from hs2p_jax.commands.evaluate import say_devices, tool_config
  from hs2p_jax.serve.app import create_app
  from hs2p_jax.serve.batcher import Batcher
  from hs2p_jax.serve.engine import Engine
  from hs2p_jax.serve.texts import TextEncoder
  from hs2p_jax.eval.scorer import RewardScorer

  cfg, mesh, rules = tool_config("serve", args.checkpoint, args.overrides, None, None, args.max_length,
                                 data_keys=("template", "max_length"))
  if args.batch_size < 1:
    raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
  leader = jax.process_index() == 0
  sock = _listen(args.host, args.port) if leader else None  # a taken port fails before minutes of loading
  scorer = RewardScorer.load(args.checkpoint, mesh, rules, cfg.model.fields(), batch_size=args.batch_size,
                             max_length=cfg.data.max_length)
  if scorer.meta.template != cfg.data.template:
    scorer.meta = dataclasses.replace(scorer.meta, template=cfg.data.template)
  say_devices(mesh)
  engine = Engine(scorer)
  t0 = time.perf_counter()
  engine.warm_up()
  print(f"hs2p serve: compiled {len(engine.lengths)} lengths ({', '.join(map(str, engine.lengths))}) x "
        f"{len(engine.row_sizes)} row counts ({', '.join(map(str, engine.row_sizes))}) in "
        f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  if not leader:
    engine.follow()
    return 0

  name = args.name or os.path.basename(storage.absolute(args.checkpoint).rstrip("/"))
  encoder = TextEncoder(scorer.tokenizer, cfg.data.template, cfg.data.max_length, truncate=args.truncate)
  batcher = Batcher(engine).start()
  app = create_app(batcher, encoder, scorer.encode, name, cfg.data.max_length,
                   token=args.token or os.environ.get(TOKEN_ENV) or None,
                   info={"template": cfg.data.template, "outputs": "reward", "truncate": args.truncate})
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30))
  stop = {"signal": None}

  def stopped(sig, frame):  # uvicorn re-raises the signal it shut down for: exit 0 after the drain
    stop["signal"] = sig
  previous = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGINT)}
  host, port = sock.getsockname()[:2]
  print(json.dumps({"listening": f"http://{host}:{port}", "model": name, "max_length": cfg.data.max_length,
                    "rows": engine.rows, "processes": jax.process_count()}), flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    batcher.close()
    engine.stop()
    for s, h in previous.items():
      signal.signal(s, h)
  print(f"hs2p serve: stopped after {batcher.batches} batches", file=sys.stderr, flush=True)
  return 0
