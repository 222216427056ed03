"""Raw record reading: local JSONL / gzip / parquet, the hub path on a local dataset, and every kind
of damaged input raising a one-line UserError that names the file and line."""

import gzip
import json
import os

import pytest

from hs2p_jax.data.records import parse_hub_spec, read_records
from hs2p_jax.errors import UserError

ROWS = [{"prompt": "a", "n": 1}, {"prompt": "é ü", "n": 2}, {"prompt": "c", "n": 3}]


def _jsonl(rows) -> bytes:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _raises(fn, pattern: str) -> str:
  with pytest.raises(UserError, match=pattern) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_jsonl_and_gzip_give_records_with_file_and_line(tmp_path):
  plain, gz = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
  data = _jsonl(ROWS[:1]) + b"\n   \n" + _jsonl(ROWS[1:])  # blank lines are skipped but counted
  plain.write_bytes(data)
  gz.write_bytes(gzip.compress(data))
  for path in (plain, gz):
    got = list(read_records(str(path)))
    assert [r for _, r in got] == ROWS
    assert [w for w, _ in got] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_parquet_rows(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=2)
  got = list(read_records(str(path)))
  assert [r for _, r in got] == ROWS
  assert [w for w, _ in got] == [f"{path}:{i}" for i in (1, 2, 3)]


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "x",}', r"invalid JSON"),
    (b'{"prompt": "\xff\xfe"}', r"invalid UTF-8"),
    (b'["prompt", "x"]', r"expected a JSON object, got list"),
    (b'"just a string"', r"expected a JSON object, got str"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(_jsonl(ROWS[:2]) + line + b"\n" + _jsonl(ROWS[2:]))
  _raises(lambda: list(read_records(str(path))), rf"^{path}:3: {message}")
  skipped = []
  got = list(read_records(str(path), on_invalid=skipped.append))
  assert [r for _, r in got] == ROWS and len(skipped) == 1 and skipped[0].startswith(f"{path}:3: ")


def test_truncated_gzip_names_the_line_it_stopped_at(tmp_path):
  path = tmp_path / "t.jsonl.gz"
  rows = [{"prompt": f"row {i} " + "x" * 50} for i in range(200)]
  whole = gzip.compress(_jsonl(rows))
  path.write_bytes(whole[:len(whole) // 2])
  msg = _raises(lambda: list(read_records(str(path))), rf"^{path}:\d+: truncated or corrupt gzip")
  line = int(msg.split(":")[1])
  assert 1 < line < 200  # some rows were read before the damage


def test_corrupt_and_non_gzip(tmp_path):
  fake = tmp_path / "plain.jsonl.gz"
  fake.write_bytes(_jsonl(ROWS))
  _raises(lambda: list(read_records(str(fake))), rf"^{fake}:1: truncated or corrupt gzip")
  flipped = tmp_path / "flip.jsonl.gz"
  data = bytearray(gzip.compress(_jsonl(ROWS * 50)))
  data[len(data) // 2] ^= 0xFF
  flipped.write_bytes(bytes(data))
  _raises(lambda: list(read_records(str(flipped))), rf"^{flipped}:\d+: (truncated or corrupt gzip|invalid)")


def test_missing_unreadable_and_unsupported_files(tmp_path):
  _raises(lambda: list(read_records(str(tmp_path / "nope.jsonl"))), r"nope\.jsonl: no such file")
  _raises(lambda: list(read_records(str(tmp_path / "nope.parquet"))), r"nope\.parquet: no such file")
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"this is not parquet at all")
  _raises(lambda: list(read_records(str(bad))), rf"^{bad}: not a readable parquet file")
  _raises(lambda: list(read_records(str(tmp_path / "x.csv"))), r"x\.csv: unsupported data source")


def test_hub_spec_parsing():
  assert parse_hub_spec("hf:nvidia/HelpSteer2") == ("nvidia/HelpSteer2", None, None)
  assert parse_hub_spec("hf:nvidia/HelpSteer2:preference") == ("nvidia/HelpSteer2", "preference", None)
  assert parse_hub_spec("hf:allenai/reward-bench@filtered") == ("allenai/reward-bench", None, "filtered")
  with pytest.raises(UserError):
    parse_hub_spec("hf:")


def test_hub_path_through_load_dataset_on_a_local_dataset(tmp_path, monkeypatch):
  """The real `datasets.load_dataset(NAME, data_dir=..., split=...)` call, on a local directory."""
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  os.makedirs(tmp_path / "repo" / "preference")
  (tmp_path / "repo" / "preference" / "train.jsonl").write_bytes(_jsonl(ROWS))
  got = list(read_records(f"hf:{tmp_path}/repo:preference", "train"))
  assert [r for _, r in got] == ROWS
  assert got[1][0] == f"hf:{tmp_path}/repo:preference split=train row=1"
  _raises(lambda: list(read_records(f"hf:{tmp_path}/repo:preference@validation")),
          r"cannot load split 'validation'")
