"""`hs2p bench`: valid JSON with positive throughput on the tiny preset, and the FLOP count by hand."""

from __future__ import annotations

import importlib.util
import json

import numpy as np

from hs2p_jax.cli import main
from hs2p_jax.model.config import preset
from hs2p_jax.roofline.flops import device_family, peak_flops, sample_step_bytes, train_flops


def _run(capsys, argv: list[str]) -> dict:
  assert main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  return json.loads(lines[0])


def test_bench_rm_cli_prints_json(capsys):
  torch = "--torch" if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers") else "--json"
  res = _run(capsys, ["bench", "rm", "--model", "tiny", "--pairs", "1", "--seq", "32", "--steps", "1", torch, "--json"])
  assert res["tokens_per_s"] > 0 and res["tokens_per_step"] == 64
  assert res["compile_s"] > 0 and res["peak_rss_bytes"] > 0
  assert res["mfu"] is None  # no known peak for CPU
  assert res["model_flops_per_step"] == train_flops(preset("tiny"), 2, 32)
  if torch == "--torch":
    assert res["torch"]["tokens_per_s"] > 0
    assert list(res)[-1] == "jax_over_torch" and res["jax_over_torch"] > 0


def test_bench_sample_cli_prints_json(capsys):
  res = _run(capsys, ["bench", "sample", "--model", "tiny", "--batch", "2", "--seq", "8", "--new-tokens", "4",
                      "--steps", "1", "--json"])
  assert res["tokens_per_s"] > 0 and res["decode_step_s"] is not None


def test_bench_data_cli_prints_json(capsys):
  res = _run(capsys, ["bench", "data", "--batch", "4", "--seq", "256", "--json"])
  assert res["tokens_per_s"] > 0 and res["pairs"] > 0


def test_train_flops_by_hand():
  cfg = preset("tiny")  # L=4, D=128, F=384, H=4, Hkv=2, Dh=32
  n = 4 * (128 * 32 * (2 * 4 + 2 * 2) + 3 * 128 * 384)
  assert n == 786432
  rows, t = 4, 64
  assert train_flops(cfg, rows, t) == 6 * n * rows * t + 12 * 4 * t * t * (4 * 32) * rows == 1308622848


def test_peaks_and_bytes():
  assert device_family("NVIDIA H100 80GB HBM3") == "h100" and device_family("TPU v5 lite") == "v5e"
  assert device_family("cpu") is None and peak_flops("cpu", "float32") is None
  assert peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  cfg = preset("tiny")
  kv = 2 * 4 * 2 * 10 * 2 * 32 * 4
  assert sample_step_bytes(cfg, batch=2, context=10) == 4 * cfg.num_params(with_lm_head=True) + kv


def test_shared_prompt_bench_batch_is_the_pipeline_layout():
  from hs2p_jax.bench.jax_runs import rm_batch
  b = rm_batch(2, 16, 256, share_prompt=10)
  assert b["input_ids"].shape == (1, 2, 22)  # one pair per row: 10 prompt + 6 chosen + 6 rejected tokens
  np.testing.assert_array_equal(b["score_row"][0], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(b["score_index"][0], [[15, 21], [15, 21]])
  np.testing.assert_array_equal(b["branch_ids"][0, 0], [0] * 10 + [1] * 6 + [2] * 6)
  np.testing.assert_array_equal(b["positions"][0, 0], [*range(16), *range(10, 16)])
  assert (b["input_ids"][0, :, 10] != b["input_ids"][0, :, 16]).all()  # the responses differ at once
