"""Decode caches. MLA: per layer and token, only the normalised latent c_kv (kv_lora_rank
values) and the rotated shared rope key k_pe (qk_rope_head_dim values).

A full K/V cache stores num_heads * (qk_nope + qk_rope + v) values per token per layer instead;
`cache_ratio` gives the factor (71x for DeepSeek-V3: 128 * (192 + 128) vs 512 + 64).

NSA (dsjax.ops.nsa_decode.NSACache): per layer and token, the selection branch's keys and
values (KV * (H + Hv) values) and about 1/d of that for the compressed blocks; plus rings of
the last l + w positions per row and layer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.stack import PerLayer, pad_slots
from dsjax.model.transformer import DecodeCache
from dsjax.ops.nsa_decode import NSACache

__all__ = ["bytes_per_token_per_layer", "cache_arrays", "cache_nbytes", "cache_ratio",
           "full_kv_values_per_token", "latent_values_per_token", "pad_slots"]


def latent_values_per_token(cfg: ModelConfig) -> int:
  """Values the latent cache holds per token per MLA layer: kv_lora_rank + qk_rope_head_dim."""
  return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim


def full_kv_values_per_token(cfg: ModelConfig) -> int:
  """Values an expanded K/V cache would hold per token per layer: N * (qk_head_dim + v)."""
  return cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)


def cache_ratio(cfg: ModelConfig) -> float:
  """How many times smaller the latent cache is than a full K/V cache."""
  return full_kv_values_per_token(cfg) / latent_values_per_token(cfg)


def cache_arrays(cache: DecodeCache) -> list[jax.Array]:
  return [a for a in jax.tree.leaves(cache) if a is not None]


def _nbytes(a) -> int:
  """Bytes of an array or a ShapeDtypeStruct."""
  return a.size * jnp.dtype(a.dtype).itemsize


def cache_nbytes(cache: DecodeCache) -> int:
  """Bytes the cache arrays occupy."""
  return int(sum(_nbytes(a) for a in cache_arrays(cache)))


def bytes_per_token_per_layer(cache: DecodeCache) -> float:
  """Measured from the arrays, for each stack: the bytes that grow with the slots, divided by
  (layers * batch * slots); every stack of one model has the same figure. MLA: c_kv + k_pe.
  NSA: the selection keys/values plus the compressed state (about 1/d of a token per slot);
  its rings (a fixed l + w positions per row and layer) are not counted."""
  def nbytes(a: jax.Array | PerLayer) -> int:
    return sum(map(_nbytes, a.arrays)) if isinstance(a, PerLayer) else _nbytes(a)

  def layer_row_slots(a: jax.Array | PerLayer) -> int:
    """L * B * S of a stacked [L,B,S,...] array or L PerLayer arrays [B,S,...]."""
    if isinstance(a, PerLayer):
      return len(a.arrays) * math.prod(a.arrays[0].shape[:2])
    return math.prod(a.shape[:3])

  def per_slot(c) -> float:
    growing = (c.k_slc, c.v_slc, c.k_cmp, c.v_cmp) if isinstance(c, NSACache) else c
    return sum(map(nbytes, growing)) / layer_row_slots(growing[0])
  def layer_caches(c):
    return [x for item in c for x in layer_caches(item)] if type(c) is tuple else [c]
  stacks = [x for c in cache.layers.values() for x in layer_caches(c)]
  figures = {per_slot(c) for c in stacks + [cache.mtp] if c is not None}
  if len(figures) != 1:
    raise ValueError(f"cache stacks differ in bytes per token per layer: {sorted(figures)}")
  return figures.pop()
