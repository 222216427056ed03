"""LoRA adapters exchanged with PEFT (`convert/peft.py`): ours load with `PeftModel.from_pretrained`
over the base's Hugging Face export and score what we score (head included); PEFT's load into ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from conftest import need_torch, padded_batch, torch_positions

TARGETS = ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")


def _adapted(base, rank: int = 4, seed: int = 0):
  """`base` (a model without adapters) with adapters of `rank` on TARGETS, all of them non-zero."""
  import jax.numpy as jnp

  from hs2p_jax.model import LlamaForCausalLM, RewardModel
  cfg = base.cfg.replace(lora_rank=rank, lora_alpha=8.0, lora_targets=TARGETS)
  model = (RewardModel(cfg, base.num_attributes, rngs=nnx.Rngs(seed)) if isinstance(base, RewardModel)
           else LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed)))
  nnx.update(model, nnx.state(base, nnx.Param))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), jnp.float32))
  return model


def _torch_out(model, ids, mask):
  torch = need_torch()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(torch_positions(mask))).logits.float().numpy()


def test_our_reward_adapter_loads_in_peft_and_scores_what_we_score(tiny_hf_dir, tmp_path):
  need_torch()
  import transformers
  from peft import PeftModel

  from hs2p_jax.convert import export_hf, load_hf
  from hs2p_jax.convert.peft import export_adapter
  path, _ = tiny_hf_dir
  base = load_hf(path, head="reward", num_attributes=3, seed=1)
  export_hf(base, str(tmp_path / "base"))
  rm = _adapted(base)
  rm.head_bias[...] = np.asarray([0.3, -0.2, 1.0], np.float32)
  export_adapter(rm, str(tmp_path / "adapter"), base=str(tmp_path / "base"))
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["target_modules"] == list(TARGETS)

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))
  peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  ids, mask = padded_batch(np.random.RandomState(0), [11, 7], 11, "right")
  ours = np.asarray(rm(ids, mask))
  assert np.abs(ours - np.asarray(base(ids, mask))).max() > 1e-3  # the adapter and head matter
  np.testing.assert_allclose(_torch_out(peft_model, ids, mask) + [0.3, -0.2, 1.0], ours, atol=1e-4)


def test_a_peft_adapter_loads_into_ours(tiny_hf_dir, tmp_path):
  torch = need_torch()
  import transformers
  from peft import LoraConfig, get_peft_model

  from hs2p_jax.convert import load_hf
  from hs2p_jax.convert.peft import load_adapter, lora_fields
  from hs2p_jax.model import create
  path, _ = tiny_hf_dir
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)  # a fresh score head
  torch.manual_seed(0)
  peft_model = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6, init_lora_weights=False,
                                              target_modules=["v_proj", "o_proj", "gate_proj"]))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  peft_model.eval()
  score = peft_model.base_model.model.score.modules_to_save["default"].weight.detach().numpy()

  base = load_hf(path, head="reward", num_attributes=3)
  fields = lora_fields(str(tmp_path / "theirs"))
  assert fields == {"lora_rank": 2, "lora_alpha": 6.0, "lora_targets": ("v_proj", "o_proj", "gate_proj"),
                    "lora_dropout": 0.0, "lora_train_head": True}
  ours = create("reward", base.cfg.replace(**fields), 3)
  nnx.update(ours, nnx.state(base, nnx.Param))
  load_adapter(ours, str(tmp_path / "theirs"))
  np.testing.assert_array_equal(np.asarray(ours.head_kernel[...]).T, score)
  ids, mask = padded_batch(np.random.RandomState(1), [10, 6], 10, "right")
  theirs = _torch_out(peft_model, ids, mask)
  np.testing.assert_allclose(np.asarray(ours(ids, mask)), theirs, atol=1e-4)

  # model.init_from: the PEFT directory over model.source, the base: the adapters continue (same
  # model.lora), or are merged into the weights (model.lora.rank 0: every weight trains)
  from hs2p_jax import config as config_lib
  from hs2p_jax.errors import UserError
  from hs2p_jax.train.model_init import architecture, load_source
  sets = ["model.kind=reward", "model.num_attributes=3", f"model.source={path}",
          f"model.init_from={tmp_path / 'theirs'}", "model.lora.rank=2", "model.lora.alpha=6",
          "model.lora.targets=[v_proj,o_proj,gate_proj]"]
  mc = config_lib.load(config_lib.RunConfig, None, sets).model
  assert architecture(mc)[0].lora_rank == 2
  continued = load_source(mc)
  assert continued.cfg.lora_rank == 2
  np.testing.assert_allclose(np.asarray(continued(ids, mask)), theirs, atol=1e-4)
  merged = load_source(config_lib.load(config_lib.RunConfig, None, sets + ["model.lora.rank=0"]).model)
  assert merged.cfg.lora_rank == 0
  np.testing.assert_allclose(np.asarray(merged(ids, mask)), theirs, atol=1e-4)
  no_base = config_lib.load(config_lib.RunConfig, None, [s for s in sets if not s.startswith("model.source")]).model
  with pytest.raises(UserError, match="a PEFT adapter; set model.source to its base model"):
    architecture(no_base)


def test_a_policy_adapter_is_a_causal_lm_adapter(tiny_hf_dir, tmp_path):
  need_torch()
  import transformers
  from peft import PeftModel

  from hs2p_jax.convert import load_hf
  from hs2p_jax.convert.peft import export_adapter
  path, _ = tiny_hf_dir
  lm = _adapted(load_hf(path))
  export_adapter(lm, str(tmp_path / "adapter"))
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
  peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                         str(tmp_path / "adapter")).eval()
  ids, mask = padded_batch(np.random.RandomState(2), [9, 9], 9, "right")
  np.testing.assert_allclose(_torch_out(peft_model, ids, mask), np.asarray(lm(ids, mask)), atol=1e-4)


def test_adapters_that_do_not_fit_are_named(tmp_path):
  from hs2p_jax.convert.peft import load_adapter, read_adapter_config
  from hs2p_jax.errors import UserError
  from hs2p_jax.model import create, preset
  d = tmp_path / "a"
  d.mkdir()
  (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                     "target_modules": ["q_proj", "lm_head"]}))
  with pytest.raises(UserError, match="target_modules"):
    read_adapter_config(str(d))
  (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True,
                                                     "target_modules": ["q_proj"]}))
  with pytest.raises(UserError, match="use_dora=True is not supported"):
    read_adapter_config(str(d))
  (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                     "target_modules": ["q_proj"]}))
  model = create("lm", preset("tiny", num_layers=1, lora_rank=4, lora_targets=("q_proj",)))
  with pytest.raises(UserError, match="a rank-2 adapter of q_proj; the model has rank 4"):
    load_adapter(model, str(d))


def test_convert_exports_a_lora_checkpoint_as_an_adapter_or_merged(tiny_hf_dir, tmp_path):
  """`hs2p convert --checkpoint LORA_CKPT --to-hf DIR --adapter | --merge`; without either, one line."""
  import os
  import subprocess
  import sys

  need_torch()
  import transformers

  from hs2p_jax.checkpoint import ModelMeta, save_model
  from hs2p_jax.convert import load_hf
  path, _ = tiny_hf_dir
  rm = _adapted(load_hf(path, head="reward", num_attributes=3))
  ckpt = str(tmp_path / "ckpt")
  save_model(ckpt, rm, ModelMeta("reward", rm.cfg, 3))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  hs2p = [sys.executable, "-m", "hs2p_jax", "convert", "--checkpoint", ckpt, "--to-hf"]
  bare = subprocess.run(hs2p + [str(tmp_path / "x")], env=env, capture_output=True, text=True)
  assert bare.returncode == 2 and "has LoRA adapters: export them (--adapter" in bare.stderr
  subprocess.run(hs2p + [str(tmp_path / "adapter"), "--adapter"], env=env, check=True, capture_output=True)
  subprocess.run(hs2p + [str(tmp_path / "merged"), "--merge", "--reward", "0=1"], env=env, check=True,
                 capture_output=True)
  assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "hs2p_reward_head.safetensors"]
  ids, mask = padded_batch(np.random.RandomState(3), [8, 5], 8, "right")
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
  bias = json.loads((tmp_path / "merged" / "config.json").read_text())["hs2p_reward"]["bias"]
  np.testing.assert_allclose(_torch_out(merged, ids, mask)[:, 0] + bias, np.asarray(rm(ids, mask))[:, 0], atol=1e-4)
