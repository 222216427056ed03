"""Atomic writes: a file or directory appears complete under its final name, or not at all.

A file at an object-storage URL is one upload, which is atomic by itself (`hs2p_jax.storage`).

Temporary names are created with ordinary modes (0666 for files, 0777 for directories, less the
umask), so what is renamed into place is as readable as a file written with `open()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Callable, Iterator, TypeVar

from hs2p_jax import storage

T = TypeVar("T")


def _unique_sibling(path: str, kind: str, create: Callable[[str], T]) -> tuple[str, T]:
  """(name, create(name)) for a fresh `.NAME.KIND-XXXX` beside `path`; retries on a name clash."""
  parent, base = os.path.split(path)
  for _ in range(100):
    name = os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
      return name, create(name)
    except FileExistsError:
      continue
  raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory that is renamed to `path` when the block succeeds."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp, _ = _unique_sibling(path, "tmp", lambda p: os.mkdir(p, 0o777))
  try:
    yield tmp
    if os.path.exists(path):
      if not overwrite:
        raise FileExistsError(f"{path} already exists")
      old, _ = _unique_sibling(path, "old", lambda p: os.mkdir(p, 0o700))
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and an atomic rename (a URL: one upload)."""
  if storage.is_url(path):
    storage.upload(path, data)
    return
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
  tmp, fd = _unique_sibling(path, "tmp", lambda p: os.open(p, flags, 0o666))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
