"""Dense SwiGLU MLP (DeepSeek names: w1 gate, w3 up, w2 down)."""

import jax
from flax import nnx

from dsjax.model.param import normal_param
from dsjax.ops.linear import project


class MLP(nnx.Module):
  """w2(silu(x w1) * (x w3)); x [B,T,D] -> [B,T,D]."""

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"w1": (0, 1), "w3": (0, 1), "w2": (0, 1)}

  def __init__(self, dim: int, hidden: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.w1 = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w3 = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w2 = normal_param(rngs, (hidden, dim), ("mlp", "embed"), std, param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    w1, w3, w2 = (w[...].astype(self.dtype) for w in (self.w1, self.w3, self.w2))
    h = jax.nn.silu(project(x, w1)) * project(x, w3)
    return project(h, w2)
