"""DeepSeek Sparse Attention (DeepSeek-V3.2): MLA whose queries attend only to the tokens a
lightning indexer picks.

The indexer (per layer): queries wq_b on MLA's normalised query latent (H_I heads of D_I),
one key per token wk(x) through a LayerNorm with bias, rotary on the first qk_rope_head_dim
dims of both, non-interleaved (rotate-half; MLA itself is interleaved) and placed first (MLA's
rope part comes last), per-head weights weights_proj(x) kept in float32. Scores and top-k are
in dsjax.ops.dsa; the selection carries no gradient (DeepSeek trains the indexer with its own
KL loss).

Exact implementations (dsa.impl; "auto": pallas on TPU/GPU, gather on CPU): "gather" reads
only each query's k selected latents, MLA in its absorbed form (dsjax.ops.dsa.sparse_latent_attention, in chunks
of queries; the index scores in blocks once [T,S] would be large, dsa.blocked_top_k);
"pallas" does the same in pallas_kernels.dsa; "dense" is the reference, the selection as a
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
from dsjax.ops.attention import (DENSE_MAX_LOGITS, AttentionMask, attention_probs,
                                 dot_product_attention)
from dsjax.ops.linear import OutMajor, project
from dsjax.ops.platform import target_platform
from dsjax.ops.rope import apply_rope


DSA_STAGES = ("dense_warmup", "sparse")
SCORE_BLOCKS = (128, 2048)  # query and key blocks of the blocked index scoring


def resolve_dsa_impl(impl: str) -> str:
  """'auto' -> the Pallas kernels on TPU / GPU, the XLA gather path on CPU."""
  if impl != "auto":
    return impl
  return "gather" if target_platform() == "cpu" else "pallas"


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
  """The lightning indexer of one DSA layer. Its inputs are detached: the LM loss reaches it
  only through the selection (no gradient) and its own KL loss reaches nothing else."""

  def __init__(self, cfg: ModelConfig, dsa: DSAConfig, *, rngs: nnx.Rngs):
    d, q, std, pdt = cfg.hidden_size, cfg.mla.q_lora_rank, cfg.initializer_range, cfg.param_dtype
    h, dim = dsa.index_n_heads, dsa.index_head_dim
    self.wq_b = normal_param(rngs, (q, h, dim), ("q_lora", "heads", "head_dim"), std, pdt)
    self.wk = normal_param(rngs, (d, dim), ("embed", "head_dim"), std, pdt)
    self.k_norm = LayerNorm(dim, 1e-6, "head_dim", pdt)
    self.weights_proj = normal_param(rngs, (d, h), ("embed", "heads"), std, "float32")
    self.rope_dim = cfg.mla.qk_rope_head_dim
    self.fp8 = dsa.index_precision == "fp8"
    self.dtype = cfg.dtype

  def _rotate(self, x, cos, sin):
    """Rotary on the first rope_dim dims, then (FP8 mode) DeepSeek's Hadamard rotation in
    bfloat16 and the e4m3 round trip."""
    rot, rest = jnp.split(x, [self.rope_dim], axis=-1)
    x = jnp.concatenate([apply_rope(rot, cos, sin, interleave=False), rest], axis=-1)
    if not self.fp8:
      return x
    return dsa_ops.fp8_round_trip(dsa_ops.hadamard(x.astype(jnp.bfloat16)))

  def keys(self, x, cos, sin) -> jax.Array:
    """The index keys [B,T,D_I] (float32) of tokens x [B,T,D]: what the decode cache keeps."""
    x = jax.lax.stop_gradient(x)
    k = self.k_norm(project(x, self.wk[...].astype(self.dtype)))
    return self._rotate(k[:, :, None, :], cos, sin)[:, :, 0, :]

  def queries(self, x, q_latent, cos, sin) -> tuple[jax.Array, jax.Array]:
    """(index queries [B,T,H_I,D_I], head weights float32 [B,T,H_I] including H_I^-0.5) of
    tokens x [B,T,D] with MLA's normalised query latent [B,T,Q]."""
    x, q_latent = jax.lax.stop_gradient((x, q_latent))
    q = self._rotate(project(q_latent, self.wq_b[...].astype(self.dtype)), cos, sin)
    heads = self.weights_proj.shape[-1]
    weights = jnp.einsum("BTD,DH->BTH", x.astype(jnp.float32), self.weights_proj[...]) * (
        heads ** -0.5)
    return q, weights


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

  drafts_with_mtp = True  # its cache is MLA's latent-slot cache plus the index keys

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

  def _queries(self, x, cos, sin):
    return self.indexer.queries(x, self.q_norm(project(x, self._w("wq_a"))), cos, sin)

  def _select(self, q, weights, keys, mask: AttentionMask | None = None, visible=None):
    """(indices, valid) [B,T,k] of each query's top-k keys: over bool visible [B,T,S], or over
    an AttentionMask, scored in blocks (dsa.blocked_top_k) once [T,S] scores would be large."""
    if visible is None and q.shape[1] * keys.shape[1] >= DENSE_MAX_LOGITS:
      return dsa_ops.blocked_top_k(q, keys, weights, dsa_ops.mask_block(mask, *SCORE_BLOCKS),
                                   self.index_topk, *SCORE_BLOCKS)
    visible = mask.dense()[:, 0] if visible is None else visible
    return dsa_ops.top_k(dsa_ops.index_scores(q, keys, weights), visible, self.index_topk)

  def _wkv_b(self):
    wkv_b = self._w("wkv_b")
    return wkv_b.in_major() if isinstance(wkv_b, OutMajor) else wkv_b  # decoding's layout

  def _sparse(self, q_nope, q_pe, indices, valid, cache: DSACache, with_target=False):
    """MLA over each query's selected entries of `cache` [B,S,...] -> [B,T,D] (and, with
    with_target, the head-mean probabilities over them, float32 [B,T,k])."""
    args = (q_nope, q_pe, cache.c_kv, cache.k_pe, indices, valid, self._wkv_b(), self.scale)
    if resolve_dsa_impl(self.impl) == "pallas":
      out = dsa_ops.kernel_attention(*args, target_platform())
      target = dsa_ops.selected_target(*args) if with_target else None
    elif with_target:
      out, target = dsa_ops.sparse_latent_attention(*args, with_target=True)
    else:
      out = dsa_ops.sparse_latent_attention(*args)
    out = project(out.astype(self.dtype), self._w("wo"), 2)
    return (out, target) if with_target else out

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
    q, weights = self._queries(x, ctx.cos, ctx.sin)
    if self.impl != "dense":
      indices, valid = self._select(q, weights, entries.k_index, ctx.mask)
      return self._sparse(q_nope, q_pe, indices, valid, entries), cache
    visible = ctx.mask.dense()[:, 0]
    scores = dsa_ops.index_scores(q, entries.k_index, weights)
    selected = dsa_ops.top_k_mask(scores, visible, self.index_topk)[:, None]
    return self._dense(q_nope, q_pe, entries.c_kv, entries.k_pe, selected), cache

  def attend_with_loss(self, x, ctx: MLAContext, options):
    """Training in DeepSeek-V3.2's stages (options.dsa_stage): (out, {"indexer_kl": the mean
    over real query tokens of KL(p_t || softmax(I_t))}), p_t the main attention's
    distribution summed over heads and L1-normalised (no gradient). "dense_warmup": dense
    attention, KL over every visible key; "sparse": the sparse attention, KL over the
    selected keys. The indexer's inputs are detached (Indexer), so the KL trains only the
    indexer and the LM loss only the rest."""
    stage = options.dsa_stage
    if stage is None:
      return self.attend(x, ctx, options), None
    if stage not in DSA_STAGES:
      raise ValueError(f"dsa_stage={stage!r}; use one of {DSA_STAGES} (or None: inference).")
    q_nope, q_pe, entries = self._new_entries(x, ctx.cos, ctx.sin)
    q, weights = self._queries(x, ctx.cos, ctx.sin)
    if stage == "dense_warmup":
      visible = ctx.mask.dense()[:, 0]
      out, probs = self._dense_with_probs(q_nope, q_pe, entries.c_kv, entries.k_pe, visible)
      target = dsa_ops.head_mean(probs, head_axis=1)
      scores = dsa_ops.index_scores(q, entries.k_index, weights)
    else:
      indices, visible = self._select(q, weights, entries.k_index, ctx.mask)
      out, target = self._sparse(q_nope, q_pe, indices, visible, entries, with_target=True)
      scores = dsa_ops.scores_at(q, entries.k_index, weights, indices)
    kl = dsa_ops.indexer_kl(target, scores, visible)
    real = (jnp.ones(kl.shape, jnp.float32) if ctx.mask.q_segment_ids is None
            else (ctx.mask.q_segment_ids > 0).astype(jnp.float32))
    return out, {"indexer_kl": jnp.sum(kl * real) / jnp.maximum(jnp.sum(real), 1.0)}

  def attend_decode(self, x, ctx: MLADecodeContext, cache: DSACache, positions, options):
    """The new tokens select among the cache's visible slots and themselves; the cache is
    only read (the caller writes the update)."""
    q_nope, q_pe, new = self._new_entries(x, ctx.cos, ctx.sin)
    both = DSACache(*(jnp.concatenate([c, n.astype(c.dtype)], axis=1) for c, n in zip(cache, new)))
    q, weights = self._queries(x, ctx.cos, ctx.sin)
    t = x.shape[1]
    cache_mask = jnp.broadcast_to(ctx.cache_mask, ctx.cache_mask.shape[:2] + (t,)
                                  + ctx.cache_mask.shape[3:])  # the same slots for every query
    visible = jnp.concatenate([cache_mask, ctx.new_mask], axis=-1)[:, 0]
    indices, valid = self._select(q, weights, both.k_index, visible=visible)
    return self._sparse(q_nope, q_pe, indices, valid, both), new

  def attend_decode_in_place(self, x, ctx: MLADecodeContext, cache: DSACache, positions,
                             options):
    q_nope, q_pe, new = self._new_entries(x, ctx.cos, ctx.sin)
    cache = cache.write(new, positions)
    q, weights = self._queries(x, ctx.cos, ctx.sin)
    indices, valid = self._select(q, weights, cache.k_index, visible=ctx.slot_mask[:, 0])
    return self._sparse(q_nope, q_pe, indices, valid, cache), cache

  def _dense_with_probs(self, q_nope, q_pe, c_kv, k_pe, visible):
    """Dense MLA over bool visible [B,T,S] -> (out [B,T,D], probabilities [B,N,T,S])."""
    q, k, v = self._expanded(q_nope, q_pe, c_kv, k_pe)
    probs = attention_probs(q, k, visible[:, None], self.scale)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)
    return project(out, self._w("wo"), 2), probs

  def _expanded(self, q_nope, q_pe, c_kv, k_pe):
    """MLA's expanded per-head q [B,T,N,Hn+R], k [B,S,N,Hn+R], v [B,S,N,Hv]."""
    kv = project(c_kv, self._w("wkv_b"))
    k_nope, v = jnp.split(kv, [self.mla.qk_nope_head_dim], axis=-1)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    return q, jnp.concatenate([k_nope, k_pe], axis=-1), v

  def _dense(self, q_nope, q_pe, c_kv, k_pe, selected) -> jax.Array:
    """The reference: the selection (bool [B,1,T,S]) as a mask on MLA's expanded attention."""
    q, k, v = self._expanded(q_nope, q_pe, c_kv, k_pe)
    out = dot_product_attention(q, k, v, selected, self.scale)
    return project(out, self._w("wo"), 2)

