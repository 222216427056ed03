"""`hs2p convert --to-hf DIR --reward SPEC`: the one-output reward model TRL, OpenRLHF and verl load
(`LlamaForSequenceClassification`, `num_labels=1`), its bias in config.json, read back by `load_hf`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import need_torch, padded_batch, requires_smollm2, torch_positions, write_jsonl

MIX = "helpfulness=0.65,correctness=0.8,coherence=0.45,complexity=0.55,verbosity=-0.4"


@pytest.mark.parametrize("spec", ["helpfulness", MIX])
def test_the_scalar_export_is_the_weighted_head_without_its_bias(tiny_hf_dir, tmp_path, spec):
  torch = need_torch()
  import transformers

  from hs2p_jax.convert import export_hf, load_hf
  from hs2p_jax.model.reward import ATTRIBUTES
  path, _ = tiny_hf_dir
  rm = load_hf(path, head="reward", num_attributes=9, seed=3)
  bias = np.linspace(-1.0, 1.0, 9).astype(np.float32)
  rm.head_bias[...] = bias
  w = np.zeros(9, np.float32)  # the spec's weights, read independently of the parser
  for item in (spec if "=" in spec else f"{spec}=1").split(","):
    name, value = item.split("=")
    w[ATTRIBUTES.index(name)] = float(value)
  from hs2p_jax.model.reward import reward_weights_from_spec
  out = tmp_path / "scalar"
  export_hf(rm, str(out), reward=reward_weights_from_spec(spec, 9))
  config = json.loads((out / "config.json").read_text())
  assert config["num_labels"] == 1 and config["architectures"] == ["LlamaForSequenceClassification"]
  assert config["hs2p_reward"]["bias"] == pytest.approx(float(bias @ w), abs=1e-6)
  assert config["hs2p_reward"]["weights"] == {ATTRIBUTES[i]: pytest.approx(float(w[i])) for i in np.nonzero(w)[0]}
  assert not (out / "hs2p_reward_head.safetensors").exists()

  ids, mask = padded_batch(np.random.RandomState(4), [13, 8, 11], 13, "right")
  ours = np.asarray(rm(ids, mask)) @ w  # what hs2p scores with these weights
  # as TRL loads a reward model: a one-label sequence classifier (no shape mismatch, nothing newly initialised)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=1)
  with torch.no_grad():
    theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(torch_positions(mask))).logits.numpy()
  assert theirs.shape == (3, 1)
  np.testing.assert_allclose(theirs[:, 0] + config["hs2p_reward"]["bias"], ours, atol=1e-4)

  back = load_hf(str(out), head="reward")  # the head's outputs read from the directory: 1
  assert back.num_attributes == 1
  np.testing.assert_allclose(np.asarray(back(ids, mask))[:, 0], ours, atol=1e-5)


def test_bad_reward_specs_and_lm_checkpoints_are_refused_by_name(tiny_hf_dir, tmp_path):
  from hs2p_jax.convert import export_hf, load_hf
  from hs2p_jax.errors import UserError
  from hs2p_jax.model.reward import reward_weights_from_spec
  with pytest.raises(UserError, match="'kindness' is not one of the head's outputs"):
    reward_weights_from_spec("helpfulness=1,kindness=2", 9)
  with pytest.raises(UserError, match="'verbosity=lots' is not ATTR=WEIGHT"):
    reward_weights_from_spec("verbosity=lots", 9)
  with pytest.raises(UserError, match="expected one of"):
    reward_weights_from_spec("niceness", 9)
  np.testing.assert_array_equal(reward_weights_from_spec("0=0.5,2=1", 3), [0.5, 0, 1])
  path, _ = tiny_hf_dir
  with pytest.raises(UserError, match="needs a reward model"):
    export_hf(load_hf(path), str(tmp_path / "x"), reward=np.ones(9, np.float32))
  assert not (tmp_path / "x").exists()


@pytest.mark.slow
@requires_smollm2
def test_smollm2_scalar_export_scores_what_hs2p_eval_scores(tmp_path):
  """A SmolLM2-shaped reward model (SmolLM2-135M's widths, heads, vocabulary and tokenizer; 4 layers,
  random weights): `hs2p eval --scores` and transformers' one-output model on the exported directory,
  the same pairs tokenized as eval tokenizes them: equal up to the recorded bias."""
  torch = need_torch()
  import transformers

  from hs2p_jax.checkpoint import ModelMeta, load_checkpoint_tokenizer, save_model
  from hs2p_jax.data.encode import encode
  from hs2p_jax.data.examples import PairExample
  from hs2p_jax.model import create, preset
  from hs2p_jax.tokenizer import load_tokenizer
  rm = create("reward", preset("smollm2-135m", num_layers=4), 9, seed=2)
  rm.head_bias[...] = np.arange(9, dtype=np.float32) / 4 - 1
  ckpt = str(tmp_path / "rm")
  save_model(ckpt, rm, ModelMeta(kind="reward", config=rm.cfg, num_attributes=9, reward_weights="helpfulness"),
             load_tokenizer("gguf:smollm2"))
  pairs = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
            "rejected": f"It is {2 * i + 1}, I think." * (1 + i % 3)} for i in range(5)]
  data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  hs2p = [sys.executable, "-m", "hs2p_jax"]
  subprocess.run(hs2p + ["eval", "--checkpoint", ckpt, "--data", data, "--format", "pairs", "--scores",
                         str(tmp_path / "scores.jsonl")], env=env, check=True, capture_output=True)
  scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
  assert [s["id"] for s in scores] == list(range(5))
  out = subprocess.run(hs2p + ["convert", "--checkpoint", ckpt, "--to-hf", str(tmp_path / "hf"), "--reward",
                               "helpfulness"], env=env, check=True, capture_output=True, text=True)
  assert json.loads(out.stdout.strip().splitlines()[-1])["num_labels"] == 1
  bias = json.loads((tmp_path / "hf" / "config.json").read_text())["hs2p_reward"]["bias"]
  assert bias == pytest.approx(float(rm.head_bias[...][4]))

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"), num_labels=1,
                                                                       dtype=torch.float32).eval()
  enc = encode([PairExample(p["prompt"], p["chosen"], p["rejected"], 1.0, None, str(i)) for i, p in enumerate(pairs)],
               load_checkpoint_tokenizer(ckpt), "steerlm", 1024)
  for s, seqs in zip(scores, enc.seqs):
    for side, seq in zip(("chosen", "rejected"), seqs):
      with torch.no_grad():
        theirs = float(hf(torch.tensor(seq[None].astype(np.int64))).logits[0, 0])
      assert theirs + bias == pytest.approx(s[side], abs=1e-4), (s["id"], side)
