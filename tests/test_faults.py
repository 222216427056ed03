"""Faults a run survives or reports in one line: a save that fails, a lost or stuck process, a
download that fails on any host (one process per host downloads). Helpers shared with test_preemption."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from conftest import separable_pairs, tiny_overrides, write_jsonl
from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.preemption import RESUME_STATUS

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def _config(tmp_path) -> str:
  cfg = tmp_path / "c.yaml"
  cfg.write_text("name: faults\n")
  return str(cfg)


def _rm_sets(tmp_path, steps: int, **extra) -> list[str]:
  data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(12))
  return tiny_overrides(tmp_path, **{"data.train": data, "data.format": "pairs", "train.objective": "bt",
                                     "train.steps": steps, "train.batch_size": 4, "train.lr": 3e-3,
                                     "train.save_every": 1000, "mesh.data": -1, **extra})


def _cmd(command: str, cfg: str, out: str, sets: list[str]) -> list[str]:
  return [sys.executable, "-m", "hs2p_jax", command, "--config", cfg, "--out", out, "--set", *sets]


def _wait_for_step(out: str, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
  path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(path)):
      return
    time.sleep(0.05)
  ended = [(i, p.returncode, p.stderr.read()[-1500:]) for i, p in enumerate(procs) if p.poll() is not None and p.stderr]
  raise AssertionError(f"the run never logged step {step}: {[p.poll() for p in procs]}; {ended}")


def _saved_steps(out: str) -> list[int]:
  ckpts = os.path.join(out, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


def _same_numbers(a: list[dict], b: list[dict], keys=("loss", "grad_norm"), rel: float = 0.0) -> None:
  assert [r["step"] for r in b] == [r["step"] for r in a]  # each step once
  for ra, rb in zip(a, b):
    for k in keys:
      assert rb[k] == pytest.approx(ra[k], rel=rel, abs=0 if rel == 0 else 1e-9), (k, ra, rb)


@pytest.fixture
def small_disk(tmp_path):
  """A directory on a tmpfs of a few MiB, to fill up (root and mount needed: else the test skips)."""
  path = tmp_path / "disk"
  path.mkdir()
  size = {"kib": 0}

  def mount(kib: int) -> str:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:100]})")
    size["kib"] = kib
    return str(path)

  yield mount
  if size["kib"]:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_save_that_fails_stops_the_run_naming_the_checkpoint(tmp_path, small_disk):
  cfg = _config(tmp_path)
  sets = _rm_sets(tmp_path, 6, **{"train.save_every": 2, "train.keep_checkpoints": 5, "train.async_checkpoint": True})
  from flax import nnx
  from hs2p_jax.model import create, preset
  params = nnx.eval_shape(lambda: create("reward", preset("tiny", num_layers=1), 9, 0))
  one = 3 * 4 * sum(x.size for x in jax.tree.leaves(nnx.state(params)))  # float32 params, AdamW mu and nu
  out = os.path.join(small_disk(int(1.6 * one) // 1024 + 64), "run")  # room for checkpoint 2, not for 4
  proc = subprocess.run(_cmd("train-rm", cfg, out, sets), env=ENV, capture_output=True, text=True)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert f"{out}/checkpoints/4: the checkpoint could not be written" in last and "space" in last, proc.stderr[-4000:]
  assert "checkpoint 2 is intact" in last and "Traceback" not in proc.stderr
  # the libraries' tracebacks went to the run's log (as much of it as the full disk took), not the terminal
  assert len(proc.stderr.strip().splitlines()) < 20 and os.path.isfile(os.path.join(out, "logs", "process_0.log"))
  moved = str(tmp_path / "moved")  # checkpoint 2 resumes elsewhere
  shutil.copytree(out, moved)
  rerun = subprocess.run(_cmd("train-rm", cfg, moved, sets), env=ENV, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "resume: state restored" in rerun.stderr
  assert [r["step"] for r in read_metrics(os.path.join(moved, "metrics.jsonl"))] == list(range(1, 7))


def _two_processes(tmp_path, out: str, extra: list[str]) -> list[subprocess.Popen]:
  from test_multiprocess import free_port
  port = free_port()
  sets = _rm_sets(tmp_path, 2000, **{"mesh.fsdp": 1}) + extra
  return [subprocess.Popen(_cmd("train-rm", _config(tmp_path), out, sets + [
      f"dist.coordinator=127.0.0.1:{port}", "dist.num_processes=2", f"dist.process_id={i}"]),
      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "stuck"])
def test_a_lost_or_stuck_process_stops_the_other_with_one_line(tmp_path, fault):
  """SIGKILL of process 1: process 0 stops within dist.heartbeat_timeout (10 s here: 6 s was missed now
  and then by a live process starved of CPU on a loaded 2-core machine) + 30 s; SIGSTOP of process 1
  (its step never ends): process 0's step outlives dist.step_timeout (3 s)."""
  out = str(tmp_path / "run")
  limits = ["dist.heartbeat_timeout=10"] if fault == "killed" else ["dist.heartbeat_timeout=120", "dist.step_timeout=3"]
  procs = _two_processes(tmp_path, out, limits)
  try:
    _wait_for_step(out, 3, procs)
    t0 = time.time()
    procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    _, err = procs[0].communicate(timeout=(10 if fault == "killed" else 3) + 30)
    elapsed = time.time() - t0
  finally:
    procs[1].kill()
    procs[1].communicate()
  assert procs[0].returncode == RESUME_STATUS, err[-2000:]
  last = err.strip().splitlines()[-1]
  if fault == "killed":
    assert "process 1 stopped answering" in last and "dist.heartbeat_timeout" in last, last
  else:
    assert "has not finished after 3 s (dist.step_timeout)" in last, last
  assert "run the same command again on every process" in last and elapsed < (40 if fault == "killed" else 36)
  assert "Traceback" not in err and " @ 0x" not in err and "Check failure" not in err, err[-3000:]


# A stand-in for the Hugging Face hub, installed in every process through sitecustomize: a download
# of ORG/NAME copies $HUB_DIR/NAME (the files its allow_patterns select) into a fresh directory and
# records "process host repo patterns" in $HUB_LOG; a repo that is not there fails as the hub would.
HUB_STANDIN = '''
import fnmatch, os, shutil, socket, tempfile
import huggingface_hub

def snapshot_download(repo_id, allow_patterns=None, **kwargs):
  src = os.path.join(os.environ["HUB_DIR"], repo_id.split("/")[-1])
  with open(os.environ["HUB_LOG"], "a") as f:
    f.write(f"{os.environ.get('HS2P_PROCESS', '?')} {socket.gethostname()} {repo_id} {','.join(allow_patterns)}\\n")
  if not os.path.isdir(src):
    raise RuntimeError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/api/models/{repo_id}")
  dst = tempfile.mkdtemp(prefix="hub-")
  for name in os.listdir(src):
    if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
      shutil.copy(os.path.join(src, name), dst)
  return dst

huggingface_hub.snapshot_download = snapshot_download
'''


@pytest.mark.slow
def test_one_process_per_host_downloads_and_a_failed_download_stops_every_process(tmp_path):
  pytest.importorskip("torch")
  from conftest import tiny_hf_model
  from test_multiprocess import free_port
  hub = tmp_path / "hub"
  tiny_hf_model(vocab_size=512).save_pretrained(hub / "tiny", safe_serialization=True)
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(HUB_STANDIN)
  log = tmp_path / "hub.log"

  def run_two(repo: str, out: str) -> list[tuple[int, str]]:
    port = free_port()
    sets = _rm_sets(tmp_path, 2, **{"mesh.fsdp": 1}) + [f"model.source=hf:org/{repo}"]
    procs = [subprocess.Popen(_cmd("train-rm", _config(tmp_path), out, sets + [
        f"dist.coordinator=127.0.0.1:{port}", "dist.num_processes=2", f"dist.process_id={i}"]),
        env={**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV.get('PYTHONPATH', '')}", "HUB_DIR": str(hub),
             "HUB_LOG": str(log), "HS2P_PROCESS": str(i)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    return [(p.wait(timeout=600), p.communicate()[1]) for p in procs]

  results = run_two("tiny", str(tmp_path / "ok"))
  assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
  fetches = log.read_text().splitlines()
  # one process of the host fetched the config (architecture), then the weights; the other waited
  assert [f.split()[0] for f in fetches] == ["0", "0"] and "*.safetensors" in fetches[1], fetches
  log.unlink()
  results = run_two("missing", str(tmp_path / "missing"))
  for rc, err in results:  # every process: one line naming the source, the process and the hub's answer
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "model.source=hf:org/missing: process 0 on " in last and "Repository Not Found" in last, err
    assert "Traceback" not in err
  assert len(log.read_text().splitlines()) == 1
