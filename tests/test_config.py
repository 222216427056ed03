"""Typed configs: YAML + overrides, validation errors that name the key, and every shipped config loads."""

from __future__ import annotations

import glob
import os

import pytest

from hs2p_jax import config as config_lib
from hs2p_jax.commands.pipeline import split_overrides
from hs2p_jax.errors import UserError

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_overrides_types_and_includes(tmp_path):
  (tmp_path / "base.yaml").write_text("train:\n  lr: 1e-5\n  steps: 10\nmodel:\n  preset: tiny\n")
  (tmp_path / "run.yaml").write_text("include: base.yaml\ntrain:\n  steps: 20\n")
  (tmp_path / "more.yaml").write_text("train:\n  lr: 2e-5\n  warmup_steps: 3\n")
  (tmp_path / "two.yaml").write_text("include: [run.yaml, more.yaml]\ntrain:\n  warmup_steps: 4\n")
  cfg = config_lib.load(config_lib.RunConfig, str(tmp_path / "run.yaml"),
                        ["train.seed=3", "mesh.fsdp=2", "model.reward_weights=[0,0,0,0,1,0,0,0,0]"])
  assert cfg.train.lr == 1e-5 and cfg.train.steps == 20 and cfg.train.seed == 3 and cfg.mesh.fsdp == 2
  assert cfg.model.reward_weights == [0, 0, 0, 0, 1, 0, 0, 0, 0] and cfg.model.preset == "tiny"
  two = config_lib.load(config_lib.RunConfig, str(tmp_path / "two.yaml"))  # later includes override earlier ones
  assert (two.train.lr, two.train.steps, two.train.warmup_steps, two.model.preset) == (2e-5, 20, 4, "tiny")


@pytest.mark.parametrize("override, message", [
    ("train.stesp=6", "unknown config key train.stesp"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=-1", "train.steps=-1: must be 0 or more"),
    ("train.bt_variant=hinge", "train.bt_variant='hinge'"),
    ("data.format=csv", "data.format='csv'"),
    ("train.micro_batch_size=3", "must divide train.batch_size"),
    ("novel=1", "unknown config key novel"),
    ("model.weight_grad=bogus", "model.weight_grad='bogus': expected one of flat, autodiff"),
    ("model.attention=flash", "model.attention='flash'"),
    ("model.remat=some", "model.remat='some'"),
    ("data.share_prompt=true", "data.share_prompt=true needs data.packing=true"),
])
def test_bad_values_name_the_key(override, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.load(config_lib.RunConfig, None, [override])


def test_bad_yaml_names_the_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train: [1, 2\n")
  with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
    config_lib.load(config_lib.RunConfig, str(bad))
  with pytest.raises(UserError, match="no such config file"):
    config_lib.load(config_lib.RunConfig, str(tmp_path / "missing.yaml"))


def test_every_shipped_config_loads():
  files = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
  assert len(files) >= 30
  for path in files:
    name = os.path.basename(path)
    if name.startswith("base"):  # fragments that the row configs include (base.yaml, base_lora.yaml)
      continue
    name = name.replace("_lora.yaml", ".yaml")  # a row on adapters is the row
    if name == "pipeline.yaml":
      cls = config_lib.PipelineConfig
    elif name == "reinforce.yaml":
      cls = config_lib.ReinforceRunConfig
    elif name.startswith("ppo"):
      cls = config_lib.PPORunConfig
    elif name.startswith("dpo"):
      cls = config_lib.DPORunConfig
    elif name == "justifier.yaml":
      cls = config_lib.SFTRunConfig
    else:
      cls = config_lib.RunConfig
    cfg = config_lib.load(cls, path)
    if name.startswith("bt_") and name.endswith("from_regression.yaml"):
      assert cfg.model.init_from and cfg.train.objective == "bt"
    if name.startswith("bt_") and name.endswith("scratch.yaml"):
      assert cfg.model.init_from is None
    if name.startswith("dpo_"):
      assert cfg.dpo.variant == name[4:-5] and cfg.policy.kind == "lm"
    if name.startswith("scaled_bt") and "helpsteer3" in path:
      assert (cfg.data.format, cfg.train.objective, cfg.train.bt_variant) == ("helpsteer3-preference", "bt", "scaled")
      assert bool(cfg.model.init_from) == name.endswith("from_regression.yaml")


def test_pipeline_override_routing():
  own, per_stage, broadcast = split_overrides(["regression.train.steps=5", "expo.search=1:2:0.5", "mesh.data=2",
                                               "train.steps=3", "stages=[regression]", "reinforce.steps=2",
                                               "reinforce.reinforce.lr=0.1"])
  assert own == ["expo.search=1:2:0.5", "stages=[regression]"]
  assert per_stage["regression"] == ["train.steps=5"] and per_stage["reinforce"] == ["reinforce.lr=0.1"]
  assert broadcast == ["mesh.data=2", "train.steps=3", "reinforce.steps=2"]
  with pytest.raises(UserError, match="not a pipeline key"):
    split_overrides(["bogus.key=1"])
