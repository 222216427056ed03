"""Atomic writes: complete or absent, never half-written, and as readable as a plain `open()` write."""

from __future__ import annotations

import os
import stat

import pytest

from hs2p_jax.atomic import atomic_dir, write_bytes, write_json, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_dirs_honour_the_umask(tmp_path, umask):
  write_text(str(tmp_path / "report.md"), "# hi\n")
  write_json(str(tmp_path / "summary.json"), {"a": 1})
  write_bytes(str(tmp_path / "plot.png"), b"\x89PNG")
  for name in ("report.md", "summary.json", "plot.png"):
    assert _mode(tmp_path / name) == 0o666 & ~umask, name
  with atomic_dir(str(tmp_path / "built")) as tmp:
    open(os.path.join(tmp, "f"), "w").close()
  assert _mode(tmp_path / "built") == 0o777 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["built", "plot.png", "report.md", "summary.json"]  # no temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "x.json"
  write_json(str(path), {"v": 1})
  with pytest.raises(TypeError):
    write_json(str(path), {"v": object()})
  assert path.read_text() == '{\n  "v": 1\n}\n'
  assert os.listdir(tmp_path) == ["x.json"]


def test_a_failed_block_leaves_no_directory(tmp_path):
  with pytest.raises(RuntimeError):
    with atomic_dir(str(tmp_path / "d")) as tmp:
      open(os.path.join(tmp, "half"), "w").close()
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == []
  with atomic_dir(str(tmp_path / "d")) as tmp:
    open(os.path.join(tmp, "one"), "w").close()
  with pytest.raises(FileExistsError):
    with atomic_dir(str(tmp_path / "d")):
      pass
  with atomic_dir(str(tmp_path / "d"), overwrite=True) as tmp:
    open(os.path.join(tmp, "two"), "w").close()
  assert os.listdir(tmp_path / "d") == ["two"] and os.listdir(tmp_path) == ["d"]
