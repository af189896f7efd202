"""Multi-head Latent Attention, training / prefill path (keys and values expanded).

Queries: x -> wq_a -> q_norm -> wq_b (or x -> wq), split into a no-rope part and a rope part.
Keys/values: x -> wkv_a -> [c_kv (C) | k_pe (R)]; c_kv -> kv_norm -> wkv_b -> [k_nope | v] per
head; k_pe is one rotary key shared by all heads. The decode cache (dsjax.infer) stores only the
normalised c_kv and the rotated k_pe: C + R values per token per layer.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.kinds import AttentionKind, TokenContext, register_attention
from dsjax.model.latent_cache import LatentCache
from dsjax.model.norm import RMSNorm
from dsjax.model.param import normal_param
from dsjax.ops.attention import AttentionMask, attention, decode_masks
from dsjax.ops.latent_attention import KeySegment, latent_attention
from dsjax.ops.rope import apply_rope, rope_cos_sin
from dsjax.ops.linear import project
from dsjax.ops.slots import write_at_slots


class MLAContext(NamedTuple):
  """Rotary cos/sin [B,T,R/2] of the shared rope key's R dims and the packed-sequence mask."""
  cos: jax.Array
  sin: jax.Array
  mask: AttentionMask


class MLADecodeContext(NamedTuple):
  """Rotary cos/sin of the new tokens; which cache slots each sees (below the row's first new
  position, bool[B,1,T,S]); the new tokens among themselves (causal, [B,1,T,T]); and, for the
  in-place path, every slot up to the query's own position ([B,1,T,S])."""
  cos: jax.Array
  sin: jax.Array
  cache_mask: jax.Array
  new_mask: jax.Array
  slot_mask: jax.Array


@register_attention("mla")
class MLA(AttentionKind):
  """x [B,T,D] -> [B,T,D] with rotary cos/sin [B,T,R/2] and an AttentionMask (the training /
  prefill path, by mla.attention_impl; decoding reads dense masks of its cache slots)."""

  drafts_with_mtp = True

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"wq": (0, 1), "wq_a": (0, 1), "wq_b": (0, 1), "wkv_a": (0, 1), "wkv_b": (0, 1),
                 "wo": (0, 2)}

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    mla, d, n = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
    std, pdt = cfg.initializer_range, cfg.param_dtype
    if mla.q_lora_rank is None:
      self.wq = normal_param(rngs, (d, n, mla.qk_head_dim), ("embed", "heads", "head_dim"), std, pdt)
    else:
      self.wq_a = normal_param(rngs, (d, mla.q_lora_rank), ("embed", "q_lora"), std, pdt)
      self.q_norm = RMSNorm(mla.q_lora_rank, cfg.rms_norm_eps, "q_lora", pdt)
      self.wq_b = normal_param(rngs, (mla.q_lora_rank, n, mla.qk_head_dim),
                               ("q_lora", "heads", "head_dim"), std, pdt)
    self.wkv_a = normal_param(rngs, (d, mla.kv_lora_rank + mla.qk_rope_head_dim),
                              ("embed", "kv_lora"), std, pdt)
    self.kv_norm = RMSNorm(mla.kv_lora_rank, cfg.rms_norm_eps, "kv_lora", pdt)
    self.wkv_b = normal_param(rngs, (mla.kv_lora_rank, n, mla.qk_nope_head_dim + mla.v_head_dim),
                              ("kv_lora", "heads", "head_dim"), std, pdt)
    self.wo = normal_param(rngs, (n, mla.v_head_dim, d), ("heads", "head_dim", "embed"), std, pdt)
    self.mla = mla
    self.interleave = cfg.rope.interleave
    self.scale = cfg.softmax_scale
    self.dtype = cfg.dtype

  # ---- the attention-kind interface (dsjax.model.kinds) ----
  @classmethod
  def create(cls, cfg: ModelConfig, *, rngs: nnx.Rngs) -> "MLA":
    return cls(cfg, rngs=rngs)

  @classmethod
  def context(cls, cfg: ModelConfig, tokens: TokenContext) -> MLAContext:
    cos, sin = rope_cos_sin(tokens.positions, cfg.rope, cfg.mla.qk_rope_head_dim)
    return MLAContext(cos, sin, AttentionMask.self_attention(tokens.positions,
                                                             tokens.segment_ids))

  @classmethod
  def decode_context(cls, cfg: ModelConfig, positions, slots: int, first_slot: int = 0
                     ) -> MLADecodeContext:
    cos, sin = rope_cos_sin(positions, cfg.rope, cfg.mla.qk_rope_head_dim)
    cache_mask, new_mask = decode_masks(positions, slots, first_slot)
    slot_mask = (jnp.arange(slots) <= positions[:, :, None])[:, None]
    return MLADecodeContext(cos, sin, cache_mask, new_mask, slot_mask)

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
    mla = cfg.mla  # causal: each query sees seq_len / 2 keys on average
    return 2 * cfg.num_attention_heads * seq_len / 2 * (mla.qk_head_dim + mla.v_head_dim)

  def attend(self, x, ctx: MLAContext, options) -> jax.Array:
    return self(x, ctx.cos, ctx.sin, ctx.mask)

  def attend_prefill(self, x, ctx: MLAContext, options, lengths=None, slots=None):
    out, latent = self.prefill(x, ctx.cos, ctx.sin, ctx.mask)
    cache = LatentCache(*latent)  # the latents do not depend on the rows' lengths
    return out, cache if slots is None else cache.padded(slots)

  def attend_decode(self, x, ctx: MLADecodeContext, cache: LatentCache, positions, options):
    segment = KeySegment(cache.c_kv, cache.k_pe, ctx.cache_mask)
    out, latent = self.decode(x, ctx.cos, ctx.sin, segment, ctx.new_mask, options.attn_impl)
    return out, LatentCache(*latent)

  def attend_decode_in_place(self, x, ctx: MLADecodeContext, cache: LatentCache, positions,
                             options):
    out, latent = self.decode_in_place(x, ctx.cos, ctx.sin, cache.c_kv, cache.k_pe, positions,
                                       ctx.slot_mask, options.attn_impl)
    return out, LatentCache(*latent)

  # ---- MLA's own passes ----
  def _w(self, name: str) -> jax.Array:
    return getattr(self, name)[...].astype(self.dtype)

  def project_queries(self, x, cos, sin) -> tuple[jax.Array, jax.Array]:
    """q_nope [B,T,N,H_nope] and rotated q_pe [B,T,N,R]."""
    if self.mla.q_lora_rank is None:
      q = project(x, self._w("wq"))
    else:
      q_latent = self.q_norm(project(x, self._w("wq_a")))
      q = project(q_latent, self._w("wq_b"))
    q_nope, q_pe = jnp.split(q, [self.mla.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

  def project_latent(self, x, cos, sin) -> tuple[jax.Array, jax.Array]:
    """What the decode cache stores: normalised c_kv [B,T,C] and rotated k_pe [B,T,R]."""
    kv = project(x, self._w("wkv_a"))
    c_kv, k_pe = jnp.split(kv, [self.mla.kv_lora_rank], axis=-1)
    k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleave)[:, :, 0, :]
    return self.kv_norm(c_kv), k_pe

  def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask: AttentionMask) -> jax.Array:
    """Naive MLA attention: expand keys/values from the latent, then softmax attention by
    mla.attention_impl (q/k head dim qk_nope + qk_rope, v head dim v_head_dim)."""
    kv = project(c_kv, self._w("wkv_b"))
    k_nope, v = jnp.split(kv, [self.mla.qk_nope_head_dim], axis=-1)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    out = attention(q, k, v, mask, self.scale, self.mla.attention_impl)
    return project(out, self._w("wo"), 2)

  def __call__(self, x, cos, sin, mask: AttentionMask) -> jax.Array:
    return self.prefill(x, cos, sin, mask)[0]

  def prefill(self, x, cos, sin, mask: AttentionMask
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The training forward pass that also returns what the cache stores: (out [B,T,D],
    (c_kv [B,T,C], k_pe [B,T,R]))."""
    q_nope, q_pe = self.project_queries(x, cos, sin)
    c_kv, k_pe = self.project_latent(x, cos, sin)
    return self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask), (c_kv, k_pe)

  def decode(self, x, cos, sin, cache: KeySegment, new_mask, impl: str = "absorb"
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attention of T new tokens x [B,T,D] over the cached latents (`cache`: c_kv [B,S,C],
    k_pe [B,S,R] and which slots each query sees) and over themselves (`new_mask`
    [B,1,T,T]). Returns (out [B,T,D], the new tokens' (c_kv, k_pe)) for the caller to store."""
    q_nope, q_pe = self.project_queries(x, cos, sin)
    c_kv, k_pe = self.project_latent(x, cos, sin)
    new = KeySegment(c_kv.astype(cache.c_kv.dtype), k_pe.astype(cache.k_pe.dtype), new_mask)
    return self._attend_latent(q_nope, q_pe, (cache, new), impl), (c_kv, k_pe)

  def decode_in_place(self, x, cos, sin, c_kv, k_pe, positions, mask, impl: str = "absorb"
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Like `decode`, but the new tokens' latents are first written into the cache arrays
    c_kv [B,S,C] and k_pe [B,S,R] at slots `positions` [B,T], and attention then reads the
    cache alone (`mask` [B,1,T,S]: each query's visible slots, its own included). Returns
    (out [B,T,D], the updated (c_kv, k_pe))."""
    q_nope, q_pe = self.project_queries(x, cos, sin)
    new_c, new_pe = self.project_latent(x, cos, sin)
    c_kv = write_at_slots(c_kv, new_c, positions)
    k_pe = write_at_slots(k_pe, new_pe, positions)
    out = self._attend_latent(q_nope, q_pe, (KeySegment(c_kv, k_pe, mask),), impl)
    return out, (c_kv, k_pe)

  def _attend_latent(self, q_nope, q_pe, segments, impl: str) -> jax.Array:
    out = latent_attention(q_nope, q_pe, segments, self._w("wkv_b"), self.scale, impl)
    return project(out, self._w("wo"), 2)
