"""Where a run's files live: a local path or an object-storage URL (`gs://BUCKET/PREFIX`, any scheme
etils.epath knows).

Object storage has no directory renames and no appends, and an object appears whole once its upload
completes. So on a URL a file is written in one upload (a log that grows is rewritten whole), and a
directory is committed by writing its marker last: Orbax's `commit_success.txt` for checkpoints,
`hs2p_model.json` for a model checkpoint. Local paths keep renames and appends. The clients are
reached through their standard variables alone: `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage)
and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, which Orbax writes arrays with).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from hs2p_jax.errors import UserError

T = TypeVar("T")


def is_url(path: str | None) -> bool:
  """Whether `path` names object storage (`SCHEME://...`, not a local file)."""
  return bool(path) and "://" in path and not path.startswith("file://")


def absolute(path: str) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return "/".join([path.rstrip("/"), *parts]) if is_url(path) else os.path.join(path, *parts)


def parent(path: str) -> str:
  return absolute(path).rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def _epath(path: str):
  from etils import epath
  _quiet_gcsfs()
  return epath.Path(path)


def _quiet_gcsfs() -> None:
  """gcsfs warns on every new filesystem it cannot classify (no storage-control credentials, as with an
  emulator) and then uses the plain bucket API, which is what a run wants: drop that one warning."""
  import logging
  logger = logging.getLogger("gcsfs")
  if not any(isinstance(f, _BucketTypeFilter) for f in logger.filters):
    logger.addFilter(_BucketTypeFilter())


class _BucketTypeFilter:
  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Could not determine bucket type")


def _io(path: str, what: str, fn: Callable[[], T]) -> T:
  """fn(), a storage client's failure (no bucket, no credentials, a lost connection) as one line naming `path`."""
  try:
    return fn()
  except UserError:
    raise
  except FileNotFoundError:
    raise UserError(f"{path}: no such file or bucket") from None
  except ImportError as e:
    raise UserError(f"{path}: {urlparse(path).scheme}:// paths need a filesystem client ({e}); "
                    f"pip install gcsfs") from None
  except Exception as e:  # noqa: BLE001 - gcsfs, google-auth and aiohttp raise many kinds
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"{path}: cannot {what} ({type(e).__name__}: {reason})") from None


def exists(path: str) -> bool:
  return _io(path, "read", lambda: _epath(path).exists()) if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  return _io(path, "read", lambda: _epath(path).is_file()) if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  return _io(path, "read", lambda: _epath(path).is_dir()) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if is_url(path):
    return _io(path, "list", lambda: sorted(p.name for p in _epath(path).iterdir()))
  return sorted(os.listdir(path))


def makedirs(path: str) -> None:
  """Creates a local directory (and its parents); nothing to create under a URL."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _io(path, "read", lambda: _epath(path).read_bytes())
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def upload(path: str, data: bytes) -> None:
  """One object holding `data` at URL `path` (it appears whole, or not at all)."""
  _io(path, "write", lambda: _epath(path).write_bytes(data))


def rmtree(path: str) -> None:
  """Removes a directory tree (local or under a URL); nothing if it does not exist."""
  if is_url(path):
    if exists(path):
      _io(path, "delete", lambda: _epath(path).rmtree())
  else:
    shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
  if is_url(path):
    _io(path, "delete", lambda: _epath(path).unlink(missing_ok=True))
  elif os.path.exists(path):
    os.unlink(path)


def upload_dir(local: str, url: str) -> None:
  """Copies the files under local directory `local` to `url/...`, one upload each."""
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        upload(join(url, *([] if rel == "." else rel.split(os.sep)), name), f.read())


def _files(url: str) -> list[tuple[str, Any]]:
  """(relative name, epath) of every file under `url`."""
  out = []

  def walk(p, prefix: str) -> None:
    for c in p.iterdir():
      if c.is_dir():
        walk(c, prefix + c.name + "/")
      else:
        out.append((prefix + c.name, c))
  walk(_epath(url), "")
  return sorted(out, key=lambda x: x[0])


def local_copy(url: str, patterns: list[str] | None = None) -> str:
  """A local copy, in this host's cache, of the directory at `url` (only the files whose names match
  one of `patterns`, if given): downloaded on first use and again when its files' names or sizes change."""
  import fnmatch
  import hashlib
  import tempfile
  if not isdir(url):
    raise UserError(f"{url}: no such directory")
  files = _io(url, "list", lambda: [(n, p, p.stat().length) for n, p in _files(url)
                                    if patterns is None or any(fnmatch.fnmatch(n, pat) for pat in patterns)])
  key = hashlib.sha256(repr([(n, size) for n, _, size in files]).encode()).hexdigest()[:16]
  local = local_dir(url, f"copy-{key}")
  if os.path.isdir(local):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(local))
  try:
    for name, p, _ in files:
      dst = os.path.join(tmp, *name.split("/"))
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      data = _io(join(url, name), "read", p.read_bytes)
      with open(dst, "wb") as f:
        f.write(data)
    os.rename(tmp, local)  # complete or absent; another process's identical copy may have won
  except OSError:
    if not os.path.isdir(local):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local


# The object-storage clients' loggers: their retries and tracebacks go to a run's log file, not the terminal.
CLIENT_LOGGERS = ("gcsfs", "fsspec", "google", "aiohttp", "urllib3")


def route_client_logs(path: str) -> None:
  """Sends the storage clients' log records (gcsfs's retries and their tracebacks) to the local file
  `path` (a run's log) instead of the terminal; the failure itself still comes as one UserError line."""
  import logging
  os.makedirs(os.path.dirname(path), exist_ok=True)
  for name in CLIENT_LOGGERS:
    logger = logging.getLogger(name)
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in logger.handlers):
      handler = logging.FileHandler(path, encoding="utf-8", delay=True)
      handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
      logger.addHandler(handler)
    logger.propagate = False


def probe(url: str, timeout: float = 5.0) -> None:
  """Checks, in seconds, that a run can write at `url` (a local path: nothing to do): the storage
  endpoint answers (`STORAGE_EMULATOR_HOST` or Google's), then one small object is written and removed.
  A failure is one UserError naming the URL and the endpoint."""
  import socket
  if not is_url(url):
    return
  if urlparse(url).scheme == "gs":
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    u = urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
    try:
      socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
      raise UserError(f"{url}: cannot reach the storage endpoint {endpoint} ({e.strerror or e}); check the network "
                      f"(or STORAGE_EMULATOR_HOST for a local emulator)") from None
  marker = join(url, ".hs2p_write_check")
  upload(marker, b"")
  remove(marker)


def cache_root() -> str:
  """This host's cache: $HS2P_CACHE or ~/.cache/hs2p_jax."""
  return os.environ.get("HS2P_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hs2p_jax")


def local_dir(path: str, *parts: str) -> str:
  """A local directory for what a run keeps beside `path` on this host only (generated data, library
  logs): `path/PARTS` itself for a local path, a directory under the host's cache for a URL."""
  if not is_url(path):
    return os.path.join(os.path.abspath(path), *parts)
  u = urlparse(absolute(path))
  return os.path.join(cache_root(), "objects", u.scheme, u.netloc, *u.path.strip("/").split("/"), *parts)
