"""The dsjax <-> DeepSeek-V4 checkpoint-name table (DeepSeek's native names, which dsjax
writes and transformers' DeepseekV4 loads).

transformers' own `save_pretrained` writes a mix (a "model." prefix, `embed_tokens`,
`hc_head.hc_fn`, `attn.norm` for the attention's kv_norm); those names are read as aliases.
Layouts as in dsjax.checkpoint.hf_names, plus GROUPED for the block-diagonal wo_a: ours
[G, I, O], the checkpoint's [G*O, I].
"""

from __future__ import annotations

from typing import Iterator

from dsjax.checkpoint.hf_names import GROUPED, LIN, VEC, Entry
from dsjax.config import ModelConfig
from dsjax.model.pattern import layer_path

_COMPRESSOR = ((("wkv",), "wkv.weight", LIN(1)), (("wgate",), "wgate.weight", LIN(1)),
               (("ape",), "ape", VEC), (("norm", "weight"), "norm.weight", VEC))

# (dsjax sub-path inside a Block, native suffix inside `layers.{i}.`, layout)
BLOCK_TABLE: tuple[tuple[tuple[str, ...], str, int], ...] = (
    (("attn_norm", "weight"), "attn_norm.weight", VEC),
    (("ffn_norm", "weight"), "ffn_norm.weight", VEC),
    *((("attn_residual", p), f"hc_attn_{p}", VEC) for p in ("fn", "base", "scale")),
    *((("ffn_residual", p), f"hc_ffn_{p}", VEC) for p in ("fn", "base", "scale")),
    (("attn", "wq_a"), "attn.wq_a.weight", LIN(1)),
    (("attn", "q_norm", "weight"), "attn.q_norm.weight", VEC),
    (("attn", "wq_b"), "attn.wq_b.weight", LIN(1)),
    (("attn", "wkv"), "attn.wkv.weight", LIN(1)),
    (("attn", "kv_norm", "weight"), "attn.kv_norm.weight", VEC),
    (("attn", "wo_a"), "attn.wo_a.weight", GROUPED),
    (("attn", "wo_b"), "attn.wo_b.weight", LIN(1)),
    (("attn", "attn_sink"), "attn.attn_sink", VEC),
    *((("attn", "compressor") + s, f"attn.compressor.{n}", l) for s, n, l in _COMPRESSOR),
    (("attn", "indexer", "wq_b"), "attn.indexer.wq_b.weight", LIN(1)),
    (("attn", "indexer", "weights_proj"), "attn.indexer.weights_proj.weight", LIN(1)),
    *((("attn", "indexer", "compressor") + s, f"attn.indexer.compressor.{n}", l)
      for s, n, l in _COMPRESSOR),
    (("ffn", "gate"), "ffn.gate.weight", LIN(1)),
    (("ffn", "router_bias"), "ffn.gate.bias", VEC),
    (("ffn", "tid2eid"), "ffn.gate.tid2eid", VEC),
    (("ffn", "shared_experts", "w1"), "ffn.shared_experts.w1.weight", LIN(1)),
    (("ffn", "shared_experts", "w3"), "ffn.shared_experts.w3.weight", LIN(1)),
    (("ffn", "shared_experts", "w2"), "ffn.shared_experts.w2.weight", LIN(1)),
)
EXPERTS = ("w1", "w3", "w2")
MODEL_TABLE = (
    (("embed",), "embed.weight", VEC),
    (("norm", "weight"), "norm.weight", VEC),
    (("head",), "head.weight", LIN(1)),
    *((("residual", p), f"hc_head_{p}", VEC) for p in ("fn", "base", "scale")),
)
# DeepSeek keeps these float32 whatever the storage dtype (transformers'
# _keep_in_fp32_modules_strict does too).
FLOAT32_SUFFIXES = (".gate.weight", ".gate.bias", "attn_sink", "ape", "hc_attn_fn", "hc_attn_base",
                    "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "hc_head_fn",
                    "hc_head_base", "hc_head_scale")


def aliases(name: str) -> tuple[str, ...]:
  """The names transformers' save_pretrained gives the native tensor `name`."""
  special = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
             "hc_head_scale": "model.hc_head.hc_scale"}
  if name in special:
    return (special[name],)
  if name.startswith("layers."):
    return ("model." + name.replace(".attn.kv_norm.", ".attn.norm."),)
  return ()


def v4_entries(cfg: ModelConfig, existing: set[tuple]) -> Iterator[Entry]:
  """Every checkpoint tensor of a DeepSeek-V4 model with config `cfg`; `existing`: the dsjax
  parameter paths (so each layer's kind decides its tensors)."""
  for path, name, layout in MODEL_TABLE:
    if path in existing:
      yield _entry(path, (), name, layout)
  for i in range(cfg.num_hidden_layers):
    stack, j = layer_path(cfg, i)
    prefix = f"layers.{i}."
    for sub, suffix, layout in BLOCK_TABLE:
      if stack + sub in existing:
        yield _entry(stack + sub, (j,), prefix + suffix, layout)
    if stack + ("ffn", "gate") in existing:
      for e in range(cfg.moe.n_routed_experts):
        for w in EXPERTS:
          yield _entry(stack + ("ffn", w), (j, e), f"{prefix}ffn.experts.{e}.{w}.weight", LIN(1))


def _entry(path, index, name: str, layout: int) -> Entry:
  return Entry(path, index, name, layout, aliases=aliases(name),
               keep_float32=name.endswith(FLOAT32_SUFFIXES))
