"""DeepSeek-V3 multi-token prediction module.

h_k = shared_head.norm(block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1,i})])))
with the main model's embedding and output head shared; h_0 is the main model's final
(normalised) hidden state, the convention of transformers' MtpModel and vLLM.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.block import Block, LayerAux
from dsjax.model.norm import RMSNorm
from dsjax.model.param import normal_param
from dsjax.model.residual import model_residual


class MTPModule(nnx.Module):
  """(embedded next tokens [B,T,D], previous hidden [B,T,D]) -> (normalised hidden [B,T,D],
  its block's LayerAux: routing of its MoE layer, attention losses). Its layer is a Block of
  cfg.mtp_spec."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, eps, pdt = cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype
    self.enorm = RMSNorm(d, eps, "embed", pdt)
    self.hnorm = RMSNorm(d, eps, "embed", pdt)
    self.eh_proj = normal_param(rngs, (2 * d, d), (None, "embed"), cfg.initializer_range, pdt)
    self.block = Block(cfg, cfg.mtp_spec, rngs=rngs)
    self.residual = model_residual(cfg, rngs=rngs)  # mHC: the block's own streams and head
    self.norm = RMSNorm(d, eps, "embed", pdt)  # DeepSeek's shared_head.norm
    self.dtype = cfg.dtype

  def __call__(self, embedded, hidden, ctx, options) -> tuple[jax.Array, LayerAux]:
    x, aux = self.block(self._mix(embedded, hidden), ctx, options)
    return self._final(x), aux

  def prefill(self, embedded, hidden, ctx, options):
    """(normalised hidden, the block's decode cache of these tokens)."""
    x, _, cache = self.block.prefill(self._mix(embedded, hidden), ctx, options)
    return self._final(x), cache

  def decode(self, embedded, hidden, ctx, cache, options):
    """(normalised hidden, the new tokens' cache update); see Block.decode."""
    x, update = self.block.decode(self._mix(embedded, hidden), ctx, cache, options)
    return self._final(x), update

  def _mix(self, embedded, hidden) -> jax.Array:
    """The block's input stream."""
    x = jnp.concatenate([self.enorm(embedded), self.hnorm(hidden)], axis=-1)
    return self.residual.expand(
        jnp.einsum("BTI,ID->BTD", x, self.eh_proj[...].astype(self.dtype)))

  def _final(self, stream) -> jax.Array:
    return self.norm(self.residual.reduce(stream))
