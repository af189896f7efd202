"""load_hf_checkpoint rejects broken checkpoint directories with errors a user can act on."""

import json
import re
import shutil

import pytest
import torch

import dsjax
from tests import hf_fixtures as hf

SHAPED = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # [kv_lora + rope, D] = [24, 32]
MISSING = "model.layers.2.mlp.experts.5.down_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  hf.build_torch_model(hf.v3_config(), seed=5).save_pretrained(path)
  dsjax.load_hf_checkpoint(path)  # the unbroken checkpoint loads
  return path


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(good_checkpoint, path)
  return path


def test_missing_directory(tmp_path):
  path = tmp_path / "no_such_checkpoint"
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
    dsjax.load_hf_checkpoint(path)


def test_directory_without_config_json(checkpoint):
  (checkpoint / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    dsjax.load_hf_checkpoint(checkpoint)


def test_unknown_model_type(checkpoint):
  config = json.loads((checkpoint / "config.json").read_text())
  config["model_type"] = "llama"
  (checkpoint / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="'llama'"):
    dsjax.load_hf_checkpoint(checkpoint)


def test_tensor_with_wrong_shape(checkpoint):
  hf.rewrite_tensor(checkpoint, SHAPED, torch.zeros(25, 32))
  with pytest.raises(ValueError) as info:
    dsjax.load_hf_checkpoint(checkpoint)
  message = str(info.value)
  assert SHAPED in message and "(25, 32)" in message and "(24, 32)" in message


def test_missing_tensor(checkpoint):
  hf.rewrite_tensor(checkpoint, MISSING, None)
  with pytest.raises(ValueError, match=re.escape(MISSING)):
    dsjax.load_hf_checkpoint(checkpoint)


def test_saving_softmax_router_biases_transformers_cannot_hold(tmp_path):
  from tests.model_fixtures import randomized_model, tiny_config
  cfg = tiny_config(moe=dsjax.MoEConfig(n_routed_experts=8, num_experts_per_tok=2,
                                        moe_intermediate_size=16, scoring_func="softmax"),
                    num_mtp_layers=0)
  model = randomized_model(cfg)  # random, non-zero router biases
  with pytest.raises(ValueError, match="router biases"):
    dsjax.save_hf_checkpoint(model, tmp_path / "out")
  assert not list((tmp_path).glob("out/*.safetensors"))
