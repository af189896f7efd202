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
[B,T,S] mask on MLA's expanded attention. Decoding with the indexer's key cache is not
implemented yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import DSAConfig, ModelConfig
from dsjax.model.kinds import register_attention
from dsjax.model.mla import MLA, MLAContext
from dsjax.model.param import AXES, normal_param, ones_param
from dsjax.ops import dsa as dsa_ops
from dsjax.ops.attention import dot_product_attention
from dsjax.ops.linear import project
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

  def scores(self, x, q_latent, cos, sin) -> jax.Array:
    """float32 [B,T,S] index scores of the queries of x [B,T,D] (with MLA's normalised query
    latent [B,T,Q]) against the keys of the same tokens."""
    q = self._rotate(project(q_latent, self.wq_b[...].astype(self.dtype)), cos, sin)
    k = self.k_norm(project(x, self.wk[...].astype(self.dtype)))
    k = self._rotate(k[:, :, None, :], cos, sin)[:, :, 0, :]
    heads = self.weights_proj.shape[-1]
    weights = jnp.einsum("BTD,DH->BTH", x.astype(jnp.float32), self.weights_proj[...]) * (
        heads ** -0.5)
    return dsa_ops.index_scores(q, k, weights)


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

  def _scores(self, x, ctx: MLAContext):
    """(index scores [B,T,S], no gradient: the selection is not trained by the LM loss;
    visible bool [B,T,S])."""
    q_latent = self.q_norm(project(x, self._w("wq_a")))
    scores = jax.lax.stop_gradient(self.indexer.scores(x, q_latent, ctx.cos, ctx.sin))
    return scores, ctx.mask.dense()[:, 0]

  def selection(self, x, ctx: MLAContext) -> jax.Array:
    """bool [B,1,T,S]: the keys each query attends to (visible and among its top-k)."""
    return dsa_ops.top_k_mask(*self._scores(x, ctx), self.index_topk)[:, None]

  def attend(self, x, ctx: MLAContext, options) -> jax.Array:
    q_nope, q_pe = self.project_queries(x, ctx.cos, ctx.sin)
    c_kv, k_pe = self.project_latent(x, ctx.cos, ctx.sin)
    if self.impl == "gather":
      indices, valid = dsa_ops.top_k(*self._scores(x, ctx), self.index_topk)
      out = dsa_ops.sparse_latent_attention(q_nope, q_pe, c_kv, k_pe, indices, valid,
                                            self._w("wkv_b"), self.scale)
      return project(out, self._w("wo"), 2)
    kv = project(c_kv, self._w("wkv_b"))
    k_nope, v = jnp.split(kv, [self.mla.qk_nope_head_dim], axis=-1)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    out = dot_product_attention(q, k, v, self.selection(x, ctx), self.scale)
    return project(out, self._w("wo"), 2)

  def _no_decode(self, *_, **__):
    raise ValueError("DSA decoding (the indexer's key cache) is not implemented yet; run "
                     "DSA models with forward() / train.py for now.")

  attend_prefill = attend_decode = attend_decode_in_place = _no_decode
