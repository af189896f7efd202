"""One pre-norm decoder block: x + attn(attn_norm(x)); then x + ffn(ffn_norm(x))."""

import jax
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.mla import MLA
from dsjax.model.mlp import MLP
from dsjax.model.moe import MoE
from dsjax.model.norm import RMSNorm
from dsjax.model.nsa import NSAttention
from dsjax.ops.routing import Routing


class Block(nnx.Module):
  """A dense-MLP block (use_moe=False) or a DeepSeekMoE block."""

  def __init__(self, cfg: ModelConfig, use_moe: bool, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.param_dtype)
    if cfg.attention == "nsa":
      self.attn = NSAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.nsa,
                              std=cfg.initializer_range, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    else:
      self.attn = MLA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.param_dtype)
    if use_moe:
      self.ffn = MoE(cfg, rngs=rngs)
    else:
      self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.use_moe = use_moe

  def __call__(self, x, cos, sin, mask, moe_impl: str | None = None
               ) -> tuple[jax.Array, Routing | None]:
    """`mask`: MLA's bool [B,1,T,S]; for NSA, the tokens' document starts int[B,T] in a
    packed row (dsjax.ops.nsa.document_starts), or None for one sequence per row."""
    if isinstance(self.attn, NSAttention):
      return self._ffn(x + self.attn(self.attn_norm(x), cos, sin, starts=mask), moe_impl)
    return self._ffn(x + self.attn(self.attn_norm(x), cos, sin, mask), moe_impl)

  def prefill(self, x, cos, sin, mask, moe_impl: str | None = None, lengths=None,
              slots: int | None = None):
    """(x, routing, the layer's decode cache entries: MLA's latent (c_kv, k_pe) of the T
    tokens, or NSA's decode state (an NSACache with `slots` slots, rows of `lengths`))."""
    if isinstance(self.attn, NSAttention):
      h, cache = self.attn.prefill(self.attn_norm(x), cos, sin, lengths, slots)
    else:
      h, cache = self.attn.prefill(self.attn_norm(x), cos, sin, mask)
    x, routing = self._ffn(x + h, moe_impl)
    return x, routing, cache

  def decode(self, x, cos, sin, cache, new_mask=None, attn_impl: str = "absorb",
             moe_impl: str | None = None, positions=None):
    """(x, the layer's cache update). MLA: `cache` a KeySegment, `new_mask` the new tokens'
    mask, the update their latent (c_kv, k_pe) (see MLA.decode). NSA: `cache` the layer's
    NSACache, `positions` int[B,T] the new tokens' (see NSAttention.decode)."""
    if isinstance(self.attn, NSAttention):
      h, update = self.attn.decode(self.attn_norm(x), cos, sin, cache, positions)
    else:
      h, update = self.attn.decode(self.attn_norm(x), cos, sin, cache, new_mask, attn_impl)
    return self._ffn(x + h, moe_impl)[0], update

  def decode_in_place(self, x, cos, sin, cache, positions, mask=None,
                      attn_impl: str = "absorb", moe_impl: str | None = None):
    """(x, the layer's cache after the step, the new tokens written into its buffers before
    attention reads them). MLA: `cache` (c_kv [B,S,C], k_pe [B,S,R]), `mask` [B,1,T,S] the
    visible slots (see MLA.decode_in_place). NSA: `cache` the layer's NSACache (see
    NSAttention.decode with write_first)."""
    if isinstance(self.attn, NSAttention):
      h, cache = self.attn.decode(self.attn_norm(x), cos, sin, cache, positions,
                                  write_first=True)
    else:
      h, cache = self.attn.decode_in_place(self.attn_norm(x), cos, sin, *cache, positions, mask,
                                           attn_impl)
    return self._ffn(x + h, moe_impl)[0], cache

  def _ffn(self, x, moe_impl) -> tuple[jax.Array, Routing | None]:
    h = self.ffn_norm(x)
    if self.use_moe:
      h, routing = self.ffn(h, moe_impl)
    else:
      h, routing = self.ffn(h), None
    return x + h, routing
