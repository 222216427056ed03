"""Losses against numpy: values, gradients (closed form), shapes, dtypes, edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hs2p_jax.losses import bt_loss, pairwise_accuracy, regression_loss


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_bt(c, r, m, variant):
  d = np.asarray(c, np.float64) - np.asarray(r, np.float64)
  m = np.asarray(m, np.float64)
  if variant == "regular":
    return np.mean(-np_log_sigmoid(d))
  if variant == "margin":
    return np.mean(-np_log_sigmoid(d - m))
  return np.mean(m * -np_log_sigmoid(d))


def np_sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


RNG = np.random.RandomState(0)
C, R = RNG.randn(16).astype(np.float32) * 2, RNG.randn(16).astype(np.float32) * 2
M = RNG.randint(0, 4, 16).astype(np.float32)


def test_regression_loss_is_masked_mse():
  pred, target = RNG.randn(6, 9).astype(np.float32), RNG.randint(0, 5, (6, 9)).astype(np.float32)
  mask = RNG.rand(6, 9) > 0.6
  expected = ((pred - target) ** 2)[mask].mean()
  assert float(regression_loss(pred, target, mask)) == pytest.approx(expected, rel=1e-6)
  # only helpfulness (index 4) labelled, as the helpfulness-only SteerLM variant
  only4 = np.zeros((6, 9), bool)
  only4[:, 4] = True
  assert float(regression_loss(pred, target, only4)) == pytest.approx(((pred[:, 4] - target[:, 4]) ** 2).mean(), rel=1e-6)
  assert float(regression_loss(pred, target, np.zeros((6, 9), bool))) == 0.0
  with pytest.raises(ValueError):
    regression_loss(pred, target[:, :5], mask)


@pytest.mark.parametrize("variant", ["regular", "margin", "scaled"])
def test_bt_loss_matches_numpy(variant):
  assert float(bt_loss(C, R, M, variant)) == pytest.approx(np_bt(C, R, M, variant), rel=1e-5)
  assert float(jax.jit(bt_loss, static_argnums=3)(C, R, M, variant)) == pytest.approx(np_bt(C, R, M, variant), rel=1e-5)


@pytest.mark.parametrize("variant", ["regular", "margin", "scaled"])
def test_bt_gradients_match_closed_form(variant):
  gc, gr = jax.grad(bt_loss, argnums=(0, 1))(C, R, M, variant)
  d = C.astype(np.float64) - R
  n = len(C)
  if variant == "regular":
    expected = -(1 - np_sigmoid(d)) / n
  elif variant == "margin":
    expected = -(1 - np_sigmoid(d - M)) / n
  else:
    expected = -M * (1 - np_sigmoid(d)) / n
  np.testing.assert_allclose(np.asarray(gc), expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(gr), -expected, rtol=1e-5, atol=1e-8)


def test_scaled_with_zero_magnitude_is_zero_and_regular_ignores_magnitude():
  zeros = np.zeros(16, np.float32)
  assert float(bt_loss(C, R, zeros, "scaled")) == 0.0
  assert float(bt_loss(C, R, zeros, "regular")) == float(bt_loss(C, R, M, "regular"))


def test_large_margins_stay_finite_and_accurate():
  c = np.array([1000.0, -1000.0, 50.0], np.float32)
  r = np.zeros(3, np.float32)
  m = np.array([3.0, 3.0, 100.0], np.float32)
  for variant in ("regular", "margin", "scaled"):
    val = float(bt_loss(c, r, m, variant))
    assert np.isfinite(val)
    assert val == pytest.approx(np_bt(c, r, m, variant), rel=1e-5)
    g = jax.grad(bt_loss)(c, r, m, variant)
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_do_not_overflow(dtype):
  c = jnp.asarray([60000.0 if dtype == jnp.float16 else 3e38, -5.0, 2.0], dtype)
  r = jnp.asarray([-60000.0 if dtype == jnp.float16 else -3e38, 5.0, 1.0], dtype)
  m = jnp.asarray([3, 2, 1], dtype)
  for variant in ("regular", "margin", "scaled"):
    val = bt_loss(c, r, m, variant)
    assert val.dtype == jnp.float32 and np.isfinite(float(val))
    ref = np_bt(np.asarray(c, np.float32), np.asarray(r, np.float32), np.asarray(m, np.float32), variant)
    assert float(val) == pytest.approx(ref, rel=1e-3)


def test_shape_mismatch_refused_instead_of_broadcasting():
  # [B, 1] rewards against a [B] margin would silently broadcast to [B, B]
  with pytest.raises(ValueError, match="1-D"):
    bt_loss(C[:, None], R[:, None], M, "margin")
  with pytest.raises(ValueError):
    bt_loss(C, R[:8], M, "regular")
  with pytest.raises(ValueError, match="variant"):
    bt_loss(C, R, M, "hinge")


def test_mask_excludes_filler_pairs_and_accuracy_counts_ties_wrong():
  mask = np.arange(16) < 10
  assert float(bt_loss(C, R, M, "scaled", mask=mask)) == pytest.approx(np_bt(C[:10], R[:10], M[:10], "scaled"), rel=1e-5)
  c = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
  r = np.array([0.0, 2.0, 4.0, 0.0], np.float32)
  assert float(pairwise_accuracy(c, r)) == 0.5  # the tie (2.0 vs 2.0) is wrong
  assert float(pairwise_accuracy(c, r, mask=np.array([1, 1, 0, 0]))) == 0.5


def np_dpo(pc, pr, rc, rr, m, variant, beta):
  z = beta * ((np.float64(pc) - np.float64(rc)) - (np.float64(pr) - np.float64(rr)))
  m = np.asarray(m, np.float64)
  per = {"regular": -np_log_sigmoid(z), "margin": -np_log_sigmoid(z - m), "scaled": m * -np_log_sigmoid(z)}[variant]
  return np.mean(per)


@pytest.mark.parametrize("variant", ["regular", "margin", "scaled"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_loss_matches_numpy(variant, beta):
  from hs2p_jax.losses import dpo_loss
  rng = np.random.RandomState(7)
  pc, pr, rc, rr = (rng.randn(16).astype(np.float32) * 20 - 60 for _ in range(4))  # sequence log-probs
  want = np_dpo(pc, pr, rc, rr, M, variant, beta)
  assert float(dpo_loss(pc, pr, rc, rr, M, variant, beta)) == pytest.approx(want, rel=1e-5)
  jitted = jax.jit(dpo_loss, static_argnums=(5, 6))
  assert float(jitted(pc, pr, rc, rr, M, variant, beta)) == pytest.approx(want, rel=1e-5)
  # gradient in pi_chosen: -beta * sigmoid(-(z - margin)) / B (times m for scaled)
  z = beta * ((pc - rc) - (pr - rr)).astype(np.float64)
  shift = M if variant == "margin" else 0.0
  scale = M if variant == "scaled" else 1.0
  g = jax.grad(dpo_loss)(pc, pr, rc, rr, M, variant, beta)
  np.testing.assert_allclose(np.asarray(g), -beta * scale * np_sigmoid(-(z - shift)) / 16, rtol=1e-4, atol=1e-7)


def test_dpo_at_the_reference_is_log2_and_refuses_broadcasting():
  from hs2p_jax.losses import dpo_loss
  lp = RNG.randn(8).astype(np.float32) * 10
  other = RNG.randn(8).astype(np.float32) * 10
  assert float(dpo_loss(lp, other, lp, other, np.ones(8, np.float32), "regular", 0.1)) == pytest.approx(np.log(2))
  with pytest.raises(ValueError, match="1-D arrays of one shape"):
    dpo_loss(lp[:, None], other[:, None], lp[:, None], other[:, None], np.ones(8, np.float32), "regular", 0.1)
