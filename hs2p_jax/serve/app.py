"""The reward server's HTTP routes (FastAPI):

- `POST /get_reward` (OpenRLHF's remote reward model): `{"query": [text, ...], "prompts": [...],
  "labels": [...]}` -> `{"rewards": [r, ...], "scores": [r, ...]}` (the same numbers under both keys).
- `POST /classify`, `POST /v1/classify` (vLLM's classification API): `{"model": name, "input": text |
  [text, ...]}` -> `{"data": [{"index": i, "label": "reward", "probs": [r], "num_classes": 1}], ...}`.
  `probs` holds the reward itself (the one output of the head), not a probability.
- `POST /score` (hs2p's): `{"prompts": [...], "responses": [...]}` unrendered; the server renders
  them in its template, as `hs2p eval` and the REINFORCE trainer do.
- `GET /health`, `GET /v1/models`.

Texts arrive rendered in the model's template (`serve.texts`). Errors are JSON in the OpenAI/vLLM
shape, `{"object": "error", "message", "type", "code"}`, with a 4xx status; with a token, every
route but `/health` needs `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import asyncio
import hmac
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

from hs2p_jax.serve.batcher import Batcher
from hs2p_jax.serve.engine import compilations
from hs2p_jax.serve.texts import BadText

Texts = list[str]
Encode = Callable[[Sequence[str]], list[np.ndarray]]


class GetRewardRequest(BaseModel):
  query: Texts = Field(min_length=1, description="rendered prompt + response texts")
  prompts: Union[Texts, None] = None  # OpenRLHF sends them; the query already holds them
  labels: Union[list[Any], None] = None


class ClassifyRequest(BaseModel):
  model_config = ConfigDict(protected_namespaces=())
  model: Union[str, None] = None
  input: Union[str, Texts]


class ScoreRequest(BaseModel):
  prompts: Texts = Field(min_length=1)
  responses: Texts = Field(min_length=1)


def error(status: int, message: str) -> JSONResponse:
  kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestTooLarge"}.get(status, "Error")
  return JSONResponse({"object": "error", "message": message, "type": kind, "code": status}, status_code=status)


class BadRequest(Exception):
  pass


M = TypeVar("M", bound=BaseModel)


async def parse(request: Request, model: type[M]) -> M:
  """The request's body as `model` (JSON whatever the Content-Type says, as curl -d sends it)."""
  try:
    body = json.loads(await request.body())
  except (ValueError, UnicodeDecodeError):
    raise BadRequest("the body is not valid JSON") from None
  try:
    return model.model_validate(body)
  except ValidationError as e:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    if len(loc) > 1 and loc[1] in ("str", "list[str]"):  # which member of `str | list[str]` failed: not news
      raise BadRequest(f"{loc[0]}: expected a string or a list of strings") from None
    raise BadRequest(f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}") from None


def create_app(batcher: Batcher, encode_texts: Encode, encode_pairs: Callable[[Sequence[str], Sequence[str]],
               list[np.ndarray]], name: str, max_length: int, token: str | None = None,
               info: dict[str, Any] | None = None) -> FastAPI:
  """The ASGI app over a running `batcher`: `encode_texts` tokenizes rendered texts,
  `encode_pairs` renders and tokenizes (prompt, response) pairs."""
  app = FastAPI(title="hs2p reward server", version="1")
  created = int(time.time())

  @app.middleware("http")
  async def bearer(request: Request, call_next):
    if token and request.url.path != "/health":
      given = request.headers.get("authorization", "")
      if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return error(401, "a valid 'Authorization: Bearer TOKEN' header is required")
    return await call_next(request)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
      return error(404, f"no route {request.method} {request.url.path}")
    return error(exc.status_code, str(exc.detail))

  @app.exception_handler(BadRequest)
  async def bad(request: Request, exc: BadRequest):
    return error(400, str(exc))

  async def rewards(encode: Callable[[], list[np.ndarray]]) -> tuple[np.ndarray, int]:
    try:
      seqs = await run_in_threadpool(encode)
    except BadText as e:
      raise BadRequest(str(e)) from None
    out = await asyncio.wrap_future(batcher.submit(seqs))
    return out, sum(len(s) for s in seqs)

  @app.post("/get_reward")
  async def get_reward(request: Request):
    req = await parse(request, GetRewardRequest)
    if req.prompts is not None and len(req.prompts) != len(req.query):
      raise BadRequest(f"prompts: {len(req.prompts)} prompts for {len(req.query)} queries")
    out, _ = await rewards(lambda: encode_texts(req.query))
    values = [float(r) for r in out]
    return {"rewards": values, "scores": values}

  async def classify(request: Request):
    req = await parse(request, ClassifyRequest)
    if req.model is not None and req.model != name:
      return error(404, f"the model {req.model!r} does not exist (this server serves {name!r})")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
      raise BadRequest("input: an empty list")
    out, tokens = await rewards(lambda: encode_texts(texts))
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
    out, _ = await rewards(lambda: encode_pairs(req.prompts, req.responses))
    return {"rewards": [float(r) for r in out]}

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": name, "batches": batcher.batches, "compilations": compilations()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "hs2p",
                                        "max_model_len": max_length, **(info or {})}]}

  return app
