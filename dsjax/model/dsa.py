"""DeepSeek Sparse Attention (DeepSeek-V3.2): MLA whose queries attend only to the tokens a
lightning indexer picks.

The indexer (per layer): queries wq_b on MLA's normalised query latent (H_I heads of D_I),
one key per token wk(x) through a LayerNorm with bias, rotary on the first qk_rope_head_dim
dims of both, non-interleaved (rotate-half; MLA itself is interleaved) and placed first (MLA's
rope part comes last), per-head weights weights_proj(x) kept in float32. Scores and top-k are
in dsjax.ops.dsa; the selection carries no gradient (DeepSeek trains the indexer with its own
KL loss).

Two exact implementations (dsa.impl): "gather" (the default) reads only each query's k
selected latents, MLA in its absorbed form (dsjax.ops.dsa.sparse_latent_attention, O(T*k)
memory besides the indexer's [T,S] scores); "dense" is the reference, the selection as a
[B,T,S] mask on MLA's expanded attention. Decoding keeps the indexer's keys next to MLA's
latent (DSACache) and selects among the cached tokens at every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import DSAConfig, ModelConfig
from dsjax.model.kinds import register_attention
from dsjax.model.latent_cache import pad_fields, slots_of, write_fields
from dsjax.model.mla import MLA, MLAContext, MLADecodeContext
from dsjax.model.param import AXES, normal_param, ones_param
from dsjax.ops import dsa as dsa_ops
from dsjax.ops.attention import dot_product_attention
from dsjax.ops.linear import OutMajor, project
from dsjax.ops.rope import apply_rope


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, in float32."""

  def __init__(self, dim: int, eps: float, axis: str, param_dtype):
    self.weight = ones_param((dim,), (axis,), param_dtype)
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **{AXES: (axis,)})
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    out = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return out * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Indexer(nnx.Module):
  """The lightning indexer of one DSA layer."""

  def __init__(self, cfg: ModelConfig, dsa: DSAConfig, *, rngs: nnx.Rngs):
    d, q, std, pdt = cfg.hidden_size, cfg.mla.q_lora_rank, cfg.initializer_range, cfg.param_dtype
    h, dim = dsa.index_n_heads, dsa.index_head_dim
    self.wq_b = normal_param(rngs, (q, h, dim), ("q_lora", "heads", "head_dim"), std, pdt)
    self.wk = normal_param(rngs, (d, dim), ("embed", "head_dim"), std, pdt)
    self.k_norm = LayerNorm(dim, 1e-6, "head_dim", pdt)
    self.weights_proj = normal_param(rngs, (d, h), ("embed", "heads"), std, "float32")
    self.rope_dim = cfg.mla.qk_rope_head_dim
    self.dtype = cfg.dtype

  def _rotate(self, x, cos, sin):
    rot, rest = jnp.split(x, [self.rope_dim], axis=-1)
    return jnp.concatenate([apply_rope(rot, cos, sin, interleave=False), rest], axis=-1)

  def keys(self, x, cos, sin) -> jax.Array:
    """The index keys [B,T,D_I] (float32) of tokens x [B,T,D]: what the decode cache keeps."""
    k = self.k_norm(project(x, self.wk[...].astype(self.dtype)))
    return self._rotate(k[:, :, None, :], cos, sin)[:, :, 0, :]

  def scores(self, x, q_latent, cos, sin, keys) -> jax.Array:
    """float32 [B,T,S] index scores of the queries of x [B,T,D] (with MLA's normalised query
    latent [B,T,Q]) against index keys [B,S,D_I]; no gradient (the LM loss does not train the
    selection)."""
    q = self._rotate(project(q_latent, self.wq_b[...].astype(self.dtype)), cos, sin)
    heads = self.weights_proj.shape[-1]
    weights = jnp.einsum("BTD,DH->BTH", x.astype(jnp.float32), self.weights_proj[...]) * (
        heads ** -0.5)
    return jax.lax.stop_gradient(dsa_ops.index_scores(q, keys, weights))


class DSACache(NamedTuple):
  """One DSA layer's decode cache: MLA's latent (c_kv [B,S,C], k_pe [B,S,R]) and the indexer's
  keys k_index [B,S,D_I]; a stack adds a leading layer axis. Slot s holds position s."""
  c_kv: jax.Array
  k_pe: jax.Array
  k_index: jax.Array

  @property
  def slots(self) -> int:
    return slots_of(self)

  def write(self, new: "DSACache", positions) -> "DSACache":
    return write_fields(self, new, positions)

  def padded(self, slots: int, offset: int = 0) -> "DSACache":
    return pad_fields(self, slots, offset)


@register_attention("dsa")
class DSAttention(MLA):
  """MLA over each query's index_topk tokens chosen by the indexer (dense MLA for sequences of
  at most index_topk tokens)."""

  drafts_with_mtp = False

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.mla.q_lora_rank is None:
      raise ValueError("DSA's indexer reads MLA's query latent: set mla.q_lora_rank "
                       "(DeepSeek-V3.2 uses 1536).")
    super().__init__(cfg, rngs=rngs)
    dsa = cfg.dsa or DSAConfig()
    self.indexer = Indexer(cfg, dsa, rngs=rngs)
    self.index_topk = dsa.index_topk
    self.impl = dsa.impl

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
    dsa, mla = cfg.dsa or DSAConfig(), cfg.mla
    keys = min(dsa.index_topk, seq_len / 2)
    attention = 2 * cfg.num_attention_heads * keys * (mla.qk_head_dim + mla.v_head_dim)
    return attention + 2 * dsa.index_n_heads * dsa.index_head_dim * seq_len / 2

  def _scores(self, x, cos, sin, keys):
    q_latent = self.q_norm(project(x, self._w("wq_a")))
    return self.indexer.scores(x, q_latent, cos, sin, keys)

  def _sparse(self, q_nope, q_pe, scores, visible, cache: DSACache) -> jax.Array:
    """MLA over each query's top-k visible entries of `cache` [B,S,...] -> [B,T,D]."""
    indices, valid = dsa_ops.top_k(scores, visible, self.index_topk)
    wkv_b = self._w("wkv_b")
    wkv_b = wkv_b.in_major() if isinstance(wkv_b, OutMajor) else wkv_b  # decoding's layout
    out = dsa_ops.sparse_latent_attention(q_nope, q_pe, cache.c_kv, cache.k_pe, indices, valid,
                                          wkv_b, self.scale)
    return project(out, self._w("wo"), 2)

  def _new_entries(self, x, cos, sin):
    """(q_nope, q_pe, these tokens' DSACache entries)."""
    q_nope, q_pe = self.project_queries(x, cos, sin)
    c_kv, k_pe = self.project_latent(x, cos, sin)
    return q_nope, q_pe, DSACache(c_kv, k_pe, self.indexer.keys(x, cos, sin))

  def attend(self, x, ctx: MLAContext, options) -> jax.Array:
    return self.attend_prefill(x, ctx, options)[0]

  def attend_prefill(self, x, ctx: MLAContext, options, lengths=None, slots=None):
    q_nope, q_pe, entries = self._new_entries(x, ctx.cos, ctx.sin)
    cache = entries if slots is None else entries.padded(slots)
    scores = self._scores(x, ctx.cos, ctx.sin, entries.k_index)
    visible = ctx.mask.dense()[:, 0]
    if self.impl == "gather":
      return self._sparse(q_nope, q_pe, scores, visible, entries), cache
    selected = dsa_ops.top_k_mask(scores, visible, self.index_topk)[:, None]
    return self._dense(q_nope, q_pe, entries.c_kv, entries.k_pe, selected), cache

  def attend_decode(self, x, ctx: MLADecodeContext, cache: DSACache, positions, options):
    """The new tokens select among the cache's visible slots and themselves; the cache is
    only read (the caller writes the update)."""
    q_nope, q_pe, new = self._new_entries(x, ctx.cos, ctx.sin)
    both = DSACache(*(jnp.concatenate([c, n.astype(c.dtype)], axis=1) for c, n in zip(cache, new)))
    scores = self._scores(x, ctx.cos, ctx.sin, both.k_index)
    visible = jnp.concatenate([ctx.cache_mask, ctx.new_mask], axis=-1)[:, 0]
    return self._sparse(q_nope, q_pe, scores, visible, both), new

  def attend_decode_in_place(self, x, ctx: MLADecodeContext, cache: DSACache, positions,
                             options):
    q_nope, q_pe, new = self._new_entries(x, ctx.cos, ctx.sin)
    cache = cache.write(new, positions)
    scores = self._scores(x, ctx.cos, ctx.sin, cache.k_index)
    return self._sparse(q_nope, q_pe, scores, ctx.slot_mask[:, 0], cache), cache

  def _dense(self, q_nope, q_pe, c_kv, k_pe, selected) -> jax.Array:
    """The reference: the selection (bool [B,1,T,S]) as a mask on MLA's expanded attention."""
    kv = project(c_kv, self._w("wkv_b"))
    k_nope, v = jnp.split(kv, [self.mla.qk_nope_head_dim], axis=-1)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    out = dot_product_attention(q, k, v, selected, self.scale)
    return project(out, self._w("wo"), 2)

