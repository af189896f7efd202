"""DeepSeek-V4's compressors: each window of `rate` tokens pooled into one K = V entry
(softmax-gated with a learned per-slot bias, normalised, rotated at the window's first
position), and CSA's lightning indexer over entries of its own. Math in
dsjax.ops.v4_attention.

DeepSeek's parameter names: wkv (hidden -> C), wgate (hidden -> C), ape (the per-slot gate bias
[rate, C], fp32), norm; C = dim, or 2 * dim for the overlapping windows of CSA.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig, V4AttentionConfig
from dsjax.model.norm import RMSNorm
from dsjax.model.param import AXES, normal_param
from dsjax.ops import dsa as dsa_ops
from dsjax.ops import v4_attention as v4
from dsjax.ops.linear import project
from dsjax.ops.rope import apply_rope, rope_cos_sin


def rotate_trailing(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,T,N,D] with its trailing R dims rotated (interleaved pairs) by cos/sin [B,T,R/2]."""
  r = 2 * cos.shape[-1]
  return jnp.concatenate([x[..., :-r], apply_rope(x[..., -r:], cos, sin)], axis=-1)


class Compressor(nnx.Module):
  """hidden [B,T,D_model] -> entries [B,W,dim] of the T // rate complete windows, rotated by
  v4.compress_rope at w * rate."""

  def __init__(self, cfg: ModelConfig, v4_cfg: V4AttentionConfig, dim: int, rate: int,
               overlap: bool, *, rngs: nnx.Rngs):
    width = 2 * dim if overlap else dim
    std, pdt = cfg.initializer_range, cfg.param_dtype
    self.wkv = normal_param(rngs, (cfg.hidden_size, width), ("embed", None), std, pdt)
    self.wgate = normal_param(rngs, (cfg.hidden_size, width), ("embed", None), std, pdt)
    self.ape = nnx.Param(jnp.zeros((rate, width), jnp.float32), **{AXES: (None, None)})
    self.norm = RMSNorm(dim, cfg.rms_norm_eps, None, jnp.float32)
    self.rate, self.overlap, self.rope_dim = rate, overlap, v4_cfg.qk_rope_head_dim
    self.rope = v4_cfg.compress_rope
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kv = project(x, self.wkv[...].astype(self.dtype))
    gate = project(x, self.wgate[...].astype(self.dtype))
    pooled = v4.compress_windows(kv, gate, self.ape[...], self.rate, self.overlap)
    entries = self.norm(pooled.astype(jnp.float32)).astype(x.dtype)
    positions = v4.entry_positions(entries.shape[1], self.rate, x.shape[0])
    cos, sin = rope_cos_sin(positions, self.rope, self.rope_dim)
    return rotate_trailing(entries[:, :, None, :], cos, sin)[:, :, 0, :]


class Indexer(nnx.Module):
  """CSA's lightning indexer: which compressed entries each query attends to. Queries from
  the attention's q latent (wq_b), keys from its own compressor at index_head_dim, scores
  sum_h relu(q_h . k * index_head_dim^-0.5) * weights_proj(hidden)_h * index_n_heads^-0.5
  (DSA's index_scores; relu commutes with the positive scale)."""

  def __init__(self, cfg: ModelConfig, v4_cfg: V4AttentionConfig, *, rngs: nnx.Rngs):
    i, e = v4_cfg.index_n_heads, v4_cfg.index_head_dim
    std, pdt = cfg.initializer_range, cfg.param_dtype
    self.wq_b = normal_param(rngs, (v4_cfg.q_lora_rank, i, e), ("q_lora", None, None), std, pdt)
    self.weights_proj = normal_param(rngs, (cfg.hidden_size, i), ("embed", None), std, pdt)
    self.compressor = Compressor(cfg, v4_cfg, e, v4_cfg.csa_rate, True, rngs=rngs)
    self.head_scale = i ** -0.5
    self.topk = v4_cfg.index_topk
    self.dtype = cfg.dtype

  def select(self, x, q_latent, cos, sin, visible) -> jax.Array:
    """bool[B,T,W]: each query's index_topk best entries among the `visible` ones [B,T,W];
    cos/sin [B,T,R/2] of the queries' positions (the compress rope)."""
    keys = self.compressor(x)
    q = rotate_trailing(project(q_latent, self.wq_b[...].astype(self.dtype)), cos, sin)
    weights = project(x, self.weights_proj[...].astype(self.dtype)).astype(jnp.float32)
    scores = dsa_ops.index_scores(q, keys, weights * self.head_scale)
    return dsa_ops.top_k_mask(scores, visible, self.topk)
