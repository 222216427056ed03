"""Raw records: one dict per JSON line, parquet row or hub row, each with a "where" for error messages.

Sources: a local `.jsonl`, `.jsonl.gz` or `.parquet` file, or `hf:NAME[:DATA_DIR][@SPLIT]`, read with
`datasets.load_dataset(NAME, data_dir=DATA_DIR, split=SPLIT)` (`@SPLIT` overrides the `split` argument).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from typing import Any, Callable, Iterator, Optional

from hs2p_jax.errors import UserError

Record = tuple[str, dict[str, Any]]  # (where, record); where = "FILE:LINE" or "hf:NAME split=S row=N"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def read_records(source: str, split: Optional[str] = None, *,
                 on_invalid: Optional[Callable[[str], None]] = None,
                 origin: Optional[dict[str, Any]] = None) -> Iterator[Record]:
  """Yields `(where, record)` for every record of `source`.

  A line that is not a UTF-8 JSON object raises `UserError("FILE:LINE: ...")`, or, when `on_invalid`
  is given, is passed to it as that message and skipped. File-level damage (missing file, corrupt
  or truncated gzip, unreadable parquet, hub failure) always raises. `origin`, when given, is
  filled with what identifies the data read (`file_origin` / `hub_origin`).
  """
  if source.startswith("hf:"):
    yield from _read_hub(source, split, origin)
    return
  if not (source.endswith(".jsonl") or source.endswith(".jsonl.gz") or source.endswith(".parquet")):
    raise UserError(f"{source}: unsupported data source (expected {', '.join(LOCAL_SUFFIXES)} or hf:NAME[:DATA_DIR])")
  if not os.path.isfile(source):
    raise UserError(f"{source}: no such file")
  if origin is not None:
    origin.update(file_origin(source))
  yield from _read_parquet(source) if source.endswith(".parquet") else _read_jsonl(source, on_invalid)


def file_origin(path: str) -> dict[str, Any]:
  """{"path", "bytes", "sha256"} of a local file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def hub_origin(source: str, split: str, ds: Any) -> dict[str, Any]:
  """What identifies a hub dataset read through `datasets`: name, data dir, split, rows, and the
  revision datasets resolved (its cache directory's hash) and its content fingerprint, if known."""
  name, data_dir, _ = parse_hub_spec(source)
  out: dict[str, Any] = {"dataset": name, "data_dir": data_dir, "split": split, "rows": len(ds),
                         "fingerprint": getattr(ds, "_fingerprint", None), "revision": None}
  files = getattr(ds, "cache_files", None) or []
  if files and isinstance(files[0], dict) and files[0].get("filename"):
    out["revision"] = os.path.basename(os.path.dirname(files[0]["filename"]))
  return out


def parse_hub_spec(source: str) -> tuple[str, Optional[str], Optional[str]]:
  """"hf:NAME[:DATA_DIR][@SPLIT]" -> (NAME, DATA_DIR or None, SPLIT or None)."""
  rest = source[len("hf:"):]
  rest, _, split = rest.partition("@")
  name, _, data_dir = rest.partition(":")
  if not name:
    raise UserError(f"{source}: expected hf:NAME[:DATA_DIR][@SPLIT]")
  return name, data_dir or None, split or None


def load_hub(source: str, split: Optional[str]) -> tuple[Any, str]:
  """(`datasets.Dataset`, the split read) of an `hf:` source; any failure is one UserError line."""
  name, data_dir, spec_split = parse_hub_spec(source)
  split = spec_split or split or "train"
  try:
    import datasets
    return datasets.load_dataset(name, data_dir=data_dir, split=split), split
  except Exception as e:  # noqa: BLE001 - hub, network and file errors all become one line
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{source}: cannot load split {split!r} ({msg})") from None


def _read_hub(source: str, split: Optional[str], origin: Optional[dict[str, Any]]) -> Iterator[Record]:
  name, data_dir, _ = parse_hub_spec(source)
  ds, split = load_hub(source, split)
  if origin is not None:
    origin.update(hub_origin(source, split, ds))
  label = f"hf:{name}" + (f":{data_dir}" if data_dir else "")
  for i, row in enumerate(ds):
    yield f"{label} split={split} row={i}", dict(row)


def _read_jsonl(path: str, on_invalid: Optional[Callable[[str], None]]) -> Iterator[Record]:
  opener = gzip.open if path.endswith(".gz") else open
  line_no = 0
  with opener(path, "rb") as f:
    while True:
      try:
        raw = f.readline()
      except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path}:{line_no + 1}: truncated or corrupt gzip data ({_one_line(e)})") from None
      if not raw:
        return
      line_no += 1
      where = f"{path}:{line_no}"
      try:
        record = _parse_line(raw, where)
      except UserError as e:
        if on_invalid is None:
          raise
        on_invalid(str(e))
        continue
      if record is not None:
        yield where, record


def _parse_line(raw: bytes, where: str) -> Optional[dict[str, Any]]:
  """One JSONL line -> a dict; None for a blank line."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: invalid UTF-8 at byte {e.start}") from None
  if not text.strip():
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(value, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}")
  return value


def _read_parquet(path: str) -> Iterator[Record]:
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises assorted errors on damaged files
    raise UserError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
  row = 0
  batches = pf.iter_batches()
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except Exception as e:  # noqa: BLE001
      raise UserError(f"{path}:{row + 1}: unreadable parquet data ({_one_line(e)})") from None
    for record in batch.to_pylist():
      row += 1
      yield f"{path}:{row}", record


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
