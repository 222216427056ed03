"""The shared training loop on a toy trainer (least squares by SGD): every record logged once,
resume after a crash equal to an uninterrupted run, the non-finite guard, unreadable checkpoints."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.errors import UserError
from hs2p_jax.train import loop as loop_lib


class Crash(Exception):
  pass


class ToyLoader:
  """A batch source whose state is the next step to read."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.x, self.y, self.next = x, y, 0

  def get_state(self):
    return {"step": self.next}

  def set_state(self, state):
    self.next = state["step"]

  def batch(self, step: int):
    assert step == self.next + 1, "the loop must read batches in order, once each"
    self.next = step
    i = (step - 1) * 4 % len(self.x)
    return self.x[i:i + 8], self.y[i:i + 8]


@jax.jit
def _sgd(w, m, x, y, lr):
  def loss_fn(w):
    return jnp.mean((x @ w - y) ** 2)
  loss, g = jax.value_and_grad(loss_fn)(w)
  m = 0.5 * m + g
  return w - lr * m, m, {"loss": loss, "grad_norm": jnp.linalg.norm(g)}


class ToyTrainer:
  def __init__(self, out_dir, lr=0.15, crash_at=None, nan_from=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32)
    self.loader = ToyLoader(x, y)
    self.params = self.opt_state = None
    self.out_dir, self.lr, self.crash_at, self.nan_from = out_dir, lr, crash_at, nan_from
    self.calls: list[str] = []

  def checkpoint_target(self):
    sds = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return {"params": sds, "opt_state": sds}

  def snapshot_targets(self):
    return {}

  def start(self, restored, snapshots):
    self.calls.append("start " + ("restored" if restored is not None else "fresh"))
    state = restored or {"params": jnp.zeros(3), "opt_state": jnp.zeros(3)}
    self.params, self.opt_state = state["params"], state["opt_state"]

  def checkpoint_state(self):
    return {"params": self.params, "opt_state": self.opt_state}

  def provenance(self):
    self.calls.append("provenance")

  def begin(self, start):
    self.calls.append(f"begin {start}")

  def step(self, step):
    if step == self.crash_at:
      raise Crash(step)
    x, y = self.loader.batch(step)
    if self.nan_from is not None and step >= self.nan_from:
      x = x * np.float32("nan")
    self.params, self.opt_state, metrics = _sgd(self.params, self.opt_state, x, y, self.lr)
    return {**metrics, "_samples": [{"text": f"sample of step {step}"}]} if step % 3 == 0 else metrics

  def record(self, step, metrics):
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def evaluate(self):
    self.calls.append("evaluate")
    return {"val": float(jnp.sum(self.params))}

  def save_final(self):
    self.calls.append("final")
    np.save(os.path.join(self.out_dir, "final.npy"), np.asarray(self.params))


def _records(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps_saved(out):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(out, "checkpoints", "*")) if
                os.path.basename(p).isdigit())


LOOP = loop_lib.LoopConfig(steps=12, log_every=2, save_every=4, keep_checkpoints=3, eval_every=5)


def test_loop_logs_saves_and_finishes(tmp_path):
  out = str(tmp_path / "run")
  t = ToyTrainer(out)
  last = loop_lib.run(t, LOOP, out)
  recs = _records(out)
  assert [r["step"] for r in recs] == [2, 4, 5, 6, 8, 10, 12]  # log_every grid + evaluations (5, 10, 12)
  assert [r["step"] for r in recs if "val" in r] == [5, 10, 12] and t.calls.count("evaluate") == 3
  assert last == recs[-1]
  assert recs[-1]["loss"] < recs[0]["loss"] / 10  # it really trains
  assert t.calls[:3] == ["provenance", "start fresh", "begin 0"] and t.calls[-1] == "final"
  assert _steps_saved(out) == [4, 8, 12]


def test_loop_resume_after_crash_equals_uninterrupted(tmp_path):
  ref_dir = str(tmp_path / "ref")
  loop_lib.run(ToyTrainer(ref_dir), LOOP, ref_dir)
  out = str(tmp_path / "run")
  with pytest.raises(Crash):
    loop_lib.run(ToyTrainer(out, crash_at=7), LOOP, out)  # logged 2, 4, 5, 6; saved 4
  assert [r["step"] for r in _records(out)] == [2, 4, 5, 6]
  assert not os.path.exists(os.path.join(out, "final.npy"))
  t = ToyTrainer(out)
  loop_lib.run(t, LOOP, out)
  assert t.calls[1:3] == ["start restored", "begin 4"]
  recs = _records(out)
  assert [r["step"] for r in recs] == [2, 4, 5, 6, 8, 10, 12]  # each step once
  with open(os.path.join(out, "samples.jsonl")) as f:  # written at 3 and 6 before the crash, 6 again after it
    assert [json.loads(line) for line in f] == [{"step": s, "text": f"sample of step {s}"} for s in (3, 6, 9, 12)]
  ref = _records(ref_dir)
  for a, b in zip(recs, ref):
    assert a["step"] == b["step"]
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-6)
  np.testing.assert_allclose(np.load(os.path.join(out, "final.npy")), np.load(os.path.join(ref_dir, "final.npy")),
                             rtol=1e-6)


def test_loop_stops_at_first_non_finite_step(tmp_path):
  out = str(tmp_path / "run")
  t = ToyTrainer(out, nan_from=5)
  loop = loop_lib.LoopConfig(steps=12, log_every=4, save_every=3, keep_checkpoints=3)
  # step 5 turns NaN; the save at step 6 comes before the next log (8): the guard stops it there
  with pytest.raises(UserError, match=r"^step 5: the loss or gradient norm is not finite.*\(step 3\)"):
    loop_lib.run(t, loop, out)
  assert _steps_saved(out) == [3]  # no checkpoint of the NaN params
  assert "final" not in t.calls and not os.path.exists(os.path.join(out, "final.npy"))
  assert [r["step"] for r in _records(out)] == [4]
  t2 = ToyTrainer(out)  # resume picks up the last good checkpoint
  loop_lib.run(t2, loop, out)
  assert t2.calls[1:3] == ["start restored", "begin 3"] and "final" in t2.calls
  assert [r["step"] for r in _records(out)] == [4, 8, 12]


def test_loop_falls_back_from_an_unreadable_checkpoint(tmp_path, capsys):
  out = str(tmp_path / "run")
  with pytest.raises(Crash):
    loop_lib.run(ToyTrainer(out, crash_at=10), LOOP, out)
  assert _steps_saved(out) == [4, 8]
  damaged = [p for p in glob.glob(os.path.join(out, "checkpoints", "8", "**", "*"), recursive=True)
             if os.path.isfile(p) and "state" in p and os.path.getsize(p) > 0]
  assert damaged
  for p in damaged:
    with open(p, "r+b") as f:
      f.truncate(1)
  t = ToyTrainer(out)
  loop_lib.run(t, LOOP, out)
  err = capsys.readouterr().err
  assert "checkpoints/8: unreadable" in err and "trying the previous checkpoint" in err
  assert t.calls[1:3] == ["start restored", "begin 4"]
  assert [r["step"] for r in _records(out)] == [2, 4, 5, 6, 8, 10, 12]
