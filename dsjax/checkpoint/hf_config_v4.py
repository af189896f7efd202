"""ModelConfig <-> `config.json` of DeepSeek-V4 (model_type "deepseek_v4": transformers 5.25's
DeepseekV4Config and DeepSeek's own files), registered with dsjax.checkpoint.hf_config.

Layer kinds come from `layer_types` (or the legacy per-layer `compress_ratios` 0 / 4 / 128) and
`mlp_layer_types` (or `num_hash_layers`): sliding_attention -> v4_sliding,
compressed_sparse_attention -> v4_csa, heavily_compressed_attention -> v4_hca; hash_moe /
moe -> the feed-forward kinds of the same names. mHC's streams are ModelConfig.mhc.
"""

from __future__ import annotations

from typing import Any

from dsjax.config import (HyperConnectionsConfig, LayerSpec, ModelConfig, MoEConfig, RopeConfig,
                          V4AttentionConfig)
from dsjax.checkpoint.hf_config import HFConverter, register_converter

ATTENTION_KINDS = {"sliding_attention": "v4_sliding", "compressed_sparse_attention": "v4_csa",
                   "heavily_compressed_attention": "v4_hca"}
RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention",
                       128: "heavily_compressed_attention"}
DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def _layer_types(hf: dict[str, Any], n: int) -> list[str]:
  if hf.get("layer_types"):
    return list(hf["layer_types"])[:n]
  if hf.get("compress_ratios") is not None:
    bad = sorted({r for r in hf["compress_ratios"]} - set(RATIO_TO_LAYER_TYPE))
    if bad:
      raise ValueError(f"config.json compress_ratios holds {bad}; DeepSeek-V4 uses 0 (sliding), "
                       "4 (CSA) and 128 (HCA).")
    return [RATIO_TO_LAYER_TYPE[r] for r in hf["compress_ratios"]][:n]
  # transformers' default when neither is given (its DeepSeek-V4-Pro-like schedule).
  return (["heavily_compressed_attention"] * min(n, 2)
          + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
             for i in range(max(n - 2, 0))])


def _mlp_types(hf: dict[str, Any], n: int) -> list[str]:
  if hf.get("mlp_layer_types"):
    return list(hf["mlp_layer_types"])[:n]
  hashed = hf.get("num_hash_layers", 3)
  return ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)


def _compress_rope(hf: dict[str, Any]) -> RopeConfig:
  params = dict((hf.get("rope_parameters") or {}).get("compress") or hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("compress_rope_theta", 160000.0)))
  if params.get("rope_type", params.get("type", "default")) in (None, "default"):
    return RopeConfig(theta=theta)
  # YaRN without the magnitude factor (DeepSeek-V4: attention_factor 1, mscale = mscale_all_dim).
  return RopeConfig(theta=theta, type="yarn", factor=float(params["factor"]),
                    original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                    beta_fast=float(params.get("beta_fast") or 32),
                    beta_slow=float(params.get("beta_slow") or 1), mscale=1.0, mscale_all_dim=1.0)


def _head_dims(hf: dict[str, Any]) -> tuple[int, int]:
  head_dim = hf.get("head_dim", 512)
  if hf.get("qk_rope_head_dim"):
    return head_dim, int(hf["qk_rope_head_dim"])
  return head_dim, int(head_dim * hf.get("partial_rotary_factor", 64 / 512))


def v4_from_hf(hf: dict[str, Any]) -> ModelConfig:
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
             if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json (deepseek_v4) lacks required fields {missing}.")
  n = hf["num_hidden_layers"]
  rates = {**DEFAULT_RATES, **(hf.get("compress_rates") or {})}
  head_dim, rope_dim = _head_dims(hf)
  pattern = tuple(LayerSpec(ATTENTION_KINDS[a], f) for a, f in
                  zip(_layer_types(hf, n), _mlp_types(hf, n)))
  main = dict((hf.get("rope_parameters") or {}).get("main") or {})
  return ModelConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=n,
      num_attention_heads=hf["num_attention_heads"],
      intermediate_size=hf["moe_intermediate_size"], attention="v4_sliding",
      v4=V4AttentionConfig(
          head_dim=head_dim, qk_rope_head_dim=rope_dim, q_lora_rank=hf.get("q_lora_rank", 1024),
          o_groups=hf.get("o_groups", 8), o_lora_rank=hf.get("o_lora_rank", 1024),
          sliding_window=hf.get("sliding_window", 128),
          csa_rate=rates["compressed_sparse_attention"],
          hca_rate=rates["heavily_compressed_attention"], compress_rope=_compress_rope(hf),
          index_n_heads=hf.get("index_n_heads", 64), index_head_dim=hf.get("index_head_dim", 128),
          index_topk=hf.get("index_topk", 512)),
      rope=RopeConfig(theta=float(main.get("rope_theta", hf.get("rope_theta", 10000.0)))),
      mhc=HyperConnectionsConfig(hc_mult=hf.get("hc_mult", 4),
                                 sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
                                 eps=hf.get("hc_eps", 1e-6)),
      moe=MoEConfig(
          n_routed_experts=hf["n_routed_experts"],
          n_shared_experts=hf.get("n_shared_experts", 1),
          num_experts_per_tok=hf["num_experts_per_tok"],
          moe_intermediate_size=hf["moe_intermediate_size"], n_group=1, topk_group=1,
          scoring_func=hf.get("scoring_func", "sqrtsoftplus"), topk_method="noaux_tc",
          norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
          routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.5)),
          first_k_dense_replace=0, swiglu_limit=float(hf.get("swiglu_limit", 10.0))),
      layer_pattern=pattern,
      # DeepSeek's MTP block (mtp.0.*) is not read yet: docs/v4.md.
      num_mtp_layers=0,
      max_position_embeddings=hf.get("max_position_embeddings", 1048576),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=hf.get("initializer_range", 0.02),
      bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def v4_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  c, moe, mhc = cfg.v4 or V4AttentionConfig(), cfg.moe, cfg.mhc
  kinds = {v: k for k, v in ATTENTION_KINDS.items()}
  rope, partial = c.compress_rope, c.qk_rope_head_dim / c.head_dim
  compress = {"rope_type": "default", "rope_theta": rope.theta, "partial_rotary_factor": partial}
  if rope.type == "yarn":
    compress.update(rope_type="yarn", factor=rope.factor, beta_fast=rope.beta_fast,
                    beta_slow=rope.beta_slow, attention_factor=1.0,
                    original_max_position_embeddings=rope.original_max_position_embeddings)
  return dict(
      model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"],
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=1, head_dim=c.head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
      q_lora_rank=c.q_lora_rank, o_groups=c.o_groups, o_lora_rank=c.o_lora_rank,
      sliding_window=c.sliding_window,
      compress_rates={"compressed_sparse_attention": c.csa_rate,
                      "heavily_compressed_attention": c.hca_rate},
      rope_theta=cfg.rope.theta, compress_rope_theta=rope.theta,
      rope_parameters={"main": {"rope_type": "default", "rope_theta": cfg.rope.theta,
                                "partial_rotary_factor": partial},
                       "compress": compress},
      index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk,
      layer_types=[kinds[s.attention] for s in cfg.layer_specs],
      mlp_layer_types=[s.ffn for s in cfg.layer_specs],
      hc_mult=mhc.hc_mult, hc_sinkhorn_iters=mhc.sinkhorn_iters, hc_eps=mhc.eps,
      n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts,
      num_experts_per_tok=moe.num_experts_per_tok,
      moe_intermediate_size=moe.moe_intermediate_size, scoring_func=moe.scoring_func,
      norm_topk_prob=moe.norm_topk_prob, routed_scaling_factor=moe.routed_scaling_factor,
      swiglu_limit=moe.swiglu_limit, num_nextn_predict_layers=cfg.num_mtp_layers,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


register_converter("deepseek_v4", HFConverter(from_hf=v4_from_hf, to_hf=v4_to_hf))
