"""Invalid configurations fail at construction with a ValueError that names the offending
field and says what to change (never a traceback from deep inside the model)."""

import re

import pytest

from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig

# Words of advice a message must contain besides the field name.
_ADVICE = re.compile(r"\b(use|set|pick|raise|lower|must|check|build|add)\b")

CASES = {
    "experts_not_divisible_by_groups": (
        lambda: MoEConfig(n_routed_experts=10, n_group=3, topk_group=1), "n_group"),
    "topk_group_exceeds_n_group": (lambda: MoEConfig(n_group=2, topk_group=3), "topk_group"),
    "topk_group_zero": (lambda: MoEConfig(n_group=2, topk_group=0), "topk_group"),
    "top_k_exceeds_experts": (lambda: MoEConfig(num_experts_per_tok=65), "num_experts_per_tok"),
    "groups_cannot_supply_top_k": (
        lambda: MoEConfig(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=4,
                          topk_method="noaux_tc", scoring_func="sigmoid"), "topk_group"),
    "noaux_tc_single_expert_groups": (
        lambda: MoEConfig(n_routed_experts=8, n_group=8, topk_group=2, num_experts_per_tok=2,
                          topk_method="noaux_tc", scoring_func="sigmoid"), "n_group"),
    "unknown_scoring_func": (lambda: MoEConfig(scoring_func="relu"), "scoring_func"),
    "unknown_topk_method": (lambda: MoEConfig(topk_method="top2"), "topk_method"),
    "unknown_moe_impl": (lambda: MoEConfig(impl="megablocks"), "impl"),
    "odd_rope_dim": (lambda: MLAConfig(qk_rope_head_dim=63), "qk_rope_head_dim"),
    "zero_q_lora": (lambda: MLAConfig(q_lora_rank=0), "q_lora_rank"),
    "unknown_rope_type": (lambda: RopeConfig(type="ntk"), "rope.type"),
    "yarn_beta_order": (lambda: RopeConfig(type="yarn", beta_fast=1.0, beta_slow=32.0),
                        "beta_fast"),
    "yarn_factor_below_one": (lambda: RopeConfig(type="yarn", factor=0.5), "factor"),
    "unknown_model_field": (lambda: ModelConfig.from_dict({"hidden_sise": 64}), "hidden_sise"),
    "unknown_moe_field": (lambda: ModelConfig.from_dict({"moe": {"n_experts": 8}}), "n_experts"),
    "unknown_rope_field": (lambda: ModelConfig.from_dict({"rope": {"base": 1e4}}), "base"),
    "bad_remat_policy": (lambda: ModelConfig(remat_policy="offload"), "remat_policy"),
    "bad_dtype": (lambda: ModelConfig(dtype="fp8"), "dtype"),
    "yarn_original_exceeds_max_positions": (
        lambda: ModelConfig(max_position_embeddings=4096,
                            rope=RopeConfig(type="yarn", factor=4.0,
                                            original_max_position_embeddings=8192)),
        "max_position_embeddings"),
    "dense_layers_exceed_depth": (
        lambda: ModelConfig(num_hidden_layers=2, moe=MoEConfig(first_k_dense_replace=3)),
        "first_k_dense_replace"),
    "negative_mtp_layers": (lambda: ModelConfig(num_mtp_layers=-1), "num_mtp_layers"),
    "zero_heads": (lambda: ModelConfig(num_attention_heads=0), "num_attention_heads"),
    "dict_instead_of_sub_config": (lambda: ModelConfig(mla={"kv_lora_rank": 64}), "mla"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_config_names_field_and_fix(name):
  build, field = CASES[name]
  with pytest.raises(ValueError) as err:
    build()
  message = str(err.value)
  assert field in message, message
  assert _ADVICE.search(message), f"no advice on what to change: {message}"


def test_valid_edge_cases_are_accepted():
  # Boundaries of the checks above: these must not raise.
  MoEConfig(n_routed_experts=8, n_group=4, topk_group=4, num_experts_per_tok=8,
            topk_method="noaux_tc", scoring_func="sigmoid")
  MoEConfig(n_routed_experts=8, n_group=8, topk_group=1, num_experts_per_tok=8,
            topk_method="greedy")  # greedy ignores groups
  ModelConfig(num_hidden_layers=2, moe=MoEConfig(first_k_dense_replace=2))  # all dense
  ModelConfig(max_position_embeddings=4096, moe=None,
              rope=RopeConfig(type="yarn", factor=1.0, original_max_position_embeddings=4096))
  assert MoEConfig(topk_method="group_limited").topk_method == "group_limited_greedy"
  assert ModelConfig(eos_token_id=[1, 2]).eos_token_id == (1, 2)


def test_from_dict_builds_nested_configs():
  cfg = ModelConfig.from_dict({"mla": {"q_lora_rank": 32}, "moe": None,
                               "rope": {"type": "yarn", "factor": 2.0,
                                        "original_max_position_embeddings": 1024}})
  assert cfg.mla == MLAConfig(q_lora_rank=32) and cfg.moe is None
  assert cfg.rope.type == "yarn" and cfg.num_moe_layers == 0
