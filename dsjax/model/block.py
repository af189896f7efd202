"""One pre-norm decoder block: x + attn(attn_norm(x)); then x + ffn(ffn_norm(x))."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.mla import MLA
from dsjax.model.mlp import MLP
from dsjax.model.moe import MoE
from dsjax.model.norm import RMSNorm
from dsjax.ops.routing import Routing


class Block(nnx.Module):
  """A dense-MLP block (use_moe=False) or a DeepSeekMoE block."""

  def __init__(self, cfg: ModelConfig, use_moe: bool, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", cfg.param_dtype)
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
    x = x + self.attn(self.attn_norm(x), cos, sin, mask)
    h = self.ffn_norm(x)
    if self.use_moe:
      h, routing = self.ffn(h, moe_impl)
    else:
      h, routing = self.ffn(h), None
    return x + h, routing
