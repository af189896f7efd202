"""config.json <-> ModelConfig: DeepSeek's released files, the legacy `rope_scaling` format and
round trips through transformers' config classes."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import DeepseekV2Config, DeepseekV3Config

import dsjax
from dsjax.checkpoint.hf_config import from_hf, to_hf
from tests import hf_fixtures as hf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The published config.json files (fields dsjax reads; DeepSeek's own `rope_scaling` format).
DEEPSEEK_V3_JSON = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "initializer_range": 0.02,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
}
DEEPSEEK_V2_LITE_JSON = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
    "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "initializer_range": 0.02,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def _architecture(cfg: dsjax.ModelConfig) -> dsjax.ModelConfig:
  """cfg without the runtime choices (dtypes, scan, remat, MoE dispatch) a config.json lacks."""
  cfg = cfg.replace(**{f: getattr(dsjax.ModelConfig(), f) for f in RUNTIME_FIELDS})
  if cfg.moe is not None:
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, impl="auto"))
  return cfg


@pytest.mark.parametrize("hf_json, preset", [(DEEPSEEK_V3_JSON, "deepseek_v3_671b.py"),
                                             (DEEPSEEK_V2_LITE_JSON, "deepseek_v2_lite.py")])
def test_released_config_json_equals_preset(hf_json, preset):
  from_json = from_hf(hf_json)
  assert _architecture(from_json) == _architecture(dsjax.load_config(str(CONFIGS / preset)))


@pytest.mark.parametrize("hf_json, config_class", [(DEEPSEEK_V3_JSON, DeepseekV3Config),
                                                   (DEEPSEEK_V2_LITE_JSON, DeepseekV2Config)])
def test_to_hf_round_trips_through_transformers_config(hf_json, config_class):
  cfg = from_hf(hf_json)
  exported = to_hf(cfg)
  assert from_hf(exported) == cfg
  through_transformers = config_class(**{k: v for k, v in exported.items()
                                         if k not in ("architectures", "model_type")})
  reread = from_hf(through_transformers.to_dict())
  assert _architecture(reread) == _architecture(cfg)


def test_legacy_rope_scaling_loads_the_same_model(tmp_path):
  """DeepSeek's files say `rope_scaling: {type: yarn}` + top-level rope_theta; transformers 5
  writes `rope_parameters`. Both must give the same logits."""
  hf.build_torch_model(hf.v3_config(), seed=6).save_pretrained(tmp_path)
  ids = hf.random_ids(hf.v3_config().vocab_size)
  modern, _ = hf.dsjax_forward(dsjax.load_hf_checkpoint(tmp_path), ids)
  config_file = tmp_path / "config.json"
  config = json.loads(config_file.read_text())
  rope = config.pop("rope_parameters")
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
  config_file.write_text(json.dumps(config))
  legacy_model = dsjax.load_hf_checkpoint(tmp_path)
  assert legacy_model.config.rope.type == "yarn"
  legacy, _ = hf.dsjax_forward(legacy_model, ids)
  np.testing.assert_array_equal(legacy, modern)


def test_unsupported_rope_type_is_named():
  bad = dict(DEEPSEEK_V2_LITE_JSON, rope_scaling={"type": "dynamic", "factor": 2.0})
  with pytest.raises(ValueError, match="dynamic"):
    from_hf(bad)


def test_kimi_k2_directory_loads_as_deepseek_v3(tmp_path):
  """A Kimi-K2-style config.json (model_type kimi_k2, DeepseekV3 architecture) gives the V3
  model: same config and logits as the directory labelled deepseek_v3."""
  import json
  import numpy as np
  import dsjax
  from tests import hf_fixtures as hf
  hf.build_torch_model(hf.v3_config(), seed=0).save_pretrained(tmp_path)
  v3 = dsjax.load_hf_checkpoint(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="kimi_k2")))
  kimi = dsjax.load_hf_checkpoint(tmp_path)
  assert kimi.config == v3.config
  ids = hf.random_ids(v3.config.vocab_size)
  np.testing.assert_array_equal(hf.dsjax_forward(kimi, ids)[0], hf.dsjax_forward(v3, ids)[0])
