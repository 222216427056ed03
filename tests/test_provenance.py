"""provenance.json: what tells runs apart (versions, commit, devices, mesh, data hashes), and the
start-of-run data report (kept / dropped / truncated, epochs)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import subprocess

import jax
import pytest

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax import provenance
from hs2p_jax.cli import main
from hs2p_jax.data.order import Order


@pytest.mark.parametrize("n, batch, steps", [(8, 4, 3), (8, 4, 2), (10, 4, 3), (10, 4, 2), (3, 4, 1), (7, 7, 5)])
def test_epoch_plan_matches_the_data_order(n, batch, steps):
  order = Order(n, batch, seed=3)
  seen, first_repeat = set(), None
  for step in range(steps):
    ids = order.ids(step, 0)
    if first_repeat is None and (seen & set(ids.tolist()) or len(set(ids.tolist())) < len(ids)):
      first_repeat = step + 1
    seen |= set(ids.tolist())
  plan = provenance.epoch_plan(n, batch, steps)
  assert plan["epochs"] == pytest.approx(steps * batch / n)
  assert plan["wraps_at_step"] == first_repeat


def _sha256(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_train_rm_records_versions_devices_mesh_and_data(tmp_path, capsys):
  rows = [{"split": "train", "prompt": f"Question {i}?", "response_1": f"Answer {i} good",
           "response_2": f"Answer {i} bad", "preference_strength": -2 + i % 2} for i in range(9)]
  rows[4]["preference_strength"] = 0                       # a tie: dropped
  rows[5]["response_1"] = "long " * 40                     # over data.max_length=64: truncated
  data = write_jsonl(tmp_path / "pref.jsonl", rows)
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: prov\n")
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "helpsteer2-preference",
                                     "train.objective": "bt", "train.steps": 3, "train.batch_size": 4})
  assert main(["train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", *sets]) == 0
  err = capsys.readouterr().err
  line = next(l for l in err.splitlines() if l.startswith("train data"))
  assert "kept 8 of 9 read, dropped 1 (tie 1)" in line and "truncated 1" in line
  assert "12 examples = 1.50 epochs (wraps into epoch 2 at step 3)" in line

  info = json.loads((tmp_path / "run" / "provenance.json").read_text())
  assert os.path.isfile(tmp_path / "run" / "config.json")
  train = info["data"]["train"]
  assert train["origin"] == {"path": data, "bytes": os.path.getsize(data), "sha256": _sha256(data)}
  assert (train["kept"], train["dropped"], train["truncated"], train["wraps_at_step"]) == (8, {"tie": 1}, 1, 3)
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers"):
    assert info["packages"][dist] == md.version(dist)
  assert info["devices"]["count"] == jax.device_count() and info["devices"]["kind"] == jax.devices()[0].device_kind
  assert info["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  root = os.path.dirname(os.path.dirname(os.path.abspath(provenance.__file__)))
  if os.path.isdir(os.path.join(root, ".git")):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert info["hs2p_jax"]["git"]["commit"] == head
  assert info["hs2p_jax"]["version"] == md.version("hs2p-jax")

  # the data changes: a resumed run (same --out) records the new file's hash
  rows[0]["response_1"] = "Answer 0 better"
  write_jsonl(tmp_path / "pref.jsonl", rows)
  assert main(["train-rm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--set", *sets,
               "train.steps=4"]) == 0
  again = json.loads((tmp_path / "run" / "provenance.json").read_text())
  assert again["data"]["train"]["origin"]["sha256"] == _sha256(data) != train["origin"]["sha256"]


def test_hub_sources_record_dataset_rows_and_revision(tmp_path):
  from hs2p_jax.data.load import load_examples
  ds_dir = tmp_path / "my_pairs"
  ds_dir.mkdir()
  write_jsonl(ds_dir / "train.jsonl", separable_pairs(5))
  examples, report = load_examples(f"hf:{ds_dir}", "pairs", "train", "pairs")
  assert len(examples) == 5
  o = report.origin
  assert (o["dataset"], o["split"], o["rows"]) == (str(ds_dir), "train", 5)
  assert isinstance(o["revision"], str) and o["revision"] and isinstance(o["fingerprint"], str)
