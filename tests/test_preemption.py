"""Preemption: a notice (SIGTERM, on any process) saves the step every process agrees on and exits
with the resume status; the same command resumes there, logging each step once (2 processes through
jax's preemption service; REINFORCE on one process, through the SIGTERM handler); Ctrl-C takes the
same path, a second one exits at once; a relaunch loads its compiled steps from the persistent cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from hs2p_jax.train.metrics import read_metrics
from hs2p_jax.train.preemption import RESUME_STATUS, StopSignal

from test_faults import ENV, _cmd, _config, _rm_sets, _same_numbers, _saved_steps, _wait_for_step


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path):
  from test_multiprocess import free_port
  cfg, sets = _config(tmp_path), _rm_sets(tmp_path, 30, **{"mesh.fsdp": 1})

  def launch(out):
    port = free_port()
    return [subprocess.Popen(_cmd("train-rm", cfg, out, sets + [f"dist.coordinator=127.0.0.1:{port}",
                                                                "dist.num_processes=2", f"dist.process_id={i}"]),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]

  def finish(procs, status):
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [status] * 2, [e[-1500:] for e in errs]
    return errs

  straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
  finish(launch(straight), 0)
  procs = launch(out)
  _wait_for_step(out, 3, procs)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only: the preemption service tells process 0
  errs = finish(procs, RESUME_STATUS)
  (k,) = _saved_steps(out)
  assert 3 <= k < 30 and all(f"preempted at step {k}" in e for e in errs)
  finish(launch(out), 0)  # each process restores its own share of the data position
  _same_numbers(read_metrics(os.path.join(straight, "metrics.jsonl")),
                read_metrics(os.path.join(out, "metrics.jsonl")), ("loss", "grad_norm", "accuracy"), rel=1e-6)


@pytest.mark.slow
def test_reinforce_preempted_resumes_with_the_uninterrupted_numbers(tmp_path):
  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.model import preset
  from hs2p_jax.tokenizer import load_tokenizer
  from hs2p_jax.train.model_init import random_model
  rm_dir = str(tmp_path / "rm")
  rm = random_model("reward", preset("tiny", num_layers=1), 9, 0, None, ())
  save_model(rm_dir, rm, ModelMeta("reward", rm.cfg, template="chat"), load_tokenizer("bytes"))
  cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/quickstart/reinforce.yaml")
  sets = [f"reward_model={rm_dir}", "policy.num_layers=1", "reinforce.steps=20", "reinforce.save_every=1000",
          "reinforce.max_new_tokens=8", "reinforce.sample_every=3", "data.builtin_size=64", "mesh.data=1", "data.buckets=[128]"]
  straight = str(tmp_path / "straight")
  subprocess.run(_cmd("reinforce", cfg, straight, sets), env=ENV, check=True, capture_output=True)
  out = str(tmp_path / "run")
  proc = subprocess.Popen(_cmd("reinforce", cfg, out, sets), env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(out, 3, [proc])
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == RESUME_STATUS, err[-2000:]
  (k,) = _saved_steps(out)
  rerun = subprocess.run(_cmd("reinforce", cfg, out, sets), env=ENV, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  a, b = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (straight, out))
  _same_numbers(a, b, ("loss", "reward", "kl", "grad_norm"), rel=1e-5)
  samples = [[json.loads(line)["step"] for line in open(os.path.join(d, "samples.jsonl"), encoding="utf-8")]
             for d in (straight, out)]
  assert samples[1] == samples[0] and sorted(set(samples[0])) == list(range(3, 20, 3)) + [20] and 3 <= k < 20


@pytest.mark.slow
def test_a_relaunched_run_loads_its_steps_from_the_compile_cache(tmp_path):
  cache = tmp_path / "cache"
  env = {**ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the tiny model compiles in well under a second
  sets = _rm_sets(tmp_path, 2) + [f"dist.compile_cache={cache}"]
  entries = []
  for out in ("first", "second"):
    subprocess.run(_cmd("train-rm", _config(tmp_path), str(tmp_path / out), sets), env=env, check=True,
                   capture_output=True)
    entries.append(sorted((f, os.stat(cache / f).st_mtime_ns) for f in os.listdir(cache)))
  # the second run read every program from the cache: no entry new, none written again
  assert len(entries[0]) >= 2 and entries[1] == entries[0]


def test_ctrl_c_asks_for_a_saved_stop_and_a_second_one_exits_now():
  stop = StopSignal()
  try:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.reached(2) and stop.interrupted and stop.why == "interrupted (Ctrl-C)"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back as it was


@pytest.mark.slow
def test_ctrl_c_mid_run_saves_that_step_exits_75_and_the_rerun_logs_the_uninterrupted_losses(tmp_path):
  cfg, sets = _config(tmp_path), _rm_sets(tmp_path, 30)
  straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
  subprocess.run(_cmd("train-rm", cfg, straight, sets), env=ENV, check=True, capture_output=True)
  proc = subprocess.Popen(_cmd("train-rm", cfg, out, sets), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for_step(out, 3, [proc])
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == RESUME_STATUS, err[-2000:]
  (k,) = _saved_steps(out)  # save_every 1000: only the interrupted step
  assert 3 <= k < 30 and f"interrupted (Ctrl-C) at step {k}: saved" in err
  rerun = subprocess.run(_cmd("train-rm", cfg, out, sets), env=ENV, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  _same_numbers(read_metrics(os.path.join(straight, "metrics.jsonl")), read_metrics(os.path.join(out, "metrics.jsonl")),
                ("loss", "grad_norm", "accuracy"), rel=1e-6)
