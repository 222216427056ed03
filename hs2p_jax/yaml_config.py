"""Typed dataclass configs from YAML: `build` a dataclass from a nested dict (types checked, unknown
keys named), `key=value` overrides, deep merges and `include:` of a base file."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from hs2p_jax.errors import UserError




def _field_types(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks and converts a YAML value to the declared field type; errors name the key."""
  if tp is Any:
    return value
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, key)
      except UserError as e:
        errors.append(str(e))
    raise UserError(errors[0] if errors else f"{key}: invalid value {value!r}")
  if _is_dataclass_type(tp):
    if not isinstance(value, dict):
      raise UserError(f"{key}: expected a mapping, got {value!r}")
    return build(tp, value, prefix=key + ".")
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise UserError(f"{key}: expected true or false, got {value!r}")
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise UserError(f"{key}: expected an integer, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise UserError(f"{key}: expected a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise UserError(f"{key}: expected a string, got {value!r}")
    return value
  if tp is dict or origin is dict:
    if not isinstance(value, dict):
      raise UserError(f"{key}: expected a mapping, got {value!r}")
    return value
  if tp is list or origin is list:
    if not isinstance(value, list):
      raise UserError(f"{key}: expected a list, got {value!r}")
    return value
  return value


def build(cls, data: dict[str, Any], prefix: str = ""):
  """Instantiates dataclass `cls` from a nested dict; unknown keys are errors naming the key."""
  types_ = _field_types(cls)
  unknown = sorted(set(data) - set(types_))
  if unknown:
    raise UserError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(types_))})")
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    value = data[f.name]
    if isinstance(value, dict) and _is_dataclass_type(types_[f.name]) and f.default_factory is not dataclasses.MISSING:
      value = merge(dataclasses.asdict(f.default_factory()), value)  # keys not given keep this field's defaults
    kwargs[f.name] = _coerce(value, types_[f.name], prefix + f.name)
  return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
  """["a.b=1", "c=x"] -> nested dict; values are parsed as YAML scalars."""
  out: dict[str, Any] = {}
  for pair in pairs:
    if "=" not in pair:
      raise UserError(f"--set {pair!r}: expected key=value")
    key, raw = pair.split("=", 1)
    key = key.strip()
    if not key:
      raise UserError(f"--set {pair!r}: empty key")
    try:
      value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
      value = raw
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise UserError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value
  return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in update.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out


def read_yaml(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such config file")
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f) or {}
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    raise UserError(f"{path}: invalid YAML{where}") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: the top level must be a mapping")
  return data


def read_with_includes(path: str) -> dict[str, Any]:
  """The mapping of `path` over those of its `include:` (a file, or a list merged in order; paths
  relative to `path`'s directory)."""
  data = read_yaml(path)
  inc = data.pop("include", None)
  if inc:
    base: dict[str, Any] = {}
    for one in [inc] if isinstance(inc, str) else inc:
      if not isinstance(one, str):
        raise UserError(f"{path}: include: expected a file name or a list of them, got {one!r}")
      base = merge(base, read_with_includes(os.path.join(os.path.dirname(path), one)))
    data = merge(base, data)
  return data
