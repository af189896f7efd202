"""Model FLOPs per trained token and device peak FLOP/s, for the MFU estimate in the logs."""

from __future__ import annotations

import math
import os

import jax

from dsjax.config import ModelConfig
from dsjax.model.kinds import attention_kind
from dsjax.model.param import logical_axes

# Dense bf16 peak FLOP/s per chip by device_kind prefix (vendor figures, no sparsity).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("NVIDIA B200", 2250e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
)
# CPU: a nominal 2.5 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units) per core.
CPU_FLOPS_PER_CORE = 2.5e9 * 32


def active_matmul_params(params, cfg: ModelConfig) -> float:
  """Parameters multiplied per token: routed experts count K/E of their size; the embedding
  table (a lookup) does not count, except as the output head when tied."""
  total = 0.0
  for path, var in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: hasattr(x, "get_value")):
    value = var.get_value()
    axes = logical_axes(var)
    if len(axes) - axes.count("layers") < 2 or path[0].key == "embed":
      continue  # norm scales and the embedding lookup
    size = math.prod(value.shape)
    if "experts" in axes:
      size *= cfg.moe.num_experts_per_tok / cfg.moe.n_routed_experts
    total += size
  if cfg.tie_word_embeddings:
    total += cfg.vocab_size * cfg.hidden_size
  return total


def train_flops_per_token(params, cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 x active params plus attention scores and values
  in every layer and MTP module: each query sees seq_len / 2 keys on average under causal
  MLA, and its compressed blocks, selected tokens and window under NSA."""
  specs = list(cfg.layer_specs) + [cfg.mtp_spec] * cfg.num_mtp_layers
  attention = sum(attention_kind(spec.attention).flops_per_token(cfg, seq_len)
                  for spec in specs)
  return 3 * (2 * active_matmul_params(params, cfg) + attention)


def peak_flops(device: jax.Device) -> float:
  """Peak FLOP/s of one device (a nominal figure for CPUs)."""
  if device.platform == "cpu":
    return (os.cpu_count() or 1) * CPU_FLOPS_PER_CORE
  for prefix, flops in PEAK_FLOPS:
    if device.device_kind.startswith(prefix):
      return flops
  return float("nan")  # unknown accelerator: MFU is reported as NaN
