"""The package imports downward only: no circle among `hs2p_jax`'s sub-packages and top-level
modules, every import counted (inside functions too)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hs2p_jax")


def _layer_graph() -> dict[str, set[str]]:
  """{layer: layers it imports}: a layer is a sub-package or a top-level module of hs2p_jax."""
  graph: dict[str, set[str]] = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      head = os.path.relpath(path, ROOT).split(os.sep)[0]
      layer = head[:-3] if head.endswith(".py") else head
      if layer in ("__init__", "__main__"):
        continue
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
          targets = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "hs2p_jax"
                                     else [])
        elif isinstance(node, ast.Import):
          targets = [a.name for a in node.names]
        for t in targets:
          parts = t.split(".")
          if parts[0] == "hs2p_jax" and len(parts) > 1 and parts[1] != layer:
            graph.setdefault(layer, set()).add(parts[1])
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_no_circle_among_sub_packages_and_top_level_modules():
  graph = _layer_graph()
  assert {"rl", "train", "eval", "serve", "bench"} <= set(graph)  # the walk saw the layers
  assert _cycles(graph) == [], _cycles(graph)


def test_the_cycle_finder_finds_one():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
