"""A served reward model as a REINFORCE scorer: `reward_model: http://HOST:PORT` in a config.

Process 0 posts the rollouts to the server's `/score` route (prompts and responses unrendered: the
server renders them in its own template, exactly as the in-process scorer does) and hands the
rewards to the other processes. A server that does not answer is retried with backoff; when the
retries run out the run stops with one line (status 75: the checkpoints are intact, resume once
the server is back). Plain `urllib`: a JSON POST with a timeout needs no client library.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import jax
import numpy as np

from hs2p_jax.errors import Stopped, UserError

TOKEN_ENV = "HS2P_SERVE_TOKEN"  # the bearer token, as `hs2p serve` reads it
CHUNK = 512                     # pairs per request


def is_served(path: str | None) -> bool:
  return bool(path) and path.startswith(("http://", "https://"))


class ServerGone(Stopped):
  status = 75


class _Refused(Exception):
  """A 4xx: the request itself is wrong; retrying cannot help."""


class RemoteScorer:
  """`scorer(prompts, responses) -> [N] rewards` from the reward server at `url` (every process
  calls it; process 0 asks the server)."""

  def __init__(self, url: str, timeout: float = 120.0, retries: int = 5, token: str | None = None):
    self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
    self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    self.info: dict[str, Any] = {}

  def check(self, needed_length: int) -> None:
    """Asks the server what it serves (process 0); one line and exit 2 if nothing answers there."""
    if jax.process_index() != 0:
      return
    try:
      models = self._request("GET", "/v1/models", None, tries=1)
    except (ServerGone, _Refused) as e:
      raise UserError(f"reward_model={self.url}: no reward server answers there ({e})") from None
    self.info = (models.get("data") or [{}])[0]
    longest = self.info.get("max_model_len")
    if isinstance(longest, int) and longest < needed_length:
      print(f"hs2p reinforce: the reward server at {self.url} takes {longest} tokens; rollouts of up to "
            f"{needed_length} are cut to that (start it with --max-length {needed_length})", file=sys.stderr,
            flush=True)

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    n = len(prompts)
    rewards, failure = np.zeros(n, np.float32), ""
    if jax.process_index() == 0:
      try:
        out = []
        for i in range(0, n, CHUNK):
          body = {"prompts": list(prompts[i:i + CHUNK]), "responses": list(responses[i:i + CHUNK])}
          out += self._request("POST", "/score", body)["rewards"]
        rewards = np.asarray(out, np.float32)
      except (ServerGone, _Refused) as e:
        failure = f"the reward server at {self.url} {e}"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      failed, rewards = multihost_utils.broadcast_one_to_all((np.int32(bool(failure)), rewards))
      rewards = np.asarray(rewards, np.float32)
      if int(failed) and not failure:
        failure = f"process 0 lost the reward server at {self.url} (its log says why)"
    if failure:
      raise ServerGone(f"{failure}; the last checkpoint is intact: resume once it answers")
    return rewards

  def _request(self, method: str, route: str, body: Any, tries: int | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.token}"} if self.token else {})
    tries = tries or self.retries + 1
    for attempt in range(tries):
      req = urllib.request.Request(self.url + route, data=data, method=method, headers=headers)
      try:
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
          return json.loads(r.read())
      except urllib.error.HTTPError as e:
        message = _message(e)
        if 400 <= e.code < 500:
          raise _Refused(f"refused the request: {e.code} {message}") from None
        reason = f"answered {e.code} {message}"
      except (urllib.error.URLError, OSError, ValueError) as e:  # refused, reset, timed out, not JSON
        reason = f"did not answer ({getattr(e, 'reason', None) or e})"
      if attempt + 1 < tries:
        time.sleep(min(2.0 ** attempt, 30.0))
    raise ServerGone(f"{reason} after {tries} tries")


def _message(e: urllib.error.HTTPError) -> str:
  try:
    return str(json.loads(e.read()).get("message", ""))
  except (ValueError, AttributeError, OSError):
    return ""
