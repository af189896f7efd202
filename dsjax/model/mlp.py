"""Dense SwiGLU MLP (DeepSeek names: w1 gate, w3 up, w2 down)."""

import jax
from flax import nnx

from dsjax.model.kinds import FeedForwardKind, register_ffn
from dsjax.model.param import normal_param
from dsjax.ops.linear import project
from dsjax.ops.swiglu import swiglu


@register_ffn("dense")
class MLP(FeedForwardKind):
  """w2(silu(x w1) * (x w3)); x [B,T,D] -> [B,T,D]. As a layer's feed-forward kind ("dense"),
  of width intermediate_size and unclamped; MoE's shared experts clamp the pre-activations
  at `swiglu_limit` > 0 (DeepSeek-V4, dsjax.ops.swiglu)."""

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"w1": (0, 1), "w3": (0, 1), "w2": (0, 1)}

  def __init__(self, dim: int, hidden: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs,
               swiglu_limit: float = 0.0):
    self.w1 = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w3 = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w2 = normal_param(rngs, (hidden, dim), ("mlp", "embed"), std, param_dtype)
    self.dtype = dtype
    self.swiglu_limit = swiglu_limit

  @classmethod
  def create(cls, cfg, *, rngs: nnx.Rngs) -> "MLP":
    return cls(cfg.hidden_size, cfg.intermediate_size, std=cfg.initializer_range,
               dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def feed_forward(self, x, tokens, options) -> tuple[jax.Array, None]:
    return self(x), None

  def __call__(self, x: jax.Array) -> jax.Array:
    w1, w3, w2 = (w[...].astype(self.dtype) for w in (self.w1, self.w3, self.w2))
    h = swiglu(project(x, w1), project(x, w3), self.swiglu_limit)
    return project(h, w2)
