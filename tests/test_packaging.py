"""The install declares what the package imports: a fresh `pip install -e .` must run the main job."""

from __future__ import annotations

import ast
import importlib.metadata as md
import pathlib
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Third-party modules imported only by optional features, and the extra that provides them.
OPTIONAL = {"torch": "test"}  # hs2p bench --torch: the PyTorch baseline
# Packages that other packages import lazily on our behalf, which their own metadata does not pull in.
LAZY = {"jinja2": "transformers' apply_chat_template (data.template=chat)"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
  return {_norm(re.split(r"[\s<>=!~;\[]", r, 1)[0]) for r in reqs}


def _imported_top_modules() -> dict[str, str]:
  """Top-level module -> first file importing it, over hs2p_jax's sources (stdlib and own excluded)."""
  out: dict[str, str] = {}
  for path in sorted((ROOT / "hs2p_jax").rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      for n in names:
        top = n.split(".")[0]
        if top not in sys.stdlib_module_names and top not in ("hs2p_jax", "__future__"):
          out.setdefault(top, str(path.relative_to(ROOT)))
  return out


def test_every_imported_package_is_declared():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
  required = _requirement_names(project["dependencies"])
  extras = {k: _requirement_names(v) for k, v in project.get("optional-dependencies", {}).items()}
  dists = md.packages_distributions()
  missing = []
  for module, where in _imported_top_modules().items():
    names = {_norm(d) for d in dists.get(module, [module])}
    if module in OPTIONAL:
      assert names & extras[OPTIONAL[module]], f"{module} ({where}) is not in the [{OPTIONAL[module]}] extra"
    elif not names & required:
      missing.append(f"{module} (imported by {where}, distribution {sorted(names)})")
  assert not missing, "imported but not in [project].dependencies: " + "; ".join(missing)
  for module, why in LAZY.items():
    assert _norm(module) in required, f"{module} is needed by {why} but not declared"
