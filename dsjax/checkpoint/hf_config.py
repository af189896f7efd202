"""ModelConfig <-> HuggingFace `config.json` dictionaries, keyed by `model_type`.

Each HuggingFace model family registers an `HFConverter` under its `model_type`
(`register_converter`); `from_hf` dispatches on the dictionary's "model_type" and `to_hf` on
`hf_model_type(cfg)`. DeepseekV2 and DeepseekV3 are registered below.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from dsjax.config import DSAConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig


@dataclasses.dataclass(frozen=True)
class HFConverter:
  """Conversion between ModelConfig and one HuggingFace model_type's `config.json`.

  from_hf: config.json dictionary -> ModelConfig (raise ValueError for what it cannot load).
  to_hf: ModelConfig -> config.json dictionary (with "model_type" set).
  """

  from_hf: Callable[[dict[str, Any]], ModelConfig]
  to_hf: Callable[[ModelConfig], dict[str, Any]]


CONVERTERS: dict[str, HFConverter] = {}


def register_converter(model_type: str, converter: HFConverter, *,
                       replace: bool = False) -> HFConverter:
  """Registers `converter` for config.json files whose "model_type" is `model_type`."""
  if model_type in CONVERTERS and not replace:
    raise ValueError(f"A converter for model_type {model_type!r} is already registered; "
                     "pass replace=True to override it.")
  CONVERTERS[model_type] = converter
  return converter


def supported_model_types() -> tuple[str, ...]:
  """The registered HuggingFace model types, sorted."""
  return tuple(sorted(CONVERTERS))


def __getattr__(name):
  # SUPPORTED_MODEL_TYPES follows the registry (PEP 562), so later registrations show up.
  if name == "SUPPORTED_MODEL_TYPES":
    return supported_model_types()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
  # transformers >= 5 writes `rope_parameters`; DeepSeek's own files use `rope_scaling`.
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  interleave = bool(hf.get("rope_interleave", True))
  if kind in (None, "default"):
    return RopeConfig(theta=float(theta), interleave=interleave)
  if kind != "yarn":
    raise ValueError(f"rope type {kind!r} in config.json is not supported; dsjax implements "
                     "'default' and 'yarn' (DeepSeek's).")
  original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
  factor = params.get("factor") or hf["max_position_embeddings"] / original
  return RopeConfig(theta=float(theta), type="yarn", factor=float(factor),
                    original_max_position_embeddings=int(original),
                    beta_fast=float(params.get("beta_fast") or 32),
                    beta_slow=float(params.get("beta_slow") or 1),
                    mscale=float(params.get("mscale") or 0.0),
                    mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                    interleave=interleave)


def _moe_from_hf(hf: dict[str, Any], v3: bool) -> MoEConfig | None:
  if not hf.get("n_routed_experts"):
    return None
  scoring = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
  topk_method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
  return MoEConfig(
      n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
      num_experts_per_tok=hf["num_experts_per_tok"],
      moe_intermediate_size=hf["moe_intermediate_size"],
      n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
      scoring_func=scoring, topk_method=topk_method,
      norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
      moe_layer_freq=int(hf.get("moe_layer_freq") or 1))


def from_hf(hf: dict[str, Any]) -> ModelConfig:
  """ModelConfig from a HuggingFace `config.json` dictionary, by its "model_type"."""
  model_type = hf.get("model_type")
  if model_type not in CONVERTERS:
    raise ValueError(f"Unknown model_type {model_type!r} in config.json; registered model "
                     f"types: {', '.join(supported_model_types()) or '(none)'} (add one with "
                     "dsjax.checkpoint.hf_config.register_converter).")
  return CONVERTERS[model_type].from_hf(hf)


def _deepseek_from_hf(hf: dict[str, Any], v3: bool) -> ModelConfig:
  """ModelConfig from a HuggingFace DeepseekV2 (v3=False) / DeepseekV3 `config.json`."""
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
             if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json lacks required fields {missing}.")
  return ModelConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      mla=MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"]),
      rope=_rope_from_hf(hf), moe=_moe_from_hf(hf, v3),
      num_mtp_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=hf.get("initializer_range", 0.02),
      bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def hf_model_type(cfg: ModelConfig) -> str:
  """deepseek_v4 for models with DeepSeek-V4 attention layers; deepseek_v32 for DSA models;
  else deepseek_v3 for sigmoid routers, deepseek_v2 for softmax routers and dense models."""
  if any(s.attention.startswith("v4_") for s in cfg.layer_specs):
    return "deepseek_v4"
  if cfg.attention == "dsa":
    return "deepseek_v32"
  if cfg.moe is not None and cfg.moe.scoring_func == "sigmoid":
    return "deepseek_v3"
  return "deepseek_v2"


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
  if rope.type == "default":
    return {"rope_type": "default", "rope_theta": rope.theta}
  return {"rope_type": "yarn", "rope_theta": rope.theta, "factor": rope.factor,
          "original_max_position_embeddings": rope.original_max_position_embeddings,
          "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow,
          "mscale": rope.mscale, "mscale_all_dim": rope.mscale_all_dim}


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A `config.json` dictionary for the HuggingFace model type `hf_model_type(cfg)` picks."""
  model_type = hf_model_type(cfg)
  if model_type not in CONVERTERS:
    raise ValueError(f"No converter registered for model_type {model_type!r}; registered model "
                     f"types: {', '.join(supported_model_types()) or '(none)'}.")
  return CONVERTERS[model_type].to_hf(cfg)


def _deepseek_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """A `config.json` dictionary for transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM."""
  if cfg.attention != "mla":
    raise ValueError(f"attention={cfg.attention!r} has no HuggingFace DeepseekV2/V3 equivalent; "
                     "save NSA models as dsjax (Orbax) checkpoints.")
  if cfg.layer_specs != cfg.replace(layer_pattern=()).layer_specs:
    raise ValueError("This layer_pattern is not DeepSeek-V2/V3's (MLA in every layer, MoE from "
                     "moe.first_k_dense_replace every moe.moe_layer_freq layers); HuggingFace "
                     "DeepseekV2/V3 cannot describe it: save it as a dsjax (Orbax) checkpoint.")
  moe = cfg.moe
  if model_type == "deepseek_v3" and moe is not None and moe.topk_method == "group_limited_greedy":
    raise ValueError("transformers' DeepseekV3 has no group_limited_greedy routing; use "
                     "topk_method='noaux_tc' or 'greedy' with sigmoid scoring.")
  hf: dict[str, Any] = {
      "architectures": ["DeepseekV3ForCausalLM" if model_type == "deepseek_v3"
                        else "DeepseekV2ForCausalLM"],
      "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_attention_heads,
      "q_lora_rank": cfg.mla.q_lora_rank, "kv_lora_rank": cfg.mla.kv_lora_rank,
      "qk_nope_head_dim": cfg.mla.qk_nope_head_dim, "qk_rope_head_dim": cfg.mla.qk_rope_head_dim,
      "v_head_dim": cfg.mla.v_head_dim, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
      "initializer_range": cfg.initializer_range, "hidden_act": "silu",
      "attention_bias": False, "rope_interleave": cfg.rope.interleave,
      "rope_parameters": _rope_to_hf(cfg.rope),
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                      else cfg.eos_token_id,
      "torch_dtype": cfg.param_dtype, "num_nextn_predict_layers": cfg.num_mtp_layers,
  }
  if moe is None:
    hf.update(n_routed_experts=None, first_k_dense_replace=cfg.num_hidden_layers)
  else:
    hf.update(n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts,
              num_experts_per_tok=moe.num_experts_per_tok,
              moe_intermediate_size=moe.moe_intermediate_size, n_group=moe.n_group,
              topk_group=moe.topk_group, topk_method=moe.topk_method,
              scoring_func=moe.scoring_func, norm_topk_prob=moe.norm_topk_prob,
              routed_scaling_factor=moe.routed_scaling_factor,
              first_k_dense_replace=moe.first_k_dense_replace,
              # DeepSeek's own modeling code honours this; transformers 5.x's native
              # DeepseekV2/V3 classes keep it in the config but ignore it (every layer from
              # first_k_dense_replace on is MoE there).
              moe_layer_freq=moe.moe_layer_freq)
  return hf


for _model_type, _v3 in (("deepseek_v2", False), ("deepseek_v3", True)):
  register_converter(_model_type, HFConverter(
      from_hf=functools.partial(_deepseek_from_hf, v3=_v3),
      to_hf=functools.partial(_deepseek_to_hf, model_type=_model_type)))
del _model_type, _v3


def _v32_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """DeepSeek-V3.2: DeepSeek-V3 with the DSA indexer in every layer."""
  missing = [k for k in ("index_n_heads", "index_head_dim", "index_topk") if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json (deepseek_v32) lacks the indexer fields {missing}.")
  cfg = _deepseek_from_hf(hf, v3=True)
  return cfg.replace(attention="dsa", dsa=DSAConfig(
      index_n_heads=hf["index_n_heads"], index_head_dim=hf["index_head_dim"],
      index_topk=hf["index_topk"]))


def _v32_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  hf = _deepseek_to_hf(cfg.replace(attention="mla", dsa=None), "deepseek_v3")
  dsa = cfg.dsa
  hf.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"],
            index_n_heads=dsa.index_n_heads, index_head_dim=dsa.index_head_dim,
            index_topk=dsa.index_topk)
  hf.pop("rope_interleave", None)  # V3.2 has no such setting: MLA is interleaved, the indexer not
  return hf


register_converter("deepseek_v32", HFConverter(from_hf=_v32_from_hf, to_hf=_v32_to_hf))
# Kimi-K2 (Moonshot) ships DeepSeek-V3's architecture under its own model_type; dsjax writes
# such models back as deepseek_v3.
register_converter("kimi_k2", HFConverter(
    from_hf=functools.partial(_deepseek_from_hf, v3=True),
    to_hf=functools.partial(_deepseek_to_hf, model_type="deepseek_v3")))

# DeepSeek-V4's converter lives in its own module, which registers itself here.
from dsjax.checkpoint import hf_config_v4  # noqa: E402,F401  pylint: disable=wrong-import-position
