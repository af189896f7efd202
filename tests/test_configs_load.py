"""Every experiment config in configs/ loads, has the keys train.py relies on, and describes
a valid ModelConfig whose fields it lists exactly (so each is overridable by --config.model.*)."""

import dataclasses
import pathlib

import ml_collections
import pytest

import dsjax
from dsjax import experiment
from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
REQUIRED = {
    "train": {"steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "eval_every"},
    "optimizer": {"lr", "warmup_steps", "schedule", "weight_decay", "clip"},
    "data": {"source", "tokenizer"},
    "mesh": {"data", "fsdp", "expert", "tensor"},
}


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def test_expected_configs_present():
  names = {p.stem for p in CONFIG_FILES}
  assert {"tiny", "deepseek_v3_671b", "deepseek_v2_lite", "moonlight_16b"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_with_required_keys(path):
  cfg = experiment.load_experiment(str(path))
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert isinstance(cfg.seed, int)
  for section, keys in REQUIRED.items():
    missing = keys - set(cfg[section].keys())
    assert not missing, f"{path.name}: {section} lacks {sorted(missing)}"
  mesh = cfg.mesh.to_dict()
  assert all(isinstance(v, int) and (v >= 1 or v == -1) for v in mesh.values()), mesh
  assert sum(v == -1 for v in mesh.values()) <= 1, f"{path.name}: several mesh axes are -1"
  assert cfg.train.seq_len <= cfg.model.max_position_embeddings


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_model_is_exactly_model_config(path):
  cfg = experiment.load_experiment(str(path))
  model = cfg.model.to_dict()
  assert set(model) == _fields(ModelConfig)
  assert set(model["mla"]) == _fields(MLAConfig)
  assert set(model["rope"]) == _fields(RopeConfig)
  assert model["moe"] is None or set(model["moe"]) == _fields(MoEConfig)
  model_cfg = dsjax.load_config(str(path))
  assert isinstance(model_cfg, ModelConfig)
  # Round trip: nothing in the file is dropped or altered on the way to ModelConfig.
  assert experiment.experiment_config(model_cfg.to_dict()).model.to_dict() == model


def test_tiny_is_small_v3_style():
  cfg = dsjax.load_config(str(CONFIG_DIR / "tiny.py"))
  assert cfg.vocab_size == 256 and cfg.num_mtp_layers == 1 and cfg.rope.type == "default"
  assert (cfg.num_dense_layers, cfg.num_moe_layers) == (1, 3)
  assert cfg.mla.q_lora_rank is not None
  assert (cfg.moe.scoring_func, cfg.moe.topk_method) == ("sigmoid", "noaux_tc")
  assert (cfg.moe.n_routed_experts, cfg.moe.num_experts_per_tok) == (8, 2)
  assert (cfg.moe.n_group, cfg.moe.topk_group, cfg.moe.n_shared_experts) == (2, 1, 1)


def test_overrides_apply_and_keep_types():
  path = str(CONFIG_DIR / "tiny.py")
  cfg = experiment.load_experiment(path, {"train.steps": 7, "model.moe.n_group": 4,
                                          "optimizer.lr": 1})
  assert cfg.train.steps == 7 and cfg.model.moe.n_group == 4
  assert isinstance(cfg.optimizer.lr, float)
  with pytest.raises(ValueError, match="stepz"):
    experiment.load_experiment(path, {"train.stepz": 7})


def test_missing_file_and_missing_get_config(tmp_path):
  missing = tmp_path / "nope.py"
  with pytest.raises(FileNotFoundError, match="nope.py"):
    experiment.load_experiment(str(missing))
  bad = tmp_path / "bad.py"
  bad.write_text("CONFIG = {}\n")
  with pytest.raises(ValueError, match=r"define get_config\(\)"):
    dsjax.load_config(str(bad))
