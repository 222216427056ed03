"""`hs2p serve` as a real process, called over HTTP by a real client (httpx): OpenRLHF's `/get_reward`,
vLLM's `/classify`, the scores `hs2p eval` gives, batching without compiling, 4xx errors, the bearer
token, SIGTERM draining, and two processes scoring what one does."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import requires_smollm2, write_jsonl

TOKEN = "s3cret"
MAX_LENGTH = 256


def _checkpoint(path: str) -> str:
  """A 2-layer reward model (9 outputs, a non-zero head bias) in the chat template, byte tokenizer."""
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.model import create, preset
  from hs2p_jax.tokenizer import byte_tokenizer
  cfg = preset("tiny", num_layers=2, dtype="float32")
  rm = create("reward", cfg, 9, seed=1)
  rm.head_bias[...] = np.linspace(-1, 1, 9).astype(np.float32)
  save_model(path, rm, ModelMeta(kind="reward", config=cfg, num_attributes=9, template="chat",
                                 reward_weights="nemotron-4-340b"), byte_tokenizer())
  return path


def _pairs(n: int = 12) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    prompt = f"Question {i}: " + "why " * int(rng.integers(1, 10)) + "?"
    if i % 4 == 3:  # a multi-turn prompt in the HelpSteer2 convention
      prompt += "\n<extra_id_1>Assistant\nBecause.\n<extra_id_1>User\nAnd then?"
    out.append({"prompt": prompt, "chosen": " Answer " * int(rng.integers(1, 8)) + f"{i} ",
                "rejected": f"No {i}." * int(rng.integers(1, 10))})
  return out


class Server:
  """An `hs2p serve` process on a free port; `url` once it says it listens."""

  def __init__(self, args: list[str], env: dict | None = None, processes: int = 1):
    from test_multiprocess import free_port
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    cmd = [sys.executable, "-m", "hs2p_jax", "serve", "--port", "0", *args]
    if processes > 1:
      port = free_port()
      cmds = [cmd + ["--set", f"dist.coordinator=127.0.0.1:{port}", f"dist.num_processes={processes}",
                     f"dist.process_id={i}"] for i in range(processes)]
    else:
      cmds = [cmd]
    # stderr to files: a server logs a line a batch, and a pipe nobody reads fills and blocks it
    self.errs = [tempfile.TemporaryFile("w+") for _ in cmds]
    self.procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=e, text=True)
                  for c, e in zip(cmds, self.errs)]
    while True:  # the ready line, after loading and compiling (gloo writes its own lines to stdout)
      line = self.procs[0].stdout.readline()
      if not line:
        raise AssertionError(self.stderr(0)[-3000:])
      if line.startswith("{"):
        break
    self.ready = json.loads(line)
    self.url = self.ready["listening"]

  def stderr(self, i: int) -> str:
    self.errs[i].seek(0)
    return self.errs[i].read()

  def stop(self) -> list[tuple[int, str]]:
    self.procs[0].send_signal(signal.SIGTERM)
    return [(p.wait(timeout=120), self.stderr(i)) for i, p in enumerate(self.procs)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(server, checkpoint, pairs, hs2p eval's scores of them)."""
  tmp = tmp_path_factory.mktemp("serve")
  ckpt = _checkpoint(str(tmp / "rm"))
  pairs = _pairs()
  data = write_jsonl(tmp / "pairs.jsonl", pairs)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-m", "hs2p_jax", "eval", "--checkpoint", ckpt, "--data", data, "--format", "pairs",
                  "--max-length", str(MAX_LENGTH), "--scores", str(tmp / "scores.jsonl")], env=env, check=True,
                 capture_output=True)
  scores = [json.loads(line) for line in (tmp / "scores.jsonl").read_text().splitlines()]
  server = Server(["--checkpoint", ckpt, "--max-length", str(MAX_LENGTH), "--batch-size", "4"],
                  env={"HS2P_SERVE_TOKEN": TOKEN})
  yield server, ckpt, pairs, scores
  if server.procs[0].poll() is None:
    server.stop()


def _texts(ckpt: str, pairs: list[dict]) -> tuple[list[str], list[str]]:
  """Each pair's chosen and rejected conversations rendered in the checkpoint's template, as a client sends them."""
  from hs2p_jax.checkpoint import load_checkpoint_tokenizer
  from hs2p_jax.data.templates import render
  tok = load_checkpoint_tokenizer(ckpt)
  return ([render("chat", p["prompt"], p["chosen"], tok).text for p in pairs],
          [render("chat", p["prompt"], p["rejected"], tok).text for p in pairs])


def _auth() -> dict:
  return {"Authorization": f"Bearer {TOKEN}"}


def test_get_reward_and_classify_score_what_hs2p_eval_scores(served):
  import httpx
  server, ckpt, pairs, scores = served
  chosen, rejected = _texts(ckpt, pairs)
  want = np.asarray([[s["chosen"], s["rejected"]] for s in scores])
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as client:
    r = client.post("/get_reward", json={"query": chosen + rejected, "prompts": [p["prompt"] for p in pairs] * 2,
                                         "labels": [""] * (2 * len(pairs))})  # OpenRLHF's request
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rewards"] == body["scores"]
    got = np.asarray(body["rewards"]).reshape(2, -1).T
    np.testing.assert_allclose(got, want, atol=1e-5)
    for route in ("/classify", "/v1/classify"):  # vLLM's request: one text or a list
      r = client.post(route, json={"model": server.ready["model"], "input": rejected})
      assert r.status_code == 200, r.text
      data = r.json()["data"]
      assert [d["index"] for d in data] == list(range(len(pairs))) and all(d["num_classes"] == 1 for d in data)
      np.testing.assert_allclose([d["probs"][0] for d in data], want[:, 1], atol=1e-5)
      assert r.json()["usage"]["prompt_tokens"] > 0
    r = client.post("/classify", json={"input": chosen[0]})
    assert r.json()["data"][0]["probs"][0] == pytest.approx(want[0, 0], abs=1e-5)
    r = client.post("/score", json={"prompts": [p["prompt"] for p in pairs], "responses": [p["chosen"] for p in pairs]})
    np.testing.assert_allclose(r.json()["rewards"], want[:, 0], atol=1e-5)  # hs2p's own route renders itself
    models = client.get("/v1/models").json()["data"][0]
    assert models["id"] == server.ready["model"] and models["max_model_len"] == MAX_LENGTH


def test_concurrent_requests_are_batched_without_compiling(served):
  import httpx
  server, ckpt, pairs, scores = served
  chosen, rejected = _texts(ckpt, pairs)
  texts = chosen + rejected
  want = {t: s for t, s in zip(texts, [s["chosen"] for s in scores] + [s["rejected"] for s in scores])}
  rng = np.random.default_rng(1)
  requests = [[texts[j] for j in rng.choice(len(texts), size=int(rng.integers(1, 6)))] for _ in range(64)]
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=120,
                    limits=httpx.Limits(max_connections=64)) as client:
    before = client.get("/health").json()

    def call(query):
      return client.post("/get_reward", json={"query": query})
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
      answers = list(pool.map(call, requests))
    after = client.get("/health").json()
  for query, r in zip(requests, answers):
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["rewards"], [want[t] for t in query], atol=1e-5)
  assert after["compilations"] == before["compilations"]  # every batch shape was compiled at start-up
  inputs = sum(len(q) for q in requests)
  assert after["batches"] - before["batches"] < inputs  # requests shared forward passes


@pytest.mark.parametrize("method,route,body,status,says", [
    ("POST", "/get_reward", b'{"query": ["a"', 400, "not valid JSON"),
    ("POST", "/get_reward", b'{"query": "a"}', 400, "query: Input should be a valid list"),
    ("POST", "/get_reward", b'{"query": [1, 2]}', 400, "query.0: Input should be a valid string"),
    ("POST", "/get_reward", b'{"query": ["a", "b"], "prompts": ["a"]}', 400, "1 prompts for 2 queries"),
    ("POST", "/get_reward", b'{"query": [""]}', 400, "input 0 is empty"),
    ("POST", "/get_reward", json.dumps({"query": ["ok", "x" * 600]}).encode(), 400, "input 1 has 600 tokens"),
    ("POST", "/classify", b'{"input": 7}', 400, "input: expected a string or a list of strings"),
    ("POST", "/score", b'{"prompts": ["a"], "responses": []}', 400, "responses: 0 responses for 1 prompts"),
    ("POST", "/get_reward", b'{"query": ["\\ud800 lone"]}', 400, "query[0]: invalid Unicode at character 0"),
    ("POST", "/get_reward", b'[' * 100_000 + b']' * 100_000, 400, "nested too deeply"),
    ("POST", "/get_reward", b'{"query": ["\xff\xfe"]}', 400, "not valid JSON"),
    ("POST", "/nowhere", b'{}', 404, "no route POST /nowhere"),
    ("GET", "/get_reward", b'', 405, "Method Not Allowed"),
])
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(served, method, route, body, status, says):
  import httpx
  server = served[0]
  with httpx.Client(base_url=server.url, headers={**_auth(), "Content-Type": "application/json"}, timeout=60) as client:
    r = client.request(method, route, content=body)
    assert r.status_code == status and says in r.json()["message"], r.text
    assert r.json()["code"] == status
    ok = client.post("/get_reward", json={"query": ["still here"]})
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1


def test_the_token_is_required(served):
  import httpx
  server = served[0]
  with httpx.Client(base_url=server.url, timeout=60) as client:
    assert client.get("/health").status_code == 200  # health checks need no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
      r = client.post("/get_reward", json={"query": ["a"]}, headers=headers)
      assert r.status_code == 401 and "Bearer" in r.json()["message"]
    assert client.post("/get_reward", json={"query": ["a"]}, auth=("user", "wrong")).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.post("/get_reward", json={"query": ["a"]}, headers=_auth()).status_code == 200
    # Basic auth with the token as the password: what a token in the URL arrives as (verl, OpenRLHF)
    assert client.post("/get_reward", json={"query": ["a"]}, auth=("anyone", TOKEN)).status_code == 200
  import httpx as h
  user_url = server.url.replace("http://", f"http://hs2p:{TOKEN}@")
  assert h.post(f"{user_url}/get_reward", json={"query": ["a"]}, timeout=60).status_code == 200


def test_protocol_edges_every_client_meets(served):
  """Empty lists, any model name, HEAD /health, the queue in /health, JSON only, a 413 before the
  body is read (and the server's memory unmoved), too many inputs."""
  import httpx
  import psutil
  server, ckpt, pairs, _ = served
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as client:
    assert client.post("/get_reward", json={"query": []}).json() == {"rewards": [], "scores": []}
    assert client.post("/classify", json={"input": []}).json()["data"] == []
    assert client.post("/score", json={"prompts": [], "responses": []}).json() == {"rewards": []}
    r = client.post("/v1/classify", json={"model": "/models/any/path", "input": "a"})  # verl names its own path
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    health = client.get("/health").json()
    assert {"queued_inputs", "queued_requests", "oldest_wait_s", "outside_template"} <= set(health)
    r = client.post("/get_reward", content=b'{"query": ["a"]}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["message"]
    rss = psutil.Process(server.procs[0].pid).memory_info().rss
    t0 = time.time()
    r = client.post("/get_reward", content=b"x" * (20 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and time.time() - t0 < 1.0 and "--max-body-mb" in r.json()["message"]
    assert psutil.Process(server.procs[0].pid).memory_info().rss - rss < 100 << 20
    r = client.post("/get_reward", json={"query": ["ok", "y" * (4 << 20)]})  # over-long by its characters alone
    assert r.status_code == 400 and "input 1 has 4194304 characters" in r.json()["message"]
    assert psutil.Process(server.procs[0].pid).memory_info().rss - rss < 100 << 20
    r = client.post("/get_reward", json={"query": ["a"] * 5000})
    assert r.status_code == 413 and "--max-inputs" in r.json()["message"]
    assert client.post("/get_reward", json={"query": ["still here"]}).status_code == 200


def test_a_big_request_delays_no_one_and_an_abandoned_one_leaves_the_queue(served):
  """A 1-input request is answered while a 4,000-input one waits (fewest inputs first); when the big
  one's client gives up, its inputs are dropped, not scored."""
  import httpx
  server = served[0]
  texts = [f"input {i} " + "words " * (i % 7) for i in range(4000)]
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as client:
    start = client.get("/health").json()["batches"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      big = pool.submit(httpx.post, f"{server.url}/get_reward", json={"query": texts}, headers=_auth(), timeout=2.0)
      deadline = time.time() + 60
      while client.get("/health").json()["queued_inputs"] == 0 and time.time() < deadline:
        time.sleep(0.01)
      r = client.post("/get_reward", json={"query": ["just one"]})
      assert r.status_code == 200 and client.get("/health").json()["queued_inputs"] > 0  # the big one still waits
      with pytest.raises(httpx.TimeoutException):
        big.result()
    deadline = time.time() + 60
    while client.get("/health").json()["queued_inputs"] and time.time() < deadline:
      time.sleep(0.05)
    health = client.get("/health").json()
  assert health["queued_inputs"] == 0 and health["queued_requests"] == 0
  assert health["batches"] - start < len(texts) // 4  # its inputs left the queue unscored


def test_texts_in_openrlhfs_decoded_form_score_what_hs2p_eval_scores(served):
  """OpenRLHF decodes prompt + response ids: the text stops at the end-of-turn token (no newline
  after it) or ends with the end-of-sequence token. Both score the full rendering's reward; a text
  outside the template is counted in /health."""
  import httpx
  server, ckpt, pairs, scores = served
  chosen, _ = _texts(ckpt, pairs)
  assert all(t.endswith("<|im_end|>\n") for t in chosen)
  want = [s["chosen"] for s in scores]
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as client:
    before = client.get("/health").json()["outside_template"]
    for form in ([t[:-1] for t in chosen], [t[:-len("<|im_end|>\n")] + "</s>" for t in chosen]):
      r = client.post("/get_reward", json={"query": form})
      np.testing.assert_allclose(r.json()["rewards"], want, atol=1e-5)
    assert client.get("/health").json()["outside_template"] == before
    client.post("/get_reward", json={"query": ["no template at all"]})
    assert client.get("/health").json()["outside_template"] == before + 1


def _rl_rewards(tmp_path, kind: str, reward_model: str, name: str, critic: str) -> list[float]:
  from hs2p_jax import config as config_lib
  from hs2p_jax.rl import ppo_trainer, reinforce_trainer
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join('{"prompt": "Say something %d"}\n' % i for i in range(8)))
  sets = {"policy.preset": "tiny", "policy.num_layers": 1, "policy.tokenizer": "bytes", "data.train": str(prompts),
          "data.format": "prompts", "data.template": "chat", "data.max_length": 64, "data.pad_multiple": 16,
          f"{kind}.prompts_per_step": 4, f"{kind}.samples_per_prompt": 4, f"{kind}.max_new_tokens": 8,
          f"{kind}.steps": 3, f"{kind}.lr": 3e-3, f"{kind}.save_every": 1000, "mesh.data": 1,
          f"{kind}.stop_strings": "[]", "reward_model": reward_model, f"{kind}.frozen_dtype": "float32"}
  if kind == "ppo":  # the critic starts from the checkpoint whichever way the rewards come
    sets.update({"critic": critic, "ppo.advantage": "grpo"})
  cls = config_lib.PPORunConfig if kind == "ppo" else config_lib.ReinforceRunConfig
  cfg = config_lib.load(cls, None, [f"{k}={v}" for k, v in sets.items()])
  (ppo_trainer if kind == "ppo" else reinforce_trainer).trainer(cfg, str(tmp_path / name)).run()
  return [json.loads(line)["reward"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["reinforce", "ppo"])
def test_rl_against_the_served_reward_model_logs_the_in_process_rewards(served, tmp_path, monkeypatch, kind):
  """REINFORCE and PPO (GRPO's estimator; its critic from the checkpoint) scoring through `hs2p
  serve` log the rewards of the run holding the reward model."""
  server, ckpt, _, _ = served
  monkeypatch.setenv("HS2P_SERVE_TOKEN", TOKEN)  # the client sends the server's token
  here = _rl_rewards(tmp_path, kind, ckpt, "in_process", ckpt)
  remote = _rl_rewards(tmp_path, kind, server.url, "served", ckpt)
  assert len(here) == len(remote) == 3
  np.testing.assert_allclose(remote, here, rtol=1e-4)
  assert len(set(here)) > 1  # the policy changed what it is scored on


def test_a_reward_server_that_is_not_there_is_one_line(tmp_path):
  from test_multiprocess import free_port

  from hs2p_jax.errors import UserError
  from hs2p_jax.rl.reward_client import RemoteScorer, ServerGone
  url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
  with pytest.raises(UserError, match=f"reward_model={url}: no reward server answers there"):
    RemoteScorer(url, timeout=5, retries=0).check(72)
  with pytest.raises(ServerGone, match="did not answer .* after 2 tries; the last checkpoint is intact") as e:
    RemoteScorer(url, timeout=5, retries=1)(["p"], ["r"])
  assert e.value.status == 75


def test_sigterm_answers_the_requests_in_flight_then_exits_0(served):
  """Last in this file: it stops the module's server."""
  import httpx
  server = served[0]
  texts = [f"{i} " + "long input " * 10 for i in range(600)]
  with httpx.Client(base_url=server.url, headers=_auth(), timeout=300) as client:
    start = client.get("/health").json()["batches"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(client.post, "/get_reward", json={"query": texts})
      deadline = time.time() + 120
      while client.get("/health").json()["batches"] == start and time.time() < deadline:
        time.sleep(0.01)  # scoring has begun: the request is in flight
      server.procs[0].send_signal(signal.SIGTERM)
      r = pending.result(timeout=300)
  assert r.status_code == 200 and len(r.json()["rewards"]) == len(texts)
  code = server.procs[0].wait(timeout=120)
  err = server.stderr(0)
  assert code == 0, err[-2000:]
  assert "stopped after" in err


def test_limits_a_shared_cluster_needs(served, tmp_path):
  """A server with small limits (token from a file): a full queue is a 503 with Retry-After, the
  connection cap answers 503 and idle connections are closed after the read timeout, a probe during
  start-up is refused (never hangs), and with a client trickling its body SIGTERM exits 0 within
  the shutdown bound. A bare 0.0.0.0 without a token refuses to start."""
  import socket

  import httpx
  from test_multiprocess import free_port
  _, ckpt, _, _ = served
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("HS2P_SERVE_TOKEN", None)
  bare = subprocess.run([sys.executable, "-m", "hs2p_jax", "serve", "--checkpoint", ckpt, "--host", "0.0.0.0"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert bare.returncode == 2 and "no token is set" in bare.stderr and "--insecure" in bare.stderr, bare.stderr

  (tmp_path / "token").write_text(TOKEN + "\n")
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "hs2p_jax", "serve", "--checkpoint", ckpt, "--port", str(port),
                           "--max-length", str(MAX_LENGTH), "--batch-size", "1", "--token-file", str(tmp_path / "token"),
                           "--max-queued", "6", "--max-connections", "4", "--read-timeout", "2",
                           "--shutdown-timeout", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  try:
    refused = 0
    while proc.poll() is None:  # start-up: every probe is refused at once
      try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        break  # listening: it said so, or is about to
      except ConnectionRefusedError:
        refused += 1
        time.sleep(0.2)
    assert refused > 0 and json.loads(proc.stdout.readline())["listening"].endswith(f":{port}")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=_auth(), timeout=60) as client:
      r = client.post("/get_reward", json={"query": ["a"] * 7})  # 7 inputs > --max-queued 6
      assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-queued" in r.json()["message"]
      assert client.post("/get_reward", json={"query": ["a"] * 6}).status_code == 200
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    extra = socket.create_connection(("127.0.0.1", port))
    assert extra.recv(4096).startswith(b"HTTP/1.1 503")  # over --max-connections: told, then closed
    time.sleep(3)  # past --read-timeout: the idle connections are closed by the server
    assert all(c.recv(16) == b"" for c in idle)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n{\"query\"")
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 0 and time.time() - t0 < 3 + 2, code
  finally:
    proc.kill()
    proc.wait()


@requires_smollm2
def test_texts_are_tokenized_as_training_tokenized_the_example():
  """Whatever the tokenizer's merges across piece boundaries, a rendered text is split back into the
  template's pieces: the tokens equal `data.encode`'s for the same example, both templates."""
  from hs2p_jax.data.encode import encode
  from hs2p_jax.data.examples import RatingExample
  from hs2p_jax.data.templates import render
  from hs2p_jax.serve.texts import BadText, TextEncoder
  from hs2p_jax.tokenizer import load_tokenizer
  tok = load_tokenizer("gguf:smollm2")
  examples = [("What is 2+2?", "4."), ("  Leading and trailing spaces.  ", "\n\nAn answer.\n"),
              ("First?\n<extra_id_1>Assistant\nYes.\n<extra_id_1>User\nSecond?", "Two."),
              ("Tell me something long.", "word " * 300)]
  zeros = np.zeros(9, np.float32)
  for template in ("steerlm", "chat"):
    for max_length, truncate in ((4096, False), (96, True)):
      enc = encode([RatingExample(p, r, zeros, zeros.astype(bool), "t") for p, r in examples], tok, template,
                   max_length)
      texts = [render(template, p, r, tok).text for p, r in examples]
      got = TextEncoder(tok, template, max_length, truncate=truncate)(texts)
      for g, want in zip(got, enc.seqs):
        np.testing.assert_array_equal(g, want[0])
  whole = "plain text, not in any template"
  assert TextEncoder(tok, "chat", 64)([whole])[0].tolist() == tok(whole, add_special_tokens=False)["input_ids"]
  with pytest.raises(BadText, match="input 0 has"):
    TextEncoder(tok, "chat", 96)([render("chat", "q", "word " * 300, tok).text])


@pytest.mark.slow
def test_two_processes_serve_what_one_does(served, tmp_path):
  """Process 0 listens, both compute each batch: the same rewards; SIGTERM to process 0 ends both with 0."""
  import httpx
  _, ckpt, pairs, scores = served
  chosen, _ = _texts(ckpt, pairs)
  server = Server(["--checkpoint", ckpt, "--max-length", str(MAX_LENGTH), "--batch-size", "2", "--set", "mesh.data=-1"],
                  env={"JAX_NUM_CPU_DEVICES": "1"}, processes=2)
  try:
    assert server.ready["processes"] == 2
    with httpx.Client(base_url=server.url, timeout=120) as client:
      with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: client.post("/get_reward", json={"query": q}),
                                [chosen[i::4] for i in range(4)]))
  finally:
    ends = server.stop()
  for i, r in enumerate(answers):
    np.testing.assert_allclose(r.json()["rewards"], [s["chosen"] for s in scores][i::4], atol=1e-5)
  assert [code for code, _ in ends] == [0, 0], [err[-2000:] for _, err in ends]
