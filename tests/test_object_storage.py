"""Runs on object storage (`gs://`), against a real local GCS emulator reached through the clients'
standard variables alone (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL): run files, model
checkpoints, resumable checkpoints, sources, and a train-rm run killed and resumed there."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import separable_pairs, tiny_hf_model, tiny_overrides, write_jsonl
from hs2p_jax import storage
from hs2p_jax.atomic import write_json
from hs2p_jax.errors import UserError
from hs2p_jax.train.metrics import MetricsWriter, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "hs2p-test"

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs")),
    reason="needs gcp-storage-emulator and gcsfs (the test extras)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """gs://BUCKET on a local emulator; the clients reach it through their standard variables."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_stand_in.py"), str(port), BUCKET],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield f"gs://{BUCKET}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.kill()
  proc.wait()


def test_files_logs_and_copies_on_object_storage(gcs, tmp_path, monkeypatch):
  base = f"{gcs}/files"
  write_json(f"{base}/a/config.json", {"x": 1})
  assert storage.isfile(f"{base}/a/config.json") and storage.isdir(f"{base}/a") and not storage.exists(f"{base}/b")
  assert json.loads(storage.read_text(f"{base}/a/config.json")) == {"x": 1}
  storage.upload(f"{base}/a/tok/tokenizer.json", b"{}")
  storage.upload(f"{base}/a/model.safetensors", b"\0" * 10)
  assert storage.listdir(f"{base}/a") == ["config.json", "model.safetensors", "tok"]
  monkeypatch.setenv("HS2P_CACHE", str(tmp_path / "cache"))
  meta = storage.local_copy(f"{base}/a", ["*.json", "tokenizer*"])  # what a source's metadata needs
  assert sorted(os.listdir(meta)) == ["config.json", "tok"] and meta.startswith(str(tmp_path / "cache"))
  full = storage.local_copy(f"{base}/a")
  assert sorted(os.listdir(full)) == ["config.json", "model.safetensors", "tok"]
  inode = os.stat(os.path.join(full, "model.safetensors")).st_ino
  assert storage.local_copy(f"{base}/a") == full  # cached until the files change: not downloaded again
  assert os.stat(os.path.join(full, "model.safetensors")).st_ino == inode
  storage.upload(f"{base}/a/model.safetensors", b"\1" * 10)  # the same names and sizes, other contents
  again = storage.local_copy(f"{base}/a")
  assert again != full and open(os.path.join(again, "model.safetensors"), "rb").read() == b"\1" * 10
  assert not os.path.exists(full) and os.path.isdir(meta)  # the stale copy is gone, the metadata copy stays
  storage.upload(f"{base}/a/model.safetensors", b"\0" * 11)
  assert storage.local_copy(f"{base}/a") != again
  storage.rmtree(f"{base}/a")
  assert not storage.exists(f"{base}/a/config.json")
  with pytest.raises(UserError, match="gs://no-such-bucket/run/config.json"):
    write_json("gs://no-such-bucket/run/config.json", {})

  # metrics: no appends on object storage; rewritten whole, and a resume drops what came after its step
  run = f"{gcs}/metrics-run"
  w = MetricsWriter(run, 4, tensorboard=False)
  for step in (1, 2, 3):
    w.log(step, {"loss": 1.0 / step}, progress=False)
  w.samples(3, [{"text": "hi"}])
  w.close()
  assert [r["step"] for r in read_metrics(f"{run}/metrics.jsonl")] == [1, 2, 3]
  w = MetricsWriter(run, 4, resume_step=2, tensorboard=False)
  w.log(3, {"loss": 0.5}, progress=False)
  w.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(f"{run}/metrics.jsonl")] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  assert read_metrics(f"{run}/samples.jsonl") == []


def test_model_and_run_checkpoints_commit_on_object_storage(gcs):
  from flax import nnx

  from hs2p_jax.checkpoint import META_FILE, ModelMeta, is_model_checkpoint, load_model, save_model
  from hs2p_jax.train.checkpoints import RunCheckpoints
  from hs2p_jax.model import create, preset

  cfg = preset("tiny", num_layers=1)
  model = create("reward", cfg, 9, seed=0)
  path = f"{gcs}/ckpt/model"
  save_model(path, model, ModelMeta("reward", cfg))
  loaded, meta = load_model(path)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError, match="already exists"):
    save_model(path, model, ModelMeta("reward", cfg))
  storage.remove(f"{path}/{META_FILE}")  # a save cut short: arrays written, metadata not yet
  assert not is_model_checkpoint(path)
  save_model(path, create("reward", cfg, 9, seed=1), ModelMeta("reward", cfg))  # not a checkpoint: replaced
  assert is_model_checkpoint(path)

  ckpts = RunCheckpoints(f"{gcs}/ckpt/run", keep=2, async_save=True)
  state = {"w": jax.numpy.arange(6.0)}
  for step in (1, 2):
    ckpts.save(step, jax.tree.map(lambda x: x * step, state), {"loader": {"step": step}})
  ckpts.close()
  storage.upload(f"{gcs}/ckpt/run/checkpoints/3/state/_METADATA", b"{")  # a save killed before its commit
  ckpts = RunCheckpoints(f"{gcs}/ckpt/run", keep=2)
  step, restored, data = ckpts.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  ckpts.close()
  assert step == 2 and data == {"loader": {"step": 2}}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0) * 2)


def test_a_source_in_a_bucket_is_copied_once_to_the_host(gcs, tmp_path, monkeypatch):
  pytest.importorskip("torch")
  from hs2p_jax import config as config_lib
  from hs2p_jax.convert import load_hf
  from hs2p_jax.train.model_init import architecture, load_source

  local = tmp_path / "hf"
  tiny_hf_model(vocab_size=512).save_pretrained(local, safe_serialization=True)
  storage.upload_dir(str(local), f"{gcs}/sources/tiny")
  monkeypatch.setenv("HS2P_CACHE", str(tmp_path / "cache"))
  mc = config_lib.load(config_lib.RunConfig, None, [f"model.source={gcs}/sources/tiny", "model.tokenizer=bytes"]).model
  arch, where = architecture(mc)
  assert arch.num_layers == load_hf(str(local)).cfg.num_layers and where == f"model.source={gcs}/sources/tiny"
  got = jax.tree.leaves(jax.tree.map(np.asarray, nnx_params(load_source(mc))))
  want = jax.tree.leaves(jax.tree.map(np.asarray, nnx_params(load_hf(str(local), head="reward", seed=mc.seed))))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)

  # retrained weights uploaded under the same names and sizes: read afresh, not from the old copy
  other = tmp_path / "hf2"
  tiny_hf_model(vocab_size=512, seed=1).save_pretrained(other, safe_serialization=True)
  assert sorted((n, os.path.getsize(other / n)) for n in os.listdir(other)) == \
      sorted((n, os.path.getsize(local / n)) for n in os.listdir(local))
  storage.upload_dir(str(other), f"{gcs}/sources/tiny")
  got = jax.tree.leaves(jax.tree.map(np.asarray, nnx_params(load_source(mc))))
  want = jax.tree.leaves(jax.tree.map(np.asarray, nnx_params(load_hf(str(other), head="reward", seed=mc.seed))))
  assert any(not np.array_equal(a, b) for a, b in zip(got, jax.tree.leaves(jax.tree.map(np.asarray, nnx_params(
      load_hf(str(local), head="reward", seed=mc.seed))))))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def nnx_params(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def _train(cfg: str, out: str, sets: list[str], env: dict, log: str) -> subprocess.Popen:
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "hs2p_jax", "train-rm", "--config", cfg, "--out", out, "--set",
                             *sets], env=env, stdout=subprocess.DEVNULL, stderr=f)


def _tail(log: str) -> str:
  with open(log) as f:
    return f.read()[-2000:]


def _hs2p(*args: str, env: dict) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "hs2p_jax", *args], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


@pytest.mark.slow
def test_train_rm_on_object_storage_resumes_after_sigkill_and_evaluates_from_there(gcs, tmp_path):
  env = {**ENV, **{k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")},
         "HS2P_CACHE": str(tmp_path / "cache")}
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: gcs\n")
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(12))
  sets = tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": 24, "train.batch_size": 4, "train.lr": 3e-3, "train.save_every": 4})
  out, local = f"{gcs}/runs/rm", str(tmp_path / "local")
  logs = [str(tmp_path / f"{name}.log") for name in ("straight", "killed", "resumed")]
  straight = _train(str(cfg), local, sets, env, logs[0])  # the uninterrupted run, on local disk, alongside
  run = _train(str(cfg), out, sets, env, logs[1])
  deadline = time.time() + 240
  while "step 10/24" not in _tail(logs[1]):  # checkpoints 4 and 8 written or in flight
    assert run.poll() is None and time.time() < deadline, _tail(logs[1])
    time.sleep(0.05)
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert straight.wait(timeout=300) == 0, _tail(logs[0])
  resumed = _train(str(cfg), out, sets, env, logs[2])
  assert resumed.wait(timeout=300) == 0, _tail(logs[2])
  with open(logs[2]) as f:
    assert "resume: state restored from the run's checkpoint" in f.read()

  a, b = read_metrics(os.path.join(local, "metrics.jsonl")), read_metrics(f"{out}/metrics.jsonl")
  assert [r["step"] for r in b] == list(range(1, 25))  # each step once
  for ra, rb in zip(a, b):
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra, rb)
  for name in ("config.json", "provenance.json", "model/hs2p_model.json", "model/tokenizer/tokenizer.json",
               "logs/process_0.log"):
    assert storage.isfile(f"{out}/{name}"), name

  reports = [json.loads(_hs2p("eval", "--checkpoint", ckpt, "--data", data, "--format", "pairs", env=env).stdout)
             for ckpt in (out, local)]
  assert reports[0] == reports[1] and reports[0]["pairs"] == 12
  from safetensors.numpy import load_file
  exported = []
  for ckpt, dest in ((out, str(tmp_path / "hf_gs")), (local, str(tmp_path / "hf_local"))):
    _hs2p("convert", "--checkpoint", ckpt, "--to-hf", dest, env=env)
    exported.append(load_file(os.path.join(dest, "model.safetensors")))
  assert exported[0].keys() == exported[1].keys()
  for k in exported[0]:
    np.testing.assert_array_equal(exported[0][k], exported[1][k])
