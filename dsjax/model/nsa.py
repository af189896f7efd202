"""Native Sparse Attention layer (Yuan et al. 2025), GQA-based as in the paper.

x -> queries (N heads, rotary) shared by three branches, each with its own keys and values
(KV heads; the paper gives every branch independent K/V so that one branch's gradients do not
shortcut another's):
  compression  keys/values of each block of l tokens (stride d) mapped to one key/value by a
               learnable MLP phi with an intra-block position embedding;
  selection    the top-n blocks of l' tokens by the compression probabilities (dsjax.ops.nsa);
  window       the last w tokens.
Per-head sigmoid gates mix the three outputs, then wo projects back to the model dim.
`prefill`/`decode` generate with a per-layer decode state (dsjax.ops.nsa_decode.NSACache).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig, NSAConfig
from dsjax.model.kinds import AttentionKind, TokenContext, register_attention
from dsjax.model.param import normal_param
from dsjax.ops import nsa as nsa_ops
from dsjax.ops import nsa_decode
from dsjax.ops.nsa_decode import NSACache
from dsjax.ops.platform import target_platform
from dsjax.ops.rope import apply_rope, rope_cos_sin
from pallas_kernels import nsa as nsa_kernels
from pallas_kernels.nsa.reference import selected_attention_gather

BRANCHES = ("compression", "selection", "window")


class Compressor(nnx.Module):
  """phi: the l tokens of a block of one KV head [l,H] -> one vector [H]:
  silu((block + position) . w1) . w2, shared by all blocks and heads."""

  def __init__(self, length: int, head_dim: int, hidden: int, std: float, param_dtype,
               rngs: nnx.Rngs):
    self.position = normal_param(rngs, (length, head_dim), (None, "head_dim"), std, param_dtype)
    self.w1 = normal_param(rngs, (length, head_dim, hidden), (None, "head_dim", "mlp"), std,
                           param_dtype)
    self.w2 = normal_param(rngs, (hidden, head_dim), ("mlp", "head_dim"), std, param_dtype)

  def __call__(self, blocks: jax.Array) -> jax.Array:
    """blocks [B,C,KV,l,H] -> [B,C,KV,H]."""
    h = jnp.einsum("BCKLH,LHF->BCKF", blocks + self.position[...].astype(blocks.dtype),
                   self.w1[...].astype(blocks.dtype))
    return jnp.einsum("BCKF,FH->BCKH", jax.nn.silu(h), self.w2[...].astype(blocks.dtype))


def resolve_select_impl(impl: str) -> str:
  """'auto' -> the XLA gather path on CPU, the Pallas kernel on TPU/GPU."""
  if impl != "auto":
    return impl
  return "gather" if target_platform() == "cpu" else "pallas"


class NSAContext(NamedTuple):
  """Rotary cos/sin [B,T,head_dim/2] (every query/key dim is rotary) and the tokens' document
  starts int[B,T] in packed rows (dsjax.ops.nsa.document_starts; None: one sequence per row);
  the three branches are causal by construction. Decoding uses (cos, sin, None)."""
  cos: jax.Array
  sin: jax.Array
  starts: jax.Array | None = None


@register_attention("nsa")
class NSAttention(AttentionKind):
  """x [B,T,D] -> [B,T,D], with rotary cos/sin [B,T,head_dim/2]; causal."""

  def __init__(self, hidden_size: int, num_heads: int, nsa: NSAConfig, *, std: float,
               dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
    if num_heads % nsa.num_kv_heads:
      raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                       f"nsa.num_kv_heads={nsa.num_kv_heads}; NSA needs whole GQA groups.")
    d, n, kv, h, hv = hidden_size, num_heads, nsa.num_kv_heads, nsa.head_dim, nsa.v_head_dim
    nb = len(BRANCHES)
    self.wq = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, param_dtype)
    self.wk = normal_param(rngs, (nb, d, kv, h), (None, "embed", "heads", "head_dim"), std,
                           param_dtype)
    self.wv = normal_param(rngs, (nb, d, kv, hv), (None, "embed", "heads", "head_dim"), std,
                           param_dtype)
    self.gate = normal_param(rngs, (d, n, nb), ("embed", "heads", None), std, param_dtype)
    self.wo = normal_param(rngs, (n, hv, d), ("heads", "head_dim", "embed"), std, param_dtype)
    length, hidden = nsa.compress_block, nsa.compress_hidden
    self.compress_k = Compressor(length, h, hidden, std, param_dtype, rngs)
    self.compress_v = Compressor(length, hv, hidden, std, param_dtype, rngs)
    self.nsa = nsa
    self.dtype = dtype

  # ---- the attention-kind interface (dsjax.model.kinds) ----
  @classmethod
  def create(cls, cfg: ModelConfig, *, rngs: nnx.Rngs) -> "NSAttention":
    return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.nsa or NSAConfig(),
               std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               rngs=rngs)

  @staticmethod
  def _nsa(cfg: ModelConfig) -> NSAConfig:
    return cfg.nsa or NSAConfig()

  @classmethod
  def context(cls, cfg: ModelConfig, tokens: TokenContext) -> NSAContext:
    cos, sin = rope_cos_sin(tokens.positions, cfg.rope, cls._nsa(cfg).head_dim)
    starts = (None if tokens.segment_ids is None
              else nsa_ops.document_starts(tokens.segment_ids))
    return NSAContext(cos, sin, starts)

  @classmethod
  def decode_context(cls, cfg: ModelConfig, positions, slots: int, first_slot: int = 0
                     ) -> NSAContext:
    return NSAContext(*rope_cos_sin(positions, cfg.rope, cls._nsa(cfg).head_dim))

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
    nsa = cls._nsa(cfg)  # compressed blocks, selected tokens and window of each query
    keys = nsa_ops.keys_per_query(seq_len, nsa).mean()
    return 2 * cfg.num_attention_heads * keys * (nsa.head_dim + nsa.v_head_dim)

  def attend(self, x, ctx: NSAContext, options) -> jax.Array:
    return self(x, ctx.cos, ctx.sin, options.select_impl, ctx.starts)

  def attend_prefill(self, x, ctx: NSAContext, options, lengths=None, slots=None):
    return self.prefill(x, ctx.cos, ctx.sin, lengths, slots)

  def attend_decode(self, x, ctx: NSAContext, cache: NSACache, positions, options):
    return self.decode(x, ctx.cos, ctx.sin, cache, positions)

  def attend_decode_in_place(self, x, ctx: NSAContext, cache: NSACache, positions, options):
    return self.decode(x, ctx.cos, ctx.sin, cache, positions, write_first=True)

  # ---- NSA's own passes ----
  def _project(self, x, cos, sin):
    """x in the compute dtype, rotated queries [B,T,N,H], and the three branches' keys
    (rotated) and values [3,B,T,KV,*] (compression, selection, window)."""
    dt = self.dtype
    x = x.astype(dt)
    q = apply_rope(jnp.einsum("BTD,DNH->BTNH", x, self.wq[...].astype(dt)), cos, sin)
    k = jnp.einsum("BTD,CDKH->CBTKH", x, self.wk[...].astype(dt))
    v = jnp.einsum("BTD,CDKH->CBTKH", x, self.wv[...].astype(dt))
    k = jnp.stack([apply_rope(k[c], cos, sin) for c in range(len(BRANCHES))]).astype(dt)
    return x, q, k, v

  def _gates(self, x) -> jax.Array:
    """Per-head sigmoid gates [B,T,N,3] (float32)."""
    return jax.nn.sigmoid(jnp.einsum("BTD,DNC->BTNC", x, self.gate[...].astype(self.dtype))
                          .astype(jnp.float32))

  def _mix(self, outs, gates) -> jax.Array:
    """Branch outputs [3,B,T,N,Hv] and gates [B,T,N,3] -> [B,T,D]."""
    mixed = jnp.einsum("CBTNH,BTNC->BTNH", outs, gates).astype(self.dtype)
    return jnp.einsum("BTNH,NHD->BTD", mixed, self.wo[...].astype(self.dtype))

  def branches(self, x, cos, sin, select_impl: str | None = None, starts=None):
    """The three branch outputs [3,B,T,N,Hv] (float32), the gates [B,T,N,3] and the selected
    block indices int32[B,T,KV,n]. starts: document starts int[B,T] of packed rows
    (dsjax.ops.nsa.document_starts; None: one sequence per row)."""
    x, q, k, v = self._project(x, cos, sin)
    return self._branches(x, q, k, v, self._compress(k[0], v[0]), select_impl, starts)

  def _branches(self, x, q, k, v, compressed, select_impl, starts=None):
    cfg = self.nsa
    scale = cfg.head_dim ** -0.5
    k_cmp, v_cmp = compressed

    def gather(q, k, v, indices, offset, starts):
      return selected_attention_gather(q, k, v, indices, cfg.select_block, scale,
                                       query_offset=offset, key_start=starts)

    platform = target_platform()

    def kernel(q, k, v, indices, key_start, key_end):
      return nsa_kernels.selected_attention(q, k, v, indices, cfg.select_block, scale,
                                            key_start=key_start, key_end=key_end,
                                            interpret=platform == "cpu",
                                            backend=None if platform == "cpu" else platform)

    # "pallas": all three branches through the kernel (nsa_ops.branch_outputs).
    use_kernel = resolve_select_impl(select_impl or cfg.select_impl) == "pallas"
    outs, indices = nsa_ops.branch_outputs(q, k[1:], v[1:], k_cmp, v_cmp, cfg, scale, gather,
                                           query_chunk=cfg.query_chunk, starts=starts,
                                           attend_selected=kernel if use_kernel else None)
    return outs, self._gates(x), indices

  def __call__(self, x, cos, sin, select_impl: str | None = None, starts=None) -> jax.Array:
    outs, gates, _ = self.branches(x, cos, sin, select_impl, starts)
    return self._mix(outs, gates)

  def prefill(self, x, cos, sin, lengths=None, slots: int | None = None
              ) -> tuple[jax.Array, NSACache]:
    """The training forward pass of a prompt x [B,T,D] at positions 0..T-1 that also returns
    the layer's decode state (dsjax.ops.nsa_decode.NSACache, [B,...]) with `slots` slots
    (default T); lengths int[B]: each row's prompt length (default T; later tokens are
    padding)."""
    x, q, k, v = self._project(x, cos, sin)
    compressed = self._compress(k[0], v[0])
    outs, gates, _ = self._branches(x, q, k, v, compressed, None)
    return self._mix(outs, gates), nsa_decode.prefill_cache(k, v, *compressed, self.nsa,
                                                            lengths, slots)

  def decode_branches(self, x, cos, sin, cache: NSACache, positions, write_first=False):
    """decode()'s parts: (branch outputs [3,B,T,N,Hv] float32, gates [B,T,N,3], selected
    blocks int32[B,T,KV,n], the layer's update; see nsa_decode.decode_branches)."""
    x, q, k, v = self._project(x, cos, sin)
    outs, indices, update = nsa_decode.decode_branches(
        q, k, v, cache, positions, self.nsa, self.nsa.head_dim ** -0.5, self.compress_k,
        self.compress_v, write_first)
    return outs, self._gates(x), indices, update

  def decode(self, x, cos, sin, cache: NSACache, positions, write_first: bool = False
             ) -> tuple[jax.Array, NSACache]:
    """T new tokens x [B,T,D] at positions int[B,T] (consecutive per row; cos/sin at those
    positions) over the layer's decode state `cache` [B,...]. Returns (out [B,T,D], the
    update: the new tokens' selection keys/values [B,T,KV,*] in k_slc/v_slc, for the caller
    to write at `positions`, and the compressed state and rings after the step). With
    `write_first`, the update is the whole state after the step, the new selection
    keys/values written into the cache's buffers before the selection reads them."""
    outs, gates, _, update = self.decode_branches(x, cos, sin, cache, positions, write_first)
    return self._mix(outs, gates), update

  def _compress(self, k, v):
    """Compressed keys/values [B,C,KV,*] (C = 0 when T is shorter than one block)."""
    length, stride = self.nsa.compress_block, self.nsa.compress_stride
    return (self.compress_k(nsa_ops.block_windows(k, length, stride)),
            self.compress_v(nsa_ops.block_windows(v, length, stride)))
