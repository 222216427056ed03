"""`hs2p plan`: the analytic breakdown against hand computations (Llama-3.1-70B on v5p and 8x H100),
and the compiled path end to end on the tiny preset with 2 virtual CPU devices."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hs2p_jax import cli
from hs2p_jax.commands.plan import build_report
from hs2p_jax.config import RunConfig, load
from hs2p_jax.errors import UserError
from hs2p_jax.model.config import PRESETS
from hs2p_jax.plan import target as plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9

# The paper's 70B setting: 4096-token sequences, bf16 compute, full remat.
LLAMA_70B = ["model.preset=llama-3.1-70b", "model.dtype=bfloat16", "model.remat=full", "data.max_length=4096",
             "train.objective=regression", "train.batch_size=128"]


def report_for(overrides: list[str], chip: str, devices: int) -> dict:
  cfg = load(RunConfig, None, overrides)
  return build_report(cfg, "test", plan.resolve_target(chip, devices, cfg.mesh), "none")


def llama_70b_counts(num_attributes: int = 9) -> tuple[int, int]:
  """(matrix params, the replicated rest: norms and head bias) of the 70B reward model, by hand."""
  c = PRESETS["llama-3.1-70b"]
  d, v, f, n_layers = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_layers
  attn = d * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  matrices = d * v + n_layers * (attn + 3 * d * f) + d * num_attributes  # embed, layers, head kernel
  vectors = n_layers * 2 * d + d + num_attributes                           # norms, head bias
  # The causal LM has an untied LM head (d * V) where the reward model has its small head.
  assert matrices + vectors - d * num_attributes - num_attributes + d * v == c.num_params()
  return matrices, vectors


def test_70b_param_count_matches_the_formula():
  matrices, vectors = llama_70b_counts()
  r = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=128"], "v5p", 128)
  assert r["model"]["params"] == matrices + vectors
  assert abs(PRESETS["llama-3.1-70b"].num_params() - 70.55e9) < 0.01e9  # with its LM head: "70B"


def test_70b_regression_fits_a_v5p_with_fsdp_128():
  matrices, vectors = llama_70b_counts()
  r = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=128", "train.micro_batch_size=128"], "v5p", 128)
  a = r["analytic"]
  # Every matrix is split over fsdp on its `embed` dimension (8192 / 128); norms and the head bias are replicated.
  assert a["params"] == 4 * (matrices // 128 + vectors)
  assert a["optimizer"] == 8 * (matrices // 128 + vectors) + 2 * 4  # mu, nu + two int32 step counts
  assert a["gradients"] == a["params"]  # one micro-batch: no separate accumulator
  assert 8e9 < a["params"] + a["optimizer"] + a["gradients"] < 9e9  # 16 bytes x 69.5e9 / 128
  assert a["activation_terms"]["rows_per_device"] == 1
  assert a["activation_terms"]["saved_per_layer"] == 4096 * 8192 * 2  # remat=full keeps each layer's bf16 input
  assert a["activation_terms"]["attention_transient"] == 64 * 4096 * 4096 * (4 + 4 + 2)
  assert r["target"]["slice"] == "v5p-256" and r["target"]["hbm"] == 95 * 2**30
  v = r["verdict"]
  assert v["fits"] and v["verdict"] == "fits" and v["basis"] == "analytic"
  assert v["headroom"] == 95 * 2**30 - a["total"]
  assert r["warnings"] == []


def test_70b_regression_does_not_fit_8_h100s():
  matrices, vectors = llama_70b_counts()
  r = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=8", "train.micro_batch_size=8"], "h100", 8)
  a = r["analytic"]
  assert a["params"] == 4 * (matrices // 8 + vectors)
  assert a["optimizer"] == 8 * (matrices // 8 + vectors) + 8
  assert a["gradients"] == 2 * a["params"]  # 16 micro-batches: accumulator + micro-batch gradient
  # float32 params + AdamW = 12 bytes/param: about 104 GB per device before gradients and activations.
  assert 100 * GB < a["params"] + a["optimizer"] < 110 * GB
  v = r["verdict"]
  assert v["fits"] is False and v["verdict"] == "does not fit" and v["headroom"] < 0
  assert any("at least" in w and "h100" in w for w in r["warnings"])  # how many devices the state needs
  assert any("XLA_PYTHON_CLIENT_MEM_FRACTION" in w for w in r["warnings"])


@pytest.mark.parametrize("config, chip, devices", [
    ("llama-3.1-70b/regression_helpfulness_lora.yaml", "v5p", 4),  # v5p-8: 4 chips
    ("llama-3.1-70b/bt_scaled_from_regression_lora.yaml", "v5p", 4),
    ("llama-3.1-8b/bt_scaled_from_regression_lora.yaml", "h100", 1)])
def test_the_lora_rows_fit_their_slices(config, chip, devices):
  """The 70B reward model on adapters fits one v5p-8 slice (full tuning needs v5p-256), the 8B one
  H100: the base in bfloat16 and kept once, AdamW state for the adapters and the head only."""
  cfg = load(RunConfig, os.path.join(REPO, "configs/paper", config))
  r = build_report(cfg, "test", plan.resolve_target(chip, devices, cfg.mesh), "none")
  a, model = r["analytic"], cfg.model
  assert model.lora.rank == 16 and r["verdict"]["verdict"] == "fits", r["verdict"]
  n = PRESETS[model.preset].num_params()
  assert 2 * n / devices * 0.9 < a["frozen_base"] < 2 * n / devices  # bf16, split over the chips (no LM head)
  assert a["optimizer"] == pytest.approx(2 * a["params"], rel=1e-3) and a["params"] < 0.02 * a["frozen_base"]
  full = build_report(load(RunConfig, os.path.join(REPO, "configs/paper", config), ["model.lora.rank=0"]), "test",
                      plan.resolve_target(chip, devices, cfg.mesh), "none")
  assert full["verdict"]["verdict"] == "does not fit"
  # model FLOPs: no weight gradient for the frozen base (4N + 6 N_lora per token against 6N)
  assert 0.6 < a["model_flops"] / full["analytic"]["model_flops"] < 0.75


def test_tensor_parallel_splits_heads_and_mlp():
  fsdp = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=8"], "h200", 8)["analytic"]
  mixed = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"], "h200", 8)["analytic"]
  # Every layer matrix is still split 8 ways (only the small head kernel has no tensor-split dimension).
  assert 0 < mixed["params"] - fsdp["params"] < 2**20
  act_f, act_m = fsdp["activation_terms"], mixed["activation_terms"]
  assert (act_f["rows_per_device"], act_m["rows_per_device"]) == (16, 32)  # the batch is split over fsdp only
  # Twice the rows per device, half the heads and half the MLP width: the same transients.
  assert act_m["attention_transient"] == act_f["attention_transient"]
  assert act_m["mlp_transient"] == act_f["mlp_transient"]


def test_a_micro_batch_the_mesh_cannot_split_is_padded_and_reported():
  r = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=128", "train.micro_batch_size=8"], "v5p", 128)
  # 8 rows padded to 128 (as the loader pads them): one row per device, never all 8 on every device
  assert r["analytic"]["activation_terms"]["rows_per_device"] == 1
  assert (r["batch"]["rows"], r["batch"]["real_rows"]) == (128, 8)
  assert any("padded to 128" in w and "94%" in w and "multiple of 128" in w for w in r["warnings"])


def test_model_flops_per_device_and_step_time():
  from hs2p_jax.roofline.flops import train_flops
  c = PRESETS["llama-3.1-70b"]
  r = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=128", "train.micro_batch_size=128"], "v5p", 128)
  a = r["analytic"]
  n = c.num_layers * (c.hidden_size * c.head_dim * 2 * (c.num_heads + c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size)
  by_hand = 6 * n * 128 * 4096 + 12 * c.num_layers * 4096 ** 2 * c.num_heads * c.head_dim * 128
  assert a["model_flops"] == pytest.approx(by_hand) == train_flops(c.replace(dtype="bfloat16"), 128, 4096)
  assert a["model_flops_per_device"] == pytest.approx(by_hand / 128)
  assert a["step_seconds_at_50_mfu"] == pytest.approx(by_hand / 128 / (0.5 * 459e12))
  assert r["model"]["attention"] == "reference" and r["model"]["attention_config"] == "reference"
  auto = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=128", "model.attention=auto"], "v5p", 128)
  assert auto["model"]["attention"] == "splash" and auto["analytic"]["activation_terms"]["attention_transient"] == 0
  gpu = report_for(LLAMA_70B + ["mesh.data=1", "mesh.fsdp=8", "model.attention=auto"], "h100", 8)
  assert gpu["model"]["attention"] == "cudnn"
  assert gpu["analytic"]["activation_terms"]["attention_transient"] == 16 * 4096 * 4096 * 2  # the mask's bias


def test_the_architecture_comes_from_a_hugging_face_config(tmp_path):
  from conftest import TINY_HF

  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3, **TINY_HF}))
  r = report_for([f"model.source=hf:{tmp_path}", "data.max_length=64", "mesh.data=2"], "h100", 2)
  d, v, f, n_layers = 64, 256, 160, 3
  matrices = d * v + n_layers * (d * 16 * (2 * 4 + 2 * 2) + 3 * d * f) + d * 9
  assert r["model"]["name"] == f"model.source=hf:{tmp_path}" and r["model"]["layers"] == n_layers
  assert r["model"]["params"] == matrices + n_layers * 2 * d + d + 9
  assert r["analytic"]["params"] == 4 * r["model"]["params"]  # data parallel: everything replicated


def test_targets():
  t = plan.resolve_target("v5p-128", None, load(RunConfig, None, ["mesh.data=-1"]).mesh)
  assert (t.devices, t.mesh, t.slice_name, t.topology) == (64, (64, 1, 1), "v5p-128", "v5p:4x4x4")
  assert plan.resolve_target("v5e-16", None, load(RunConfig, None, []).mesh).devices == 16
  assert plan.resolve_target(None, None, load(RunConfig, None, ["mesh.data=2", "mesh.fsdp=2"]).mesh).devices == 4
  mesh = load(RunConfig, None, []).mesh
  for chip, devices, message in [("tpu9", None, "unknown"), ("h100-8", None, "TPU slice"),
                                 ("v5p-16", 4, "disagrees"), ("h100", 0, "positive")]:
    with pytest.raises(UserError, match=message):
      plan.resolve_target(chip, devices, mesh)


def test_user_errors_exit_2(tmp_path, capsys):
  path = tmp_path / "lm.yaml"
  path.write_text("model:\n  preset: tiny\n  kind: lm\n")
  assert cli.main(["plan", "--config", str(path)]) == 2
  assert "hs2p plan covers reward-model (model.kind=reward), REINFORCE" in capsys.readouterr().err
  path.write_text("model:\n  preset: tiny\n")
  assert cli.main(["plan", "--config", str(path), "--chip", "v9"]) == 2


def _run_plan(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "hs2p_jax", "plan", *args], capture_output=True, text=True,
                        env=env, timeout=300, cwd=REPO)


TINY = """\
model:
  preset: tiny
  num_layers: 2
data:
  max_length: 64
train:
  objective: bt
  batch_size: 8
  micro_batch_size: 4
mesh:
  data: 1
  fsdp: -1
"""


def test_cli_compiles_the_tiny_step_on_2_cpu_devices(tmp_path):
  cfg = tmp_path / "tiny.yaml"
  cfg.write_text(TINY)
  out = tmp_path / "plan"
  proc = _run_plan(["--config", str(cfg), "--devices", "2", "--chip", "v5e", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout)
  assert json.loads((out / "plan.json").read_text()) == report
  c, a = report["compiled"], report["analytic"]
  assert c["status"] == "ok" and c["compiler"].startswith("host CPU (2 ") and c["layers_compiled"] == [2]
  # The compiled arguments are the params, optimizer state and batch on one device; jit drops only
  # the batch's unused example_id ([k, N] int32), so they agree to within 1%.
  assert abs(c["argument"] - (a["params"] + a["optimizer"] + a["batch"])) <= 0.01 * c["argument"]
  assert c["alias"] > a["params"] + a["optimizer"] - 1024  # params and optimizer state are donated
  assert c["temp"] > a["gradients"]
  # the compiled FLOPs of the step (remat none: forward + backward) against the model's share
  assert c["flops_layers_compiled"] == [2] and 0.8 < c["flops_ratio"] < 2.5
  assert a["model_flops_per_device"] == pytest.approx(a["model_flops"] / 2)
  assert report["verdict"]["verdict"] == "fits" and report["target"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  for line in ("params (float32)", "optimizer (AdamW", "activations (estimate)", "per device (compiled: host CPU",
               "FITS (analytic)"):
    assert line in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="TPU AOT compilation needs libtpu")
def test_tpu_aot_compile_on_a_v5p_topology(tmp_path):
  """The tiny step compiled by libtpu for 4 compile-only v5p chips (v5p:2x2x1), attention auto -> splash."""
  cfg = tmp_path / "tiny.yaml"
  cfg.write_text(TINY.replace("  num_layers: 2\n", "  num_layers: 2\n  attention: auto\n"))
  proc = _run_plan(["--config", str(cfg), "--chip", "v5p-8", "--compile", "tpu", "--set", "data.max_length=256"])
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout)
  c = report["compiled"]
  assert c["status"] == "ok" and c["compiler"].startswith("tpu (v5p:2x2x1")
  assert report["verdict"]["basis"] == "compiled for the chip" and report["verdict"]["fits"]
  assert report["model"]["attention"] == "splash" and c["kernel_flops_per_device"] > 0
  assert 0.8 < c["flops_ratio"] < 2.5 and report["warnings"] == []


def test_cli_plans_a_dpo_step():
  """The quickstart DPO step compiled on 2 CPU devices; model FLOPs by hand."""
  proc = _run_plan(["--config", os.path.join(REPO, "configs/quickstart/dpo.yaml"), "--devices", "2",
                    "--chip", "h100", "--set", "mesh.data=2"])
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout)
  c, a, b = r["compiled"], r["analytic"], r["batch"]
  assert r["kind"] == "dpo" and c["status"] == "ok" and r["objective"] == "dpo (scaled, beta 0.1)"
  res = a["resident"]
  assert res["policy"] == res["reference"] == 4 * r["model"]["params"]  # replicated float32
  cfg = PRESETS["tiny"]
  n = cfg.num_layers * (cfg.hidden_size * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads)
                        + 3 * cfg.hidden_size * cfg.intermediate_size)
  rows, t = b["real_rows"] * b["micro_batches"], b["seq_len"]
  attn = 4 * cfg.num_layers * t * t * cfg.num_heads * cfg.head_dim * rows
  head = 2 * cfg.hidden_size * cfg.vocab_size * rows * t
  f = a["model_flops"]
  assert f["policy"] == pytest.approx(6 * n * rows * t + 3 * attn + 3 * head)
  assert f["reference"] == pytest.approx(2 * n * rows * t + attn + head)
  assert a["model_flops_per_device"] == pytest.approx(f["total"] / 2)
  assert 0.8 < c["flops_ratio"] < 1.25 and c["peak"] > a["resident_total"]
  assert "compiling the DPO step" in proc.stderr and r["verdict"]["fits"]


def test_pair_tokens_give_the_rows_the_loader_packs_such_pairs_into(tmp_path):
  """`--pair-tokens P,R`: rows of a micro-batch of such pairs with and without the prompt shared
  (first fit of equal units: whole units per row, rows bucketed like the loader's), model FLOPs by hand."""
  from hs2p_jax.roofline.flops import decoder_matmul_params
  from hs2p_jax.data.batching import bucket_rows
  cfg = tmp_path / "tiny.yaml"
  cfg.write_text(TINY)
  t, split, pairs = 256, 4, 8
  for p, r in ((60, 20), (200, 30), (10, 200)):
    reports = {}
    for share in (False, True):
      proc = _run_plan(["--config", str(cfg), "--devices", str(split), "--compile", "none", "--pair-tokens", f"{p},{r}",
                        "--set", f"data.max_length={t}", "data.packing=true", f"data.share_prompt={share}",
                        f"train.micro_batch_size={pairs}"])
      assert proc.returncode == 0, proc.stderr
      reports[share] = json.loads(proc.stdout)
    unshared = -(-2 * pairs // (t // (p + r)))
    fits = p + 2 * r <= t
    shared = -(-pairs // (t // (p + 2 * r))) if fits else unshared
    pk = reports[True]["packing"]
    assert (pk["rows_unshared"], pk["rows_shared"]) == (bucket_rows(unshared, split, 2 * pairs, "pow2"),
                                                        bucket_rows(shared, split, 2 * pairs, "pow2"))
    assert reports[False]["packing"]["rows"] == pk["rows_unshared"] and pk["rows"] == pk["rows_shared"]
    c = PRESETS["tiny"].replace(num_layers=2)
    attn = lambda n: 12 * c.num_layers * n * c.num_heads * c.head_dim  # noqa: E731  per token pair
    want = 6 * decoder_matmul_params(c) * (p + 2 * r) + attn(2 * (p + r) ** 2 - p * p) if fits else \
        6 * decoder_matmul_params(c) * 2 * (p + r) + attn(2 * (p + r) ** 2)
    assert reports[True]["analytic"]["model_flops"] == pytest.approx(want * pairs)  # one micro-batch a step
  proc = _run_plan(["--config", str(cfg), "--compile", "none", "--pair-tokens", "60,20"])
  assert proc.returncode != 0 and "--pair-tokens: for packed preference-pair configs" in proc.stderr
  proc = _run_plan(["--config", str(cfg), "--compile", "none", "--pair-tokens", "60"])
  assert proc.returncode != 0 and "expected PROMPT,RESPONSE" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="TPU AOT compilation needs libtpu")
def test_a_shared_prompt_plan_compiles_splash_on_its_own_rows_with_fewer_flops(tmp_path):
  """Packed pairs sharing their prompt, compiled by libtpu for v5p:2x2x1: splash (once per branch),
  the compiled step at the rows such pairs take (4 instead of 8), fewer FLOPs than unshared."""
  cfg = tmp_path / "tiny.yaml"
  cfg.write_text(TINY.replace("  num_layers: 2\n", "  num_layers: 2\n  attention: auto\n"))
  reports = {}
  for share in (False, True):
    proc = _run_plan(["--config", str(cfg), "--chip", "v5p-8", "--compile", "tpu", "--pair-tokens", "60,20",
                      "--set", "data.max_length=256", "data.packing=true", f"data.share_prompt={share}",
                      "train.micro_batch_size=8"])
    assert proc.returncode == 0, proc.stderr
    reports[share] = json.loads(proc.stdout)
  plain, shared = reports[False], reports[True]
  assert plain["model"]["attention"] == shared["model"]["attention"] == "splash"
  assert (plain["packing"]["rows"], shared["packing"]["rows"]) == (8, 4)
  cp, cs = plain["compiled"], shared["compiled"]
  assert cp["status"] == cs["status"] == "ok" and shared["verdict"]["fits"]
  # the kernel runs twice on half the rows: the same attention; XLA's matmuls on half the rows
  assert cs["kernel_flops_per_device"] == pytest.approx(cp["kernel_flops_per_device"])
  assert cs["flops_per_device"] < 0.6 * cp["flops_per_device"]
  assert shared["analytic"]["model_flops"] < plain["analytic"]["model_flops"]


def test_memory_extrapolated_to_depth_never_shrinks_below_the_deeper_compile():
  """Figures at 2 and 4 layers go linearly to 80; a figure smaller at 4 layers than at 2 (XLA
  scheduling the shallower program differently) stays at the 4-layer figure rather than going
  negative (the 70B PPO values phase's temporaries: 3.14 GB at 2 layers, 2.26 at 4)."""
  from hs2p_jax.plan import compile as comp
  assert comp.memory_at([10, 14], [2, 4], 80) == comp.linear([10, 14], [2, 4], 80) == 166
  assert comp.memory_at([3_142_449_088, 2_255_222_976], [2, 4], 80) == 2_255_222_976
  assert comp.memory_at([7], [3], 3) == 7
