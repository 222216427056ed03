"""Typed access to record fields: each check raises `UserError("WHERE: ...")` naming the field."""

from __future__ import annotations

import math
from typing import Any, Optional

from hs2p_jax.errors import UserError

_MISSING = object()


def _get(record: dict[str, Any], key: str, where: str) -> Any:
  value = record.get(key, _MISSING)
  if value is _MISSING or value is None:
    raise UserError(f"{where}: missing field {key!r}")
  return value


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def text(record: dict[str, Any], key: str, where: str) -> str:
  """A required non-empty (not only whitespace) string field."""
  value = _get(record, key, where)
  if not isinstance(value, str):
    raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {_short(value)}")
  if not value.strip():
    raise UserError(f"{where}: field {key!r} is empty")
  return value


def optional_text(record: dict[str, Any], key: str, where: str) -> Optional[str]:
  """A string field that may be absent or null."""
  if record.get(key) is None:
    return None
  value = record[key]
  if not isinstance(value, str):
    raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {_short(value)}")
  return value


def integer(record: dict[str, Any], key: str, where: str, allowed: range | tuple[int, ...]) -> int:
  """A required integer field with a value in `allowed` (bools and floats are rejected)."""
  value = _get(record, key, where)
  if isinstance(value, bool) or not isinstance(value, int):
    raise UserError(f"{where}: field {key!r} must be an integer, got {type(value).__name__} {_short(value)}")
  if value not in allowed:
    shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else ", ".join(map(str, allowed))
    raise UserError(f"{where}: field {key!r}={value} is out of range ({shown})")
  return value


def positive_number(record: dict[str, Any], key: str, where: str, default: float) -> float:
  """An optional finite number > 0; `default` when absent or null."""
  if record.get(key) is None:
    return default
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise UserError(f"{where}: field {key!r} must be a number, got {type(value).__name__} {_short(value)}")
  if not math.isfinite(value) or value <= 0:
    raise UserError(f"{where}: field {key!r}={value} must be a positive finite number")
  return float(value)
