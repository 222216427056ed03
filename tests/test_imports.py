"""No import circles in hs2p_jax: every import (at the top of a module or inside a function) read from the sources."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / "hs2p_jax").rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _owner(name: str, modules) -> str | None:
  """The module a dotted name lives in: the longest prefix that is one of ours."""
  parts = name.split(".")
  while parts and ".".join(parts) not in modules:
    parts.pop()
  return ".".join(parts) or None


def import_graph() -> dict[str, set[str]]:
  """module -> the hs2p_jax modules it imports (`from PKG import SUB` imports SUB; `from PKG import NAME`, PKG)."""
  modules = _modules()
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for module, path in modules.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      names: list[str] = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
          base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for name in names:
        target = _owner(name, modules) if name.startswith("hs2p_jax") else None
        if target and target != module:
          graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  out: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_imports_inside_functions():
  g = import_graph()
  assert "hs2p_jax.commands.plan" in g["hs2p_jax.cli"]  # imported inside a function
  assert "hs2p_jax.data.fields" in g["hs2p_jax.data.pairs"]  # `from hs2p_jax.data import fields`
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
  assert cycles(import_graph()) == []


def layer_graph() -> dict[str, set[str]]:
  """The import graph collapsed to layers: each sub-package, and each top-level module, of hs2p_jax."""
  layers: dict[str, set[str]] = {}
  for module, targets in import_graph().items():
    parts = module.split(".")
    if len(parts) < 2:  # hs2p_jax/__init__.py
      continue
    edges = layers.setdefault(parts[1], set())
    edges.update(t.split(".")[1] for t in targets if len(t.split(".")) > 1 and t.split(".")[1] != parts[1])
  for targets in list(layers.values()):
    for t in targets:
      layers.setdefault(t, set())
  return layers


def test_layers_import_downward_only():
  """No circle among the sub-packages and top-level modules (RL above training, evaluation below it...)."""
  layers = layer_graph()
  assert {"rl", "train", "eval", "serve", "bench", "roofline", "feed"} <= set(layers)
  assert "train" in layers["rl"] and "rl" not in layers["train"] and "eval" in layers["train"]
  assert cycles(layers) == []
