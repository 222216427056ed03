"""The reward server's HTTP routes (FastAPI):

- `POST /get_reward` (OpenRLHF's remote reward model): `{"query": [text, ...], "prompts": [...],
  "labels": [...]}` -> `{"rewards": [r, ...], "scores": [r, ...]}` (the same numbers under both keys).
- `POST /classify`, `POST /v1/classify` (vLLM's classification API): `{"model": name, "input": text |
  [text, ...]}` -> `{"data": [{"index": i, "label": "reward", "probs": [r], "num_classes": 1}], ...}`.
  `probs` holds the reward itself (the one output of the head), not a probability.
- `POST /score` (hs2p's): `{"prompts": [...], "responses": [...]}` unrendered; the server renders
  them in its template, as `hs2p eval` and the REINFORCE trainer do.
- `GET|HEAD /health` (no token): the queue (inputs and requests waiting, the oldest's wait), the
  batches scored, texts outside the template; `GET /v1/models`.

An empty list answers empty lists. `/classify` serves its one model under any `model` name (vLLM's
clients send their own). Texts arrive rendered in the model's template (`serve.texts`). Every input
error is JSON in the OpenAI/vLLM shape, `{"object": "error", "message", "type", "code"}`, with a 4xx
status (invalid Unicode, nesting too deep, too many inputs: 413; a full queue: 503 with
Retry-After); the token, Content-Type and body size are checked first (`serve.guard`). A request
whose client disconnects while it waits is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Callable, Sequence, TypeVar, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hs2p_jax.serve.batcher import Batcher, QueueFull
from hs2p_jax.serve.engine import compilations
from hs2p_jax.serve.texts import BadText

Texts = list[str]
Encode = Callable[[Sequence[str]], list[np.ndarray]]


class GetRewardRequest(BaseModel):
  query: Texts = Field(description="rendered prompt + response texts")
  prompts: Union[Texts, None] = None  # OpenRLHF sends them; the query already holds them
  labels: Union[list[Any], None] = None


class ClassifyRequest(BaseModel):
  model_config = ConfigDict(protected_namespaces=())
  model: Union[str, None] = None
  input: Union[str, Texts]


class ScoreRequest(BaseModel):
  prompts: Texts
  responses: Texts


def error(status: int, message: str) -> JSONResponse:
  kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestTooLarge", 503: "ServiceUnavailable"}.get(status, "Error")
  return JSONResponse({"object": "error", "message": message, "type": kind, "code": status}, status_code=status,
                      headers={"Retry-After": "1"} if status == 503 else None)


class BadRequest(Exception):
  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _valid_unicode(texts: Sequence[str], field: str) -> None:
  """A 400 for a text JSON may carry but UTF-8 cannot (a lone surrogate, `"\\ud800"`)."""
  for i, t in enumerate(texts):
    try:
      t.encode("utf-8")
    except UnicodeEncodeError as e:
      raise BadRequest(f"{field}[{i}]: invalid Unicode at character {e.start} (a lone surrogate)") from None


M = TypeVar("M", bound=BaseModel)


async def parse(request: Request, model: type[M]) -> M:
  """The request's body as `model` (the guard has let JSON bodies alone through)."""
  try:
    body = json.loads(await request.body())
  except (ValueError, UnicodeDecodeError):
    raise BadRequest("the body is not valid JSON") from None
  except RecursionError:
    raise BadRequest("the body's JSON is nested too deeply") from None
  try:
    return model.model_validate(body)
  except ValidationError as e:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    if len(loc) > 1 and loc[1] in ("str", "list[str]"):  # which member of `str | list[str]` failed: not news
      raise BadRequest(f"{loc[0]}: expected a string or a list of strings") from None
    raise BadRequest(f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}") from None


def create_app(batcher: Batcher, encode_texts: Encode, encode_pairs: Callable[[Sequence[str], Sequence[str]],
               list[np.ndarray]], name: str, max_length: int, info: dict[str, Any] | None = None,
               max_inputs: int = 4096, outside: Callable[[], int] | None = None) -> FastAPI:
  """The ASGI app over a running `batcher`: `encode_texts` tokenizes rendered texts,
  `encode_pairs` renders and tokenizes (prompt, response) pairs; at most `max_inputs` a request;
  `outside()` counts the texts that were not in the template. Wrap it in `guard.Guard`."""
  app = FastAPI(title="hs2p reward server", version="1")
  created = int(time.time())

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
      return error(404, f"no route {request.method} {request.url.path}")
    return error(exc.status_code, str(exc.detail))

  @app.exception_handler(BadRequest)
  async def bad(request: Request, exc: BadRequest):
    return error(exc.status, str(exc))

  async def rewards(request: Request, n: int, encode: Callable[[], list[np.ndarray]]) -> tuple[np.ndarray, int]:
    if n > max_inputs:
      raise BadRequest(f"{n} inputs in one request, more than the server's {max_inputs} (--max-inputs); "
                       "send them in several", 413)
    try:
      seqs = await run_in_threadpool(encode)
    except BadText as e:
      raise BadRequest(str(e)) from None
    try:
      job = batcher.submit(seqs)
    except QueueFull as e:
      raise BadRequest(str(e), 503) from None
    waiting = asyncio.wrap_future(job.future)
    while True:  # the rewards, unless the client goes first: then its inputs leave the queue
      done, _ = await asyncio.wait({waiting}, timeout=0.5)
      if done:
        return done.pop().result(), sum(len(s) for s in seqs)
      if await request.is_disconnected():
        job.cancel()
        raise BadRequest("the client went away", 499)

  @app.post("/get_reward")
  async def get_reward(request: Request):
    req = await parse(request, GetRewardRequest)
    if req.prompts is not None and len(req.prompts) != len(req.query):
      raise BadRequest(f"prompts: {len(req.prompts)} prompts for {len(req.query)} queries")
    _valid_unicode(req.query, "query")
    out, _ = await rewards(request, len(req.query), lambda: encode_texts(req.query))
    values = [float(r) for r in out]
    return {"rewards": values, "scores": values}

  async def classify(request: Request):
    req = await parse(request, ClassifyRequest)  # any model name: this server serves one
    texts = [req.input] if isinstance(req.input, str) else req.input
    _valid_unicode(texts, "input")
    out, tokens = await rewards(request, len(texts), lambda: encode_texts(texts))
    data = [{"index": i, "label": "reward", "probs": [float(r)], "num_classes": 1} for i, r in enumerate(out)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

  app.post("/classify")(classify)
  app.post("/v1/classify")(classify)

  @app.post("/score")
  async def score(request: Request):
    req = await parse(request, ScoreRequest)
    if len(req.prompts) != len(req.responses):
      raise BadRequest(f"responses: {len(req.responses)} responses for {len(req.prompts)} prompts")
    _valid_unicode(req.prompts, "prompts")
    _valid_unicode(req.responses, "responses")
    out, _ = await rewards(request, len(req.prompts), lambda: encode_pairs(req.prompts, req.responses))
    return {"rewards": [float(r) for r in out]}

  @app.api_route("/health", methods=["GET", "HEAD"])
  async def health():
    return {"status": "ok", "model": name, "batches": batcher.batches, "compilations": compilations(),
            **batcher.stats(), "outside_template": outside() if outside else 0}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "hs2p",
                                        "max_model_len": max_length, **(info or {})}]}

  return app
