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


def _content_id(info: dict[str, Any]) -> str:
  """What names an object's contents in its listing: its checksum (crc32c, md5), else its generation or
  etag, else its size and time of writing."""
  for key in ("crc32c", "md5Hash", "generation", "etag", "ETag"):
    if info.get(key):
      return f"{key}:{info[key]}"
  return f"size:{info.get('size')}:{info.get('updated') or info.get('mtime') or info.get('LastModified')}"


COPY_CHUNK = 8 << 20  # bytes read and written at a time: memory stays bounded whatever a file's size
COPY_THREADS = 8      # files downloaded at once


def _download(fs: Any, path: str, dst: str, info: dict[str, Any]) -> None:
  """Streams object `path` to local file `dst` in COPY_CHUNK pieces, its crc32c checked where the
  listing gives one (why not fsspec's `get`: it checks nothing)."""
  import base64
  crc = None
  if info.get("crc32c"):
    import google_crc32c
    crc = google_crc32c.Checksum()
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with fs.open(path, "rb", block_size=COPY_CHUNK) as src, open(dst, "wb") as out:
    while True:
      chunk = src.read(COPY_CHUNK)
      if not chunk:
        break
      out.write(chunk)
      if crc is not None:
        crc.update(chunk)
  if crc is not None and base64.b64encode(crc.digest()).decode() != info["crc32c"]:
    raise UserError(f"{path}: the downloaded bytes do not match the object's crc32c (changed while read?)")


def local_copy(url: str, patterns: list[str] | None = None) -> str:
  """A local copy, in this host's cache, of the directory at `url` (only the files whose names match
  one of `patterns`, if given), keyed by each object's checksum or generation: downloaded on first
  use and again when any object changes (a re-upload of the same names and sizes included); files
  streamed to disk in chunks, several at once. A newer copy of the same URL replaces older ones."""
  import concurrent.futures
  import fnmatch
  import hashlib
  import tempfile
  if not isdir(url):
    raise UserError(f"{url}: no such directory")
  import fsspec
  _quiet_gcsfs()
  fs, root = fsspec.core.url_to_fs(url)

  def listing() -> list[tuple[str, str, dict[str, Any]]]:
    fs.invalidate_cache()  # a cached listing would hide a re-upload
    found = fs.find(root, detail=True)
    out = [(path[len(root.rstrip("/")) + 1:], path, info) for path, info in sorted(found.items())
           if info.get("type", "file") == "file"]
    return [f for f in out if patterns is None or any(fnmatch.fnmatch(f[0], pat) for pat in patterns)]
  files = _io(url, "list", listing)
  key = hashlib.sha256(repr([(n, info.get("size"), _content_id(info)) for n, _, info in files]).encode()).hexdigest()[:16]
  local = local_dir(url, f"copy-{key}")
  if os.path.isdir(local):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(local))
  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, min(COPY_THREADS, len(files)))) as pool:
      jobs = [pool.submit(_io, join(url, name), "read", lambda p=path, n=name, i=info:
                          _download(fs, p, os.path.join(tmp, *n.split("/")), i)) for name, path, info in files]
      for job in jobs:
        job.result()
    os.rename(tmp, local)  # complete or absent; another process's identical copy may have won
  except OSError:
    if not os.path.isdir(local):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  pattern_key = "all" if patterns is None else ",".join(patterns)
  _forget_older(local, pattern_key)
  return local


def _forget_older(local: str, pattern_key: str) -> None:
  """Removes the copies of the same URL and file selection that `local` supersedes (a marker file
  names each copy's selection: a metadata-only copy never removes a full one)."""
  with open(os.path.join(os.path.dirname(local), os.path.basename(local) + ".select"), "w") as f:
    f.write(pattern_key)
  parent_dir = os.path.dirname(local)
  for name in os.listdir(parent_dir):
    marker = os.path.join(parent_dir, name + ".select")
    if name.startswith("copy-") and not name.endswith(".select") and name != os.path.basename(local) \
        and os.path.isfile(marker):
      with open(marker) as f:
        same = f.read() == pattern_key
      if same:
        shutil.rmtree(os.path.join(parent_dir, name), ignore_errors=True)
        os.unlink(marker)


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
