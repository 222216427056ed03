"""LoRA models that give back what they were given: a PEFT adapter continues as it came (its rank,
alpha, targets; a contradicting `model.lora` is one line) and exports tensor for tensor; a LoRA
run's model is its adapters and head over a base named by reference and fingerprint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import need_torch, padded_batch, requires_smollm2, separable_pairs, tiny_hf_model, write_jsonl
from hs2p_jax.cli import main


def _cli(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _pairs(tmp_path) -> str:
  return write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(8))


def _train(capsys, tmp_path, out: str, sets: list[str]):
  cfg = tmp_path / "run.yaml"
  cfg.write_text("name: lora\n")
  return _cli(capsys, "train-rm", "--config", str(cfg), "--out", out, "--set", *sets)


def _run_sets(tmp_path, **extra) -> list[str]:
  base = {"data.train": _pairs(tmp_path), "data.format": "pairs", "data.template": "chat", "data.max_length": 64,
          "data.pad_multiple": 16, "data.buckets": "[64]", "train.objective": "bt", "train.batch_size": 4,
          "train.log_every": 1, "mesh.data": 1}
  base.update(extra)
  return [f"{k}={v}" for k, v in base.items()]


def _peft_adapter(tmp_path):
  """(base HF dir, PEFT adapter dir): a SEQ_CLS LoRA of rank 2, alpha 6 (PEFT's default is 8, ours
  16) on targets listed in another order than ours, B non-zero, saved by PEFT itself."""
  torch = need_torch()
  import transformers
  from peft import LoraConfig, get_peft_model
  base = tmp_path / "base"
  tiny_hf_model(vocab_size=320).save_pretrained(base, safe_serialization=True)
  seq = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=9)
  torch.manual_seed(0)
  peft_model = get_peft_model(seq, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6, init_lora_weights=False,
                                               target_modules=["down_proj", "v_proj", "q_proj"]))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  return str(base), str(tmp_path / "theirs")


def test_a_peft_adapter_trained_zero_steps_exports_as_it_came(tmp_path, capsys):
  need_torch()
  import transformers
  from peft import PeftModel
  from safetensors.numpy import load_file

  from hs2p_jax.checkpoint import load_model
  base, theirs = _peft_adapter(tmp_path)
  run = str(tmp_path / "run")
  sets = _run_sets(tmp_path, **{"model.source": base, "model.init_from": theirs, "model.tokenizer": "bytes",
                                "train.steps": 0})
  code, _, err = _train(capsys, tmp_path, run, sets)  # model.lora: every key unset
  assert code == 0, err
  code, out, err = _cli(capsys, "convert", "--checkpoint", f"{run}/model", "--to-hf", str(tmp_path / "out"), "--adapter")
  assert code == 0, err
  want, got = load_file(os.path.join(theirs, "adapter_model.safetensors")), \
      load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
  assert sorted(got) == sorted(want) and any(k.endswith("lora_B.weight") for k in want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype and np.array_equal(got[name], tensor), name
  assert max(np.abs(t).max() for k, t in want.items() if "lora_B" in k) > 0
  config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  theirs_config = json.loads(open(os.path.join(theirs, "adapter_config.json")).read())
  assert (config["r"], config["lora_alpha"], set(config["target_modules"])) == \
      (theirs_config["r"], theirs_config["lora_alpha"], set(theirs_config["target_modules"])) == (2, 6, {"down_proj", "v_proj", "q_proj"})
  assert config["base_model_name_or_path"] == base and config["task_type"] == "SEQ_CLS"

  # PEFT over the base, from the exported directory alone, scores what hs2p scores
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=9)
  peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "out")).eval()
  ours, _ = load_model(f"{run}/model")
  ids, mask = padded_batch(np.random.RandomState(0), [12, 7], 12, "right", vocab=300)
  import torch
  with torch.no_grad():
    theirs_out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids, mask)), theirs_out, atol=1e-4)

  # a model.lora setting that contradicts the adapter: one line naming both values, nothing merged
  capsys.readouterr()  # transformers' loading report above
  code, _, err = _train(capsys, tmp_path, str(tmp_path / "run2"), sets + ["model.lora.alpha=16",
                                                                       "model.lora.targets=[q_proj,v_proj,down_proj]"])
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert "model.lora.alpha=16: " in err and "holds adapters with alpha 6" in err and "model.lora.rank=0" in err
  assert not os.path.exists(tmp_path / "run2" / "model")


def test_merge_init_merges_the_start_and_trains_fresh_adapters(tmp_path):
  from flax import nnx

  from hs2p_jax import config as config_lib
  from hs2p_jax.errors import UserError
  from hs2p_jax.train.model_init import architecture, load_source
  base, theirs = _peft_adapter(tmp_path)
  sets = [f"model.source={base}", f"model.init_from={theirs}", "model.tokenizer=bytes"]
  load = lambda *more: config_lib.load(config_lib.RunConfig, None, sets + list(more)).model  # noqa: E731
  continued = load_source(load())
  fresh = load_source(load("model.lora.merge_init=true", "model.lora.rank=4"))
  assert (continued.cfg.lora_rank, continued.cfg.lora_alpha) == (2, 6.0)
  assert (fresh.cfg.lora_rank, fresh.cfg.lora_alpha, fresh.cfg.lora_targets[0]) == (4, 16.0, "q_proj")
  assert architecture(load("model.lora.merge_init=true", "model.lora.rank=4"))[0].lora_rank == 4
  assert all(not np.asarray(v.get_value()).any() for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam))
             if str(p[-1]).endswith("_lora_b"))
  ids, mask = padded_batch(np.random.RandomState(1), [9, 5], 9, "right", vocab=300)
  np.testing.assert_allclose(np.asarray(fresh(ids, mask)), np.asarray(continued(ids, mask)), atol=1e-5)
  with pytest.raises(UserError, match="holds no LoRA adapters to merge"):
    architecture(config_lib.load(config_lib.RunConfig, None, [f"model.source={base}", "model.lora.merge_init=true",
                                                               "model.tokenizer=bytes"]).model)


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@requires_smollm2
def test_a_lora_model_is_its_adapters_over_its_referenced_base(tmp_path, capsys):
  """SmolLM2's first two layers (real weights) under rank-8 adapters: DIR/model holds the adapters and
  head; eval, the server's scorer and convert --merge read the base from the GGUF file and score what
  the same model saved whole (merged) scores; a base that is not the one trained over is one line."""
  need_torch()
  import transformers

  from hs2p_jax.checkpoint import ModelMeta, load_model, read_meta, save_model
  from hs2p_jax.eval.scorer import RewardScorer
  from hs2p_jax.model import merge_lora
  run = str(tmp_path / "run")
  sets = _run_sets(tmp_path, **{"model.source": "gguf:smollm2", "model.num_layers": 2, "model.lora.rank": 8,
                                "train.steps": 2, "train.lr": 1e-2, "data.max_length": 48, "data.buckets": "[48]"})
  code, _, err = _train(capsys, tmp_path, run, sets)
  assert code == 0, err
  meta = read_meta(f"{run}/model")
  assert meta.base["source"] == "gguf:smollm2" and len(meta.base["fingerprint"]) == 16
  lora_model, _ = load_model(f"{run}/model")
  base_bytes = 4 * meta.config.replace(lora_rank=0).num_params()
  assert _dir_bytes(f"{run}/model/params") < base_bytes / 4, (_dir_bytes(f"{run}/model/params"), base_bytes)

  # the same model saved whole (merged): what eval, the scorer and the HF export must agree with
  merged = merge_lora(lora_model)
  save_model(str(tmp_path / "merged"), merged, ModelMeta("reward", merged.cfg, 9, template="chat", max_length=48),
             tokenizer=None)
  os.symlink(f"{run}/model/tokenizer", tmp_path / "merged" / "tokenizer")
  scores = {}
  for name, ckpt in (("lora", f"{run}/model"), ("merged", str(tmp_path / "merged"))):
    out = tmp_path / f"{name}.jsonl"
    code, _, err = _cli(capsys, "eval", "--checkpoint", ckpt, "--data", _pairs(tmp_path), "--format", "pairs",
                        "--scores", str(out))
    assert code == 0, err
    scores[name] = [json.loads(line) for line in out.read_text().splitlines()]
  flat = lambda rows: np.asarray([[r["chosen"], r["rejected"]] for r in rows], np.float64)  # noqa: E731
  np.testing.assert_allclose(flat(scores["lora"]), flat(scores["merged"]), atol=1e-5)

  prompts, responses = ["Hi", "What is 2+2?"], ["Hello there", "4"]  # the server's scorer
  a, b = RewardScorer.load(f"{run}/model"), RewardScorer.load(str(tmp_path / "merged"))
  np.testing.assert_allclose(np.asarray(a(prompts, responses)), np.asarray(b(prompts, responses)), atol=1e-5)

  code, _, err = _cli(capsys, "convert", "--checkpoint", f"{run}/model", "--to-hf", str(tmp_path / "hf"), "--merge")
  assert code == 0, err
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
  ids, mask = padded_batch(np.random.RandomState(2), [10, 10], 10, "right", vocab=1000)  # unpadded: HF finds the last token by its pad id
  import torch
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  bias = json.loads((tmp_path / "hf" / "config.json").read_text()).get("hs2p_reward", {}).get("bias", 0.0)
  np.testing.assert_allclose(theirs + np.asarray(bias), np.asarray(merged(ids, mask)), atol=1e-4)

  # the base named by the model is not the one its adapters trained over: one line, before any score
  record = json.loads(open(f"{run}/model/hs2p_model.json").read())
  record["base"]["fingerprint"] = "0" * 16
  with open(f"{run}/model/hs2p_model.json", "w") as f:
    json.dump(record, f)
  code, _, err = _cli(capsys, "eval", "--checkpoint", f"{run}/model", "--data", _pairs(tmp_path), "--format", "pairs")
  assert code == 2 and "its base gguf:smollm2 is not the one its adapters trained over" in err, err
