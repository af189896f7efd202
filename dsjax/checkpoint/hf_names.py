"""The dsjax <-> HuggingFace/DeepSeek parameter-name table.

Each row maps a dsjax parameter (path inside a Block, an MTP module or the Transformer) to a
checkpoint tensor name and a layout:
  VEC       same array.
  LIN(n)    a torch Linear weight [out, in]: ours is `hf.T` reshaped, whose first n axes make
            up `in` (wo [N,Hv,D] has n=2; wq_b [Q,N,H] has n=1).
  GROUPED   a block-diagonal Linear of G groups: ours [G, I, O], the checkpoint's [G*O, I]
            (DeepSeek-V4's wo_a).
DeepSeek-V4's table is dsjax.checkpoint.v4_names.
Routed experts are stored one tensor per expert (`mlp.experts.{e}.*`) in DeepSeek's layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from dsjax.checkpoint import hf_config
from dsjax.config import ModelConfig
from dsjax.model.pattern import layer_path

VEC = 0
GROUPED = -1


def LIN(n_in: int = 1) -> int:  # noqa: N802 - reads as a layout constant in the table
  return n_in


# (dsjax sub-path inside a Block, checkpoint suffix inside `model.layers.{i}.`, layout)
BLOCK_TABLE: tuple[tuple[tuple[str, ...], str, int], ...] = (
    (("attn_norm", "weight"), "input_layernorm.weight", VEC),
    (("ffn_norm", "weight"), "post_attention_layernorm.weight", VEC),
    (("attn", "wq"), "self_attn.q_proj.weight", LIN(1)),
    (("attn", "wq_a"), "self_attn.q_a_proj.weight", LIN(1)),
    (("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", VEC),
    (("attn", "wq_b"), "self_attn.q_b_proj.weight", LIN(1)),
    (("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight", LIN(1)),
    (("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", VEC),
    (("attn", "wkv_b"), "self_attn.kv_b_proj.weight", LIN(1)),
    (("attn", "wo"), "self_attn.o_proj.weight", LIN(2)),
    # DeepSeek-V3.2's DSA indexer.
    (("attn", "indexer", "wq_b"), "self_attn.indexer.wq_b.weight", LIN(1)),
    (("attn", "indexer", "wk"), "self_attn.indexer.wk.weight", LIN(1)),
    (("attn", "indexer", "k_norm", "weight"), "self_attn.indexer.k_norm.weight", VEC),
    (("attn", "indexer", "k_norm", "bias"), "self_attn.indexer.k_norm.bias", VEC),
    (("attn", "indexer", "weights_proj"), "self_attn.indexer.weights_proj.weight", LIN(1)),
)
DENSE_FFN_TABLE = (
    (("ffn", "w1"), "mlp.gate_proj.weight", LIN(1)),
    (("ffn", "w3"), "mlp.up_proj.weight", LIN(1)),
    (("ffn", "w2"), "mlp.down_proj.weight", LIN(1)),
)
MOE_TABLE = (
    (("ffn", "gate"), "mlp.gate.weight", LIN(1)),
    (("ffn", "router_bias"), "mlp.gate.e_score_correction_bias", VEC),
    (("ffn", "shared_experts", "w1"), "mlp.shared_experts.gate_proj.weight", LIN(1)),
    (("ffn", "shared_experts", "w3"), "mlp.shared_experts.up_proj.weight", LIN(1)),
    (("ffn", "shared_experts", "w2"), "mlp.shared_experts.down_proj.weight", LIN(1)),
)
EXPERT_TABLE = (
    ("w1", "gate_proj.weight"), ("w3", "up_proj.weight"), ("w2", "down_proj.weight"),
)
MTP_TABLE = (
    (("enorm", "weight"), "enorm.weight", VEC),
    (("hnorm", "weight"), "hnorm.weight", VEC),
    (("eh_proj",), "eh_proj.weight", LIN(1)),
    (("norm", "weight"), "shared_head.norm.weight", VEC),
)
# Copies of the shared embedding/head that DeepSeek stores inside each MTP layer.
MTP_SHARED_COPIES = (("embed",), "embed_tokens.weight"), (("head",), "shared_head.head.weight")
# Router biases may be absent from a checkpoint (DeepSeek-V2 has none): they then stay zero.
OPTIONAL = ("mlp.gate.e_score_correction_bias",)
# The router stays float32 in the file whatever the storage dtype: DeepSeek stores its bias so,
# and transformers (_keep_in_fp32_modules_strict, since 5.24) holds both tensors in float32.
FLOAT32_IN_FILE = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                   "indexer.weights_proj.weight")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: it fills `index` (layer, expert) of dsjax parameter `path`."""
  path: tuple
  index: tuple[int, ...]
  hf_name: str
  layout: int
  optional: bool = False
  aliases: tuple[str, ...] = ()  # other names the tensor may have in a file
  keep_float32: bool = False

  @property
  def float32_in_file(self) -> bool:
    return self.keep_float32 or self.hf_name.endswith(FLOAT32_IN_FILE)


def _block_entries(prefix: str, path: tuple, index: tuple[int, ...], existing: set[tuple],
                   cfg: ModelConfig) -> Iterator[Entry]:
  is_moe = path + ("ffn", "gate") in existing
  for sub, suffix, layout in BLOCK_TABLE + (MOE_TABLE if is_moe else DENSE_FFN_TABLE):
    if path + sub in existing:
      yield Entry(path + sub, index, prefix + suffix, layout, suffix in OPTIONAL)
  if is_moe:
    for e in range(cfg.moe.n_routed_experts):
      for name, suffix in EXPERT_TABLE:
        yield Entry(path + ("ffn", name), index + (e,), f"{prefix}mlp.experts.{e}.{suffix}",
                    LIN(1))


def checkpoint_entries(cfg: ModelConfig, existing: set[tuple]) -> Iterator[Entry]:
  """Every checkpoint tensor of a model with config `cfg`; `existing` is the set of dsjax
  parameter paths (so optional parts such as wq vs wq_a/wq_b follow the model)."""
  if hf_config.hf_model_type(cfg) == "deepseek_v4":
    from dsjax.checkpoint.v4_names import v4_entries  # pylint: disable=import-outside-toplevel
    yield from v4_entries(cfg, existing)
    return
  yield Entry(("embed",), (), "model.embed_tokens.weight", VEC)
  yield Entry(("norm", "weight"), (), "model.norm.weight", VEC)
  if ("head",) in existing:
    yield Entry(("head",), (), "lm_head.weight", LIN(1))
  for i in range(cfg.num_hidden_layers):
    stack, j = layer_path(cfg, i)
    yield from _block_entries(f"model.layers.{i}.", stack, (j,), existing, cfg)
  for k in range(cfg.num_mtp_layers):
    prefix = f"model.layers.{cfg.num_hidden_layers + k}."
    for sub, suffix, layout in MTP_TABLE:
      yield Entry(("mtp", k) + sub, (), prefix + suffix, layout)
    yield from _block_entries(prefix, ("mtp", k, "block"), (), existing, cfg)


def hf_shape(our_shape: tuple[int, ...], layout: int) -> tuple[int, ...]:
  """The checkpoint shape of a dsjax array (one layer / expert slice) under `layout`."""
  if layout == VEC:
    return our_shape
  if layout == GROUPED:
    groups, n_in, n_out = our_shape
    return (groups * n_out, n_in)
  return (math.prod(our_shape[layout:]), math.prod(our_shape[:layout]))


def mtp_copy_names(cfg: ModelConfig) -> list[str]:
  return [f"model.layers.{cfg.num_hidden_layers + k}.{suffix}"
          for k in range(cfg.num_mtp_layers) for _, suffix in MTP_SHARED_COPIES]
