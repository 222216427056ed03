"""`hs2p serve`: a reward-model checkpoint behind HTTP (`serve.app`), on the mesh of every process.

Process 0 listens (uvicorn) and leads the forward passes; the others follow them. The port is
bound at once (a taken port fails before minutes of loading) but listens only once every program
is compiled: a probe during start-up is refused, never left hanging. SIGTERM (or Ctrl-C) stops
accepting connections, answers the requests in flight for at most `--shutdown-timeout` seconds,
releases the followers and exits 0. Without a token, only a loopback address is served unless
`--insecure` says otherwise.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import socket
import sys
import time

from hs2p_jax import storage
from hs2p_jax.errors import UserError

TOKEN_ENV = "HS2P_SERVE_TOKEN"


def _bind(host: str, port: int) -> socket.socket:
  try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
  sock.set_inheritable(True)
  return sock


def _loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def read_token(args) -> str | None:
  """The token from --token, --token-file or $HS2P_SERVE_TOKEN (None: no token); one line on a bad file."""
  if args.token_file:
    try:
      with open(args.token_file, encoding="utf-8") as f:
        token = f.readline().strip()
    except OSError as e:
      raise UserError(f"--token-file {args.token_file}: {e.strerror or e}") from None
    if not token:
      raise UserError(f"--token-file {args.token_file}: the file's first line is empty")
    return token
  return args.token or os.environ.get(TOKEN_ENV) or None


def _more_files(wanted: int) -> None:
  """Raises this process's open-file limit towards `wanted` (connections are files)."""
  import resource
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
  if soft != resource.RLIM_INFINITY and soft < target:
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve_command(args) -> int:
  import jax
  import uvicorn

  from hs2p_jax.commands.evaluate import say_devices, tool_config
  from hs2p_jax.serve.app import create_app
  from hs2p_jax.serve.batcher import Batcher
  from hs2p_jax.serve.guard import Guard, guarded_protocol
  from hs2p_jax.serve.engine import Engine
  from hs2p_jax.serve.texts import TextEncoder
  from hs2p_jax.eval.scorer import RewardScorer

  cfg, mesh, rules = tool_config("serve", args.checkpoint, args.overrides, None, None, args.max_length,
                                 data_keys=("template", "max_length"))
  if args.batch_size < 1:
    raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
  for flag in ("max_body_mb", "max_inputs", "max_queued", "max_connections", "read_timeout", "shutdown_timeout"):
    if getattr(args, flag) <= 0:
      raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive number")
  token = read_token(args)
  if not token and not _loopback(args.host) and not args.insecure:
    raise UserError(f"--host {args.host}: other machines reach it and no token is set; give one (--token-file or "
                    f"${TOKEN_ENV}) or pass --insecure")
  leader = jax.process_index() == 0
  sock = _bind(args.host, args.port) if leader else None  # a taken port fails before minutes of loading
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
  say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  encoder = TextEncoder(scorer.tokenizer, cfg.data.template, cfg.data.max_length, truncate=args.truncate, log=say)
  batcher = Batcher(engine, max_queued=args.max_queued).start()
  app = create_app(batcher, encoder, scorer.encode, name, cfg.data.max_length,
                   info={"template": cfg.data.template, "outputs": "reward", "truncate": args.truncate},
                   max_inputs=args.max_inputs, outside=lambda: encoder.outside)
  guarded = Guard(app, token, int(args.max_body_mb * (1 << 20)))
  _more_files(args.max_connections + 256)
  server = uvicorn.Server(uvicorn.Config(
      guarded, log_level="warning", access_log=False, timeout_keep_alive=30, lifespan="off",
      http=guarded_protocol(args.max_connections, args.read_timeout),
      timeout_graceful_shutdown=max(1, int(round(args.shutdown_timeout)))))
  stop = {"signal": None}

  def stopped(sig, frame):  # uvicorn re-raises the signal it shut down for: exit 0 after the drain
    stop["signal"] = sig
  previous = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGINT)}
  sock.listen(2048)  # only now: a probe during start-up was refused
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
