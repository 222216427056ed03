"""Decoder families beside Llama (`model/families.py`): small random transformers models of Qwen2
(q/k/v biases), Qwen3 (per-head q/k RMSNorm, a head dim other than hidden/heads) and Mistral load
and match transformers' logits on padded batches, greedy decoding with the KV cache matches
`generate`, and the exports load as the family's own classes (the scalar reward export too)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import need_torch, padded_batch, torch_positions
from hs2p_jax.convert import export_hf, load_hf

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1e6)),  # head dim 32 where hidden/heads is 16
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=None, rope_theta=1e6)),
}


def family_model(family: str, cls: str = "ForCausalLM", seed: int = 0, **extra):
  """A random transformers model of `family` with non-trivial norms and biases."""
  torch = need_torch()
  import transformers
  config_cls, fields = FAMILIES[family]
  cfg = getattr(transformers, config_cls)(**{**SHAPE, **fields, **extra})
  torch.manual_seed(seed)
  model = getattr(transformers, type(cfg).__name__.replace("Config", cls))(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))  # Qwen2's biases start at zero: make them matter
  return model


def _logits(model, ids, mask):
  torch = need_torch()
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(torch_positions(mask))).logits.float().numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_loads_and_matches_transformers(family, tmp_path):
  ref = family_model(family)
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  lm = load_hf(str(tmp_path / "hf"))
  assert lm.cfg.family == family
  assert lm.cfg.attention_bias == (family == "qwen2") and lm.cfg.qk_norm == (family == "qwen3")
  for side in ("left", "right"):
    ids, mask = padded_batch(np.random.RandomState(0), [40, 23, 7], 40, side)
    want, got = _logits(ref, ids, mask), np.asarray(lm(ids, mask))
    m = mask.astype(bool)
    assert np.abs(got - want)[m].max() <= 1e-4, (family, side, np.abs(got - want)[m].max())
  n = sum(p.numel() for name, p in ref.named_parameters())
  assert lm.cfg.num_params() == n  # the model FLOPs count what the family holds

  # the family's quirk matters: without it the logits differ
  if family != "mistral":
    off = load_hf(str(tmp_path / "hf"), **({"qk_norm": False} if family == "qwen3" else {}))
    if family == "qwen3":
      ids, mask = padded_batch(np.random.RandomState(1), [16], 16, "right")
      assert np.abs(np.asarray(off(ids, mask)) - _logits(ref, ids, mask)).max() > 1e-2

  # export: the family's own class reloads with the same logits
  import transformers
  export_hf(lm, str(tmp_path / "out"))
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["model_type"] == family and config["architectures"] == [type(ref).__name__]
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(back) is type(ref)
  ids, mask = padded_batch(np.random.RandomState(2), [20, 9], 20, "right")
  np.testing.assert_allclose(_logits(back, ids, mask), _logits(ref, ids, mask), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_decoding_with_the_kv_cache_matches_generate(family, tmp_path):
  torch = need_torch()
  from hs2p_jax.sample import generate
  ref = family_model(family, seed=3)
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  lm = load_hf(str(tmp_path / "hf"))
  ids, mask = padded_batch(np.random.RandomState(6), [9, 5], 9, "left", low=3)
  new = 12
  got = np.asarray(generate(lm, ids, mask, max_new_tokens=new, temperature=0.0, eos_ids=[]).tokens)
  for i in range(len(ids)):
    prompt = ids[i][mask[i].astype(bool)]
    with torch.no_grad():
      want = ref.generate(torch.tensor(prompt[None]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got[i][:new].tolist() == want, (family, i)


@pytest.mark.parametrize("family", ["qwen3"])
def test_a_scalar_reward_export_is_the_familys_sequence_classifier(family, tmp_path):
  torch = need_torch()
  import transformers

  ref = family_model(family, "ForSequenceClassification", seed=4, num_labels=9)
  ref.save_pretrained(tmp_path / "rm", safe_serialization=True)
  rm = load_hf(str(tmp_path / "rm"), head="reward", num_attributes=9)
  rm.head_bias[...] = np.linspace(-1, 1, 9).astype(np.float32)
  weights = np.zeros(9, np.float32)
  weights[4] = 1.0  # helpfulness
  export_hf(rm, str(tmp_path / "scalar"), reward=weights)
  back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "scalar"), num_labels=1)
  assert type(back).__name__ == "Qwen3ForSequenceClassification"
  bias = json.loads((tmp_path / "scalar" / "config.json").read_text())["hs2p_reward"]["bias"]
  ids, mask = padded_batch(np.random.RandomState(5), [12, 12], 12, "right")
  with torch.no_grad():
    theirs = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  np.testing.assert_allclose(theirs + bias, np.asarray(rm(ids, mask))[:, 4], atol=1e-4)


@pytest.mark.parametrize("name, published", [("qwen3-0.6b", 0.596e9), ("qwen3-8b", 8.19e9), ("qwen3-32b", 32.8e9),
                                             ("qwen2.5-7b", 7.61e9), ("qwen2.5-72b", 72.7e9), ("mistral-7b", 7.25e9)])
def test_presets_hold_the_published_parameter_counts(name, published):
  """The presets' shapes against the model cards' parameter counts (within 0.5 %)."""
  from hs2p_jax.model.config import preset
  assert preset(name).num_params() == pytest.approx(published, rel=5e-3)


def test_a_qwen3_reward_model_trains_and_leaves_as_qwen3(tmp_path, capsys):
  """`hs2p train-rm` on a Qwen3 source (full and LoRA), exported with `--reward helpfulness`: the
  family's own sequence classifier with one label scores what hs2p scores minus the recorded bias;
  the LoRA run's adapter loads in `peft` over the base and scores what hs2p scores."""
  torch = need_torch()
  import transformers
  from peft import PeftModel

  from conftest import separable_pairs, write_jsonl
  from hs2p_jax.checkpoint import load_model
  from hs2p_jax.cli import main
  base = tmp_path / "base"
  family_model("qwen3", "ForSequenceClassification", seed=7, vocab_size=320, num_labels=9).save_pretrained(
      base, safe_serialization=True)
  (tmp_path / "c.yaml").write_text("name: qwen3\n")
  pairs = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))
  sets = [f"model.source={base}", "model.tokenizer=bytes", f"data.train={pairs}", "data.format=pairs",
          "data.template=chat", "data.max_length=64", "data.buckets=[64]", "train.objective=bt", "train.steps=2",
          "train.batch_size=4", "train.lr=1e-3", "mesh.data=1"]
  ids, mask = padded_batch(np.random.RandomState(8), [14, 14], 14, "right", vocab=300)
  for name, extra in (("full", []), ("lora", ["model.lora.rank=4"])):
    run = tmp_path / name
    assert main(["train-rm", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--set", *sets, *extra]) == 0
    ours, meta = load_model(str(run / "model"))
    assert meta.config.family == "qwen3"
    scores = np.asarray(ours(ids, mask))
    if name == "full":
      assert main(["convert", "--checkpoint", str(run / "model"), "--to-hf", str(tmp_path / "scalar"),
                   "--reward", "helpfulness"]) == 0
      back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "scalar"), num_labels=1)
      assert type(back).__name__ == "Qwen3ForSequenceClassification"
      bias = json.loads((tmp_path / "scalar" / "config.json").read_text())["hs2p_reward"]["bias"]
      with torch.no_grad():
        theirs = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
      np.testing.assert_allclose(theirs + bias, scores[:, 4], atol=1e-4)
    else:
      assert main(["convert", "--checkpoint", str(run / "model"), "--to-hf", str(tmp_path / "adapter"),
                   "--adapter"]) == 0
      hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=9)
      peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
      head_bias = np.asarray(ours.head_bias[...])
      with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
      np.testing.assert_allclose(theirs + head_bias, scores, atol=1e-4)
  capsys.readouterr()


def test_mistrals_sliding_window_matches_transformers_past_the_window(tmp_path):
  """A window of 8 positions on 40-token rows (padded either side) and in decoding with the KV
  cache, 12 tokens past it: transformers' logits and `generate`; without the window they differ."""
  torch = need_torch()
  from hs2p_jax.sample import generate
  ref = family_model("mistral", seed=9, sliding_window=8)
  ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
  lm = load_hf(str(tmp_path / "hf"))
  assert lm.cfg.sliding_window == 8
  for side in ("left", "right"):
    ids, mask = padded_batch(np.random.RandomState(10), [40, 23, 7], 40, side)
    want, got = _logits(ref, ids, mask), np.asarray(lm(ids, mask))
    m = mask.astype(bool)
    assert np.abs(got - want)[m].max() <= 1e-4, (side, np.abs(got - want)[m].max())
  whole = np.asarray(load_hf(str(tmp_path / "hf"), sliding_window=0)(ids, mask))
  assert np.abs(whole - want)[m].max() > 1e-3  # the window matters on these rows
  ids, mask = padded_batch(np.random.RandomState(11), [6, 4], 6, "left", low=3)
  got = np.asarray(generate(lm, ids, mask, max_new_tokens=14, temperature=0.0, eos_ids=[]).tokens)
  for i in range(len(ids)):
    prompt = ids[i][mask[i].astype(bool)]
    with torch.no_grad():
      want_ids = ref.generate(torch.tensor(prompt[None]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got[i][:14].tolist() == want_ids, i
  export_hf(lm, str(tmp_path / "out"))
  assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 8
