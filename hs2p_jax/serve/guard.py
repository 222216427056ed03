"""What the reward server checks before any work, below its routes.

`Guard` (an ASGI middleware): the token (a bearer token, or HTTP Basic auth's password, as clients
that put it in the URL send it), the Content-Type (JSON only: a browser page may not POST
`text/plain` at a server on 127.0.0.1), and the body's size (a 413 before it is read whole).
`GuardedH11` (uvicorn's HTTP/1.1 protocol): at most `max_connections` open connections (the next
gets a 503 and is closed), and a request's headers and body must arrive within `read_timeout`
seconds of its first byte (or of the connection, for one that sends nothing), so half-sent and idle
connections cannot hold the server's files.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

OPEN = ("/health",)  # routes without the token (health checks)


def _error(status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
  kind = {401: "AuthenticationError", 413: "RequestTooLarge", 415: "UnsupportedMediaType",
          503: "ServiceUnavailable"}.get(status, "Error")
  body = json.dumps({"object": "error", "message": message, "type": kind, "code": status}).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
  if status == 401:
    headers.append((b"www-authenticate", b'Bearer, Basic realm="hs2p"'))
  return ({"type": "http.response.start", "status": status, "headers": headers},
          {"type": "http.response.body", "body": body})


def token_matches(header: str, token: str) -> bool:
  """Whether an Authorization header carries `token`: `Bearer TOKEN`, or Basic auth with it as the
  password (any user name)."""
  scheme, _, value = header.partition(" ")
  if scheme.lower() == "bearer":
    return hmac.compare_digest(value.strip().encode(), token.encode())
  if scheme.lower() == "basic":
    try:
      decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
      return False
    return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
  return False


class Guard:
  """ASGI middleware: token, Content-Type and body size, checked before the app sees the request;
  the body is read here (at most `max_body` bytes) and handed on whole."""

  def __init__(self, app: Callable, token: str | None, max_body: int):
    self.app, self.token, self.max_body = app, token, max_body

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    refusal = None
    if self.token and scope["path"] not in OPEN and not token_matches(headers.get("authorization", ""), self.token):
      refusal = _error(401, "the token is required: 'Authorization: Bearer TOKEN' or HTTP Basic auth with "
                            "TOKEN as the password")
    elif scope["method"] in ("POST", "PUT", "PATCH"):
      kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
      length = headers.get("content-length")
      if length is not None and length.isdigit() and int(length) > self.max_body:
        refusal = _error(413, f"the body has {int(length)} bytes, more than the server's {self.max_body} "
                              f"(--max-body-mb)")
      elif kind != "application/json" and not kind.endswith("+json"):
        refusal = _error(415, f"Content-Type {kind!r}: send application/json")
    if refusal is not None:
      for message in refusal:
        await send(message)
      return
    if scope["method"] not in ("POST", "PUT", "PATCH"):
      return await self.app(scope, receive, send)
    chunks, size = [], 0
    while True:  # the body, whole, within the limit (a chunked body has no length to check up front)
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunk = message.get("body", b"")
      size += len(chunk)
      if size > self.max_body:
        for m in _error(413, f"the body is over the server's {self.max_body} bytes (--max-body-mb)"):
          await send(m)
        return
      chunks.append(chunk)
      if not message.get("more_body", False):
        break
    body = b"".join(chunks)
    sent = {"body": False}

    async def replay() -> dict[str, Any]:
      if not sent["body"]:
        sent["body"] = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()  # after the body: a disconnect, when the client goes
    await self.app(scope, replay, send)


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


def guarded_protocol(max_connections: int, read_timeout: float) -> type:
  """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers and body."""

  class GuardedH11(H11Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
      super().connection_made(transport)
      self._deadline = None
      if len(self.connections) > max_connections:
        body = json.dumps({"object": "error", "message": f"the server has {max_connections} connections open "
                           "(--max-connections); try again", "type": "ServiceUnavailable", "code": 503}).encode()
        transport.write(BUSY % (len(body), body))
        transport.close()
        return
      self._arm()

    def _arm(self) -> None:
      if self._deadline is None:
        self._deadline = self.loop.call_later(read_timeout, self._too_slow)

    def _disarm(self) -> None:
      if self._deadline is not None:
        self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
      self._deadline = None
      if self.cycle is not None and not self.cycle.response_complete:
        self.cycle.disconnected = True
        self.cycle.message_event.set()
      self.transport.close()

    def _reading(self) -> bool:
      """Whether a request is still arriving (headers, or a body not yet whole)."""
      return self.cycle is None or self.cycle.response_complete or self.cycle.more_body

    def data_received(self, data: bytes) -> None:
      if self._reading():
        self._arm()
      super().data_received(data)
      if not self._reading():
        self._disarm()

    def on_response_complete(self) -> None:
      super().on_response_complete()
      self._disarm()  # idle now: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc) -> None:
      self._disarm()
      super().connection_lost(exc)

  return GuardedH11
